r"""The paper's Figures 6 and 7: gradients lie in the subspace of the activations.

    python -m experiments.subspace                    # 3x256 MLP after 100 backprop steps
    python -m experiments.subspace --depth=6 --width=1024 --dataset=cifar10   # the paper's network

Trains an MLP by backprop for ``--steps`` steps; then, on one batch, for each
linear layer ``l`` (input activations ``X_l`` [B, n], the batch-mean gradient
of its kernel ``G_l``, as rows [m, n]) measures the cosine between ``G_l``
and its projection on the top-k principal directions of ``X_l``
(:func:`guessgrad.metrics.subspace_overlap`, uncentred), against a random
k-dimensional subspace, for k from 1 to n. A layer's weight gradient is a
sum of per-example outer products ``delta_b x_b^T``, so at k = rank(X) the
overlap is exactly 1; the paper's point is how fast it gets there. Prints
the table at a few k, and writes subspace.json, subspace.md and subspace.png.
(MLP only: the layer inputs are read from its sites.)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import guessgrad as gg
from experiments import measuring
from guessgrad import metrics
from guessgrad._src import sites as sites_lib

FLAGS = flags.FLAGS
NAME = "subspace"

measuring.define_flags(steps=100, methods="backprop", depth=3, width=256)


def ks_for(n: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to n (n included)."""
    out = [2**i for i in range(n.bit_length()) if 2**i < n]
    return (*out, n)


def layer_inputs(setup: measuring.Setup, params, images) -> list[jax.Array]:
    """Each linear layer's input [B, n]: the image, then the previous site after its activation."""
    _, raw, _ = sites_lib.run(setup.model, sites_lib.split_variables(params), (images,))
    labels = jnp.zeros(images.shape[0], jnp.int32)
    found = gg.structure(setup.model, params, {"image": images, "label": labels})
    inputs = [images.reshape(images.shape[0], -1)]
    for info in found.sites[:-1]:
        value = raw[info.path]
        inputs.append(value if info.act is None else info.act(value))
    return inputs


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        if FLAGS.model != "mlp":
            raise ValueError("experiments.subspace measures MLPs (--model=mlp).")
        path = measuring.prepare_workdir(NAME)
        setup = measuring.setup([])
    except (ValueError, TypeError) as err:
        return measuring.fail(NAME, err)
    params = measuring.trained_params(setup)
    batch = setup.batch(FLAGS.steps)
    grads = setup.true_grad_fn(params, batch)
    inputs = layer_inputs(setup, params, batch["image"])
    kernels = [
        grads["params"][name]["kernel"]
        for name in sorted(grads["params"], key=_layer_index)
    ]
    layers = {}
    key = jax.random.key(FLAGS.seed + 1)
    for index, (x, kernel) in enumerate(zip(inputs, kernels)):
        n = x.shape[1]
        grid = ks_for(n)
        overlap = metrics.subspace_overlap(
            kernel.T, x, grid, jax.random.fold_in(key, index)
        )
        layers[f"layer {index}"] = {
            "n": int(n),
            "ks": list(grid),
            "pca": np.asarray(overlap["pca"]).tolist(),
            "random": np.asarray(overlap["random"]).tolist(),
        }
        print(
            f"[{NAME}] layer {index} (n={n}): "
            + ", ".join(
                f"k={k} {p:.3f}/{r:.3f}"
                for k, p, r in zip(
                    grid,
                    layers[f"layer {index}"]["pca"],
                    layers[f"layer {index}"]["random"],
                )
            )
        )
    results = {
        "experiment": NAME,
        "settings": measuring.settings(),
        "layers": layers,
        "paper": "the gradient's projection on the top-k PCA directions of the activations "
        "is far closer to it than a random k-dimensional subspace's",
    }
    shown_k = (1, 8, 32)
    header = ["layer", "n"] + [f"k={k} PCA / random" for k in shown_k]
    rows = []
    for name, layer in layers.items():
        cells = []
        for k in shown_k:
            if k in layer["ks"]:
                i = layer["ks"].index(k)
                cells.append(f"{layer['pca'][i]:.3f} / {layer['random'][i]:.3f}")
            else:
                cells.append("-")
        rows.append([name, str(layer["n"])] + cells)
    text = measuring.markdown(header, rows)
    print(text)
    fig, axes = measuring.figure(len(layers), width=4.0)
    for ax, (name, layer) in zip(axes, layers.items()):
        ax.plot(layer["ks"], layer["pca"], "-o", ms=3, label="top-k PCA of activations")
        ax.plot(layer["ks"], layer["random"], "-s", ms=3, label="random k-dim subspace")
        ax.set(
            xscale="log", xlabel="k", ylabel="cosine with the projection", title=name
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    measuring.save(path, NAME, results, text, fig)
    measuring.paper_hint(NAME)
    return 0


def _layer_index(name: str) -> int:
    return int(name.rsplit("_", 1)[-1])


if __name__ == "__main__":
    app.run(main)
