"""The flags and main() every experiment entry point shares.

An entry point (``experiments/mlp.py``, ``experiments/localmixer.py``) defines
only its model's flags and a function that turns them into a
``guessgrad.experiment.ModelSpec``::

    from experiments import common  # first: sets XLA_FLAGS before jax starts

    common.define_flags(epochs=300, learning_rate=1e-3)
    _DEPTH = flags.DEFINE_integer("depth", 3, "Linear layers of the MLP.")

    def main(argv):
        return common.main(argv, "mlp", lambda: experiment.MLPSpec(depth=_DEPTH.value))

    if __name__ == "__main__":
        app.run(main)

Everything else (method, data set, optimiser, training length, estimator
options, work directory, ``--resume``, ``--compare``, ``--augment``) is here,
and all logic is in ``guessgrad.experiment``. Flags are process-global: one
entry point per process.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from collections.abc import Callable, Sequence

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

# Estimator options as flags: (flag name, option name, kind, help). A flag left
# unset takes the estimator's default; one no chosen method takes is an error.
_OPTIONS = (
    ("num_guesses", "num_guesses", "integer", "Guesses averaged per step."),
    (
        "mode",
        "mode",
        "string",
        f"Derivatives: one of {', '.join(gg.MODES)} (default {gg.DEFAULT_MODE}).",
    ),
    ("normalize", "normalize", "bool", "Rescale each guess to norm sqrt(size)."),
    (
        "lean",
        "lean",
        "bool",
        "Keep no per-layer activations (recompute them; needs --mode=joint).",
    ),
    ("rank", "rank", "integer", "Subspace rank of wperp and wperp_ns."),
    (
        "downstream_depth",
        "depth",
        "integer",
        "Layers the downstream guess is pulled back through.",
    ),
    (
        "cosine",
        "cosine",
        "float",
        "Cosine of oracle_angle's guess with the true gradient.",
    ),
    (
        "scale",
        "scale",
        "string",
        (
            "oracle_angle: gradient (the estimate has the gradient's norm) or "
            "directional (the paper's step (g.u)u along the unit guess u: cosine "
            "times as long)."
        ),
    ),
    (
        "mask",
        "mask",
        "bool",
        "activation_perturbation: multiply the noise by the site's ReLU mask.",
    ),
    (
        "krylov_steps",
        "krylov_steps",
        "integer",
        "wperp_ns (variant krylov): Krylov steps (default: enough for max(3 rank, 16) dimensions).",
    ),
    (
        "block_size",
        "block_size",
        "integer",
        "wperp_ns (variant krylov): vectors per Krylov block (default 2).",
    ),
    (
        "degree",
        "degree",
        "integer",
        "wperp_ns (variant vector): the filter's degree (default 6).",
    ),
    (
        "variant",
        "variant",
        "string",
        "wperp_ns: krylov (default: W-perp's subspace) or vector (a filter).",
    ),
    (
        "cutoff",
        "cutoff",
        "float",
        "wperp_ns: the filter's band edge in [0, 1] (0: a power filter).",
    ),
)
_DEFINE = {
    "integer": flags.DEFINE_integer,
    "float": flags.DEFINE_float,
    "bool": flags.DEFINE_bool,
    "string": flags.DEFINE_string,
}

# The flag holders, filled by define_flags().
_FLAGS: dict[str, flags.FlagHolder] = {}
_OPTION_FLAGS: list[tuple[flags.FlagHolder, str]] = []


def define_flags(
    *,
    epochs: int,
    learning_rate: float,
    epochs_help: str = "",
    learning_rate_help: str = "",
    workdir_help: str = "runs/<dataset>-<method>-<model>-seed<seed>",
) -> None:
    """Defines the shared flags with this experiment's defaults (once per process)."""
    if _FLAGS:
        raise RuntimeError("experiments.common.define_flags was already called.")
    f = _FLAGS
    f["method"] = flags.DEFINE_string(
        "method",
        experiment.DEFAULT_METHOD,
        f"Gradient estimator: one of {', '.join(gg.ESTIMATORS)}.",
    )
    f["dataset"] = flags.DEFINE_string(
        "dataset", data.DEFAULT_DATASET, f"Data set: one of {', '.join(data.DATASETS)}."
    )
    f["data_dir"] = flags.DEFINE_string(
        "data_dir",
        None,
        "tfds data directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets; "
        "unused for mnist10k).",
    )
    f["optimizer"] = flags.DEFINE_string(
        "optimizer", "adamw", f"Optimiser: one of {', '.join(experiment.OPTIMIZERS)}."
    )
    f["learning_rate"] = flags.DEFINE_float(
        "learning_rate", learning_rate, ("Step size. " + learning_rate_help).strip()
    )
    f["batch_size"] = flags.DEFINE_integer(
        "batch_size", experiment.Config.batch_size, "Training examples per step."
    )
    f["epochs"] = flags.DEFINE_integer(
        "epochs", epochs, ("Passes over the training set. " + epochs_help).strip()
    )
    f["steps"] = flags.DEFINE_integer(
        "steps", None, "Training steps; overrides --epochs."
    )
    f["eval_every"] = flags.DEFINE_integer(
        "eval_every",
        experiment.Config.eval_every,
        "Steps between evaluations and checkpoints (and at the last step).",
    )
    f["log_every"] = flags.DEFINE_integer(
        "log_every", experiment.Config.log_every, "Steps between train-loss lines."
    )
    f["augment"] = flags.DEFINE_bool(
        "augment",
        False,
        "Random crops (padding 4) and horizontal flips of the training images, "
        "on device. Flips are wrong for digits: for natural images (cifar10, ...).",
    )
    f["seed"] = flags.DEFINE_integer(
        "seed", 0, "Seeds initialisation, data order, augmentation and guesses."
    )
    f["workdir"] = flags.DEFINE_string(
        "workdir", None, f"Output directory (default {workdir_help})."
    )
    f["resume"] = flags.DEFINE_bool(
        "resume", False, "Continue the run in --workdir from its last checkpoint."
    )
    f["compare"] = flags.DEFINE_string(
        "compare",
        None,
        'Run several methods instead of --method: "all" or a comma-separated list. '
        "On CPU, wperp (an exact SVD per example and layer) takes seconds per step "
        "at width 128, orders of magnitude more than the others.",
    )
    f["progress"] = flags.DEFINE_bool("progress", True, "Show a progress bar.")
    define_option_flags()


