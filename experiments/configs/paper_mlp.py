r"""The paper's measurement network trained: a 6x1024 MLP on CIFAR-10.

    python -m experiments.prepare_data --dataset=cifar10   # once
    python -m experiments.main --config=experiments/configs/paper_mlp.py \
        --config.compare=backprop,wt,mixing --config.data_dir=~/tensorflow_datasets

Singhal et al. measure their guesses along a backprop trajectory of this
network (``experiments.cosine``, ``experiments.bias``); training it with
each guess is this config. Hours per method on a CPU, minutes on a GPU.
"""

from guessgrad import experiment


def get_config():
    config = experiment.config_dict(
        experiment.Config(model=experiment.MLPSpec(depth=6, width=1024))
    )
    config.method = "wt"
    config.dataset = "cifar10"
    config.optimizer = "adamw"
    config.learning_rate = 1e-3
    config.batch_size = 128
    config.epochs = 100
    config.eval_every = 2000
    return config
