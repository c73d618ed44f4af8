r"""The paper's Figures 6 and 7: gradients in the subspace of the activations (``python -m experiments.subspace``).

    python -m experiments.subspace                    # 3x256 MLP after 100 backprop steps
    python -m experiments.subspace --depth=6 --width=1024 --dataset=cifar10   # the paper's network
    python -m experiments.subspace --steps=1000 --batch_size=256

After ``steps`` backprop steps of an MLP, on one batch, how much of each
layer's per-example gradient with respect to its input lies in the top-k
principal directions of that input, against a random subspace. Each field is
a flag of the same name.
"""

from experiments import measuring


def get_config():
    return measuring.base_config(steps=100, methods="backprop", depth=3, width=256)
