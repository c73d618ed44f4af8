r"""An MLP on the 10,000 MNIST digits that ship with guessgrad (``python -m experiments.mlp``).

    python -m experiments.main --config=experiments/configs/mlp.py
    python -m experiments.main --config=experiments/configs/mlp.py \
        --config.method=wt --config.options.num_guesses=4 --config.steps=5000

About a minute for 3x128 mixing on 2 CPU cores. The learning rate 1e-3 was
measured on mnist10k (3x128, adamw, 300 epochs, seeds 0 and 1): mixing
reached 92.7% test accuracy at 1e-3 against 91.3% at 1e-4, wt 93.7% against
94.7%; 1e-3 leads both early in training.
"""

from guessgrad import experiment


def get_config():
    config = experiment.config_dict(
        experiment.Config(model=experiment.MLPSpec(depth=3, width=128))
    )
    config.method = "mixing"
    config.dataset = "mnist10k"
    config.optimizer = "adamw"
    config.learning_rate = 1e-3
    config.batch_size = 128
    config.epochs = 300
    config.eval_every = 1000
    return config
