r"""Trains an MLP on image classification with a gradient estimator.

    python -m experiments.mlp --method=mixing
    python -m experiments.mlp --method=wt --num_guesses=4 --steps=5000
    python -m experiments.mlp --compare=all

The short form of ``python -m experiments.main
--config=experiments/configs/mlp.py``: that file's fields as flags
(``--depth`` is ``model.depth``, every estimator option a flag). Trains on
the 10,000 MNIST digits that ship with guessgrad unless --dataset names
another, and writes config.json, metrics.jsonl, results.json, curves.png
and checkpoints to --workdir.
"""

from __future__ import annotations

from absl import app

from experiments import common  # before guessgrad: it sets XLA_FLAGS for jax
from experiments.configs import mlp

main = common.run_alias(
    "mlp",
    mlp.get_config,
    {"depth": "model.depth", "width": "model.width"},
    help={
        "depth": "Linear layers of the MLP.",
        "width": "Hidden units per layer.",
        "epochs": "Passes over the training set. About a minute for 3x128 mixing "
        "on 2 CPU cores.",
    },
)

if __name__ == "__main__":
    app.run(main)
