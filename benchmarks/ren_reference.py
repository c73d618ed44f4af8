"""Ren et al.'s own LocalMixer update functions, loaded from a checkout for side-by-side timing.

Ren, Kornblith, Liao, Hinton (2022) published their JAX code as
``google-research/local_forward_gradient`` (mirrored as
``debnath-d/local_forward_gradient``). Nothing of it is copied here: point
``benchmarks.localmixer --ren=DIR`` at a checkout and this module imports its
``train_mixer_supervised.py`` as it is, with the modules it needs only for
data loading and logging (``tensorflow``, ``clu``) replaced by empty
stand-ins, then sets its flags to the benchmarked configuration. Its
``preprocess`` needs ``einops`` (``pip install einops``).

The three update functions compared (each ``(params, batch, key) -> (grads,
logs)``, followed by the same optax update as guessgrad's step):

* ``LG-BP``: ``jax.grad`` of the sum of the local greedy losses (its
  ``loss(..., stop_gradient=True, readout=True)``, the fused custom-VJP
  cross-entropy) plus the readout's loss: local backprop.
* ``LG-FG-W``: ``update_forward_grad_weights`` (weight perturbation, one JVP).
* ``LG-FG-A``: ``update_forward_grad_activations`` (activity perturbation, one
  JVP and explicit local weight gradients).
* ``BP``: ``update_backprop`` (global backprop through every block).
"""

from __future__ import annotations

import importlib
import os
import sys
import types

import jax
import jax.numpy as jnp
from absl import flags

METHODS = ("LG-BP", "LG-FG-W", "LG-FG-A", "BP")


def _stub_modules() -> None:
    """Empty stand-ins for the modules the reference imports only for data and logs."""
    if "tensorflow" not in sys.modules:
        tf = types.ModuleType("tensorflow")
        tf.config = types.SimpleNamespace(
            experimental=types.SimpleNamespace(
                list_physical_devices=lambda kind: [],
                set_memory_growth=lambda *args: None,
            )
        )
        # einops inspects any loaded tensorflow for its tensor types.
        tf.Tensor = type("Tensor", (), {})
        tf.Variable = type("Variable", (), {})
        sys.modules["tensorflow"] = tf
    if "clu" not in sys.modules:
        clu = types.ModuleType("clu")
        clu.metric_writers = types.ModuleType("clu.metric_writers")
        sys.modules["clu"] = clu
        sys.modules["clu.metric_writers"] = clu.metric_writers


def load(path: str):
    """Import ``train_mixer_supervised`` from the checkout at ``path``."""
    script = os.path.join(path, "train_mixer_supervised.py")
    if not os.path.isfile(script):
        raise FileNotFoundError(
            f"--ren={path!r}: no train_mixer_supervised.py there; give a checkout "
            "of google-research's local_forward_gradient (or its mirror "
            "debnath-d/local_forward_gradient)."
        )
    try:
        importlib.import_module("einops")
    except ImportError as e:
        raise ImportError("Ren et al.'s code needs einops: pip install einops") from e
    _stub_modules()
    sys.path.insert(0, os.path.abspath(path))
    return importlib.import_module("train_mixer_supervised")


def configure(ren, *, blocks: int, channels: int, groups: int, patches: int) -> None:
    """Set the reference's flags to a LocalMixer configuration with every layer norm on.

    guessgrad's ``LocalMixer`` defaults to the reference's supervised
    configuration: layer norms at the block input, the middle, after every
    linear map, before each head and before the readout.
    """
    values = {
        "num_blocks": blocks,
        "num_channel_mlp_units": channels,
        "num_groups": groups,
        "num_patches": patches,
        "begin_ln": True,
        "middle_ln": True,
        "post_linear_ln": True,
        "inter_ln": True,
        "last_layer_ln": True,
        "dataset": "cifar-10",
        "optimizer": "adam",  # "sgd" adds weight decay inside the update functions
        "augcolor": False,
        "fuse_cross_entropy": True,
        "modular_loss": True,
        "spatial_loss": True,
        "num_passes": 1,
    }
    for name, value in values.items():
        flags.FLAGS[name].value = value


def init_params(ren):
    """The reference's parameters for the configured network (its own initialiser)."""
    F = flags.FLAGS
    metadata = ren.get_dataset_metadata(F.dataset)
    sizes = ren.get_layer_sizes(
        metadata,
        F.num_patches,
        F.num_channel_mlp_units,
        F.num_blocks,
        F.num_groups,
        F.concat_groups,
        F.same_head,
        F.conv_mixer,
        F.kernel_size,
    )
    params = ren.init_random_params(ren.get_param_scale("kaiming", sizes), sizes)
    return jax.tree.map(jnp.asarray, params)


def update_fn(ren, method: str):
    """``(params, batch, key) -> grads`` of one of :data:`METHODS`."""
    if method == "LG-FG-W":
        return lambda p, b, k: ren.update_forward_grad_weights(p, b, k)[0]
    if method == "LG-FG-A":
        return lambda p, b, k: ren.update_forward_grad_activations(p, b, k)[0]
    if method == "BP":
        return lambda p, b, k: ren.update_backprop(p, b, k)[0]
    if method == "LG-BP":

        def local_objective(params, batch, key):
            final, local, _ = ren.loss(
                params, batch, stop_gradient=True, readout=True, key=key
            )
            return final + sum(jnp.sum(x) for x in local)

        return jax.grad(local_objective)
    raise ValueError(
        f"Unknown reference method {method!r}; valid: {', '.join(METHODS)}."
    )
