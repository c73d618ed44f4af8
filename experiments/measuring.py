"""What the measurement experiments share: flags, a backprop trajectory, outputs.

The paper's measurements (``experiments/cosine.py``, ``experiments/bias.py``)
are made on a network along a backprop training trajectory. This module sets
up the model (an MLP by default, ``--model=localmixer`` for the tiny
LocalMixer: any :class:`guessgrad.experiment.ModelSpec`), the data, the
estimators with the model's loss and trainable subset, trains by backprop and
yields the points to measure at, and writes each experiment's JSON, table and
figure to its workdir. The measurements themselves are
:mod:`guessgrad.metrics`.
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
from absl import flags, logging

import guessgrad as gg
from experiments import common  # before jax: the XLA flags
from guessgrad import data, experiment

FLAGS = flags.FLAGS
MODELS = ("mlp", "localmixer")


def define_flags(
    *, steps: int, methods: str, depth: int = 6, width: int = 1024, mode: str = "joint"
) -> None:
    """The measurement flags, with every estimator option (``--mode`` a list)."""
    flags.DEFINE_enum("model", "mlp", MODELS, "The network measured.")
    flags.DEFINE_list(
        "mode",
        mode,
        f"Derivative modes measured for activation-space methods, comma-separated "
        f"({', '.join(gg.MODES)}): joint is the paper's estimator (one directional "
        f"derivative per example across every layer), per_layer one per site.",
    )
    common.define_option_flags(exclude=("mode",))
    flags.DEFINE_integer("depth", depth, "MLP: linear layers.")
    flags.DEFINE_integer("width", width, "MLP: hidden units per layer.")
    flags.DEFINE_string("config", "tiny", "LocalMixer: a named size.")
    flags.DEFINE_string(
        "dataset", data.DEFAULT_DATASET, f"One of {', '.join(data.DATASETS)}."
    )
    flags.DEFINE_string("data_dir", None, "tfds data directory.")
    flags.DEFINE_integer("batch_size", 128, "Examples per batch.")
    flags.DEFINE_integer("steps", steps, "Backprop training steps of the trajectory.")
    flags.DEFINE_float("learning_rate", 1e-3, "AdamW step size of the trajectory.")
    flags.DEFINE_string(
        "methods", methods, "Comma-separated estimator names to measure."
    )
    flags.DEFINE_integer("seed", 0, "Seeds initialisation, data order and guesses.")
    flags.DEFINE_string("workdir", None, "Output directory (default under runs/).")


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


def model_spec() -> experiment.ModelSpec:
    if FLAGS.model == "mlp":
        return experiment.MLPSpec(depth=FLAGS.depth, width=FLAGS.width)
    return experiment.LocalMixerSpec(config=FLAGS.config)


def parse_methods() -> list[str]:
    methods = experiment.parse_methods(FLAGS.methods)
    return [m for m in methods if m != "backprop"]


def modes() -> list[str]:
    """``--mode`` checked: a non-empty list of distinct modes."""
    chosen = list(FLAGS.mode)
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


def variants(methods: Sequence[str]) -> list[Variant]:
    """Each method with the option flags it takes, once per ``--mode`` if it has modes.

    With one mode a variant's label is the method's name; with several,
    ``"<method> (<mode>)"``.
    """
    chosen = modes()
    common.estimator_options(methods or ["backprop"])  # a flag no method takes: error
    out = []
    for method in methods:
        options = common.options_for(method)
        if "mode" not in gg.estimator_options(method):
            out.append(Variant(method, method, options))
            continue
        for mode in chosen:
            label = method if len(chosen) == 1 else f"{method} ({mode})"
            out.append(Variant(label, method, {**options, "mode": mode}))
    return out


def setup(methods: Sequence[str], options: dict[str, dict] | None = None) -> Setup:
    """Builds the model, loads the data and every estimator: backprop and each of :func:`variants`.

    ``Setup.estimators`` is keyed by the variants' labels; ``options``
    (label -> options) adds to or overrides what the flags set.
    """
    spec = model_spec()
    spec.validate(data.image_shape(FLAGS.dataset))
    dataset = data.load(FLAGS.dataset, FLAGS.data_dir)
    model = spec.build(dataset.num_classes)
    init_key, data_key = jax.random.split(jax.random.key(FLAGS.seed))
    loader = data.Loader(
        dataset.train_images,
        dataset.train_labels,
        FLAGS.batch_size,
        data_key,
        flatten=spec.flatten,
    )
    params = spec.init_params(model, init_key, loader.batch(0)["image"])
    args = {**spec.estimator_args(), "trainable": spec.trainable()}
    options = options or {}
    estimators = {"backprop": gg.get_estimator("backprop", model, **args)}
    for v in variants(methods):
        estimators[v.label] = gg.get_estimator(
            v.method, model, **args, **{**v.options, **options.get(v.label, {})}
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
    setup: Setup, points: int, estimator=None, optimizer=None
) -> Iterator[tuple[int, Any]]:
    """Trains for ``--steps``; yields ``(step, params)`` at ``points`` steps.

    By default by backprop with AdamW (``--learning_rate``); ``estimator``
    (``(params, batch, key) -> (grads, metrics)``) and ``optimizer`` replace
    them (a guessed trajectory). The points are evenly spaced from 0 to
    ``--steps`` (both included when ``points > 1``).
    """
    if optimizer is None:
        optimizer = optax.adamw(FLAGS.learning_rate)
    if estimator is None:
        estimator = gg.get_estimator(
            "backprop",
            setup.model,
            **setup.spec.estimator_args(),
            trainable=setup.spec.trainable(),
            has_aux=True,
        )
    step_fn = gg.make_train_step(estimator, optimizer, has_aux=True)
    state = gg.init_train_state(setup.params, optimizer, jax.random.key(FLAGS.seed))
    at = sorted({round(i * FLAGS.steps / max(points - 1, 1)) for i in range(points)})
    for step in range(FLAGS.steps + 1):
        if step in at:
            yield step, state.params
        if step < FLAGS.steps:
            state, metrics = step_fn(state, setup.batch(step))
            if step % 50 == 0 and not bool(metrics["finite"]):
                raise FloatingPointError(
                    f"The trajectory diverged at step {step + 1}; lower the "
                    "learning rate."
                )


def trained_params(setup: Setup):
    """The parameters after ``--steps`` backprop steps."""
    params = setup.params
    for _, params in trajectory(setup, 2):
        pass
    return params


def workdir(name: str) -> str:
    if FLAGS.workdir:
        return os.path.abspath(FLAGS.workdir)
    slug = model_spec().slug
    return os.path.abspath(
        os.path.join("runs", f"{FLAGS.dataset}-{name}-{slug}-seed{FLAGS.seed}")
    )


def prepare_workdir(name: str) -> str:
    """Checks and creates the workdir (and quiets JAX's and Orbax's INFO lines)."""
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    path = workdir(name)
    experiment.check_workdir(path)
    os.makedirs(path, exist_ok=True)
    return path


def settings() -> dict[str, Any]:
    """The flags every measurement records."""
    return {
        "model": model_spec().to_json(),
        "model_label": model_spec().label,
        "dataset": FLAGS.dataset,
        "batch_size": FLAGS.batch_size,
        "steps": FLAGS.steps,
        "learning_rate": FLAGS.learning_rate,
        "seed": FLAGS.seed,
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


def paper_hint(name: str, **settings: Any) -> None:
    """Prints the command of the paper's setting (:data:`PAPER_MLP` and ``settings``)
    when these flags differ from it."""
    paper = {**PAPER_MLP, **settings}
    if FLAGS.model != "mlp" or all(
        FLAGS[flag].value == value for flag, value in paper.items()
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
    "Setup",
    "Variant",
    "define_flags",
    "figure",
    "markdown",
    "number",
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
