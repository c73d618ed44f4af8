r"""The paper's Figures 6 and 7: gradients lie in the subspace of the activations.

    python -m experiments.subspace                    # 3x256 MLP after 100 backprop steps
    python -m experiments.subspace --depth=6 --width=1024 --dataset=cifar10   # the paper's network

Trains an MLP by backprop for ``--steps`` steps; then, on one batch, for each
linear layer ``l`` with input activations ``x_l`` [B, n] (the image, then
each hidden layer's output) measures how much of the per-example gradient
with respect to those activations, ``dL/dx_l`` [B, n] (the paper's claim:
``dL/dx_{k+1}`` lies approximately in the span of the activations
``x_{k+1}``, which is why activation mixing guesses well), lies in the
top-k principal directions of ``x_l``: the cosine between ``dL/dx_l`` and its
projection (:func:`guessgrad.metrics.subspace_overlap`, uncentred), against
a random k-dimensional subspace, for k from 1 to n.

Beside it, labelled as such, the same overlap for the rows of the layer's
weight gradient ``sum_b delta_b x_b^T``, which lie in the span of the
batch's inputs by construction (overlap exactly 1 at k = rank(X)): a much
weaker statement than the paper's. Prints the table at a few k, and writes
subspace.json, subspace.md and subspace.png. (MLP only: a layer's input and
its kernel are read from the MLP's sites and parameters.)
Its settings are ``experiments/configs/subspace.py``'s fields, each a flag.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app

import guessgrad as gg
from experiments import common, measuring
from experiments.configs.subspace import get_config
from guessgrad import metrics

NAME = "subspace"
common.define_flags(get_config(), measuring.FIELDS, help=measuring.HELP)
measuring.one_of("model", measuring.MODELS)


def ks_for(n: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to n (n included)."""
    out = [2**i for i in range(n.bit_length()) if 2**i < n]
    return (*out, n)


def layer_inputs(setup: measuring.Setup, params, images) -> list[jax.Array]:
    """Each linear layer's input [B, n]: the image, then the previous site after its activation."""
    raw = gg.site_values(setup.model, params, {"image": images})
    labels = jnp.zeros(images.shape[0], jnp.int32)
    found = gg.structure(setup.model, params, {"image": images, "label": labels})
    inputs = [images.reshape(images.shape[0], -1)]
    for info in found.sites[:-1]:
        value = raw[info.path]
        inputs.append(value if info.act is None else info.act(value))
    return inputs


def input_gradients(model, params, batch) -> list[jax.Array]:
    """Per example, each linear layer's ``dL/dx_l`` [B, n]: ``dL/ds_l K_l^T``.

    ``dL/ds_l`` is the gradient at the layer's site (its pre-activation
    ``s_l = x_l K_l + b_l``), per example (the examples' losses are
    independent), by reverse mode.
    """
    found = gg.structure(model, params, batch)
    site_grads = gg.site_gradients(model, params, batch)
    names = sorted(params["params"], key=_layer_index)
    return [
        site_grads[info.path].reshape(batch["image"].shape[0], -1)
        @ params["params"][name]["kernel"].T
        for info, name in zip(found.sites, names)
    ]


def overlaps(rows, x, key) -> dict:
    n = x.shape[1]
    grid = ks_for(n)
    overlap = metrics.subspace_overlap(rows, x, grid, key)
    return {
        "n": int(n),
        "ks": list(grid),
        "pca": np.asarray(overlap["pca"]).tolist(),
        "random": np.asarray(overlap["random"]).tolist(),
    }


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        config = common.apply_flags(get_config())
        if config.model != "mlp":
            raise ValueError("experiments.subspace measures MLPs (--model=mlp).")
        path = measuring.prepare_workdir(config, NAME)
        setup = measuring.setup(config, [])
    except (ValueError, TypeError) as err:
        return measuring.fail(NAME, err)
    params = measuring.trained_params(config, setup)
    batch = setup.batch(config.steps)
    grads = setup.true_grad_fn(params, batch)
    inputs = layer_inputs(setup, params, batch["image"])
    input_grads = input_gradients(setup.model, params, batch)
    kernels = [
        grads["params"][name]["kernel"]
        for name in sorted(grads["params"], key=_layer_index)
    ]
    layers = {}
    key = jax.random.key(config.seed + 1)
    for index, (x, dx, kernel) in enumerate(zip(inputs, input_grads, kernels)):
        layer_key = jax.random.fold_in(key, index)
        layer = overlaps(dx, x, layer_key)
        layer["weight_gradient"] = overlaps(kernel.T, x, layer_key)
        layers[f"layer {index}"] = layer
        print(
            f"[{NAME}] layer {index} (n={layer['n']}), dL/dx: "
            + ", ".join(
                f"k={k} {p:.3f}/{r:.3f}"
                for k, p, r in zip(layer["ks"], layer["pca"], layer["random"])
            )
        )
    results = {
        "experiment": NAME,
        "settings": measuring.settings(config),
        "layers": layers,
        "measured": "per layer: dL/dx_l (per example) against the top-k principal "
        "directions of x_l (pca) and a random subspace (random); weight_gradient: the "
        "rows of the kernel's gradient, in the inputs' span by construction",
        "paper": "the gradient's projection on the top-k PCA directions of the activations "
        "is far closer to it than a random k-dimensional subspace's",
    }
    shown_k = (1, 8, 32)
    header = (
        ["layer", "n"]
        + [f"k={k} dL/dx: PCA / random" for k in shown_k]
        + [f"k={k} weight-gradient rows: PCA" for k in shown_k]
    )

    def at(curve, layer, k, fmt="{:.3f}"):
        return fmt.format(curve[layer["ks"].index(k)]) if k in layer["ks"] else "-"

    rows = []
    for name, layer in layers.items():
        cells = [
            f"{at(layer['pca'], layer, k)} / {at(layer['random'], layer, k)}"
            for k in shown_k
        ]
        cells += [at(layer["weight_gradient"]["pca"], layer, k) for k in shown_k]
        rows.append([name, str(layer["n"])] + cells)
    text = measuring.markdown(header, rows)
    print(text)
    fig, axes = measuring.figure(len(layers), width=4.0)
    for ax, (name, layer) in zip(axes, layers.items()):
        ax.plot(layer["ks"], layer["pca"], "-o", ms=3, label="dL/dx: top-k PCA of x")
        ax.plot(layer["ks"], layer["random"], "-s", ms=3, label="dL/dx: random k-dim")
        ax.plot(
            layer["ks"],
            layer["weight_gradient"]["pca"],
            ":",
            label="weight-gradient rows: top-k PCA",
        )
        ax.set(
            xscale="log", xlabel="k", ylabel="cosine with the projection", title=name
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    measuring.save(path, NAME, results, text, fig)
    measuring.paper_hint(config, NAME)
    return 0


def _layer_index(name: str) -> int:
    return int(name.rsplit("_", 1)[-1])


if __name__ == "__main__":
    app.run(main)
