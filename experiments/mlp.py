r"""Trains an MLP on image classification with a gradient estimator.

    python -m experiments.mlp --method=mixing
    python -m experiments.mlp --method=wt --num_guesses=4 --steps=5000
    python -m experiments.mlp --compare=all

trains on the 10,000 MNIST digits that ship with guessgrad unless --dataset
names another, and writes config.json, metrics.jsonl, results.json,
curves.png and checkpoints to --workdir. All logic is in guessgrad.experiment.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence

# On CPU with jax 0.10, XLA's concurrency-optimised scheduler can deadlock a step
# holding two batched factorisations (W-perp's): turn it off before jax starts.
_NO_DEADLOCK = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} {_NO_DEADLOCK}".strip()
    )

from absl import app, flags, logging

import guessgrad as gg
from guessgrad import data, experiment

_METHOD = flags.DEFINE_string(
    "method",
    experiment.DEFAULT_METHOD,
    f"Gradient estimator: one of {', '.join(gg.ESTIMATORS)}.",
)
_DATASET = flags.DEFINE_string(
    "dataset", data.DEFAULT_DATASET, f"Data set: one of {', '.join(data.DATASETS)}."
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    None,
    "tfds data directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets; unused for mnist10k).",
)
_DEPTH = flags.DEFINE_integer("depth", 3, "Linear layers of the MLP.")
_WIDTH = flags.DEFINE_integer("width", 128, "Hidden units per layer.")
_OPTIMIZER = flags.DEFINE_string(
    "optimizer", "adamw", f"Optimiser: one of {', '.join(gg.OPTIMIZERS)}."
)
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate",
    experiment.DEFAULT_LEARNING_RATE,
    "Step size. Default 1e-3: measured on mnist10k (3x128, adamw, 300 epochs, seeds "
    "0 and 1), mixing reached 92.7% test accuracy at 1e-3 against 91.3% at 1e-4, "
    "wt 93.7% against 94.7%; 1e-3 leads both early in training.",
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Training examples per step.")
_EPOCHS = flags.DEFINE_integer(
    "epochs",
    experiment.DEFAULT_EPOCHS,
    "Passes over the training set (about a minute for 3x128 mixing on 2 CPU cores).",
)
_STEPS = flags.DEFINE_integer("steps", None, "Training steps; overrides --epochs.")
_EVAL_EVERY = flags.DEFINE_integer(
    "eval_every",
    experiment.Config.eval_every,
    "Steps between evaluations and checkpoints (and at the last step).",
)
_LOG_EVERY = flags.DEFINE_integer(
    "log_every", experiment.Config.log_every, "Steps between train-loss lines."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seeds initialisation, data order and guesses.")
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Output directory (default runs/<dataset>-<method>-<depth>x<width>-seed<seed>).",
)
_RESUME = flags.DEFINE_bool(
    "resume", False, "Continue the run in --workdir from its last checkpoint."
)
_COMPARE = flags.DEFINE_string(
    "compare",
    None,
    'Run several methods instead of --method: "all" or a comma-separated list. On CPU, '
    "wperp (an exact SVD per example and layer) takes seconds per step at width 128, "
    "orders of magnitude more than the others.",
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")

# Estimator options: a flag left unset takes the estimator's default. Flag name -> option name.
_NUM_GUESSES = flags.DEFINE_integer("num_guesses", None, "Guesses averaged per step.")
_MODE = flags.DEFINE_string(
    "mode",
    None,
    f"Derivatives: one of {', '.join(gg.MODES)} (default {gg.DEFAULT_MODE}).",
)
_NORMALIZE = flags.DEFINE_bool(
    "normalize", None, "Rescale each guess to norm sqrt(size)."
)
_LEAN = flags.DEFINE_bool(
    "lean", None, "Keep no per-layer activations (recompute them; needs --mode=joint)."
)
_RANK = flags.DEFINE_integer("rank", None, "Subspace rank of wperp and wperp_ns.")
_DOWNSTREAM_DEPTH = flags.DEFINE_integer(
    "downstream_depth", None, "Layers the downstream guess is pulled back through."
)
_COSINE = flags.DEFINE_float(
    "cosine", None, "Cosine of oracle_angle's guess with the true gradient."
)
_OPTION_FLAGS = (
    (_NUM_GUESSES, "num_guesses"),
    (_MODE, "mode"),
    (_NORMALIZE, "normalize"),
    (_LEAN, "lean"),
    (_RANK, "rank"),
    (_DOWNSTREAM_DEPTH, "depth"),
    (_COSINE, "cosine"),
)


def _estimator_options(methods: Sequence[str]) -> dict[str, object]:
    """The options set by flags; each must apply to one of ``methods``."""
    options = {}
    for holder, option in _OPTION_FLAGS:
        if holder.value is None:
            continue
        if not any(option in gg.estimator_options(m) for m in methods):
            takers = [m for m in gg.ESTIMATORS if option in gg.estimator_options(m)]
            takes = ", ".join(gg.estimator_options(methods[0])) or "no options"
            raise ValueError(
                f"--{holder.name} (estimator option {option!r}) does not apply to "
                f"{' or '.join(methods)}; it applies to: {', '.join(takers)}."
                + (f" {methods[0]} takes: {takes}." if len(methods) == 1 else "")
            )
        options[option] = holder.value
    return options


def main(argv: Sequence[str]) -> int:
    """Runs one method (or --compare); returns the exit status."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(
            logging.WARNING
        )  # JAX's and Orbax's INFO lines would bury the progress
    try:
        methods = (
            experiment.parse_methods(_COMPARE.value)
            if _COMPARE.value
            else [_METHOD.value]
        )
        gg.estimator_options(_METHOD.value)  # a ValueError listing the valid names
        config = experiment.Config(
            method=methods[0],
            dataset=_DATASET.value,
            data_dir=_DATA_DIR.value,
            depth=_DEPTH.value,
            width=_WIDTH.value,
            optimizer=_OPTIMIZER.value,
            learning_rate=_LEARNING_RATE.value,
            batch_size=_BATCH_SIZE.value,
            epochs=_EPOCHS.value,
            steps=_STEPS.value,
            eval_every=_EVAL_EVERY.value,
            log_every=_LOG_EVERY.value,
            options=_estimator_options(methods),
            seed=_SEED.value,
            workdir=_WORKDIR.value,
            resume=_RESUME.value,
            progress=_PROGRESS.value,
        )
        if _COMPARE.value:
            experiment.method_configs(config, methods)
        else:
            experiment.validate(config)
    except ValueError as err:
        print(f"mlp: {err}", file=sys.stderr)
        return 2
    try:
        if _COMPARE.value:
            experiment.compare(config, methods)
        else:
            experiment.run(config)
    except (experiment.WorkdirError, data.DataMissingError) as err:
        print(f"mlp: {err}", file=sys.stderr)
        return 1
    except experiment.Interrupted as interrupt:
        command = [sys.executable, "-m", "experiments.mlp", *sys.argv[1:]]
        if not _RESUME.value:
            command.append("--resume")
        print(
            f"\nInterrupted at step {interrupt.step} of {interrupt.total_steps}; the checkpoint is in "
            f"{interrupt.workdir}.\nResume with:\n    {shlex.join(command)}",
            file=sys.stderr,
        )
        return 130
    except KeyboardInterrupt:
        print(
            "\nInterrupted before training started; nothing was saved.", file=sys.stderr
        )
        return 130
    return 0


if __name__ == "__main__":
    app.run(main)
