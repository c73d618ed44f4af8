r"""Ren et al.'s CIFAR-10 setting: LocalMixer ``M/8/16`` with random crops and flips.

    python -m experiments.prepare_data --dataset=cifar10   # once
    python -m experiments.main --config=experiments/configs/localmixer_cifar10.py \
        --config.compare=backprop,activation_perturbation,mixing,wt \
        --config.options.mask=True --config.data_dir=~/tensorflow_datasets

4 blocks, 8x8 patches, 512 channels, 16 groups (919K parameters), local
greedy losses, 200 epochs with crops and flips as in their reference code
(which uses SGD with warm-up and a decaying rate; this runner AdamW at a
constant rate). Hours per method on one GPU. The paper's second column is
``--config.epochs=500``.
"""

from guessgrad import experiment


def get_config():
    config = experiment.config_dict(
        experiment.Config(
            model=experiment.LocalMixerSpec(config="M/8/16", objective="local_greedy")
        )
    )
    config.method = "wt"
    config.dataset = "cifar10"
    config.augment = True
    config.optimizer = "adamw"
    config.learning_rate = 3e-3
    config.batch_size = 128
    config.epochs = 200
    config.eval_every = 5000
    return config
