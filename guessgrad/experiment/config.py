"""A run's configuration: :class:`Config`, its checks, and its config-file form.

:class:`Config` is a frozen dataclass of everything a run depends on.
:func:`config_dict` gives it as an ``ml_collections.ConfigDict`` (what a
config file's ``get_config()`` returns and ``--config.<field>=`` overrides:
every field, the model's settings under ``model`` with its ``kind``, and
every estimator option under ``options``, unset ones ``None``), and
:func:`from_config_dict` turns one back into a :class:`Config` (and the
methods to compare, and the backbone pretraining, where the file asks for
them). ``config.json`` records :func:`config_record`, the same fields.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optax

import guessgrad as gg
from guessgrad import data
from guessgrad.experiment.specs import (
    MODEL_SPECS,
    MLPSpec,
    ModelSpec,
    check_positive,
    model_spec_from_json,
)
from guessgrad.experiment.workdir import check_workdir

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
    model: ModelSpec = dataclasses.field(default_factory=MLPSpec)
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
        check_positive(name, getattr(config, name))
    if config.steps is not None:
        check_positive("steps", config.steps)
    if config.stop_after is not None:
        check_positive("stop_after", config.stop_after)
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
    # option values, and options the model cannot take. The run reuses it.
    try:
        estimator(config, data.num_classes(config.dataset))
    except TypeError as err:
        raise ValueError(str(err)) from err


def estimator(config: Config, num_classes: int):
    """The estimator of ``config`` for its model, ``(params, batch, key) -> (grads, metrics)``.

    Built once per method, options, model and class count in a process
    (validation and the train step share it), unless an option's value
    cannot be hashed.
    """
    key = (config.method, tuple(sorted(_set_options(config).items())), config.model)
    try:
        hash(key)
    except TypeError:
        return _build_estimator(*key, num_classes)
    return _cached_estimator(*key, num_classes)


def _build_estimator(method, options, spec, num_classes):
    return gg.get_estimator(
        method,
        spec.build(num_classes),
        **spec.estimator_args(),
        **dict(options),
        has_aux=True,
    )


_cached_estimator = functools.lru_cache(maxsize=16)(_build_estimator)


def total_steps(config: Config, steps_per_epoch: int) -> int:
    """``config.steps`` if set, else ``config.epochs * steps_per_epoch``."""
    return config.steps if config.steps is not None else config.epochs * steps_per_epoch


def config_record(config: Config) -> dict[str, Any]:
    """``config`` as JSON-able data, as config.json stores it (the model spec with its kind)."""
    record = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    record["model"] = config.model.to_json()
    record["options"] = dict(config.options)
    return _jsonable(record)


def resolved_options(config: Config) -> dict[str, Any]:
    """Every option of the estimator: ``config.options`` over the model's defaults
    (:meth:`ModelSpec.option_defaults`) over the estimator's."""
    return {**gg.estimator_options(config.method), **_set_options(config)}


def _set_options(config: Config) -> dict[str, Any]:
    """The options ``config`` trains with besides the estimator's defaults: its
    ``options`` over its model's (:meth:`ModelSpec.option_defaults`)."""
    return {**config.model.option_defaults(config.method), **dict(config.options)}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def check_options(methods: Sequence[str], options: Mapping[str, Any]) -> None:
    """Raises a ValueError for an option that none of ``methods`` takes, naming who takes it."""
    for option in options:
        if any(option in gg.estimator_options(m) for m in methods):
            continue
        takers = [m for m in gg.ESTIMATORS if option in gg.estimator_options(m)]
        takes = ", ".join(gg.estimator_options(methods[0])) or "no options"
        raise ValueError(
            f"The estimator option {option!r} does not apply to "
            f"{' or '.join(methods)}; it applies to: {', '.join(takers) or 'none'}."
            + (f" {methods[0]} takes: {takes}." if len(methods) == 1 else "")
        )


