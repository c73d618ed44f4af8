r"""The paper's Figure 3 (left): bias, the cosine of the mean of K guesses (``python -m experiments.bias``).

    python -m experiments.bias                        # 3x256 MLP after 100 backprop steps, K up to 1000
    python -m experiments.bias --depth=6 --width=1024 --dataset=cifar10   # the paper's network
    python -m experiments.bias --methods=wt,mixing --max_guesses=100 --examples=8

After ``steps`` backprop steps, for each of ``examples`` training examples
and each method of ``methods``, the cosine of the mean of K guesses
(K = 1 .. ``max_guesses``) with that example's true gradient. Each field is
a flag of the same name (an estimator option of ``options`` too, but
``--downstream_depth`` for ``options.depth``).
"""

from experiments import measuring


def get_config():
    config = measuring.base_config(
        steps=100,
        methods="directional,activation_perturbation,mixing,wt",
        depth=3,
        width=256,
    )
    config.max_guesses = 1000
    config.examples = 4
    return config
