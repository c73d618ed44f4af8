"""The command line every experiment shares: config files, their flags, and main().

An experiment is a config file (``experiments/configs/<name>.py``, a
``get_config()`` returning an ``ml_collections.ConfigDict``). The one entry
point, ``python -m experiments.main --config=<file> --config.<field>=...``,
overrides any field of it. The short commands (``experiments.mlp``,
``experiments.localmixer``, ``experiments.prompt_tuning`` and the
measurements) are the same config files with their fields as plain flags:
:func:`define_flags` defines ``--<flag>`` for a field, typed and defaulting
as the file has it, and :func:`apply_flags` writes the flags given on the
command line into the config. One flag system: every flag is a config field.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

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

# Help of the short commands' flags, by config field.
HELP = {
    "method": f"Gradient estimator: one of {', '.join(gg.ESTIMATORS)}.",
    "compare": 'Run several methods instead of --method: "all" or a comma-separated '
    "list. On CPU, wperp (an exact SVD per example and layer) takes seconds per "
    "step at width 128, orders of magnitude more than the others.",
    "dataset": f"Data set: one of {', '.join(data.DATASETS)}.",
    "data_dir": "tfds data directory (default $TFDS_DATA_DIR or "
    "~/tensorflow_datasets; unused for mnist10k).",
    "optimizer": f"Optimiser: one of {', '.join(experiment.OPTIMIZERS)}.",
    "learning_rate": "Step size.",
    "batch_size": "Training examples per step.",
    "epochs": "Passes over the training set.",
    "steps": "Training steps; overrides --epochs.",
    "eval_every": "Steps between evaluations and checkpoints (and at the last step).",
    "log_every": "Steps between train-loss lines.",
    "augment": "Random crops (padding 4) and horizontal flips of the training "
    "images, on device. Flips are wrong for digits: for natural images.",
    "seed": "Seeds initialisation, data order, augmentation and guesses.",
    "workdir": "Output directory (default runs/<dataset>-<method>-<model>-seed<seed>).",
    "resume": "Continue the run in --workdir from its last checkpoint.",
    "progress": "Show a progress bar.",
    "options.num_guesses": "Guesses averaged per step.",
    "options.mode": f"Derivatives: one of {', '.join(gg.MODES)} "
    f"(default {gg.DEFAULT_MODE}).",
    "options.normalize": "Rescale each guess to norm sqrt(size).",
    "options.lean": "Keep no per-layer activations (recompute them; needs "
    "--mode=joint).",
    "options.rank": "Subspace rank of wperp and wperp_ns.",
    "options.depth": "Layers the downstream guess is pulled back through.",
    "options.cosine": "Cosine of oracle_angle's guess with the true gradient.",
    "options.scale": "oracle_angle: gradient (the estimate has the gradient's norm) "
    "or directional (the paper's step (g.u)u along the unit guess u).",
    "options.mask": "activation_perturbation: multiply the noise by the site's "
    "ReLU mask.",
    "options.krylov_steps": "wperp_ns: Krylov steps (krylov default: enough for "
    "max(3 rank, 16) dimensions; warm default: 0).",
    "options.block_size": "wperp_ns (variant krylov): vectors per Krylov block.",
    "options.degree": "wperp_ns (variant vector): the filter's degree.",
    "options.variant": "wperp_ns: krylov (W-perp's subspace), vector (a filter) or "
    "warm (W-perp's subspace from a basis carried across steps).",
    "options.subspace": "wperp_ns (variant warm): directions of the carried basis "
    "(default rank + 3).",
    "options.warmup": "wperp_ns (variant warm): subspace iterations that build the "
    "first basis.",
    "options.cutoff": "wperp_ns: the filter's band edge in [0, 1] (0: a power filter).",
}

# The short commands' flags for a run's fields: flag name -> config field.
RUN_FLAGS = {
    name: name
    for name in (
        "method",
        "compare",
        "dataset",
        "data_dir",
        "optimizer",
        "learning_rate",
        "batch_size",
        "epochs",
        "steps",
        "eval_every",
        "log_every",
        "augment",
        "seed",
        "workdir",
        "resume",
        "progress",
    )
}
# Every estimator option as a flag (unset: the estimator's default).
OPTION_FLAGS = {
    ("downstream_depth" if name == "depth" else name): f"options.{name}"
    for name in experiment.option_types()
}

_DEFINE = {
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    bool: flags.DEFINE_bool,
    str: flags.DEFINE_string,
    list: flags.DEFINE_list,
    tuple: flags.DEFINE_list,
}
# The defined flags: flag name -> (config field, convert).
_FIELDS: dict[str, tuple[str, Callable[[Any], Any] | None]] = {}


def _parent(config, path: str):
    *parents, key = path.split(".")
    for name in parents:
        config = config[name]
    return config, key


def define_flags(
    config,
    fields: Mapping[str, str],
    *,
    help: Mapping[str, str] | None = None,
    convert: Mapping[str, Callable[[Any], Any]] | None = None,
) -> None:
    """Defines ``--<flag>`` for each ``flag: field`` of ``fields`` (``field`` dotted, e.g. ``model.depth``).

    Each flag has the field's type and value in ``config`` as its default;
    its help is ``help[flag]``, else :data:`HELP` of the field. ``convert``
    maps a flag to a function of its value giving the field's value.
    """
    for flag, path in fields.items():
        parent, key = _parent(config, path)
        kind = parent.get_type(key)
        if kind not in _DEFINE:
            raise TypeError(f"No flag type for {path} ({kind.__name__}).")
        default = parent[key]
        if isinstance(default, tuple):
            default = list(default)
        text = (help or {}).get(flag) or HELP.get(path) or f"config.{path}"
        # Listed by --help as the entry point's own flags.
        _DEFINE[kind](flag, default, text, module_name=_entry_point())
        _FIELDS[flag] = (path, (convert or {}).get(flag))


def _entry_point() -> str:
    """The module that defines flags through this one, named as absl names it."""
    frame = sys._getframe(1)
    while frame.f_globals.get("__name__") in (__name__, "experiments.measuring"):
        frame = frame.f_back
    name = frame.f_globals.get("__name__", "")
    return sys.argv[0] if name == "__main__" else name


def apply_flags(config):
    """``config`` with the value of every flag given on the command line in its field."""
    for flag, (path, convert) in _FIELDS.items():
        if not flags.FLAGS[flag].present:
            continue
        value = flags.FLAGS[flag].value
        parent, key = _parent(config, path)
        parent[key] = convert(value) if convert else value
    return config


def quiet() -> None:
    """JAX's and Orbax's INFO lines would bury the progress (unless --verbosity says)."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