# --- the config-file form ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pretraining:
    """Pretraining a frozen backbone by backprop before tuning it (prompt tuning).

    Attributes:
      epochs: passes over the untransformed training data.
      learning_rate: the step size of the pretraining.
    """

    epochs: int = 10
    learning_rate: float = 1e-3


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What a config file asks for: a run, or a comparison, maybe after pretraining.

    Attributes:
      config: the run's configuration (with ``methods``: shared by each method).
      methods: the estimators to compare, each in ``<workdir>/<method>``;
        None: run ``config.method``.
      pretraining: pretrain the backbone first (a ViT spec without a
        ``backbone``); None: none.
      name: the experiment's name in its default workdir,
        ``runs/<dataset>-<name>-<model>-seed<seed>`` (None: a single run's
        method, or ``compare``).
    """

    config: Config
    methods: tuple[str, ...] | None = None
    pretraining: Pretraining | None = None
    name: str | None = None


def _value_type(hint: Any) -> type:
    """``int`` for ``int | None``: the type a ``None`` field takes when overridden."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


@functools.cache
def option_types() -> dict[str, type]:
    """Every estimator option's name and type, read from the estimators' signatures."""
    types: dict[str, type] = {}
    for method in gg.ESTIMATORS:
        hints = typing.get_type_hints(getattr(gg.estimators, method))
        for name in gg.estimator_options(method):
            types.setdefault(name, _value_type(hints[name]))
    return types


def _section(values: Mapping[str, Any], hints: Mapping[str, Any]):
    """A ConfigDict of ``values``, each ``None`` a placeholder of its field's type."""
    from ml_collections import config_dict

    section = config_dict.ConfigDict()
    for name, value in values.items():
        if value is None:
            value = config_dict.placeholder(_value_type(hints[name]))
        elif isinstance(value, Mapping):
            value = dict(value)
        setattr(section, name, value)
    return section


def config_dict(
    config: Config | None = None,
    *,
    methods: Sequence[str] | None = None,
    pretraining: Pretraining | None = None,
    name: str | None = None,
):
    """``config`` (default ``Config()``) as a ConfigDict, the form config files return.

    Fields are :class:`Config`'s; ``model`` holds the spec's ``kind`` and
    settings; ``options`` every option of every estimator (``None``: the
    estimator's default), so ``--config.options.num_guesses=4`` overrides
    one; ``compare`` the methods to compare (``"all"`` or a comma-separated
    list; ``None``: run ``method``); ``pretrain`` (only with
    ``pretraining``) the backbone pretraining's ``epochs`` and
    ``learning_rate``; ``name`` (only with ``name``) the experiment's name
    in default workdirs.
    """
    config = Config() if config is None else config
    unknown = sorted(set(config.options) - set(option_types()))
    if unknown:
        raise ValueError(
            f"No estimator takes option(s) {', '.join(unknown)}; the options: "
            f"{', '.join(option_types())}."
        )
    hints = typing.get_type_hints(Config)
    fields = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(Config)
        if f.name not in ("model", "options")
    }
    result = _section(fields, hints)
    spec = config.model
    result.model = _section(
        {"kind": spec.kind, **dataclasses.asdict(spec)},
        {"kind": str, **typing.get_type_hints(type(spec))},
    )
    result.options = _section(
        {name: config.options.get(name) for name in option_types()}, option_types()
    )
    result.update(
        _section({"compare": ",".join(methods) if methods else None}, {"compare": str})
    )
    if pretraining is not None:
        result.pretrain = _section(dataclasses.asdict(pretraining), {})
    if name is not None:
        result.name = name
    return result


def config_from_record(record: Mapping[str, Any]) -> Config:
    """The :class:`Config` of a :func:`config_record` (``None`` options dropped).

    Raises a ValueError naming a field that is not one, with the valid ones.
    """
    record = dict(record)
    names = [f.name for f in dataclasses.fields(Config)]
    unknown = sorted(set(record) - set(names))
    if unknown:
        raise ValueError(
            f"Unknown configuration field(s) {', '.join(unknown)}; the fields: "
            f"{', '.join(names)}."
        )
    if "model" in record:
        record["model"] = model_spec_from_json(record["model"])
    options = record.get("options") or {}
    record["options"] = {k: v for k, v in dict(options).items() if v is not None}
    return Config(**record)


def from_config_dict(config) -> Experiment:
    """The :class:`Experiment` of a ConfigDict (or a plain mapping) of :func:`config_dict`'s shape."""
    record = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    compare = record.pop("compare", None)
    pretrain = record.pop("pretrain", None)
    name = record.pop("name", None)
    methods = tuple(parse_methods(compare)) if compare else None
    run_config = config_from_record(record)
    check_options(methods or [run_config.method], run_config.options)
    pretraining = None if pretrain is None else Pretraining(**pretrain)
    return Experiment(run_config, methods, pretraining, name)
