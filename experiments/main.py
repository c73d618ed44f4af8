r"""Runs an experiment from its config file.

    python -m experiments.main --config=experiments/configs/mlp.py
    python -m experiments.main --config=experiments/configs/mlp.py \
        --config.method=wt --config.options.num_guesses=4 --config.steps=30 --workdir=runs/wt
    python -m experiments.main --config=experiments/configs/localmixer.py \
        --config.compare=backprop,wt,mixing

``--config`` names a file under ``experiments/configs/`` (its
``get_config()``); ``--config.<field>=<value>`` overrides any field of it:
the run's (``method``, ``steps``, ``learning_rate``, ...), the model's
(``model.depth``), every estimator option (``options.num_guesses``),
``compare`` (methods to compare, "all" or a comma-separated list). The
resolved configuration is what the workdir's config.json records.
``--workdir`` is ``--config.workdir``. The logic is guessgrad.experiment's.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from experiments import common  # before guessgrad: it sets XLA_FLAGS for jax

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file, experiments/configs/<name>.py.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (the same as --config.workdir)."
)
flags.mark_flags_as_required(["config"])


def main(argv: Sequence[str]) -> int:
    """Runs the config file's experiment; returns the exit status."""
    config = _CONFIG.value
    if _WORKDIR.value is not None:
        config.workdir = _WORKDIR.value
    return common.main(argv, "main", config, resume_flag="--config.resume=True")


if __name__ == "__main__":
    try:
        app.run(main)
    except AttributeError as err:  # --config.<name> that the config file lacks
        field = str(err).strip("\"'")
        sys.exit(f"main: the config has no field {field}; see the file's get_config().")