def define_option_flags(exclude: Sequence[str] = ()) -> None:
    """Defines a flag per estimator option (unset: the estimator's default), but ``exclude``."""
    if _OPTION_FLAGS:
        raise RuntimeError("The estimator option flags were already defined.")
    for name, option, kind, help_text in _OPTIONS:
        if name not in exclude:
            _OPTION_FLAGS.append((_DEFINE[kind](name, None, help_text), option))


def options_for(method: str) -> dict[str, object]:
    """The options set by flags that ``method`` takes."""
    taken = gg.estimator_options(method)
    return {
        option: holder.value
        for holder, option in _OPTION_FLAGS
        if holder.value is not None and option in taken
    }


def estimator_options(methods: Sequence[str]) -> dict[str, object]:
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
                f"{' or '.join(methods)}; it applies to: {', '.join(takers) or 'none'}."
                + (f" {methods[0]} takes: {takes}." if len(methods) == 1 else "")
            )
        options[option] = holder.value
    return options


def config(model: experiment.ModelSpec, methods: Sequence[str]) -> experiment.Config:
    """The run's Config from the shared flags and ``model``."""
    f = {name: holder.value for name, holder in _FLAGS.items()}
    return experiment.Config(
        method=methods[0],
        dataset=f["dataset"],
        data_dir=f["data_dir"],
        model=model,
        optimizer=f["optimizer"],
        learning_rate=f["learning_rate"],
        batch_size=f["batch_size"],
        epochs=f["epochs"],
        steps=f["steps"],
        eval_every=f["eval_every"],
        log_every=f["log_every"],
        augment=f["augment"],
        options=estimator_options(methods),
        seed=f["seed"],
        workdir=f["workdir"],
        resume=f["resume"],
        progress=f["progress"],
    )


