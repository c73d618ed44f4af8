"""Models with sites: the MLP of the paper, and chains of site maps.

Any Flax module with sites marked inside (:func:`guessgrad.site`) works
with every estimator. A :class:`Chain` is the special case of a sequence of
*site maps* ``s_l = f_l(theta_l, x_l)`` (a dense layer, a grouped dense
layer, a linear map followed by a layer norm, ...) with an elementwise
activation between consecutive sites, ``x_{l+1} = sigma(s_l)``; the last site
is the logits. Its sites are marked after each map, and because each site
declares its own map, a chain also supports lean mode (which recomputes the
forward site by site).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from guessgrad._src.base import Array
from guessgrad._src.sites import site


def fan_in_uniform(fan_in: int) -> Callable:
    """Initialiser drawing from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Linear(nn.Module):
    """Dense layer ``x @ kernel + bias`` with PyTorch-default initialisation.

    Kernel and bias are both drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the
    initialisation the paper's numbers come from.
    """

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        fan_in = x.shape[-1]
        kernel = self.param("kernel", fan_in_uniform(fan_in), (fan_in, self.features))
        y = x @ kernel
        if self.use_bias:
            y = y + self.param("bias", fan_in_uniform(fan_in), (self.features,))
        return y


class Chain(nn.Module):
    """Base class: a chain of site maps with an activation between sites.

    Subclasses implement :meth:`layer_modules` (decorated with ``nn.nowrap``),
    returning freshly constructed modules, each with a unique ``name``: their
    parameters live under ``params[name]``. Override :meth:`preprocess` to
    change how an image batch becomes the first layer's input (default: flatten)
    and :meth:`activation` for another elementwise nonlinearity (default: ReLU).
    """

    @nn.nowrap
    def layer_modules(self) -> Sequence[nn.Module]:
        raise NotImplementedError(
            f"{type(self).__name__} must implement layer_modules()."
        )

    @nn.nowrap
    def preprocess(self, image: Array) -> Array:
        """[B, ...] images -> [B, features] inputs of the first site map."""
        return image.reshape(image.shape[0], -1)

    @nn.nowrap
    def activation(self, site: Array) -> Array:
        """The elementwise nonlinearity between sites."""
        return nn.relu(site)

    @nn.compact
    def __call__(self, image: Array) -> Array:
        x = self.preprocess(image)
        modules = self.layer_modules()
        for index, module in enumerate(modules):
            last = index == len(modules) - 1
            # Site l is the output of map l, named after it; the activation follows.
            x = site(
                self, module.name, module(x), act=None if last else self.activation
            )
        return x


class MLP(Chain):
    """Multi-layer perceptron: ``depth`` linear layers with ReLU between.

    ``depth`` counts linear layers: ``MLP(depth=3, width=128, num_classes=10)``
    has two hidden layers of width 128 and an output layer of width 10.
    """

    depth: int = 3
    width: int = 128
    num_classes: int = 10

    @nn.nowrap
    def layer_modules(self) -> Sequence[nn.Module]:
        if self.depth < 1 or self.width < 1 or self.num_classes < 1:
            raise ValueError(
                f"MLP needs depth >= 1, width >= 1 and num_classes >= 1; got "
                f"depth={self.depth}, width={self.width}, num_classes={self.num_classes}."
            )
        widths = [self.width] * (self.depth - 1) + [self.num_classes]
        return tuple(Linear(w, name=f"dense_{i}") for i, w in enumerate(widths))
