"""A Vision Transformer with prompt tokens, for visual prompt tuning with guessed gradients.

:class:`ViT` is the ViT of Dosovitskiy et al. (2021) as the original JAX
release writes it (google-research/vision_transformer): a patch embedding (a
convolution with kernel = stride = patch size), a class token, learned
position embeddings, pre-norm encoder blocks (LayerNorm -> multi-head
self-attention -> residual; LayerNorm -> MLP with GELU -> residual), a final
LayerNorm and a linear head on the class token. Its parameter names and
shapes are the release's, so its ``.npz`` checkpoints load 1:1
(:func:`load_vit_npz`).

Prompt tokens (Jia et al. 2022, "Visual Prompt Tuning") are extra
parameters ``prompts``:

* ``prompt_depth="shallow"``: ``[num_prompts, hidden]``, inserted right
  after the class token into the first block's input, after the position
  embeddings were added (prompts have none).
* ``prompt_depth="deep"``: ``[num_layers, num_prompts, hidden]``, a fresh set
  per block: block ``i`` reads ``prompts[i]`` in the prompt positions,
  replacing what block ``i - 1`` wrote there.

``num_prompts=0`` is a plain ViT (no ``prompts`` parameter).

Sites (the values whose per-example gradients the estimators guess):

* ``Transformer/prompts`` (deep: ``Transformer/prompts_{i}``, one per
  block): the prompt tokens as block ``i`` reads them, ``[B, num_prompts,
  hidden]`` (the parameter broadcast over the batch). With only the prompts
  trainable this is the only site guessed: the prompts' estimate is the
  batch sum of the guessed gradient at these tokens, and one forward-mode
  pass through the frozen network gives it (no activation is kept for a
  backward pass). Its W^T guess pulls back from the first block's ``query``
  (through the layer norm and the query projection).
* ``.../MultiHeadDotProductAttention_1/{query,key,value}``: the attention
  projections ``[B, T, heads, head_dim]``, no activation after them. This
  is where each block's input, prompt tokens included, enters the attention:
  a prompt changes the class token only through the keys and values it
  contributes, and the W^T-type guesses pull back from the next site (the
  block's MLP) through the attention and its output projection.
* ``.../MlpBlock_3/hidden``: the MLP's hidden pre-activation ``[B, T,
  mlp_dim]`` (``act=gelu``, the tanh approximation, as in the release), the
  dense layer of the paper's setting: the activation derivative ``D`` of the
  W^T guess ``D W^T eps`` is GELU's, and mixing mixes its post-activations.
* ``logits``: the head's output ``[B, num_classes]`` (terminal).

The attention's output projection, the layer norms and the patch embedding
are not sites: their parameters are updated from the next site's estimate
by the local VJP (the structure table of :func:`guessgrad.print_structure`
says which). Layers are unrolled in a Python loop (sites inside ``nn.scan``
are refused).

With only the prompts trainable (``trainable=prompt_mask``), every estimator
leaves the backbone and the head exactly at zero. With the head trainable
too (``prompt_mask(..., head=True)``) the ``logits`` site is guessed as well.

Checkpoints: :func:`load_vit_npz` reads the release's ``.npz`` files (and
:func:`save_vit_npz`'s, the same flat format).

Inputs are images ``[B, H, W, C]``; the public checkpoints were trained on
pixels scaled to ``[-1, 1]``. Dropout is left out (the model is
deterministic).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from guessgrad._src.base import Array
from guessgrad._src.sites import site

PROMPT_DEPTHS = ("shallow", "deep")

# Named sizes: the public ones ("size/patch") and "tiny", ours, for tests and
# CPUs (patch 4: a 7x7 grid on 28x28 digits, 8x8 on 32x32 images).
VIT_CONFIGS: dict[str, dict[str, int]] = {
    "tiny": {
        "patch_size": 4,
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 2,
        "mlp_dim": 64,
    },
    "Ti/16": {
        "patch_size": 16,
        "hidden_size": 192,
        "num_layers": 12,
        "num_heads": 3,
        "mlp_dim": 768,
    },
    "S/16": {
        "patch_size": 16,
        "hidden_size": 384,
        "num_layers": 12,
        "num_heads": 6,
        "mlp_dim": 1536,
    },
    "B/16": {
        "patch_size": 16,
        "hidden_size": 768,
        "num_layers": 12,
        "num_heads": 12,
        "mlp_dim": 3072,
    },
    "B/32": {
        "patch_size": 32,
        "hidden_size": 768,
        "num_layers": 12,
        "num_heads": 12,
        "mlp_dim": 3072,
    },
}

# Where the public checkpoints of each named size come from.
_PUBLIC_CHECKPOINTS = {
    "Ti/16": (
        "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
        "gs://vit_models/augreg/",
    ),
    "S/16": (
        "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
        "gs://vit_models/augreg/",
    ),
    "B/16": ("ViT-B_16.npz", "gs://vit_models/imagenet21k/"),
    "B/32": ("ViT-B_32.npz", "gs://vit_models/imagenet21k/"),
}

_XAVIER = nn.initializers.xavier_uniform()


def _symmetric_uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class MlpBlock(nn.Module):
    """Dense -> GELU -> Dense; the hidden pre-activation is the site ``hidden``."""

    mlp_dim: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        bias_init = nn.initializers.normal(stddev=1e-6)
        h = nn.Dense(self.mlp_dim, kernel_init=_XAVIER, bias_init=bias_init)(x)
        h = site(self, "hidden", h, act=nn.gelu)
        return nn.Dense(x.shape[-1], kernel_init=_XAVIER, bias_init=bias_init)(h)


class SelfAttention(nn.Module):
    """Multi-head dot-product self-attention with the parameters of flax's ``MultiHeadDotProductAttention``.

    ``query``/``key``/``value`` kernels ``[hidden, heads, head_dim]``, ``out``
    kernel ``[heads, head_dim, hidden]``; the three projections are sites.
    """

    num_heads: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        hidden = x.shape[-1]
        if hidden % self.num_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must divide hidden_size ({hidden})."
            )
        head_dim = hidden // self.num_heads

        def project(name):
            dense = nn.DenseGeneral(
                (self.num_heads, head_dim), kernel_init=_XAVIER, name=name
            )
            return site(self, name, dense(x))

        q, k, v = project("query"), project("key"), project("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(
            q.dtype
        )
        attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v)
        out = nn.DenseGeneral(hidden, axis=(-2, -1), kernel_init=_XAVIER, name="out")
        return out(attended)


class EncoderBlock(nn.Module):
    """Pre-norm block: ``x + attention(LN(x))``, then ``y + mlp(LN(y))``."""

    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = nn.LayerNorm(name="LayerNorm_0")(x)
        x = x + SelfAttention(self.num_heads, name="MultiHeadDotProductAttention_1")(y)
        y = nn.LayerNorm(name="LayerNorm_2")(x)
        return x + MlpBlock(self.mlp_dim, name="MlpBlock_3")(y)


class Encoder(nn.Module):
    """Position embeddings, prompts, the blocks (unrolled) and the final LayerNorm."""

    num_layers: int
    num_heads: int
    mlp_dim: int
    prompt_depth: str = "shallow"

    @nn.compact
    def __call__(self, x: Array, prompts: Array | None) -> Array:
        x = x + _PosEmbed(name="posembed_input")(x)
        deep = self.prompt_depth == "deep"
        for i in range(self.num_layers):
            if prompts is not None and (i == 0 or deep):
                # [class token, prompts, patches]: block 0 gets the prompts
                # inserted; with deep prompts, every later block gets its own
                # set in place of the previous block's prompt outputs.
                own = prompts[i] if deep else prompts
                patches = x[:, 1 + (own.shape[0] if i else 0) :]
                own = jnp.broadcast_to(own.astype(x.dtype), (x.shape[0],) + own.shape)
                own = site(self, f"prompts_{i}" if deep else "prompts", own)
                x = jnp.concatenate([x[:, :1], own, patches], axis=1)
            x = EncoderBlock(self.num_heads, self.mlp_dim, name=f"encoderblock_{i}")(x)
        return nn.LayerNorm(name="encoder_norm")(x)


class _PosEmbed(nn.Module):
    """The learned position embeddings ``[1, 1 + grid, hidden]`` (class token first)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return self.param(
            "pos_embedding",
            nn.initializers.normal(stddev=0.02),
            (1,) + x.shape[1:],
        ).astype(x.dtype)


