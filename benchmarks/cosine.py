"""Cosine of each estimator with backprop at initialisation, joint vs per-layer mode.

    python -m benchmarks.cosine --depth=6 --width=1024 --batch_size=128 --num_keys=4

Uses the first training batch of the embedded digits (or --dataset), a
freshly initialised MLP, and averages the cosine over ``--num_keys`` keys.
Prints a table and writes JSON to ``--out``.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import guessgrad as gg
from guessgrad import data

FLAGS = flags.FLAGS
flags.DEFINE_integer("depth", 6, "Linear layers of the MLP.")
flags.DEFINE_integer("width", 1024, "Hidden width.")
flags.DEFINE_integer("batch_size", 128, "Examples in the batch.")
flags.DEFINE_integer("num_keys", 4, "Guesses (keys) averaged per cosine.")
flags.DEFINE_string("dataset", data.DEFAULT_DATASET, "Data set name.")
flags.DEFINE_list("methods", list(gg.ESTIMATORS), "Estimators to measure.")
flags.DEFINE_integer(
    "wperp_batch_size", 16, "Smaller batch for exact wperp (one SVD per example)."
)
flags.DEFINE_string("out", "cosine.json", "Where to write the JSON results.")


def flat(tree):
    return jax.flatten_util.ravel_pytree(tree)[0]


def cosine(a, b):
    return float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def measure(model, params, batch, name, mode, num_keys):
    options = {"mode": mode} if mode else {}
    estimate = jax.jit(gg.get_estimator(name, model, **options))
    true = flat(gg.get_estimator("backprop", model)(params, batch, None))
    start = time.perf_counter()
    values = [
        cosine(flat(estimate(params, batch, jax.random.key(k))), true)
        for k in range(num_keys)
    ]
    return float(np.mean(values)), float(np.std(values)), time.perf_counter() - start


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    dataset = data.load(FLAGS.dataset)
    images = data.normalize(dataset.train_images[: FLAGS.batch_size], flatten=True)
    batch = {
        "image": images,
        "label": jnp.asarray(dataset.train_labels[: FLAGS.batch_size]),
    }
    model = gg.models.MLP(FLAGS.depth, FLAGS.width, dataset.num_classes)
    params = model.init(jax.random.key(0), batch["image"])
    rows = []
    for name in FLAGS.methods:
        modes = (
            ["joint", "per_layer"] if "mode" in gg.estimator_options(name) else [None]
        )
        use = batch
        if name == "wperp":
            use = jax.tree.map(lambda a: a[: FLAGS.wperp_batch_size], batch)
        for mode in modes:
            mean, std, seconds = measure(model, params, use, name, mode, FLAGS.num_keys)
            rows.append(
                {
                    "method": name,
                    "mode": mode or "-",
                    "cosine": mean,
                    "std": std,
                    "batch_size": int(use["label"].shape[0]),
                    "seconds": seconds,
                }
            )
            print(
                f"{name:24s} {mode or '-':10s} cos={mean:+.5f} ±{std:.5f} (B={rows[-1]['batch_size']}, "
                f"{seconds:.1f}s)",
                flush=True,
            )
    with open(FLAGS.out, "w") as f:
        json.dump(
            {
                "depth": FLAGS.depth,
                "width": FLAGS.width,
                "dataset": FLAGS.dataset,
                "rows": rows,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    app.run(main)
