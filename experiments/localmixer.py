r"""Trains a LocalMixer (Ren et al. 2022) on image classification with a gradient estimator.

    python -m experiments.localmixer --method=wt
    python -m experiments.localmixer --method=activation_perturbation --objective=local
    python -m experiments.localmixer --compare=backprop,wt,mixing
    python -m experiments.localmixer --method=wt --dataset=cifar10 --config=M/8/16 --augment

The short form of ``python -m experiments.main
--config=experiments/configs/localmixer.py``: that file's fields as flags
(here ``--config`` is the mixer's size, ``model.config``). Trains the small
"tiny" size on the 10,000 MNIST digits that ship with guessgrad unless
--config and --dataset name others. --objective picks the losses: "global"
(one at the readout), "local" (one per block, a stop_gradient between
blocks) or "local_greedy" (per block, replicated per patch and channel
group).
"""

from __future__ import annotations

from absl import app

from experiments import common  # before guessgrad: it sets XLA_FLAGS for jax
from experiments.configs import localmixer
from guessgrad import experiment, models

main = common.run_alias(
    "localmixer",
    localmixer.get_config,
    {"config": "model.config", "objective": "model.objective"},
    help={
        "config": "Named LocalMixer configuration: one of "
        f"{', '.join(models.LOCALMIXER_CONFIGS)} (the patch grid must divide the image).",
        "objective": f"One of {', '.join(experiment.LOCALMIXER_OBJECTIVES)}. global: "
        "one loss at the readout; local: a loss per block, a stop_gradient between "
        "blocks; local_greedy: per-block losses replicated per patch and channel "
        "group (Ren et al.'s LG-*).",
    },
)

if __name__ == "__main__":
    app.run(main)
