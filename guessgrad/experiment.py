"""One training loop for every experiment: the logic behind ``python -m experiments.*``.

An experiment is a model (a :class:`ModelSpec`: :class:`MLPSpec`,
:class:`LocalMixerSpec`) trained with a gradient estimator on an image
classification data set. :func:`run` trains one method and writes everything
it measured to a work directory:

* ``config.json``: the full configuration (the model spec with its ``kind``),
  with the estimator's resolved options;
* ``metrics.jsonl``: one JSON object per line, ``{"kind": "train", ...}`` with
  the mean batch loss every ``log_every`` steps and ``{"kind": "eval", ...}``
  with train and test loss and accuracy at each evaluation;
* ``results.json``: final accuracies and losses, steps, wall time, devices;
* ``curves.png``: loss and accuracy against the step;
* ``checkpoints/``: Orbax checkpoints of the :class:`guessgrad.TrainState`,
  saved at each evaluation (the last ``keep_checkpoints`` kept) and on Ctrl-C.

A run is a pure function of its configuration: the batch of step ``t`` is cut
from ``(data key, t)``, the estimator's key is ``fold_in(key, t)`` and the
augmentation's (``augment=True``) is split from it, so resuming from a
checkpoint gives exactly the parameters an uninterrupted run would have.
:func:`compare` runs several methods on the same data and seed and tabulates
them. Nothing here needs absl.

A new architecture is one more :class:`ModelSpec` subclass: a frozen
dataclass of its settings that says how to build the Flax module, whether it
takes flattened images, which arguments the estimator needs to train it
(``loss_fn``, ``inputs``), and how to name it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Self

import jax
import jax.numpy as jnp
import numpy as np
import optax

import guessgrad as gg
from guessgrad import data, parallel

# Optimisers by name (the command line's --optimizer).
OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "adamw": lambda lr: optax.adamw(lr, weight_decay=1e-4),
    "sgd": optax.sgd,
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "stable_adamw": gg.stable_adamw,
}


def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    """Optimiser ``name`` (adamw, sgd, momentum = SGD with momentum 0.9, stable_adamw)."""
    if name not in OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}."
        )
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive; got {learning_rate!r}.")
    return OPTIMIZERS[name](learning_rate)


DEFAULT_METHOD = "mixing"
DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_EPOCHS = 300

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CURVES_FILE = "curves.png"
CHECKPOINT_DIR = "checkpoints"
COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"

# Config fields that, with the estimator's resolved options, define what a run computes.
_IDENTITY_FIELDS = (
    "method",
    "dataset",
    "model",
    "transform",
    "augment",
    "optimizer",
    "learning_rate",
    "batch_size",
    "seed",
)
# Longest wait between progress-bar refreshes (each one is a host sync).
_REFRESH_SECONDS = 1.0

# A run whose training loss (on the evaluated train subset) exceeds
# BLOWUP_FACTOR times its step-0 value at BLOWUP_EVALS evaluations in a row,
# or at the last one, stops as diverged even though every number is finite.
BLOWUP_FACTOR = 3.0
BLOWUP_EVALS = 2


# --- architectures ------------------------------------------------------------------


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


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")


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
        _check_positive("depth", self.depth)
        _check_positive("width", self.width)


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
    return MODEL_SPECS[kind](**settings)


# --- configuration -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything one training run depends on.

    Attributes:
      method: estimator name, a key of ``guessgrad.ESTIMATORS``.
      dataset: a name in ``guessgrad.data.DATASETS``.
      data_dir: tfds data directory (unused for the packaged ``mnist10k``).
      model: the architecture, a :class:`ModelSpec` (default a 3x128 MLP).
      optimizer: a key of :data:`OPTIMIZERS`.
      learning_rate: the optimiser's step size.
      batch_size: training examples per step.
      epochs: training length in passes over the training set, unless ``steps``.
      steps: training length in steps; overrides ``epochs`` when set.
      eval_every: steps between evaluations (and checkpoints); the last step
        is always evaluated.
      log_every: steps between ``"train"`` lines (mean batch loss) in metrics.jsonl.
      train_eval_examples: train accuracy is measured on the first this many
        training examples.
      eval_batch_size: examples per evaluation batch.
      transform: a shift of every image (a name in ``guessgrad.data.TRANSFORMS``,
        e.g. ``"invert"``), the labels kept: a second task on the same data.
      augment: random crops (padding 4) and horizontal flips of the training
        images, on device inside the step (``guessgrad.data.augment``). Flips
        are wrong for digits: leave it off for them.
      options: keyword options of the estimator (e.g. ``{"num_guesses": 4}``);
        options left out take the estimator's defaults.
      seed: seeds initialisation, data order, augmentation and guesses.
      workdir: output directory; default
        ``runs/<dataset>-<method>-<model slug>-seed<seed>``.
      resume: continue from the workdir's last checkpoint. Without it a workdir
        holding checkpoints is refused.
      stop_after: stop (with a checkpoint) once this many steps are done,
        as if interrupted; for testing resumption.
      keep_checkpoints: checkpoints kept in the workdir.
      progress: show a progress bar.
    """

    method: str = DEFAULT_METHOD
    dataset: str = data.DEFAULT_DATASET
    data_dir: str | None = None
    model: ModelSpec = MLPSpec()
    optimizer: str = "adamw"
    learning_rate: float = DEFAULT_LEARNING_RATE
    batch_size: int = 128
    epochs: int = DEFAULT_EPOCHS
    steps: int | None = None
    eval_every: int = 1000
    log_every: int = 100
    train_eval_examples: int = 2000
    eval_batch_size: int = 1000
    transform: str | None = None
    augment: bool = False
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    workdir: str | None = None
    resume: bool = False
    stop_after: int | None = None
    keep_checkpoints: int = 2
    progress: bool = True


class WorkdirError(RuntimeError):
    """The work directory cannot be used as asked; ``str()`` says why and what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the run stopped at that step (``str()`` says why)."""


LOCK_FILE = ".lock"