class ViT(nn.Module):
    """A Vision Transformer with optional prompt tokens (see the module docstring).

    Attributes:
      num_classes: outputs of the linear head on the class token.
      patch_size: side of the square patches (the embedding's kernel and
        stride); the image's height and width must be multiples of it.
      hidden_size: token width.
      num_layers: encoder blocks.
      num_heads: attention heads (they divide ``hidden_size``).
      mlp_dim: the MLP's hidden width.
      num_prompts: prompt tokens (0: none, a plain ViT).
      prompt_depth: ``"shallow"`` (one set, before the first block) or
        ``"deep"`` (a fresh set per block).

    Parameters (the original release's names): ``embedding/{kernel,bias}``,
    ``cls``, ``Transformer/posembed_input/pos_embedding``,
    ``Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1/
    {query,key,value,out}, LayerNorm_2, MlpBlock_3/{Dense_0,Dense_1}}``,
    ``Transformer/encoder_norm``, ``head``; and ours, ``prompts``.

    The head is initialised like any dense layer (LeCun normal), not at zero
    as in the release: a frozen zero head would pass no gradient to the
    prompts.

    ``__call__(images)``: ``[B, H, W, C]`` -> logits ``[B, num_classes]``.
    """

    num_classes: int
    patch_size: int = 4
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    mlp_dim: int = 64
    num_prompts: int = 0
    prompt_depth: str = "shallow"

    @nn.compact
    def __call__(self, images: Array) -> Array:
        self._check()
        if images.ndim != 4:
            raise ValueError(
                f"ViT takes images [B, H, W, C]; got shape {tuple(images.shape)}."
            )
        height, width = images.shape[1:3]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"Patches of {self.patch_size}x{self.patch_size} need the image's "
                f"height and width divisible by {self.patch_size}; got {height}x{width}."
            )
        p = self.patch_size
        x = nn.Conv(
            self.hidden_size, (p, p), strides=(p, p), padding="VALID", name="embedding"
        )(images)
        batch = x.shape[0]
        x = x.reshape(batch, -1, self.hidden_size)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden_size))
        x = jnp.concatenate(
            [jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, self.hidden_size)), x], 1
        )
        prompts = None
        if self.num_prompts:
            shape = (self.num_prompts, self.hidden_size)
            if self.prompt_depth == "deep":
                shape = (self.num_layers,) + shape
            # Jia et al.'s initialisation: uniform, Xavier's bound for a patch
            # embedding of 3-channel patches.
            bound = float(np.sqrt(6.0 / (3 * p * p + self.hidden_size)))
            prompts = self.param("prompts", _symmetric_uniform(bound), shape)
        x = Encoder(
            self.num_layers,
            self.num_heads,
            self.mlp_dim,
            self.prompt_depth,
            name="Transformer",
        )(x, prompts)
        logits = nn.Dense(self.num_classes, name="head")(x[:, 0])
        return site(self, "logits", logits)

    def _check(self) -> None:
        for name in (
            "num_classes",
            "patch_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "mlp_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        if (
            not isinstance(self.num_prompts, int)
            or isinstance(self.num_prompts, bool)
            or self.num_prompts < 0
        ):
            raise ValueError(
                f"num_prompts must be a non-negative integer; got {self.num_prompts!r}."
            )
        if self.prompt_depth not in PROMPT_DEPTHS:
            raise ValueError(
                f"Unknown prompt_depth {self.prompt_depth!r}; valid: "
                f"{', '.join(PROMPT_DEPTHS)}."
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must divide hidden_size "
                f"({self.hidden_size})."
            )


def vit(
    config: str,
    num_classes: int,
    *,
    num_prompts: int = 0,
    prompt_depth: str = "shallow",
    **overrides: Any,
) -> ViT:
    """The :class:`ViT` of a named size (a key of :data:`VIT_CONFIGS`), fields overridable."""
    if config not in VIT_CONFIGS:
        raise ValueError(
            f"Unknown ViT configuration {config!r}; valid: {', '.join(VIT_CONFIGS)}."
        )
    fields: Mapping[str, Any] = {**VIT_CONFIGS[config], **overrides}
    model = ViT(
        num_classes=num_classes,
        num_prompts=num_prompts,
        prompt_depth=prompt_depth,
        **fields,
    )
    model._check()
    return model


def _key_name(entry: Any) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def prompt_mask(params: Any, *, head: bool = False) -> Any:
    """A tree of bools shaped like ``params``: True at the prompt tokens (and the head if ``head``).

    Pass it as an estimator's ``trainable`` (and to ``optax.masked``): only
    the prompts learn, the backbone stays frozen. ``head=True`` also trains
    the linear head, as Jia et al. do (``functools.partial(prompt_mask,
    head=True)``).
    """
    names = {"prompts", "head"} if head else {"prompts"}

    def is_trainable(path, _):
        return any(_key_name(entry) in names for entry in path)

    return jax.tree_util.tree_map_with_path(is_trainable, params)


# --- checkpoints in the original release's .npz format ---------------------------------


def _inner(params: Any) -> Mapping[str, Any]:
    """The ``params`` collection of a variables dict (``model.init``'s output), or ``params`` itself."""
    if isinstance(params, Mapping) and "params" in params:
        return params["params"]
    return params


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, key + "/"))
        else:
            flat[key] = value
    return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *scopes, leaf = key.split("/")
        node = tree
        for scope in scopes:
            node = node.setdefault(scope, {})
        node[leaf] = value
    return tree


