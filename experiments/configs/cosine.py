r"""The paper's Figure 1: cosine with the true gradient and one-step effectiveness (``python -m experiments.cosine``).

    python -m experiments.cosine                      # 6x1024 MLP, embedded digits, 300 steps
    python -m experiments.cosine --dataset=cifar10 --steps=3000 --points=30   # the paper's setting
    python -m experiments.cosine --methods=wt,mixing --mode=joint --num_guesses=4

Every method of ``methods`` measured at ``points`` steps of a backprop
trajectory: its cosine with the true gradient (over ``num_keys`` keys),
per layer and per example (``examples`` of each batch), and its one-step
effectiveness; activation-space methods in each mode of ``mode``. Each field
is a flag of the same name (an estimator option of ``options`` too, but
``--downstream_depth`` for ``options.depth``).
"""

from experiments import measuring


def get_config():
    config = measuring.base_config(
        steps=300,
        methods="directional,activation_perturbation,mixing,wt",
        mode=("joint", "per_layer"),
    )
    config.points = 6
    config.num_keys = 4
    config.examples = 16
    return config
