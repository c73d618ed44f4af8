r"""Trains a LocalMixer (Ren et al. 2022) on image classification with a gradient estimator.

    python -m experiments.localmixer --method=wt
    python -m experiments.localmixer --method=activation_perturbation --objective=local
    python -m experiments.localmixer --compare=backprop,wt,mixing
    python -m experiments.localmixer --method=wt --dataset=cifar10 --config=M/8/16 --augment

trains the small "tiny" configuration on the 10,000 MNIST digits that ship
with guessgrad unless --config and --dataset name others, and writes
config.json, metrics.jsonl, results.json, curves.png and checkpoints to
--workdir. --objective picks the losses: "global" (one at the readout),
"local" (one per block, a stop_gradient between blocks) or "local_greedy"
(per block, replicated per patch and channel group). The shared flags are in
experiments/common.py; all logic is in guessgrad.experiment.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags

from experiments import common  # before guessgrad: it sets XLA_FLAGS for jax
from guessgrad import experiment, models

DEFAULT_EPOCHS = 30
DEFAULT_LEARNING_RATE = 3e-3

common.define_flags(
    epochs=DEFAULT_EPOCHS,
    learning_rate=DEFAULT_LEARNING_RATE,
    epochs_help="",
    learning_rate_help="",
    workdir_help="runs/<dataset>-<method>-localmixer-<config>-<objective>-seed<seed>",
)
_CONFIG = flags.DEFINE_string(
    "config",
    experiment.LocalMixerSpec.config,
    "Named LocalMixer configuration: one of "
    f"{', '.join(models.LOCALMIXER_CONFIGS)} (the patch grid must divide the image).",
)
_OBJECTIVE = flags.DEFINE_string(
    "objective",
    experiment.LocalMixerSpec.objective,
    f"One of {', '.join(experiment.LOCALMIXER_OBJECTIVES)}. global: one loss at the readout; local: a loss per block, a stop_gradient "
    "between blocks; local_greedy: per-block losses replicated per patch and "
    "channel group (Ren et al.'s LG-*).",
)


def main(argv: Sequence[str]) -> int:
    """Runs one method (or --compare); returns the exit status."""
    return common.main(
        argv,
        "localmixer",
        lambda: experiment.LocalMixerSpec(
            config=_CONFIG.value, objective=_OBJECTIVE.value
        ),
    )


if __name__ == "__main__":
    app.run(main)