def save_vit_npz(path: str | os.PathLike, params: Any) -> None:
    """Writes ``params`` as the original release's ``.npz``: one array per leaf, keys joined with ``/``.

    ``params`` is ``model.init``'s output (or its ``"params"`` collection);
    keys look like ``Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel``.
    The prompts and the head are written too (``prompts``, ``head/...``).
    """
    flat = {k: np.asarray(v) for k, v in _flatten(_inner(params)).items()}
    with open(path, "wb") as f:
        np.savez(f, **flat)


def _public_name(model: ViT) -> tuple[str, str]:
    for name, (filename, where) in _PUBLIC_CHECKPOINTS.items():
        config = VIT_CONFIGS[name]
        if all(getattr(model, k) == v for k, v in config.items()):
            return (
                f"ViT-{name}",
                f"{filename} from the public ViT release: {where}{filename}",
            )
    return (
        "ViT",
        (
            "a ViT .npz of the model's size from the public ViT release "
            "(e.g. ViT-B_16.npz: gs://vit_models/imagenet21k/ViT-B_16.npz; "
            "more sizes under gs://vit_models/augreg/)"
        ),
    )


def _resize_pos_embedding(found: np.ndarray, shape: tuple[int, ...], key: str):
    """Bilinear resize of the position-embedding grid; the class token's row is kept."""
    old, new = found.shape[1] - 1, shape[1] - 1
    side_old, side_new = math.isqrt(old), math.isqrt(new)
    if (
        found.ndim != 3
        or found.shape[0] != 1
        or found.shape[2] != shape[2]
        or side_old**2 != old
        or side_new**2 != new
    ):
        raise ValueError(
            f"Checkpoint parameter {key!r} has shape {tuple(found.shape)}; expected "
            f"{tuple(shape)} (position embeddings of a square grid can be resized; "
            "these cannot)."
        )
    grid = jnp.asarray(found[0, 1:], jnp.float32).reshape(side_old, side_old, -1)
    grid = jax.image.resize(grid, (side_new, side_new, grid.shape[-1]), "bilinear")
    resized = np.concatenate([found[0, :1], np.asarray(grid).reshape(new, -1)], 0)
    return resized[None].astype(found.dtype)