class _Terminated(KeyboardInterrupt):
    signum = signal.SIGTERM


def _terminated(signum, frame):
    raise _Terminated()


def main(
    argv: Sequence[str],
    name: str,
    model: Callable[[], experiment.ModelSpec],
    prepare: Callable[[experiment.Config], experiment.Config] | None = None,
) -> int:
    """Runs one method (or --compare) of experiment ``name``; returns the exit status.

    ``model()`` builds the spec from the entry point's own flags; ``prepare``,
    if given, turns the validated configuration into the one to run (e.g.
    after pretraining a backbone), under the same error handling. A bad flag
    is one line on stderr and exit status 2 (an unusable work directory
    too); a workdir that cannot be resumed or unprepared data 1; a run that
    diverged 1; Ctrl-C 130 and SIGTERM 143 (with the command that resumes).
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {' '.join(argv[1:])}")
    # From here on a signal is an exception this function turns into its status
    # (the package's start-up handler exits at once); a run installs its own.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminated)
    if not flags.FLAGS["verbosity"].present:
        # JAX's and Orbax's INFO lines would bury the progress.
        logging.set_verbosity(logging.WARNING)
    compare_flag, method, resume = (
        _FLAGS["compare"].value,
        _FLAGS["method"].value,
        _FLAGS["resume"].value,
    )
    try:
        methods = experiment.parse_methods(compare_flag) if compare_flag else [method]
        gg.estimator_options(method)  # a ValueError listing the valid names
        run_config = config(model(), methods)
        if compare_flag:
            experiment.method_configs(run_config, methods)
        else:
            experiment.validate(run_config)
    except ValueError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:  # a checkpoint a flag names
        print(f"{name}: {err}", file=sys.stderr)
        return 1
    try:
        if prepare is not None:
            run_config = prepare(run_config)
            experiment.validate(run_config)
        if compare_flag:
            rows = experiment.compare(run_config, methods)
            diverged = any(r.get("status") == "diverged" for r in rows)
        else:
            diverged = experiment.run(run_config)["status"] == "diverged"
    except (
        experiment.WorkdirError,
        experiment.CheckpointError,
        data.DataMissingError,
        FileNotFoundError,
    ) as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        # What only the run finds out: a batch that does not split over the
        # devices, an estimator option the model cannot take (seen when the
        # step is traced). The traceback with --verbosity=0.
        logging.info("%s", name, exc_info=True)
        print(f"{name}: {err}", file=sys.stderr)
        return 2
    except experiment.Interrupted as interrupt:
        if interrupt.step is None:
            kept = experiment.checkpoint_steps(interrupt.workdir)
            print(
                f"\n{interrupt.signal_name} before training started; nothing was saved"
                + (
                    f" (the checkpoints of steps {kept} in {interrupt.workdir} are as they were)."
                    if kept
                    else "."
                ),
                file=sys.stderr,
            )
            return interrupt.exit_code
        command = [sys.executable, "-m", f"experiments.{name}", *sys.argv[1:]]
        if not resume:
            command.append("--resume")
        print(f"Resume with:\n    {shlex.join(command)}", file=sys.stderr)
        return interrupt.exit_code
    except KeyboardInterrupt as interrupt:
        signum = getattr(interrupt, "signum", signal.SIGINT)
        print(
            f"\n{signal.Signals(signum).name} before training started; nothing new "
            "was saved.",
            file=sys.stderr,
        )
        return 128 + signum
    if diverged:
        return 1
    return 0
