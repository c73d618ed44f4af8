"""LocalMixer (Ren, Kornblith, Liao, Hinton 2022): an MLP-Mixer built for local losses.

An image is cut into a ``patches x patches`` grid of flattened patches
``[B, P, D]``. Block 0 is a patch-wise dense layer (D -> C) and a grouped dense
layer (G groups of C/G -> C/G); every later block mixes tokens (a dense layer
over the P axis), then channels (C -> C), then groups, with a residual. Each
linear map is followed by a layer norm (no affine parameters) and a ReLU; the
sites are the layer norms' outputs, where Ren et al. add their perturbations.

Each block has a linear head on the spatial average of its (layer-normed)
output, and a readout sits on the last block's average. The objective
decides how they are trained:

* ``"global"``: one loss at the readout, ordinary backprop through every
  block (Ren et al.'s BP). The heads still learn, on ``stop_gradient``
  features, so their accuracies can be read, but send nothing back.
* ``"local"``: a ``stop_gradient`` between blocks; block k learns from its
  own head's cross-entropy, the readout from the last block's features
  (Ren et al.'s "L" variants: L-BP with backprop).
* ``"local_greedy"``: as ``"local"``, and every head's loss is replicated per
  patch and group (``[B, P, G]`` copies): copy ``(p, g)``'s derivative reaches
  only the features of patch p, group g (Ren et al.'s "LG" variants: LG-BP,
  LG-FG-W, LG-FG-A). The copies are never materialised: one cross-entropy per
  example, and a forward-mode rule giving each copy its share.

Heads and readout always get their exact local gradient (the structure table
of :func:`guessgrad.print_structure` says so). Call the model with labels
(``model.apply(params, images, labels)``) to get the dict of per-example
losses that estimators train on (:func:`local_mixer_args`); without labels it
returns the readout's logits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from guessgrad._src.base import Array
from guessgrad._src.sites import NEXT, copies, site, tap

OBJECTIVES = ("global", "local", "local_greedy")

# Ren et al.'s named configurations ("size/patch grid/groups"), with the
# blocks their MNIST and CIFAR-10 runs use; "tiny" is ours, for tests and CPUs
# (a 4x4 grid fits 28x28 digits and 32x32 CIFAR images).
LOCALMIXER_CONFIGS: dict[str, dict[str, int]] = {
    "tiny": {"blocks": 2, "channels": 64, "groups": 4, "patches": 4},
    "S/1/1": {"blocks": 1, "channels": 256, "groups": 1, "patches": 1},
    "M/1/16": {"blocks": 1, "channels": 512, "groups": 16, "patches": 1},
    "M/8/16": {"blocks": 4, "channels": 512, "groups": 16, "patches": 8},
}


def layer_norm(x: Array, axis: int = -1, eps: float = 1e-5) -> Array:
    """``(x - mean) / sqrt(var + eps)`` over ``axis``, no scale or offset (Ren et al.'s)."""
    mean = jnp.mean(x, axis=axis, keepdims=True)
    var = jnp.mean(jnp.square(x), axis=axis, keepdims=True) - jnp.square(mean)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def ren_normal(key, shape, dtype=jnp.float32):
    """N(0, s^2) with ``s = min(2 / sqrt(fan_in), 0.1)``, fan_in = ``shape[-2]`` (Ren et al.'s "kaiming")."""
    scale = min(2.0 / math.sqrt(shape[-2]), 0.1)
    return scale * jax.random.normal(key, shape, dtype)


def patchify(images: Array, patches: int) -> Array:
    """``[B, H, W, C]`` -> ``[B, patches^2, (H/patches) (W/patches) C]``, patches in row-major order."""
    batch, height, width, channels = images.shape
    if height % patches or width % patches:
        raise ValueError(
            f"A {patches}x{patches} patch grid needs the image's height and width "
            f"divisible by {patches}; got {height}x{width}."
        )
    ph, pw = height // patches, width // patches
    x = images.reshape(batch, patches, ph, patches, pw, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, patches * patches, -1)


def _cross_entropy(logits: Array, labels: Array) -> tuple[Array, Array]:
    """Per-example cross-entropy and its gradient ``softmax - onehot`` w.r.t. the logits."""
    log_probs = jax.nn.log_softmax(logits)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return -jnp.sum(onehot * log_probs, axis=-1), jnp.exp(log_probs) - onehot


@jax.custom_jvp
def replicated_cross_entropy(
    features: Array, kernel: Array, bias: Array, labels: Array
) -> Array:
    """Ren et al.'s patch- and group-wise loss: ``[B, P, G]`` copies of one cross-entropy.

    ``features`` ``[B, P, G, C/G]``; the logits are ``mean_p(features) @ kernel +
    bias`` (one head over the concatenated groups). Every copy has the value of
    the example's cross-entropy, and the mean over the copies is exactly that
    cross-entropy, value and gradient. The forward-mode derivative of copy
    ``(p, g)`` sees only patch p's group g: ``G * delta . (d features[p, g] @
    W_g)`` plus the head parameters' full share, with ``delta = softmax -
    onehot``; summed over the copies these are ``P G`` times the derivative of
    the cross-entropy. Nothing is computed per copy but one dot product.
    """
    value, _ = _replicated_value(features, kernel, bias, labels)
    return value


def _replicated_value(features, kernel, bias, labels):
    batch, patches, groups, _ = features.shape
    pooled = jnp.mean(features, axis=1).reshape(batch, -1)
    loss, delta = _cross_entropy(pooled @ kernel + bias, labels)
    return jnp.broadcast_to(loss[:, None, None], (batch, patches, groups)), (
        pooled,
        delta,
    )


@replicated_cross_entropy.defjvp
def _replicated_jvp(primals, tangents):
    features, kernel, bias, labels = primals
    d_features, d_kernel, d_bias, _ = tangents
    value, (pooled, delta) = _replicated_value(features, kernel, bias, labels)
    groups, width = features.shape[2], features.shape[3]
    pulled = jnp.einsum(
        "gck,bk->bgc", kernel.reshape(groups, width, -1), delta
    )  # W_g delta
    per_copy = groups * jnp.einsum("bpgc,bgc->bpg", d_features, pulled)
    shared = jnp.einsum("bc,ck,bk->b", pooled, d_kernel, delta) + delta @ d_bias
    return value, per_copy + shared[:, None, None]


class MixerBlock(nn.Module):
    """One LocalMixer block: ``[B, P, D]`` -> ``[B, P, G, C/G]`` (see the module docstring)."""

    channels: int
    groups: int
    first: bool
    begin_ln: bool = True
    middle_ln: bool = True
    post_linear_ln: bool = True
    head: Any = (
        NEXT  # what its last site's W^T-type guesses pull from (site's ``next``)
    )

    @nn.compact
    def __call__(self, x: Array) -> Array:
        batch, patches = x.shape[:2]
        width = self.channels // self.groups
        post = layer_norm if self.post_linear_ln else (lambda v, axis=-1: v)
        residual = x
        h = layer_norm(x) if self.begin_ln else x
        if not self.first:
            # Token mixing over the P axis, one map for every channel; its
            # layer norm runs over the channels of each patch, so an element
            # reaches every group of its patch: copy_axes=1.
            mixed = nn.Dense(patches, kernel_init=ren_normal, name="token_mixing")(
                jnp.swapaxes(h, 1, 2)
            )
            # Normalised after the swap back: a reduction over the minor axis
            # (over a strided one, XLA:CPU's reductions run many times slower).
            h = site(
                self,
                "token_mixing",
                post(jnp.swapaxes(mixed, 1, 2)),
                act=nn.relu,
                copy_axes=1,
            )
            if self.middle_ln:
                h = layer_norm(h)
        h = nn.Dense(self.channels, kernel_init=ren_normal, name="channel")(h)
        # The channel and grouped sites' elements of patch p, group g reach
        # only copy (p, g) of the replicated loss: copy_axes=2.
        h = site(self, "channel", post(h), act=nn.relu, copy_axes=2)
        h = h.reshape(batch, patches, self.groups, width)
        if self.middle_ln:
            h = layer_norm(h)
        kernel = self.param("grouped_kernel", ren_normal, (self.groups, width, width))
        bias = self.param("grouped_bias", nn.initializers.zeros, (self.groups, width))
        h = post(jnp.einsum("bpgc,gcd->bpgd", h, kernel) + bias)
        if not self.first:
            h = h + residual.reshape(h.shape)
        return site(self, "grouped", h, act=nn.relu, next=self.head, copy_axes=2)


class LocalMixer(nn.Module):
    """Ren et al.'s LocalMixer with sites, local heads and a readout.

    Attributes:
      num_classes: classes of the heads and the readout.
      patches: the patch grid's side (the image is cut into ``patches^2``).
      blocks: mixer blocks.
      channels: features per patch (C).
      groups: channel groups (G divides C); each group has its own loss copy.
      objective: ``"global"``, ``"local"`` or ``"local_greedy"`` (see the
        module docstring).
      begin_ln, middle_ln, post_linear_ln, inter_ln, last_layer_ln: Ren et
        al.'s layer-norm placements (block input; before the channel and
        grouped maps; after every linear map; before each head; before the
        readout). All on by default, as in the reference code's supervised
        configuration (its flags default them off; parameter counts do not
        depend on them: no affine parameters).

    ``__call__(images, labels=None)``: images ``[B, H, W, C]``. Without labels,
    the readout's logits ``[B, num_classes]``; with labels, the per-example
    losses: ``{"head_k": [B, P, G] (local_greedy) or [B], "readout": [B]}``.
    """

    num_classes: int
    patches: int = 4
    blocks: int = 2
    channels: int = 64
    groups: int = 4
    objective: str = "local_greedy"
    begin_ln: bool = True
    middle_ln: bool = True
    post_linear_ln: bool = True
    inter_ln: bool = True
    last_layer_ln: bool = True

    @nn.compact
    def __call__(self, images: Array, labels: Array | None = None):
        self._check()
        local = self.objective != "global"
        x = patchify(images, self.patches)
        losses: dict[str, Array] = {}
        for k in range(self.blocks):
            last = k == self.blocks - 1
            # W^T-type guesses of a block's last site pull from its own head
            # (local objectives), or from the next block / the readout (global).
            target = f"head_{k}" if local else ("readout" if last else None)
            block = MixerBlock(
                self.channels,
                self.groups,
                first=k == 0,
                begin_ln=self.begin_ln,
                middle_ln=self.middle_ln,
                post_linear_ln=self.post_linear_ln,
                head=target or NEXT,
                name=f"block_{k}",
            )
            out = block(x)  # [B, P, G, C/G]
            features = layer_norm(out) if self.inter_ln else out
            if not local:
                features = jax.lax.stop_gradient(features)
            head = nn.Dense(self.num_classes, kernel_init=ren_normal, name=f"head_{k}")
            batch = features.shape[0]
            logits = tap(self, f"head_{k}", head(features.mean(1).reshape(batch, -1)))
            if labels is not None:
                if self.objective == "local_greedy":
                    params = head.variables["params"]
                    losses[f"head_{k}"] = replicated_cross_entropy(
                        features, params["kernel"], params["bias"], labels
                    )
                else:
                    losses[f"head_{k}"] = _cross_entropy(logits, labels)[0]
            x = out.reshape(out.shape[0], out.shape[1], -1)
            if local:
                x = jax.lax.stop_gradient(x)
        pooled = x.mean(1)
        if self.last_layer_ln:
            pooled = layer_norm(pooled)
        readout = nn.Dense(
            self.num_classes, kernel_init=nn.initializers.zeros, name="readout"
        )
        logits = tap(self, "readout", readout(pooled))
        if labels is None:
            return logits
        losses["readout"] = _cross_entropy(logits, labels)[0]
        return losses

    def _check(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"Unknown objective {self.objective!r}; valid: {', '.join(OBJECTIVES)}."
            )
        for name in ("num_classes", "patches", "blocks", "channels", "groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        if self.channels % self.groups:
            raise ValueError(
                f"groups ({self.groups}) must divide channels ({self.channels})."
            )


def local_mixer(
    config: str, num_classes: int, *, objective: str = "local_greedy", **overrides: Any
) -> LocalMixer:
    """The LocalMixer of a named configuration (a key of :data:`LOCALMIXER_CONFIGS`)."""
    if config not in LOCALMIXER_CONFIGS:
        raise ValueError(
            f"Unknown LocalMixer configuration {config!r}; valid: "
            f"{', '.join(LOCALMIXER_CONFIGS)}."
        )
    fields: Mapping[str, Any] = {**LOCALMIXER_CONFIGS[config], **overrides}
    model = LocalMixer(num_classes=num_classes, objective=objective, **fields)
    model._check()
    return model


def _losses(outputs, batch):
    """The model's losses; ``local_greedy``'s ``[B, P, G]`` head losses are its copies."""
    del batch
    return {k: copies(v) if jnp.ndim(v) > 1 else v for k, v in outputs.items()}


def _images_and_labels(batch):
    return batch["image"], batch["label"]


def local_mixer_args() -> dict[str, Any]:
    """The estimator arguments a :class:`LocalMixer` trains with: ``inputs`` and ``loss_fn``.

    ``gg.get_estimator(name, mixer, **local_mixer_args())``: the model is
    called with the batch's images and labels and returns its losses.
    """
    return {"inputs": _images_and_labels, "loss_fn": _losses}
