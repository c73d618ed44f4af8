r"""Ren et al.'s LocalMixer, the small ``tiny`` size, on the embedded digits (``python -m experiments.localmixer``).

    python -m experiments.main --config=experiments/configs/localmixer.py
    python -m experiments.main --config=experiments/configs/localmixer.py \
        --config.compare=backprop,wt,mixing --config.model.objective=local

``model.objective`` picks the losses: ``global`` (one at the readout),
``local`` (one per block, a stop_gradient between blocks) or
``local_greedy`` (per block, replicated per patch and channel group, Ren et
al.'s LG-*).
"""

from guessgrad import experiment


def get_config():
    config = experiment.config_dict(
        experiment.Config(
            model=experiment.LocalMixerSpec(config="tiny", objective="local_greedy")
        )
    )
    config.method = "mixing"
    config.dataset = "mnist10k"
    config.optimizer = "adamw"
    config.learning_rate = 3e-3
    config.batch_size = 128
    config.epochs = 30
    config.eval_every = 1000
    return config
