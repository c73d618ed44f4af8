r"""The paper's Figure 4: self-sharpening, guesses and weights losing rank (``python -m experiments.self_sharpening``).

    python -m experiments.self_sharpening             # 3x256 MLP, 500 steps per run
    python -m experiments.self_sharpening --depth=6 --width=128 --dataset=cifar10 \
        --steps=50000 --train_learning_rate=1e-4      # the paper's setting
    python -m experiments.self_sharpening --powers=1,4 --points=10

Training with the W^T guess through each next layer's ``U S^p V^T`` for
every p of ``powers``, and with each method of ``methods`` (``optimizer``,
``train_learning_rate``), measured at ``points`` steps: the cosine with the
true gradient and the effective ranks of guesses and weights. Each field is
a flag of the same name (an estimator option of ``options`` too, but
``--downstream_depth`` for ``options.depth``).
"""

from experiments import measuring


def get_config():
    config = measuring.base_config(
        steps=500, methods="self_sharpening,wt", depth=3, width=256
    )
    config.points = 5
    config.powers = [0.1, 0.25, 0.5, 1.0, 2.0, 4.0]
    config.train_learning_rate = 1e-3
    config.optimizer = "stable_adamw"
    return config
