r"""The paper's Figure 3 (middle and right): a method against oracle_angle at its cosine (``python -m experiments.bias_training``).

    python -m experiments.bias_training               # 3x256 MLP, W^T against the oracle, 3 optimisers
    python -m experiments.bias_training --methods=mixing --dataset=cifar10 --steps=5000
    python -m experiments.bias_training --oracle_scale=gradient --momentum_learning_rate=0.003

The one method of ``methods``' cosine at initialisation (over
``cosine_batches`` batches), then ``steps`` steps of training with it and
with ``oracle_angle`` at that cosine (its step: ``oracle_scale``), by SGD,
SGD with momentum and AdamW at their learning rates. Each field is a flag of
the same name (an estimator option of ``options`` too, but
``--downstream_depth`` for ``options.depth``).
"""

from experiments import measuring


def get_config():
    config = measuring.base_config(steps=500, methods="wt", depth=3, width=256)
    config.sgd_learning_rate = 0.1
    config.momentum_learning_rate = 0.01
    config.adamw_learning_rate = 1e-3
    config.cosine_batches = 4
    config.oracle_scale = "directional"
    return config
