"""What the measurement experiments share: settings, flags, a backprop trajectory, outputs.

The paper's measurements (``experiments/cosine.py``, ``experiments/bias.py``)
are made on a network along a backprop training trajectory. Each is a config
file (``experiments/configs/<name>.py``: :func:`base_config` and the
measurement's own fields) whose fields are its flags (:data:`FIELDS`, with
:data:`HELP`). This module sets up the model (an MLP by default,
``--model=localmixer`` for the tiny LocalMixer: any
:class:`guessgrad.experiment.ModelSpec`), the data, the estimators with the
model's loss and trainable subset, trains by backprop and yields the points
to measure at, and writes each experiment's JSON, table and figure to its
workdir. The measurements themselves are :mod:`guessgrad.metrics`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
import optax
from absl import flags
from ml_collections import config_dict

import guessgrad as gg
from experiments import common  # before jax: the XLA flags
from guessgrad import data, experiment

MODELS = ("mlp", "localmixer")


def base_config(
    *,
    steps: int,
    methods: str,
    depth: int = 6,
    width: int = 1024,
    mode: Sequence[str] = ("joint",),
):
    """The settings every measurement has, a ConfigDict its config file adds to.

    ``options`` holds every estimator option but ``mode`` (``None``: the
    estimator's default); ``mode`` lists the modes measured.
    """
    config = config_dict.ConfigDict()
    config.model = "mlp"
    config.depth = depth
    config.width = width
    config.config = "tiny"
    config.dataset = data.DEFAULT_DATASET
    config.data_dir = config_dict.placeholder(str)
    config.batch_size = 128
    config.steps = steps
    config.learning_rate = 1e-3
    config.methods = methods
    config.mode = list(mode)
    config.seed = 0
    config.workdir = config_dict.placeholder(str)
    config.options = config_dict.ConfigDict()
    for name, kind in experiment.option_types().items():
        if name != "mode":
            config.options[name] = config_dict.placeholder(kind)
    return config


# The help of base_config's fields (an estimator option's is common.HELP's).
HELP = {
    "model": f"The network measured: {' or '.join(MODELS)}.",
    "depth": "MLP: linear layers.",
    "width": "MLP: hidden units per layer.",
    "config": "LocalMixer: a named size.",
    "dataset": f"One of {', '.join(data.DATASETS)}.",
    "data_dir": "tfds data directory.",
    "batch_size": "Examples per batch.",
    "steps": "Backprop training steps of the trajectory.",
    "learning_rate": "AdamW step size of the trajectory.",
    "methods": "Comma-separated estimator names to measure.",
    "mode": "Derivative modes measured for activation-space methods, comma-separated "
    f"({', '.join(gg.MODES)}): joint is the paper's estimator (one directional "
    "derivative per example across every layer), per_layer one per site.",
    "seed": "Seeds initialisation, data order and guesses.",
    "workdir": "Output directory (default under runs/).",
}
# Their flags: flag name -> config field; each estimator option named as the
# training commands name it, but --mode (the list above).
FIELDS = {
    **{name: name for name in HELP},
    **{f: field for f, field in common.OPTION_FLAGS.items() if field != "options.mode"},
}


def one_of(flag: str, choices: Sequence[str]) -> None:
    """``--<flag>`` must be one of ``choices``: checked as the command line is parsed."""
    flags.register_validator(
        flag,
        lambda value: value in choices,
        message=f"value should be one of <{'|'.join(choices)}>",
    )


@dataclasses.dataclass
class Setup:
    """A model with its data, parameters and the functions the measurements take."""

    spec: experiment.ModelSpec
    model: Any
    params: Any
    loader: data.Loader
    estimators: dict[str, Callable]
    loss_fn: Callable  # (params, batch) -> scalar mean loss
    true_grad_fn: Callable  # (params, batch) -> grads

    def batch(self, step: int):
        return self.loader.batch(step)


def model_spec(config) -> experiment.ModelSpec:
    if config.model == "mlp":
        return experiment.MLPSpec(depth=config.depth, width=config.width)
    return experiment.LocalMixerSpec(config=config.config)


def parse_methods(config) -> list[str]:
    methods = experiment.parse_methods(config.methods)
    return [m for m in methods if m != "backprop"]


def modes(config) -> list[str]:
    """``--mode`` checked: a non-empty list of distinct modes."""
    chosen = list(config.mode)
    bad = [m for m in chosen if m not in gg.MODES]
    if bad or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(
            f"--mode must list distinct modes among {', '.join(gg.MODES)}; got "
            f"{','.join(chosen) or 'none'}."
        )
    return chosen


@dataclasses.dataclass(frozen=True)
class Variant:
    """One estimator measured: a method with its options (a mode among ``--mode``)."""

    label: str  # "wt" or, with several modes, "wt (joint)"
    method: str
    options: dict

    @property
    def mode(self) -> str | None:
        return self.options.get("mode")


def variants(config, methods: Sequence[str]) -> list[Variant]:
    """Each method with the options of ``config`` it takes (over its model's defaults),
    once per ``--mode`` if it has modes.

    With one mode a variant's label is the method's name; with several,
    ``"<method> (<mode>)"``. An option set that no method takes is a ValueError.
    """
    chosen = modes(config)
    given = {name: value for name, value in config.options.items() if value is not None}
    experiment.check_options(methods or ["backprop"], given)
    spec = model_spec(config)
    out = []
    for method in methods:
        options = {
            **spec.option_defaults(method),
            **experiment.options_for(method, given),
        }
        if "mode" not in gg.estimator_options(method):
            out.append(Variant(method, method, options))
            continue
        for mode in chosen:
            label = method if len(chosen) == 1 else f"{method} ({mode})"
            out.append(Variant(label, method, {**options, "mode": mode}))
    return out


def setup(
    config, methods: Sequence[str], options: dict[str, dict] | None = None
) -> Setup:
    """Builds the model, loads the data and every estimator: backprop and each of :func:`variants`.

    ``Setup.estimators`` is keyed by the variants' labels; ``options``
    (label -> options) adds to or overrides what ``config`` sets.
    """
    spec = model_spec(config)
    spec.validate(data.image_shape(config.dataset))
    dataset = data.load(config.dataset, config.data_dir)
    model = spec.build(dataset.num_classes)
    init_key, data_key = jax.random.split(jax.random.key(config.seed))
    loader = data.Loader(
        dataset.train_images,
        dataset.train_labels,
        config.batch_size,
        data_key,
        flatten=spec.flatten,
    )
    params = spec.init_params(model, init_key, loader.batch(0)["image"])
    args = {**spec.estimator_args(), "trainable": spec.trainable()}
    options = options or {}
    estimators = {"backprop": gg.get_estimator("backprop", model, **args)}
    for v in variants(config, methods):
        estimators[v.label] = gg.get_estimator(
            v.method,
            model,
            **args,
            **{**v.options, **options.get(v.label, {})},
        )
    metric_fn = gg.get_estimator("backprop", model, **args, has_aux=True)

    def loss_fn(params, batch):
        return metric_fn(params, batch, None)[1]["loss"]

    backprop = estimators["backprop"]
    return Setup(
        spec,
        model,
        params,
        loader,
        estimators,
        loss_fn,
        lambda params, batch: backprop(params, batch, None),
    )


def trajectory(
    config, setup: Setup, points: int, estimator=None, optimizer=None
) -> Iterator[tuple[int, Any]]:
    """Trains for ``--steps``; yields ``(step, params)`` at ``points`` steps.

    By default by backprop with AdamW (``--learning_rate``); ``estimator``
    (``(params, batch, key) -> (grads, metrics)``) and ``optimizer`` replace
    them (a guessed trajectory). The points are evenly spaced from 0 to
    ``--steps`` (both included when ``points > 1``).
    """
    if optimizer is None:
        optimizer = optax.adamw(config.learning_rate)
    if estimator is None:
        estimator = gg.get_estimator(
            "backprop",
            setup.model,
            **setup.spec.estimator_args(),
            trainable=setup.spec.trainable(),
            has_aux=True,
        )
    step_fn = gg.make_train_step(estimator, optimizer, has_aux=True)
    state = gg.init_train_state(setup.params, optimizer, jax.random.key(config.seed))
    at = sorted({round(i * config.steps / max(points - 1, 1)) for i in range(points)})
    for step in range(config.steps + 1):
        if step in at:
            yield step, state.params
        if step < config.steps:
            state, metrics = step_fn(state, setup.batch(step))
            if step % 50 == 0 and not bool(metrics["finite"]):
                raise FloatingPointError(
                    f"The trajectory diverged at step {step + 1}; lower the "
                    "learning rate."
                )


def trained_params(config, setup: Setup):
    """The parameters after ``--steps`` backprop steps."""
    params = setup.params
    for _, params in trajectory(config, setup, 2):
        pass
    return params


def workdir(config, name: str) -> str:
    if config.workdir:
        return os.path.abspath(config.workdir)
    slug = model_spec(config).slug
    return os.path.abspath(
        os.path.join("runs", f"{config.dataset}-{name}-{slug}-seed{config.seed}")
    )


def prepare_workdir(config, name: str) -> str:
    """Checks and creates the workdir (and quiets JAX's and Orbax's INFO lines)."""
    common.quiet()
    path = workdir(config, name)
    experiment.check_workdir(path)
    os.makedirs(path, exist_ok=True)
    return path


def settings(config) -> dict[str, Any]:
    """The settings every measurement records."""
    spec = model_spec(config)
    return {
        "model": spec.to_json(),
        "model_label": spec.label,
        "dataset": config.dataset,
        "batch_size": config.batch_size,
        "steps": config.steps,
        "learning_rate": config.learning_rate,
        "seed": config.seed,
        "device": experiment.device_info(),
    }


def save(path: str, name: str, record: dict[str, Any], table: str, figure) -> None:
    """Writes ``<name>.json``, ``<name>.md`` (the table) and ``<name>.png``; prints where."""
    with open(os.path.join(path, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(experiment.json_safe(record), f, indent=2, allow_nan=False)
        f.write("\n")
    with open(os.path.join(path, f"{name}.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    figure.savefig(os.path.join(path, f"{name}.png"), dpi=100)
    print(f"{name}: {name}.json, {name}.md and {name}.png in {path}")


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append(
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
    )
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def percent(x) -> str:
    return "-" if x is None else f"{x:.2%}"


def number(x, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def figure(columns: int = 1, width: float = 6.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * columns, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, columns)
    return fig, np.atleast_1d(axes)


# The paper's measurement network: a 6x1024 MLP on CIFAR-10.
PAPER_MLP = {"dataset": "cifar10", "depth": 6, "width": 1024}


def style(axes) -> None:
    """The measurements' plot style: a light grid and a small legend on each of ``axes``."""
    for ax in np.atleast_1d(axes):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def paper_hint(config, name: str, **settings: Any) -> None:
    """Prints the command of the paper's setting (:data:`PAPER_MLP` and ``settings``)
    when ``config`` differs from it."""
    paper = {**PAPER_MLP, **settings}
    if config.model != "mlp" or all(
        config[field] == value for field, value in paper.items()
    ):
        return
    args = " ".join(f"--{flag}={value}" for flag, value in paper.items())
    print(
        f"The paper's setting: python -m experiments.{name} {args} --data_dir=<tfds dir>"
    )


def to_host(tree):
    return jax.tree.map(lambda x: np.asarray(x).tolist(), jax.device_get(tree))


def fail(name: str, err: Exception) -> int:
    print(f"{name}: {err}", file=sys.stderr)
    return 2


__all__ = [
    "FIELDS",
    "HELP",
    "Setup",
    "Variant",
    "base_config",
    "figure",
    "markdown",
    "number",
    "one_of",
    "paper_hint",
    "parse_methods",
    "percent",
    "prepare_workdir",
    "save",
    "settings",
    "setup",
    "to_host",
    "trained_params",
    "trajectory",
    "variants",
]