class _Terminated(KeyboardInterrupt):
    signum = signal.SIGTERM


def _terminated(signum, frame):
    raise _Terminated()


def main(
    argv: Sequence[str], name: str, config, *, resume_flag: str = "--resume"
) -> int:
    """Runs what ``config`` (a config file's ConfigDict) asks for; returns the exit status.

    A bad setting is one line on stderr and exit status 2 (an unusable work
    directory too); a workdir that cannot be resumed or unprepared data 1; a
    run that diverged 1; Ctrl-C 130 and SIGTERM 143 (with the command that
    resumes: this one with ``resume_flag``).
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {' '.join(argv[1:])}")
    # From here on a signal is an exception this function turns into its status
    # (the package's start-up handler exits at once); a run installs its own.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminated)
    quiet()
    try:
        plan = experiment.from_config_dict(config)
        if plan.methods:
            experiment.method_configs(plan.config, plan.methods)
        else:
            experiment.validate(plan.config)
    except (ValueError, TypeError) as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:  # a checkpoint a field names
        print(f"{name}: {err}", file=sys.stderr)
        return 1
    try:
        rows = experiment.launch(plan)
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
        return _interrupted(interrupt, name, plan.config.resume, resume_flag)
    except KeyboardInterrupt as interrupt:
        signum = getattr(interrupt, "signum", signal.SIGINT)
        print(
            f"\n{signal.Signals(signum).name} before training started; nothing new "
            "was saved.",
            file=sys.stderr,
        )
        return 128 + signum
    return 1 if any(row.get("status") == "diverged" for row in rows) else 0


def _interrupted(
    interrupt: experiment.Interrupted, name: str, resume: bool, resume_flag: str
) -> int:
    """Says what a signal left (and the command that resumes); the shell's status."""
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
        command.append(resume_flag)
    print(f"Resume with:\n    {shlex.join(command)}", file=sys.stderr)
    return interrupt.exit_code


def run_alias(
    name: str,
    get_config: Callable[[], Any],
    fields: Mapping[str, str],
    **define_kwargs: Any,
) -> Callable[[Sequence[str]], int]:
    """A short command: ``get_config()``'s ``fields`` as flags (with every option); its ``main``."""
    define_flags(get_config(), {**RUN_FLAGS, **OPTION_FLAGS, **fields}, **define_kwargs)

    def alias_main(argv: Sequence[str]) -> int:
        try:
            config = apply_flags(get_config())
        except (TypeError, ValueError, KeyError) as err:
            print(f"{name}: {err}", file=sys.stderr)
            return 2
        return main(argv, name, config)

    return alias_main