class _WorkdirLock:
    """One run per workdir: an exclusive ``flock`` on ``<workdir>/.lock``.

    The file names the holder (host, pid, start time) for the message a
    second run gets. The kernel releases the lock when the holder exits in
    any way (SIGKILL and the OOM killer included), so a lock left by a dead
    run is stale and simply taken over, with a line saying so. On a clean
    exit the file is emptied.
    """

    def __init__(self, workdir: str, label: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.label = label
        self.file = None

    def __enter__(self) -> Self:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise WorkdirError(
                f"{os.path.dirname(self.path)} is in use by another run ({holder}); "
                "wait for it to finish, or choose another --workdir."
            ) from None
        handle.seek(0)
        earlier = handle.read().strip()
        if earlier:
            print(
                f"[{self.label}] taking over the workdir lock of an earlier run that "
                f"is no longer running ({earlier})"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(
            f"pid {os.getpid()} on {platform.node()}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        handle.flush()
        self.file = handle
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self.file is None:
            return
        try:
            self.file.seek(0)
            self.file.truncate()
        except OSError:
            pass  # an unwritable workdir: the lock still goes with the process
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
        self.file = None


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped the run at a step boundary.

    ``step`` is the step whose checkpoint was saved in ``workdir``, or None
    when the signal came before training started (nothing was saved; a
    resumed run's earlier checkpoints are untouched). ``exit_code`` is the
    shell's convention, 128 + the signal number: 130 for Ctrl-C, 143 for
    SIGTERM.
    """

    def __init__(
        self,
        step: int | None,
        total_steps: int | None,
        workdir: str,
        signum: int = signal.SIGINT,
    ):
        super().__init__(step, total_steps, workdir, signum)
        self.step = step
        self.total_steps = total_steps
        self.workdir = workdir
        self.signum = int(signum)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _Signals:
    """SIGINT and SIGTERM while a run is in progress: noted, acted on at the next boundary.

    The handler only records the first signal (and says so on stderr), so no
    exception lands inside Orbax, JAX or a half-written file; later signals
    are ignored until the run has saved and stopped. Outside the main thread
    (where Python allows no handlers) Ctrl-C stays a KeyboardInterrupt.
    """

    def __init__(self, label: str):
        self.label = label
        self.signum: int | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        # os.write, not print: a handler may run while the main thread is printing.
        os.write(
            2,
            f"\n[{self.label}] {signal.Signals(signum).name}: stopping at the end of "
            "this step (a checkpoint follows; further signals are ignored)\n".encode(),
        )

    def check_before_training(self, workdir: str) -> None:
        if self.signum is not None:
            raise Interrupted(None, None, workdir, self.signum)


def default_workdir(config: Config, label: str | None = None) -> str:
    """``runs/<dataset>-<label or method>-<model slug>-seed<seed>``."""
    name = f"{config.dataset}-{label or config.method}-{config.model.slug}-seed{config.seed}"
    return os.path.join("runs", name)


def parse_methods(text: str) -> list[str]:
    """``"all"`` or a comma-separated list of estimator names -> the names, checked."""
    if text.strip() == "all":
        return list(gg.ESTIMATORS)
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise ValueError(
            f'Give "all" or a comma-separated list of methods; valid names: {", ".join(gg.ESTIMATORS)}.'
        )
    for method in methods:
        gg.estimator_options(method)  # raises a ValueError listing the valid names
    duplicates = sorted({m for m in methods if methods.count(m) > 1})
    if duplicates:
        raise ValueError(f"Methods listed twice: {', '.join(duplicates)}.")
    return methods


def options_for(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of ``options`` that estimator ``method`` takes."""
    valid = gg.estimator_options(method)
    return {name: value for name, value in options.items() if name in valid}


def validate(config: Config) -> None:
    """Raises a ValueError saying what is wrong with ``config`` and what is valid.

    (A TypeError for a ``model`` that is no ModelSpec or a non-bool ``augment``.)
    Checks the method, optimizer and data set names against their registries,
    the model spec (its settings, and that it takes the data set's images),
    the estimator options (names and values), every size and count, the
    learning rate (finite, positive), the batch size against the training
    set, and that the workdir can be one (not a file, writable): all before
    any data is loaded.
    """
    for name in (
        "batch_size",
        "epochs",
        "eval_every",
        "log_every",
        "keep_checkpoints",
        "train_eval_examples",
        "eval_batch_size",
    ):
        _check_positive(name, getattr(config, name))
    if config.steps is not None:
        _check_positive("steps", config.steps)
    if config.stop_after is not None:
        _check_positive("stop_after", config.stop_after)
    if not isinstance(config.augment, bool):
        raise TypeError(f"augment must be True or False; got {config.augment!r}.")
    if config.dataset not in data.DATASETS:
        raise ValueError(
            f"Unknown data set {config.dataset!r}; valid names: {', '.join(data.DATASETS)}."
        )
    rate = config.learning_rate
    if (
        isinstance(rate, bool)
        or not isinstance(rate, (int, float))
        or not math.isfinite(rate)
        or rate <= 0
    ):
        raise ValueError(
            f"learning_rate must be a finite number > 0; got {config.learning_rate!r}."
        )
    num_train = data.num_train_examples(config.dataset)
    if config.batch_size > num_train:
        raise ValueError(
            f"batch_size {config.batch_size} is larger than {config.dataset}'s "
            f"training set ({num_train} examples); use --batch_size={num_train} or less."
        )
    check_workdir(config.workdir or default_workdir(config))
    if config.transform is not None and config.transform not in data.TRANSFORMS:
        raise ValueError(
            f"Unknown transform {config.transform!r}; valid names: {', '.join(data.TRANSFORMS)}."
        )
    if not isinstance(config.model, ModelSpec):
        raise TypeError(
            f"model must be a ModelSpec ({', '.join(c.__name__ for c in MODEL_SPECS.values())}); "
            f"got {config.model!r}."
        )
    config.model.validate(data.image_shape(config.dataset))
    make_optimizer(config.optimizer, config.learning_rate)
    # Builds (without running) the estimator: checks the name, option names and
    # option values, and options the model cannot take.
    try:
        _estimator(config, data.num_classes(config.dataset))
    except TypeError as err:
        raise ValueError(str(err)) from err


def _estimator(config: Config, num_classes: int):
    """The estimator of ``config`` for its model, ``(params, batch, key) -> (grads, metrics)``."""
    spec = config.model
    return gg.get_estimator(
        config.method,
        spec.build(num_classes),
        **spec.estimator_args(),
        **dict(config.options),
        has_aux=True,
    )


def total_steps(config: Config, steps_per_epoch: int) -> int:
    """``config.steps`` if set, else ``config.epochs * steps_per_epoch``."""
    return config.steps if config.steps is not None else config.epochs * steps_per_epoch


def device_info() -> dict[str, Any]:
    """The JAX backend and devices this process computes on."""
    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind,
        "jax_version": jax.__version__,
        "num_devices": len(devices),
        "num_processes": jax.process_count(),
        "host": platform.node(),
    }


# --- evaluation ------------------------------------------------------------------


@functools.cache
def make_eval_fn(model):
    """Jitted ``(params, batch) -> [loss sum, correct count, example count]`` over the batch's mask.

    Cached per model (Flax modules compare by their fields), so runs of the same
    architecture share one compiled evaluation.
    """

    @jax.jit
    def eval_sums(params, batch):
        logits = model.apply(params, batch["image"])
        mask = batch["mask"].astype(jnp.float32)
        losses = gg.per_example_loss(logits, batch["label"])
        correct = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
        return jnp.stack(
            [jnp.sum(losses * mask), jnp.sum(correct * mask), jnp.sum(mask)]
        )

    return eval_sums


def evaluate(eval_fn, params, loader: data.Loader) -> dict[str, float]:
    """Mean loss and accuracy over every example of ``loader`` (one host sync)."""
    sums = sum(eval_fn(params, batch) for batch in loader.eval_batches())
    loss, correct, count = (float(x) for x in jax.device_get(sums))
    return {"loss": loss / count, "accuracy": correct / count}


# --- metrics file, checkpoints, plots ----------------------------------------------


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (empty if it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_metrics(path: str, last_step: int) -> None:
    """Drops records after ``last_step``: a resumed run writes them again."""
    records = [r for r in read_metrics(path) if r["step"] <= last_step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(_json_line(r) for r in records)


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (strict JSON has neither)."""
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _json_line(record: Mapping[str, Any]) -> str:
    return json.dumps(json_safe(record), allow_nan=False) + "\n"


def _write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as strict JSON (non-finite numbers as null), atomically."""
    text = json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n"
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(partial, path)


def _checkpoint_manager(directory: str, keep: int):
    import orbax.checkpoint as ocp

    # Orbax removes the temporary folders of saves that never finished.
    # Saves are synchronous: one that fails stops the run at that step rather
    # than surfacing later from a background thread while training goes on.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(directory, options=options)


def _to_saveable(state: gg.TrainState) -> gg.TrainState:
    # Orbax stores arrays, not typed PRNG keys: save the key's raw data.
    return state._replace(key=jax.random.key_data(state.key))


def _save_checkpoint(manager, state: gg.TrainState, meta: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    step = int(meta["step"])
    if step in manager.all_steps():
        return
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(_to_saveable(state)), meta=ocp.args.JsonSave(meta)
    )
    try:
        manager.save(step, args=args)
        manager.wait_until_finished()
    except Exception as err:  # any failure to write: stop here
        saved = [s for s in manager.all_steps() if s != step]
        kept = (
            f"the checkpoint of step {max(saved)} is kept"
            if saved
            else "no earlier checkpoint exists"
        )
        raise CheckpointError(
            f"Could not write the checkpoint of step {step} in {manager.directory} "
            f"({_first_line(err)}); training stopped there and "
            f"{kept}. Free disk space or restore write access, then resume with --resume."
        ) from err


def _close_quietly(manager) -> None:
    """Closes a checkpoint manager whose last save failed (its error is already raised)."""
    with contextlib.suppress(Exception):
        manager.close()


def _restore_one(manager, step: int, template: gg.TrainState):
    import orbax.checkpoint as ocp

    saveable = _to_saveable(template)
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(saveable), meta=ocp.args.JsonRestore()
    )
    restored = manager.restore(step, args=args)
    state = jax.tree.unflatten(
        jax.tree.structure(saveable), jax.tree.leaves(restored.state)
    )
    meta = dict(restored.meta)
    if int(meta["step"]) != step or int(state.step) != step:
        raise ValueError(f"it holds step {int(state.step)}, not {step}")
    return state._replace(key=jax.random.wrap_key_data(state.key)), meta


def _first_line(err: BaseException) -> str:
    """``Type: message`` on one line, at most 200 characters (reprs in messages can be long)."""
    text = " ".join(str(err).split())
    if len(text) > 200:
        text = text[:199] + "…"
    return f"{type(err).__name__}: {text}"


def _restore_checkpoint(
    manager, template: gg.TrainState, workdir: str, label: str
) -> tuple[gg.TrainState, dict[str, Any]]:
    """The latest checkpoint that restores; an unreadable one is moved aside with a warning.

    A checkpoint that fails to restore (a truncated array file, an empty
    ``_METADATA``) is moved to ``<workdir>/corrupt-checkpoint-<step>`` (kept
    for inspection, out of the way of the step's next save) and the one
    before it is tried. If none restores, a :class:`WorkdirError` says which
    folder to delete.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
        try:
            return _restore_one(manager, step, template)
        except Exception as err:  # noqa: BLE001  (any failure: try the one before)
            failures.append(f"step {step} ({_first_line(err)})")
            source = os.path.join(manager.directory, str(step))
            aside = os.path.join(workdir, f"corrupt-checkpoint-{step}")
            if os.path.exists(aside):
                shutil.rmtree(aside)
            shutil.move(str(source), aside)
            manager.reload()
            print(
                f"[{label}] warning: the checkpoint of step {step} could not be read "
                f"({_first_line(err)}); moved it to {aside}"
                + (", trying the one before" if step != steps[-1] else ""),
                file=sys.stderr,
            )
    raise WorkdirError(
        f"No checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)} could be restored: "
        f"{'; '.join(failures)}. They were moved to {workdir}/corrupt-checkpoint-*.\n"
        f"Delete {workdir} (or run without --resume in another --workdir) to start over."
    )


def load_params(workdir: str, step: int | None = None) -> tuple[Any, int]:
    """``(params, step)`` of a checkpoint in ``workdir`` (default: the latest)."""
    import orbax.checkpoint as ocp

    steps = checkpoint_steps(workdir)
    if not steps or (step is not None and step not in steps):
        raise FileNotFoundError(
            f"No checkpoint {'' if step is None else f'of step {step} '}in {workdir}; saved steps: {steps or 'none'}."
        )
    step = steps[-1] if step is None else step
    manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    )
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
        )
    finally:
        manager.close()
    return restored.state["params"], step


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the checkpoints saved in ``workdir`` (empty if none)."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(name)
        for name in os.listdir(directory)
        if name.isdigit() and os.path.isdir(os.path.join(directory, name))
    )


def plot_curves(
    records: Sequence[Mapping[str, Any]], path: str, title: str = ""
) -> None:
    """Writes loss and accuracy against the step (from metrics.jsonl records) as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, acc_ax = figure.subplots(1, 2)
    if train:
        loss_ax.plot(
            [r["step"] for r in train],
            [r["loss"] for r in train],
            lw=1,
            alpha=0.6,
            label="batch loss",
        )
    steps = [r["step"] for r in evals]
    for split, style in (("train", "-o"), ("test", "-s")):
        loss_ax.plot(
            steps,
            [r[f"{split}_loss"] for r in evals],
            style,
            ms=3,
            label=f"{split} loss",
        )
        acc_ax.plot(
            steps,
            [100 * r[f"{split}_accuracy"] for r in evals],
            style,
            ms=3,
            label=f"{split} accuracy",
        )
    loss_ax.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="loss")
    acc_ax.set(xlabel="step", ylabel="accuracy (%)", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=100)


# --- tables ----------------------------------------------------------------------

_COLUMNS = (
    ("method", "method", "{}"),
    ("train acc", "train_accuracy", "{:.2%}"),
    ("test acc", "test_accuracy", "{:.2%}"),
    ("train loss", "train_loss", "{:.4g}"),
    ("test loss", "test_loss", "{:.4g}"),
    ("steps", "steps", "{}"),
    ("wall time", "wall_time_s", "{:.1f} s"),
    ("examples/s", "examples_per_s", "{:,.0f}"),
)


def _cells(rows: Iterable[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = [title for title, _, _ in _COLUMNS]
    body = [
        [
            "-" if row.get(key) is None else fmt.format(row[key])
            for _, key, fmt in _COLUMNS
        ]
        for row in rows
    ]
    return header, body


def format_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """Plain-text table of results (method, accuracies, losses, steps, wall time)."""
    header, body = _cells(rows)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])


def markdown_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """The same table in Markdown."""
    header, body = _cells(rows)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


# --- training --------------------------------------------------------------------


def check_workdir(path: str) -> None:
    """Raises a ValueError when ``path`` cannot be a work directory (a file, not writable)."""
    path = os.path.abspath(path)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is a file" if existing == path else f"lies under a file, {existing}"
        raise ValueError(f"The work directory {path} {what}; choose another --workdir.")
    try:  # os.access says yes to root on read-only mounts: try it
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ValueError(
            f"The work directory {path} cannot be written ({existing}: "
            f"{err.strerror or err}); choose another --workdir."
        ) from None


def _prepare_workdir(config: Config, workdir: str, num_steps: int) -> list[int]:
    """Checks the workdir against ``config.resume``; returns the saved checkpoint steps.

    Temporary folders of a save that never finished are Orbax's to remove
    (when the run's checkpoint manager starts); they are not checkpoints.
    """
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    steps = checkpoint_steps(workdir)
    if steps and not config.resume:
        raise WorkdirError(
            f"{workdir} already holds checkpoints of an earlier run (steps {', '.join(map(str, steps))}).\n"
            "Pass --resume (Config.resume=True) to continue that run, or choose another --workdir."
        )
    if steps:
        saved_record = _load_json(os.path.join(workdir, CONFIG_FILE))
        saved = _identity(
            _upgrade(saved_record.get("config", {})),
            saved_record.get("estimator_options", {}),
        )
        mine = _identity(config_record(config), resolved_options(config))
        differ = [f for f in mine if f in saved and saved[f] != mine[f]]
        if differ:
            details = "; ".join(
                f"{f}: saved {saved[f]!r}, now {mine[f]!r}" for f in differ
            )
            raise WorkdirError(
                f"Cannot resume the run in {workdir} with a different configuration ({details}).\n"
                "Resume with the saved settings, or choose another --workdir."
            )
        if steps[-1] > num_steps:
            raise WorkdirError(
                f"The run in {workdir} has trained {steps[-1]} steps; this configuration "
                f"asks for {num_steps}. Resume with at least {steps[-1]} steps "
                "(--steps or --epochs), or choose another --workdir."
            )
        return steps
    results = os.path.join(workdir, RESULTS_FILE)
    if os.path.isfile(results) and os.path.getsize(results) > 0:
        raise WorkdirError(
            f"{workdir} holds the {RESULTS_FILE} of an earlier run but no "
            "checkpoint to resume from; choose another --workdir, or delete it to start over."
        )
    metrics = os.path.join(workdir, METRICS_FILE)
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        # A run killed before its first checkpoint: nothing to resume, nothing to keep.
        print(
            f"[{config.method}] {workdir} holds the {METRICS_FILE} of a run that "
            "stopped before its first checkpoint; starting over from step 0"
        )
    if os.path.isdir(directory):
        # No finished checkpoint: at most Orbax's temporary folders of an aborted save.
        shutil.rmtree(directory)
    return steps


def _identity(
    config: Mapping[str, Any], estimator_options: Mapping[str, Any]
) -> dict[str, Any]:
    """What a run computes: a resumed run must agree on all of it."""
    return {f: config.get(f) for f in _IDENTITY_FIELDS} | {
        "estimator_options": _jsonable(dict(estimator_options))
    }


def _upgrade(record: Mapping[str, Any]) -> dict[str, Any]:
    """A config.json record written before model specs: ``depth``/``width`` were an MLP's."""
    record = dict(record)
    if "model" not in record and "depth" in record and "width" in record:
        record["model"] = MLPSpec(record.pop("depth"), record.pop("width")).to_json()
    record.setdefault("augment", False)
    options = dict(record.get("options", {}))
    if record.get("method") == "wperp_ns" and "power_iters" in options:
        # Before 0.2 one option meant the Krylov steps or the filter's degree.
        renamed = "degree" if options.get("variant") == "vector" else "krylov_steps"
        options[renamed] = options.pop("power_iters")
        options.pop("ns_steps", None)
        record["options"] = options
    return record


def config_record(config: Config) -> dict[str, Any]:
    """``config`` as JSON-able data, as config.json stores it (the model spec with its kind)."""
    record = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    record["model"] = config.model.to_json()
    record["options"] = dict(config.options)
    return _jsonable(record)


def resolved_options(config: Config) -> dict[str, Any]:
    """Every option of the estimator: ``config.options`` over the estimator's defaults."""
    return {**gg.estimator_options(config.method), **dict(config.options)}


def _load_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def run(config: Config) -> dict[str, Any]:
    """Trains ``config.method`` on ``config.dataset`` and writes the workdir; returns the results.

    Returns the dict written to results.json (accuracies and losses on the
    train subset and the test set after the last step, steps, wall time,
    devices), with ``"status": "done"``. With ``config.stop_after`` before
    the end, stops with a checkpoint and returns ``{"status": "stopped",
    "step": ...}`` without writing results.json.

    A step whose loss or update is not finite ends the run: nothing after the
    last checkpoint is saved, and results.json gets ``"status": "diverged"``
    with the step, the last good checkpoint and the likely cause (also
    returned). Ctrl-C (SIGINT) and SIGTERM stop at the end of the current
    step, after its metrics line and a checkpoint.

    Raises:
      ValueError: an invalid configuration (see :func:`validate`).
      WorkdirError: another run holds the workdir (its lock file names it);
        the workdir holds checkpoints and ``resume`` is False;
        ``resume`` is True and the saved run's configuration differs, or asks
        for fewer steps than were trained; it holds results but no
        checkpoint; or no checkpoint in it can be read.
      guessgrad.data.DataMissingError: the data set is not prepared.
      Interrupted: a signal stopped the run (``step`` None: before training).
    """
    validate(config)
    with _Signals(config.method) as signals:
        parallel.maybe_initialize_distributed()
        workdir = os.path.abspath(config.workdir or default_workdir(config))
        # One process of a multi-host job writes the workdir; it holds the lock.
        lock = (
            _WorkdirLock(workdir, config.method)
            if jax.process_index() == 0
            else contextlib.nullcontext()
        )
        with lock:
            return _run(config, signals)


def _run(config: Config, signals: _Signals) -> dict[str, Any]:
    started = time.perf_counter()
    label = config.method
    workdir = os.path.abspath(config.workdir or default_workdir(config))
    print(f"[{label}] workdir: {workdir}")
    parallel.maybe_initialize_distributed()
    mesh = parallel.data_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    print(f"[{label}] computing on {parallel.describe(mesh)}: {jax.devices()}")
    steps_per_epoch = data.num_train_examples(config.dataset) // config.batch_size
    num_steps = total_steps(config, steps_per_epoch)
    had_files = os.path.isdir(workdir) and any(
        name != LOCK_FILE for name in os.listdir(workdir)
    )
    saved_steps = _prepare_workdir(config, workdir, num_steps)
    signals.check_before_training(workdir)

    dataset = data.transform(
        data.load(config.dataset, config.data_dir), config.transform
    )
    signals.check_before_training(workdir)
    spec = config.model
    model = spec.build(dataset.num_classes)
    init_key, data_key, train_key = jax.random.split(jax.random.key(config.seed), 3)
    loader = data.Loader(
        dataset.train_images,
        dataset.train_labels,
        config.batch_size,
        data_key,
        # Augmentation crops and flips [B, H, W, C] images; it flattens after.
        flatten=spec.flatten and not config.augment,
        sharding=parallel.batch_sharding(mesh),
    )
    num_train_eval = min(config.train_eval_examples, len(dataset.train_labels))
    eval_loaders = {
        "train": _eval_loader(
            dataset.train_images[:num_train_eval],
            dataset.train_labels[:num_train_eval],
            config,
            mesh,
        ),
        "test": _eval_loader(dataset.test_images, dataset.test_labels, config, mesh),
    }
    stop_step = (
        num_steps if config.stop_after is None else min(config.stop_after, num_steps)
    )

    optimizer, train_step = _train_step(config, dataset.num_classes, mesh)
    init_images = loader.batch(0)["image"]
    if spec.flatten:
        init_images = init_images.reshape(init_images.shape[0], -1)
    params = spec.init_params(model, init_key, init_images)
    # Replicated over the mesh (the batch is sharded over it): data parallel on
    # every local device, and over hosts under jax.distributed.
    state = _place(gg.init_train_state(params, optimizer, train_key), mesh)
    eval_fn = make_eval_fn(model)
    # Trace the step before anything is written: what an estimator refuses only
    # on seeing the model and batch fails here. The step's first call reuses the trace.
    jax.eval_shape(train_step.jitted, state, loader.batch(0))
    signals.check_before_training(workdir)

    os.makedirs(workdir, exist_ok=True)
    metrics_path = os.path.join(workdir, METRICS_FILE)
    manager = _checkpoint_manager(
        os.path.join(workdir, CHECKPOINT_DIR), config.keep_checkpoints
    )
    elapsed_before, window = 0.0, []
    if saved_steps:
        state, meta = _restore_checkpoint(manager, state, workdir, label)
        state = _place(state, mesh)
        elapsed_before = float(meta["elapsed_s"])
        window = [(int(s), np.float32(x)) for s, x in meta["window_losses"]]
        _truncate_metrics(metrics_path, int(state.step))
        print(f"[{label}] resumed from the checkpoint at step {int(state.step)}")
    else:
        if config.resume and had_files:
            print(
                f"[{label}] --resume: no checkpoint in {workdir}; starting from step 0"
            )
        open(metrics_path, "w").close()

    options = resolved_options(config)
    _write_json(
        os.path.join(workdir, CONFIG_FILE),
        {
            "config": config_record(config) | {"workdir": workdir},
            "estimator_options": options,
            "total_steps": num_steps,
            "steps_per_epoch": loader.steps_per_epoch,
            "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
            "num_train_examples": len(dataset.train_labels),
            "num_test_examples": len(dataset.test_labels),
            "train_eval_examples": num_train_eval,
            "device": device_info(),
        },
    )

    session_start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - session_start

    def run_eval(step: int) -> dict[str, Any]:
        record = {"kind": "eval", "step": step, "epoch": step / loader.steps_per_epoch}
        for split, eval_loader in eval_loaders.items():
            result = evaluate(eval_fn, state.params, eval_loader)
            record[f"{split}_loss"], record[f"{split}_accuracy"] = (
                result["loss"],
                result["accuracy"],
            )
        record["wall_time_s"] = elapsed()
        return record

    def checkpoint(step: int) -> None:
        # The batch losses since the last "train" line, so a resumed run logs the same mean.
        first = step - step % config.log_every
        pending = [
            [s, float(x)] for s, x in jax.device_get(window) if first < s <= step
        ]
        _save_checkpoint(
            manager,
            state,
            {"step": step, "elapsed_s": elapsed(), "window_losses": pending},
        )

    start_step = int(state.step)
    progress = _progress_bar(config, num_steps, start_step)
    last_eval: dict[str, Any] | None = None
    unchecked: list[tuple[int, Any]] = []  # (step, finite flag) not yet read

    def first_nonfinite() -> int | None:
        flags = jax.device_get([f for _, f in unchecked])
        bad = next((s for (s, _), ok in zip(unchecked, flags) if not ok), None)
        unchecked.clear()
        return bad

    diverged_at, checkpoint_failed, blown_up = None, False, None
    try:
        with open(metrics_path, "a", encoding="utf-8") as metrics_file:

            def log(record: dict[str, Any]) -> None:
                metrics_file.write(_json_line(record))
                metrics_file.flush()

            if start_step == 0:
                log(run_eval(0))
            start_loss, above = _blowup_history(read_metrics(metrics_path))
            synced_step, synced_time = start_step, time.perf_counter()
            for step in range(start_step, stop_step):
                state, metrics = train_step(state, loader.batch(step))
                done = step + 1
                window.append((done, metrics["loss"]))
                unchecked.append((done, metrics["finite"]))
                is_log = done % config.log_every == 0
                is_eval = done % config.eval_every == 0 or done == num_steps
                timed_out = time.perf_counter() - synced_time > _REFRESH_SECONDS
                if is_log or is_eval or timed_out or done == stop_step:
                    diverged_at = first_nonfinite()
                    if diverged_at is not None:
                        break
                    now = time.perf_counter()
                    rate = (
                        (done - synced_step)
                        * config.batch_size
                        / max(now - synced_time, 1e-9)
                    )
                    postfix = {"ex/s": f"{rate:,.0f}"}
                    if is_log:
                        loss = _mean_loss(window)
                        log(
                            {
                                "kind": "train",
                                "step": done,
                                "loss": loss,
                                "examples_per_s": rate,
                            }
                        )
                        window = []
                        postfix["loss"] = f"{loss:.4f}"
                    progress.set_postfix(postfix, refresh=False)
                    progress.update(done - synced_step)
                    synced_step, synced_time = done, now
                if is_eval:
                    last_eval = run_eval(done)
                    log(last_eval)
                    progress.write(
                        f"[{label}] step {done}: train acc {last_eval['train_accuracy']:.2%}, "
                        f"test acc {last_eval['test_accuracy']:.2%}, test loss {last_eval['test_loss']:.4f}"
                    )
                    checkpoint(done)
                    # Evaluation time does not count against throughput.
                    synced_time = time.perf_counter()
                    above = above + 1 if _above(last_eval, start_loss) else 0
                    if above >= BLOWUP_EVALS or (above and done == num_steps):
                        blown_up = (done, last_eval["train_loss"], start_loss)
                        log({"kind": "diverged", "step": done, "loss": blown_up[1]})
                        break
                if signals.signum is not None:
                    break
            if diverged_at is None:
                diverged_at = first_nonfinite()
            if diverged_at is None and int(state.step) < num_steps:
                checkpoint(int(state.step))
            if diverged_at is not None:
                loss = dict(jax.device_get(window)).get(diverged_at)
                loss = None if loss is None else float(loss)
                log({"kind": "diverged", "step": diverged_at, "loss": loss})
    except KeyboardInterrupt:  # raised where no handler could be installed
        signals.signum = signals.signum or signal.SIGINT
        diverged_at = first_nonfinite()
        if diverged_at is None:
            checkpoint(int(state.step))
        else:
            loss = None
    except CheckpointError:
        checkpoint_failed = True
        raise
    finally:
        progress.close()
        if checkpoint_failed:
            _close_quietly(manager)
        else:
            manager.wait_until_finished()
            last_saved = max(manager.all_steps(), default=None)
            manager.close()

    step = int(state.step)
    if diverged_at is not None:
        return _diverged(config, workdir, diverged_at, loss, last_saved, options)
    if blown_up is not None:
        return _blew_up(config, workdir, *blown_up, num_steps, options)
    if signals.signum is not None and step < num_steps:
        print(
            f"[{label}] {signal.Signals(signals.signum).name} at step {step} of "
            f"{num_steps}; checkpoint saved in {workdir}",
            file=sys.stderr,
        )
        raise Interrupted(step, num_steps, workdir, signals.signum)
    if step < num_steps:
        print(
            f"[{label}] stopped at step {step} of {num_steps}; checkpoint saved in {workdir}"
        )
        return {
            "status": "stopped",
            "step": step,
            "total_steps": num_steps,
            "workdir": workdir,
        }
    if last_eval is None:  # resumed a finished run: its final evaluation, again
        last_eval = run_eval(step)

    records = read_metrics(metrics_path)
    train_records = [r for r in records if r["kind"] == "train"]
    wall_time = elapsed() if step > start_step else elapsed_before
    results = {
        "status": "done",
        **_run_fields(config, options),
        "steps": step,
        "epochs": step / loader.steps_per_epoch,
        "train_accuracy": last_eval["train_accuracy"],
        "train_loss": last_eval["train_loss"],
        "test_accuracy": last_eval["test_accuracy"],
        "test_loss": last_eval["test_loss"],
        "last_batch_loss": train_records[-1]["loss"] if train_records else None,
        "wall_time_s": wall_time,
        "session_wall_time_s": time.perf_counter() - started,
        "examples_per_s": _mean_rate(train_records),
        "workdir": workdir,
        **device_info(),
    }
    _write_json(os.path.join(workdir, RESULTS_FILE), results)
    title = f"{config.method} on {config.dataset}, {_model_title(config)}, {config.optimizer} lr={config.learning_rate:g}"
    plot_curves(records, os.path.join(workdir, CURVES_FILE), title)
    print(format_table([results]))
    print(
        f"[{label}] results in {workdir}: {CONFIG_FILE}, {METRICS_FILE}, {RESULTS_FILE}, {CURVES_FILE}"
    )
    return json_safe(results)


def _run_fields(config: Config, options: Mapping[str, Any]) -> dict[str, Any]:
    """What results.json repeats of the configuration."""
    return {
        "method": config.method,
        "dataset": config.dataset,
        "model": config.model.label,
        "model_spec": config.model.to_json(),
        "augment": config.augment,
        "transform": config.transform,
        "optimizer": config.optimizer,
        "learning_rate": config.learning_rate,
        "estimator_options": options,
    }


def _diverged(
    config: Config,
    workdir: str,
    step: int,
    loss: float | None,
    last_saved: int | None,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """Writes results.json for a run that stopped at a non-finite step; returns it."""
    kept = (
        f"the last good checkpoint is step {last_saved}"
        if last_saved is not None
        else "no checkpoint was saved before it"
    )
    message = (
        f"the loss or the update became non-finite at step {step} (batch loss "
        f"{loss}); nothing after it was saved, and {kept}. Likely cause: a learning "
        f"rate too large for {config.optimizer} ({config.learning_rate:g}; try a "
        "smaller --learning_rate), or labels outside the model's classes."
    )
    return _write_diverged(config, workdir, step, loss, last_saved, message, options)


def _blowup_history(records: Sequence[Mapping[str, Any]]) -> tuple[float | None, int]:
    """``(step-0 train loss, evaluations in a row above BLOWUP_FACTOR times it)`` so far."""
    evals = [r for r in records if r.get("kind") == "eval"]
    if not evals or evals[0].get("step") != 0:
        return None, 0
    start = evals[0].get("train_loss")
    above = 0
    for record in evals[1:]:
        above = above + 1 if _above(record, start) else 0
    return start, above


def _above(record: Mapping[str, Any], start: float | None) -> bool:
    loss = record.get("train_loss")
    return (
        start is not None
        and loss is not None
        and math.isfinite(start)
        and start > 0
        and loss > BLOWUP_FACTOR * start
    )


def _blew_up(
    config: Config,
    workdir: str,
    step: int,
    loss: float,
    start: float,
    num_steps: int,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """Writes results.json for a run whose loss blew up but stayed finite; returns it."""
    rule = (
        "at the last evaluation"
        if step == num_steps
        else f"at {BLOWUP_EVALS} evaluations in a row"
    )
    message = (
        f"the training loss rose to {loss:.4g} at step {step}, above "
        f"{BLOWUP_FACTOR:g}x its start ({start:.4g}) {rule}; its checkpoint is kept. "
        f"Likely cause: a learning rate too large for {config.optimizer} "
        f"({config.learning_rate:g}; try a smaller --learning_rate)."
    )
    return _write_diverged(config, workdir, step, loss, step, message, options)


def _write_diverged(
    config: Config,
    workdir: str,
    step: int,
    loss: float | None,
    last_saved: int | None,
    message: str,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """results.json of a diverged run (``"status": "diverged"``), one line on stderr."""
    results = {
        "status": "diverged",
        **_run_fields(config, options),
        "step": step,
        "loss": loss,
        "last_checkpoint_step": last_saved,
        "message": message,
        "workdir": workdir,
        **device_info(),
    }
    _write_json(os.path.join(workdir, RESULTS_FILE), results)
    print(f"[{config.method}] diverged: {message}", file=sys.stderr)
    return json_safe(results)


_SHIFTED = {"invert": "inverted", "rotate": "rotated"}


def _model_title(config: Config) -> str:
    shifted = f", images {_SHIFTED[config.transform]}" if config.transform else ""
    return config.model.label + shifted + (", augmented" if config.augment else "")


def _train_step(config: Config, num_classes: int, mesh):
    """``(optimizer, data-parallel train step)`` of ``config``, shared by runs that compute the same step.

    Runs in one process with the same method, options, model, optimiser and
    augmentation (a resumed run, a test's reruns) reuse one compiled step.
    """
    key = (
        config.method,
        tuple(sorted(dict(config.options).items())),
        config.model,
        num_classes,
        config.optimizer,
        config.learning_rate,
        config.augment,
        mesh,
    )
    try:
        hash(key)
    except TypeError:  # an unhashable option value: build it afresh
        return _build_train_step(*key)
    return _cached_train_step(*key)


def _build_train_step(
    method, options, spec, num_classes, optimizer_name, learning_rate, augment, mesh
):
    optimizer = make_optimizer(optimizer_name, learning_rate)
    trainable = spec.trainable()
    if trainable is not None:  # frozen leaves never move, weight decay included
        optimizer = optax.masked(optimizer, trainable)
    estimator = gg.get_estimator(
        method,
        spec.build(num_classes),
        **spec.estimator_args(),
        **dict(options),
        has_aux=True,
    )
    if augment:
        estimator = _augmented(estimator, flatten=spec.flatten)
    return optimizer, parallel.make_parallel_train_step(estimator, optimizer, mesh)


_cached_train_step = functools.lru_cache(maxsize=8)(_build_train_step)


def _place(state: gg.TrainState, mesh) -> gg.TrainState:
    """``state`` replicated over ``mesh``, typed exactly as the train step's outputs.

    ``parallel.replicate`` alone gives arrays whose type lacks the mesh that
    the step's outputs carry, so the step's second call would compile it
    again; a jitted identity with the step's output sharding gives the same
    type (and the same values).
    """
    state = parallel.replicate(state, mesh)
    return jax.jit(lambda s: s, out_shardings=parallel.replicated(mesh))(state)


def _augmented(estimator, *, flatten: bool):
    """``estimator`` on randomly cropped and flipped images (``data.augment``), inside the step.

    The step's key is split: one half draws the augmentation, the other goes
    to the estimator. Images are flattened after augmenting when the model
    takes them flat.
    """

    def estimate(params, batch, key):
        aug_key, estimator_key = jax.random.split(key)
        images = data.augment(batch["image"], aug_key)
        if flatten:
            images = images.reshape(images.shape[0], -1)
        return estimator(params, {**batch, "image": images}, estimator_key)

    estimate.has_aux = getattr(estimator, "has_aux", False)
    return estimate


def _eval_loader(
    images: np.ndarray, labels: np.ndarray, config: Config, mesh
) -> data.Loader:
    # Fixed-size padded batches, a multiple of the device count.
    devices = mesh.devices.size
    batch_size = max(
        devices, min(config.eval_batch_size, len(labels)) // devices * devices
    )
    return data.Loader(
        images,
        labels,
        batch_size,
        None,
        flatten=config.model.flatten,
        shuffle=False,
        drop_remainder=False,
        sharding=parallel.batch_sharding(mesh),
    )


def _mean_loss(window: Sequence[tuple[int, Any]]) -> float:
    return float(
        np.mean(np.asarray(jax.device_get([loss for _, loss in window]), np.float64))
    )


def _mean_rate(train_records: Sequence[Mapping[str, Any]]) -> float | None:
    # Median over logged windows: robust to the first window's compilation.
    rates = [r["examples_per_s"] for r in train_records if "examples_per_s" in r]
    return float(np.median(rates)) if rates else None


def _progress_bar(config: Config, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=config.method,
        unit="step",
        dynamic_ncols=True,
        disable=not config.progress,
        leave=True,
    )


def method_configs(config: Config, methods: Sequence[str]) -> list[Config]:
    """One validated configuration per method, each with the options of ``config`` it takes.

    Raises a ValueError for an unknown method or option value, or an option
    that none of ``methods`` takes.
    """
    if not methods:
        raise ValueError(
            f"Give at least one method; valid names: {', '.join(gg.ESTIMATORS)}."
        )
    for method in methods:
        gg.estimator_options(method)  # raises a ValueError listing the valid names
    unused = [
        o
        for o in config.options
        if not any(o in gg.estimator_options(m) for m in methods)
    ]
    if unused:
        raise ValueError(f"No method in {list(methods)} takes option(s) {unused}.")
    configs = [
        dataclasses.replace(config, method=m, options=options_for(m, config.options))
        for m in methods
    ]
    for method_config in configs:
        validate(method_config)
    return configs


def compare(config: Config, methods: Sequence[str]) -> list[dict[str, Any]]:
    """Runs each of ``methods`` with ``config`` (same data, seed, budget); returns one row per method.

    Each method runs in ``<workdir>/<method>`` and is passed only the options of
    ``config.options`` it takes (an option no listed method takes is an
    error). Writes compare.json and compare.md (a Markdown table) to the
    workdir and prints the table.
    """
    methods = list(methods)
    configs = method_configs(config, methods)
    workdir = os.path.abspath(config.workdir or default_workdir(config, "compare"))
    print(f"comparing {', '.join(methods)} in {workdir}")
    rows = []
    for method_config in configs:
        results = run(
            dataclasses.replace(
                method_config, workdir=os.path.join(workdir, method_config.method)
            )
        )
        if results["status"] == "stopped":
            print(
                f"compare: {method_config.method} stopped at step {results['step']}; not tabulated"
            )
            return rows
        if results["status"] == "diverged":
            print(
                f"compare: {method_config.method} diverged at step {results['step']}; "
                "tabulated without results"
            )
            rows.append(
                {
                    "method": f"{method_config.method} (diverged)",
                    "steps": results["step"],
                    "status": "diverged",
                    "workdir": results["workdir"],
                }
            )
            continue
        rows.append(
            {key: results[key] for _, key, _ in _COLUMNS}
            | {"status": "done", "workdir": results["workdir"]}
        )
    record = config_record(config) | {"workdir": workdir}
    _write_json(
        os.path.join(workdir, COMPARE_JSON),
        {"config": record, "methods": methods, "rows": rows},
    )
    title = f"{config.dataset}, {_model_title(config)}, {config.optimizer} lr={config.learning_rate:g}, seed {config.seed}"
    with open(os.path.join(workdir, COMPARE_MD), "w", encoding="utf-8") as f:
        f.write(f"# {title}\n\n{markdown_table(rows)}\n")
    print(f"\n{title}\n{format_table(rows)}")
    print(f"comparison in {workdir}: {COMPARE_JSON}, {COMPARE_MD}")
    return rows


__all__ = [
    "LOCALMIXER_OBJECTIVES",
    "MODEL_SPECS",
    "Config",
    "Interrupted",
    "LocalMixerSpec",
    "MLPSpec",
    "ModelSpec",
    "WorkdirError",
    "checkpoint_steps",
    "compare",
    "config_record",
    "default_workdir",
    "device_info",
    "evaluate",
    "format_table",
    "load_params",
    "make_eval_fn",
    "markdown_table",
    "method_configs",
    "model_spec_from_json",
    "options_for",
    "parse_methods",
    "plot_curves",
    "read_metrics",
    "resolved_options",
    "run",
    "total_steps",
    "validate",
]