def load_vit_npz(
    path: str | os.PathLike,
    model: ViT,
    params: Any = None,
    *,
    with_prompts: bool = False,
) -> Any:
    """Loads a checkpoint of the original JAX ViT release (or :func:`save_vit_npz`) into ``params``.

    Args:
      path: the ``.npz`` file (flat keys joined with ``/``, e.g.
        ``Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel``).
      model: the :class:`ViT` the parameters are for.
      params: the model's initialised variables (``model.init``'s output, or
        its ``"params"`` collection), at the image size it will see. None:
        initialised here (key 0) at the checkpoint's own resolution (its
        position grid times the patch size, its embedding's channels).
      with_prompts: also load ``prompts`` when the file has them (a model
        saved after prompt tuning); by default the model's own prompts are
        kept (public checkpoints have none).

    Returns the same structure as ``params``, with every backbone leaf from
    the checkpoint and:

    * the model's own prompts (unless ``with_prompts``);
    * the model's own fresh head when the checkpoint has none, or its head
      has another number of classes, or sits on a ``pre_logits`` layer (ImageNet-21k
      checkpoints: ``pre_logits/...`` is ignored, the model has none, and the
      head read its output);
    * position embeddings resized when the patch grid differs (a different
      image size): bilinear on the square grid, the class token's row kept.

    Raises:
      FileNotFoundError: no file at ``path`` (the message names the public
        checkpoint expected for the model's size and where it comes from).
      ValueError: a leaf of another shape (naming the parameter, the expected
        and the found shape), keys the model needs that the file lacks, or
        keys the model has no place for (each listed).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        _, expected = _public_name(model)
        raise FileNotFoundError(
            f"No ViT checkpoint at {path!r}: expected {expected} "
            f"(also over HTTPS at https://storage.googleapis.com/vit_models/...)."
        )
    with np.load(path, allow_pickle=False) as npz:
        found = {k: npz[k] for k in npz.files}
    if params is None:
        params = _init_for_checkpoint(model, found, path)
    variables = params
    own = _flatten(_inner(params))

    keep = {k for k in own if k == "prompts" or k.startswith("prompts/")}
    if with_prompts:
        keep = {k for k in keep if k not in found}
    pre_logits = any(k.startswith("pre_logits/") for k in found)
    heads = [k for k in own if k.startswith("head/")]
    if (
        pre_logits
        or not any(k.startswith("head/") for k in found)
        or any(
            k in found and found[k].shape[-1:] != np.shape(own[k])[-1:] for k in heads
        )
    ):
        keep.update(heads)

    missing = sorted(k for k in own if k not in keep and k not in found)
    if missing:
        raise ValueError(
            f"The checkpoint {path!r} lacks {len(missing)} parameter(s) the model "
            f"needs: {', '.join(missing)}."
        )
    unexpected = sorted(
        k
        for k in found
        if k not in own
        and not k.startswith("pre_logits/")
        and not (k == "prompts" or k.startswith("prompts/"))
    )
    if unexpected:
        raise ValueError(
            f"The checkpoint {path!r} has {len(unexpected)} parameter(s) the model "
            f"has no place for (another architecture or depth?): "
            f"{', '.join(unexpected)}."
        )

    loaded = {}
    for key, value in own.items():
        if key in keep:
            loaded[key] = value
            continue
        shape = tuple(np.shape(value))
        array = found[key]
        if key == "Transformer/posembed_input/pos_embedding" and array.shape != shape:
            array = _resize_pos_embedding(array, shape, key)
        if tuple(array.shape) != shape:
            raise ValueError(
                f"Checkpoint parameter {key!r} has shape {tuple(array.shape)}; the "
                f"model expects {shape}."
            )
        loaded[key] = jnp.asarray(array, dtype=jnp.result_type(value))
    tree = _unflatten(loaded)
    if isinstance(variables, Mapping) and "params" in variables:
        return {**variables, "params": tree}
    return tree


def _init_for_checkpoint(model: ViT, found: Mapping[str, np.ndarray], path: str):
    """``model.init`` at the image size and channels the checkpoint was trained at."""
    pos = found.get("Transformer/posembed_input/pos_embedding")
    kernel = found.get("embedding/kernel")
    if pos is None or kernel is None or pos.ndim != 3 or kernel.ndim != 4:
        raise ValueError(
            f"The checkpoint {path!r} has no usable 'embedding/kernel' and "
            "'Transformer/posembed_input/pos_embedding' to size the model by; "
            "pass params=model.init(...)."
        )
    side = math.isqrt(pos.shape[1] - 1)
    size = side * model.patch_size
    images = jnp.zeros((1, size, size, kernel.shape[2]), jnp.float32)
    return model.init(jax.random.key(0), images)
