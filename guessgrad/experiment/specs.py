"""The architectures a run trains: a :class:`ModelSpec` per kind, chosen by name.

A new architecture is one more :class:`ModelSpec` subclass: a frozen
dataclass of its settings that says how to build the Flax module, whether it
takes flattened images, which arguments the estimator needs to train it
(``loss_fn``, ``inputs``, ``trainable``), and how to name it; registered in
:data:`MODEL_SPECS` under its ``kind``, a config file picks it by that name
(``config.model.kind``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

import guessgrad as gg


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """An architecture to train: its settings, and how the runner builds and trains it.

    Subclasses are frozen dataclasses of JSON-able settings, registered in
    :data:`MODEL_SPECS` under their ``kind``. Class attributes:

    * ``kind``: the architecture's name (``"mlp"``, ``"localmixer"``), stored
      in config.json next to the settings;
    * ``flatten``: whether the model takes images flattened to ``[B, H*W*C]``
      (else ``[B, H, W, C]``).
    """

    kind: ClassVar[str] = ""
    flatten: ClassVar[bool] = False

    def build(self, num_classes: int):
        """The Flax module. ``apply(params, images)`` must return logits ``[B, num_classes]``."""
        raise NotImplementedError

    def estimator_args(self) -> dict[str, Any]:
        """Keyword arguments for ``gg.build_estimator`` besides the options (``loss_fn``, ``inputs``, ``trainable``)."""
        trainable = self.trainable()
        return {} if trainable is None else {"trainable": trainable}

    def option_defaults(self, method: str) -> dict[str, Any]:
        """Estimator options this model trains ``method`` with unless the config sets them."""
        del method
        return {}

    def trainable(self):
        """None (every parameter learns) or ``params -> tree of bools``: the leaves that learn.

        The estimator gets it as ``trainable`` and the optimiser is masked to
        it (``optax.masked``), so frozen leaves never move, weight decay
        included.
        """
        return

    def init_params(self, model, key, images):
        """The initial variables: ``model.init`` (a spec with a pretrained backbone loads it here)."""
        return model.init(key, images)

    @property
    def label(self) -> str:
        """A human-readable name, e.g. ``"MLP 3x128"``, for titles and results."""
        raise NotImplementedError

    @property
    def slug(self) -> str:
        """A short file-name-safe name for default work directories."""
        raise NotImplementedError

    def validate(self, image_shape: Sequence[int] | None = None) -> None:
        """Raises a ValueError naming what is wrong and the valid choices.

        With ``image_shape`` (``(H, W, C)``), also checks that the
        architecture takes images of that shape.
        """

    def to_json(self) -> dict[str, Any]:
        """``{"kind": ..., **settings}``, as config.json stores it."""
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class MLPSpec(ModelSpec):
    """``gg.models.MLP``: ``depth`` linear layers (``width`` hidden units) with ReLU between."""

    kind: ClassVar[str] = "mlp"
    flatten: ClassVar[bool] = True

    depth: int = 3
    width: int = 128

    def build(self, num_classes: int):
        return gg.models.MLP(
            depth=self.depth, width=self.width, num_classes=num_classes
        )

    @property
    def label(self) -> str:
        return f"MLP {self.depth}x{self.width}"

    @property
    def slug(self) -> str:
        return f"{self.depth}x{self.width}"

    def validate(self, image_shape: Sequence[int] | None = None) -> None:
        check_positive("depth", self.depth)
        check_positive("width", self.width)


# LocalMixer objectives (Ren et al. 2022): "global", one loss at the readout
# (backprop through it is their BP); "local", per-block losses with a
# stop_gradient between blocks (L-BP with backprop); "local_greedy", per-block
# losses replicated per patch and channel group (LG-*).
LOCALMIXER_OBJECTIVES: tuple[str, ...] = tuple(gg.models.OBJECTIVES)


@dataclasses.dataclass(frozen=True)
class LocalMixerSpec(ModelSpec):
    """``gg.models.local_mixer(config, num_classes, objective=...)``: Ren et al.'s LocalMixer.

    Attributes:
      config: a named configuration, a key of ``gg.models.LOCALMIXER_CONFIGS``.
      objective: one of :data:`LOCALMIXER_OBJECTIVES`.
    """

    kind: ClassVar[str] = "localmixer"
    flatten: ClassVar[bool] = False

    config: str = "tiny"
    objective: str = "local_greedy"

    def build(self, num_classes: int):
        return gg.models.local_mixer(self.config, num_classes, objective=self.objective)

    def estimator_args(self) -> dict[str, Any]:
        return dict(gg.models.local_mixer_args())

    def option_defaults(self, method: str) -> dict[str, Any]:
        # Heads and readout train with their exact local gradient (Ren et al.):
        # weight perturbation perturbs only the blocks (LG-FG-W).
        return (
            {"exact_heads": True}
            if "exact_heads" in gg.estimator_options(method)
            else {}
        )

    @property
    def label(self) -> str:
        return f"LocalMixer {self.config} ({self.objective})"

    @property
    def slug(self) -> str:
        return f"localmixer-{self.config.replace('/', '-')}-{self.objective}"

    def validate(self, image_shape: Sequence[int] | None = None) -> None:
        configs = gg.models.LOCALMIXER_CONFIGS
        if self.config not in configs:
            raise ValueError(
                f"Unknown LocalMixer configuration {self.config!r}; valid names: "
                f"{', '.join(configs)}."
            )
        if self.objective not in LOCALMIXER_OBJECTIVES:
            raise ValueError(
                f"Unknown LocalMixer objective {self.objective!r}; valid names: "
                f"{', '.join(LOCALMIXER_OBJECTIVES)}."
            )
        if image_shape is not None:
            patches = configs[self.config]["patches"]
            height, width = image_shape[:2]
            if height % patches or width % patches:
                fits = [
                    n
                    for n, c in configs.items()
                    if not (height % c["patches"] or width % c["patches"])
                ]
                raise ValueError(
                    f"LocalMixer {self.config} cuts images into a {patches}x{patches} patch grid, "
                    f"which does not divide {height}x{width} images; configurations that fit: "
                    f"{', '.join(fits) or 'none'}."
                )


@dataclasses.dataclass(frozen=True)
class ViTSpec(ModelSpec):
    """``gg.models.vit(config, num_classes, ...)``: a ViT, optionally prompt-tuned on a frozen backbone.

    Attributes:
      config: a named size, a key of ``gg.models.VIT_CONFIGS``.
      num_prompts: prompt tokens (0: none).
      prompt_depth: ``"shallow"`` (prepended to the first layer's input) or
        ``"deep"`` (a fresh set per layer).
      backbone: a checkpoint in the public ViT ``.npz`` format
        (``gg.models.load_vit_npz``); with it, only the prompts learn (and
        the head with ``train_head``), the backbone frozen. None: every
        parameter learns from a random initialisation (pretraining).
      train_head: with a backbone, also train the linear head (Jia et al.'s
        VPT); needed when the task's classes differ from the checkpoint's.
    """

    kind: ClassVar[str] = "vit"
    flatten: ClassVar[bool] = False

    config: str = "tiny"
    num_prompts: int = 4
    prompt_depth: str = "shallow"
    backbone: str | None = None
    train_head: bool = False

    def build(self, num_classes: int):
        return gg.models.vit(
            self.config,
            num_classes,
            num_prompts=self.num_prompts,
            prompt_depth=self.prompt_depth,
        )

    def trainable(self):
        if self.backbone is None:
            return None
        return functools.partial(gg.models.prompt_mask, head=self.train_head)

    def init_params(self, model, key, images):
        params = model.init(key, images)
        if self.backbone is None:
            return params
        head = _npz_head_classes(self.backbone)
        if head is not None and head != model.num_classes and not self.train_head:
            raise ValueError(
                f"The backbone {self.backbone} has a {head}-class head and the task "
                f"{model.num_classes} classes: its head cannot be kept, and a fresh one "
                "must learn (pass --train_head / ViTSpec(train_head=True))."
            )
        return gg.models.load_vit_npz(self.backbone, model, params)

    @property
    def label(self) -> str:
        prompts = (
            f", {self.num_prompts} {self.prompt_depth} prompts"
            if self.num_prompts
            else ""
        )
        frozen = " on a frozen backbone" if self.backbone else ""
        return f"ViT {self.config}{prompts}{frozen}"

    @property
    def slug(self) -> str:
        tuned = "-prompts" if self.backbone else ""
        return f"vit-{self.config.replace('/', '-')}-{self.num_prompts}{self.prompt_depth[0]}{tuned}"

    def validate(self, image_shape: Sequence[int] | None = None) -> None:
        configs = gg.models.VIT_CONFIGS
        if self.config not in configs:
            raise ValueError(
                f"Unknown ViT configuration {self.config!r}; valid names: {', '.join(configs)}."
            )
        if not isinstance(self.num_prompts, int) or self.num_prompts < 0:
            raise ValueError(
                f"num_prompts must be a non-negative integer; got {self.num_prompts!r}."
            )
        if self.prompt_depth not in ("shallow", "deep"):
            raise ValueError(
                f"Unknown prompt_depth {self.prompt_depth!r}; valid: shallow, deep."
            )
        if self.backbone is not None and not os.path.exists(self.backbone):
            raise FileNotFoundError(
                f"No backbone checkpoint at {self.backbone}: expected a .npz in the "
                "public ViT format (e.g. ViT-B_16.npz from the original release, "
                "gs://vit_models/imagenet21k/ViT-B_16.npz, or one written by "
                "guessgrad.models.save_vit_npz)."
            )
        if self.backbone is not None and not (self.num_prompts or self.train_head):
            raise ValueError(
                "A frozen backbone with no prompts and no head to train has nothing to "
                "learn: give num_prompts > 0 or train_head."
            )
        if image_shape is not None:
            patch = configs[self.config]["patch_size"]
            if image_shape[0] % patch or image_shape[1] % patch:
                raise ValueError(
                    f"ViT {self.config} cuts {patch}x{patch} patches, which do not tile "
                    f"{image_shape[0]}x{image_shape[1]} images."
                )


def _npz_head_classes(path: str) -> int | None:
    """The number of classes of a ``.npz`` checkpoint's head (None: it has none)."""
    with np.load(path) as saved:
        return saved["head/kernel"].shape[-1] if "head/kernel" in saved.files else None


MODEL_SPECS: dict[str, type[ModelSpec]] = {
    "mlp": MLPSpec,
    "localmixer": LocalMixerSpec,
    "vit": ViTSpec,
}


def model_spec_from_json(record: Mapping[str, Any]) -> ModelSpec:
    """The inverse of :meth:`ModelSpec.to_json`."""
    settings = dict(record)
    kind = settings.pop("kind", None)
    if kind not in MODEL_SPECS:
        raise ValueError(
            f"Unknown model kind {kind!r}; valid kinds: {', '.join(MODEL_SPECS)}."
        )
    spec = MODEL_SPECS[kind]
    fields = [f.name for f in dataclasses.fields(spec)]
    unknown = [name for name in settings if name not in fields]
    if unknown:
        raise ValueError(
            f"The {kind} model has no setting(s) {', '.join(unknown)}; its "
            f"settings: {', '.join(fields)}."
        )
    return spec(**settings)


def check_positive(name: str, value: Any) -> None:
    """Raises a ValueError unless ``value`` is a positive int (not a bool)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
