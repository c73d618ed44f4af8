"""W-perp with estimator state: the warm-started variant against the cold Krylov default.

    python -m benchmarks.wperp_state                      # fidelity at 3x256, timing at 6x1024
    python -m benchmarks.wperp_state --quick              # small and fast: a smoke run

Fidelity (``--depth`` x ``--width`` MLP, trained by ``--train_steps`` steps
of backprop on the packaged digits): per rank k in ``--ranks``, over the
hidden sites and ``--examples`` examples of a held-out batch, the cosine
between the mean estimate's direction at the site, ``P g`` (``P`` the
projector on the found k-dimensional subspace, ``g`` the true site
gradient), and exact W-perp's ``P_k g`` (``mean cos``; 1 is exact), and
the relative projector error ``|P - P_k| / |P_k|`` (``proj``). The warm
variant's state comes from ``init`` on a training batch followed by
``--refine_steps`` steps on further training batches at the same weights
(what it carries after as many training steps, if weights stood still).

Timing (``--time_depth`` x ``--time_width``, batch ``--time_batch``): the
median jitted training step (estimate + AdamW) per candidate, measured
round-robin with ``wt`` in one process, and its ratio to ``wt``'s, in
per-layer mode; ``products`` is the next-map products per site.
Writes the rows as JSON to ``--out``.
"""

from __future__ import annotations

import json
import platform
import statistics
import time

import jax
import numpy as np
import optax
from absl import app, flags

import guessgrad as gg
from benchmarks.common import (
    exact_bases,
    site_gradients,
    sub_context,
    subspace_scores,
    train,
)
from guessgrad import data as gdata
from guessgrad import rules

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Small sizes: a smoke run.")
flags.DEFINE_integer("depth", 3, "Hidden layers of the fidelity MLP.")
flags.DEFINE_integer("width", 256, "Width of the fidelity MLP.")
flags.DEFINE_list("ranks", ["3", "10"], "Ranks k to score.")
flags.DEFINE_integer("train_steps", 300, "Backprop steps that train the MLP.")
flags.DEFINE_integer("examples", 16, "Examples whose exact subspace is computed.")
flags.DEFINE_integer("refine_steps", 20, "Warm-state steps before scoring.")
flags.DEFINE_integer("time_depth", 6, "Hidden layers of the timed MLP.")
flags.DEFINE_integer("time_width", 1024, "Width of the timed MLP.")
flags.DEFINE_list("time_batches", ["128"], "Batch sizes of the timed step.")
flags.DEFINE_integer("time_rank", 3, "Rank of the timed candidates.")
flags.DEFINE_integer("rounds", 7, "Timed rounds (0: no timing).")
flags.DEFINE_list(
    "cosine_widths", [], "Widths W of trained 6xW MLPs for whole-network cosines."
)
flags.DEFINE_integer("cosine_rank", 10, "Rank of the whole-network cosines.")
flags.DEFINE_integer("cosine_batch", 8, "Examples per whole-network cosine.")
flags.DEFINE_integer("cosine_batches", 32, "Batches (one key each) they average.")
flags.DEFINE_list(
    "cosine_methods",
    ["wt", "wperp", "krylov", "warm"],
    "Methods of the whole-network cosines (wperp is always added: the ratios' "
    "reference); also debiased (rules.debiased_wt).",
)
flags.DEFINE_float("debiased_sigma", 1e-6, "sigma of debiased_wt.")
flags.DEFINE_string("out", "benchmark_wperp_state.json", "Where to write the rows.")


def warm_settings(rank: int) -> list[tuple[int, int]]:
    """(subspace P, Krylov steps d) of the warm candidates at rank k."""
    settings = [(rank + 2, 0), (rank + 3, 0), (2 * rank, 0), (rank + 3, 1)]
    return list(dict.fromkeys(settings))  # (rank + 3, 0) is the default


def candidates(rank: int) -> dict[str, dict]:
    """name -> wperp_ns options."""
    out = {"krylov (the default)": {"variant": "krylov"}}
    for subspace, steps in warm_settings(rank):
        default = (subspace, steps) == (rank + 3, 0)
        out[f"warm P{subspace} d{steps}" + (" (warm default)" if default else "")] = {
            "variant": "warm",
            "subspace": subspace,
            "krylov_steps": steps,
        }
    return out


def warm_state(model, params, loader, rank, options, steps):
    """The warm rule's per-site bases after ``init`` and ``steps`` refinements."""
    rule = rules.wperp_ns(
        rank,
        variant="warm",
        subspace=options["subspace"],
        krylov_steps=options["krylov_steps"],
    )
    estimator = gg.estimators.from_rule(model, rule)
    state = estimator.init(params, loader.batch(1))
    step = jax.jit(estimator)
    for index in range(steps):
        _, state = step(params, loader.batch(2 + index), jax.random.key(index), state)
    return list(state.values())  # forward order of the guessed sites


def fidelity(dataset) -> list[dict]:
    loader = gdata.Loader(
        dataset.train_images, dataset.train_labels, 128, jax.random.key(0), flatten=True
    )
    model = gg.models.MLP(FLAGS.depth, FLAGS.width, dataset.num_classes)
    params = model.init(jax.random.key(0), loader.batch(0)["image"])
    params, _ = train(model, params, loader, FLAGS.train_steps)
    held_out = {
        "image": gdata.normalize(dataset.test_images[: FLAGS.examples], flatten=True),
        "label": dataset.test_labels[: FLAGS.examples],
    }
    ctx = sub_context(model, params, held_out, FLAGS.examples)
    # MLP(depth): depth - 1 hidden sites, then the logits.
    widths = [FLAGS.width] * (FLAGS.depth - 1) + [dataset.num_classes]
    rows = []
    for rank in [int(r) for r in FLAGS.ranks]:
        # Sites whose next map has more than k outputs (else any guess is in the top k).
        sites = [i for i in range(FLAGS.depth - 1) if widths[i + 1] > rank]
        grads = site_gradients(model, params, held_out, FLAGS.examples, sites)
        bases, _ = exact_bases(ctx, sites, rank)
        for name, options in candidates(rank).items():
            if options["variant"] == "krylov":
                steps = rules.default_krylov_steps(rank)

                def space(i, steps=steps, rank=rank):
                    return rules.krylov_subspace(
                        ctx, i, jax.random.key(i), rank, rules.KRYLOV_BLOCK, steps
                    )

                products = rules.wperp_ns_products(rank)
            else:
                state = warm_state(
                    model, params, loader, rank, options, FLAGS.refine_steps
                )

                def space(i, state=state, options=options, rank=rank):
                    ritz, keep, _ = rules.warm_subspace(
                        ctx, i, rank, options["krylov_steps"], state[i]
                    )
                    return ritz, keep

                products = rules.wperp_ns_products(
                    rank,
                    "warm",
                    options["krylov_steps"],
                    subspace=options["subspace"],
                )
            found = jax.jit(
                lambda sites=sites, space=space: [space(i) for i in sites]
            )()
            per_site = [
                [
                    float(np.mean(x))
                    for x in subspace_scores(ritz, keep, bases[i][0], grads[i], rank)
                ]
                for i, (ritz, keep) in zip(sites, found)
            ]
            row = {
                "rank": rank,
                "name": name,
                "products": products,
                "proj": float(np.mean([p for p, _ in per_site])),
                "mean_cos": float(np.mean([c for _, c in per_site])),
            }
            rows.append(row)
            print(
                f"  k={rank:2d} {name:26s} products {products:3d} proj "
                f"{row['proj']:.3f} mean cos {row['mean_cos']:.4f}",
                flush=True,
            )
    return rows


def timing(dataset, batch_size: int) -> list[dict]:
    loader = gdata.Loader(
        dataset.train_images,
        dataset.train_labels,
        batch_size,
        jax.random.key(0),
        flatten=True,
    )
    batch = loader.batch(0)
    model = gg.models.MLP(FLAGS.time_depth, FLAGS.time_width, dataset.num_classes)
    params = model.init(jax.random.key(0), batch["image"])
    optimizer = optax.adamw(1e-4)
    rank = FLAGS.time_rank
    named = {"wt": gg.get_estimator("wt", model, has_aux=True)}
    for name, options in candidates(rank).items():
        named[name] = gg.get_estimator(
            "wperp_ns", model, rank=rank, has_aux=True, **options
        )
    entries = []
    for name, estimator in named.items():
        state = gg.init_train_state(
            params, optimizer, jax.random.key(1), estimator=estimator, batch=batch
        )
        step = gg.make_train_step(estimator, optimizer).lower(state, batch).compile()
        jax.block_until_ready(step(state, batch))
        entries.append({"name": name, "step": step, "state": state, "times": []})
        print(f"  compiled {name}", flush=True)
    for _ in range(FLAGS.rounds):
        for entry in entries:
            t0 = time.perf_counter()
            jax.block_until_ready(entry["step"](entry["state"], batch))
            entry["times"].append(time.perf_counter() - t0)
    base = statistics.median(entries[0]["times"])
    rows = []
    for entry in entries:
        median = statistics.median(entry["times"])
        rows.append(
            {
                "batch": batch_size,
                "name": entry["name"],
                "ms": 1e3 * median,
                "x_wt": median / base,
            }
        )
        print(
            f"  batch {batch_size} {entry['name']:26s} {1e3 * median:8.1f} ms "
            f"{median / base:5.2f}x wt",
            flush=True,
        )
    return rows


# --cosine_methods names -> the methods' row names.
COSINE_METHODS = {
    "wt": "wt",
    "wperp": "wperp exact",
    "krylov": "wperp_ns krylov (default)",
    "warm": "wperp_ns warm",
    "debiased": "debiased wt",
}


def ratio_with_error(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """``mean(a) / mean(b)`` and its standard error (delta method, paired samples)."""
    n = len(a)
    ma, mb = np.mean(a), np.mean(b)
    ratio = ma / mb
    cov = np.cov(a, b) if n > 1 else np.zeros((2, 2))
    var = (cov[0, 0] / ma**2 + cov[1, 1] / mb**2 - 2 * cov[0, 1] / (ma * mb)) / n
    return float(ratio), float(abs(ratio) * np.sqrt(max(var, 0.0)))


def whole_network_cosines(dataset, width: int) -> list[dict]:
    """Cosine of one estimate with the batch's true gradient at a trained 6x``width``
    MLP, per method: ``--cosine_batches`` held-out batches of ``--cosine_batch``
    examples, one key each, the same batches and keys for every method (paired:
    the ratio to exact W-perp's has a smaller error than either mean)."""
    loader = gdata.Loader(
        dataset.train_images, dataset.train_labels, 128, jax.random.key(0), flatten=True
    )
    model = gg.models.MLP(6, width, dataset.num_classes)
    params = model.init(jax.random.key(0), loader.batch(0)["image"])
    params, _ = train(model, params, loader, FLAGS.train_steps)
    rank = FLAGS.cosine_rank
    backprop = gg.get_estimator("backprop", model)
    true_grad = jax.jit(lambda p, b: backprop(p, b, None))
    warm = gg.get_estimator("wperp_ns", model, rank=rank, variant="warm")
    state = warm.init(params, loader.batch(1))
    warm_step = jax.jit(warm)
    for index in range(FLAGS.refine_steps):
        _, state = warm_step(
            params, loader.batch(2 + index), jax.random.key(index), state
        )
    methods = {
        "wt": gg.get_estimator("wt", model),
        "wperp exact": gg.get_estimator("wperp", model, rank=rank),
        "wperp_ns krylov (default)": gg.get_estimator("wperp_ns", model, rank=rank),
        "wperp_ns warm": lambda p, b, k: warm(p, b, k, state)[0],
        "debiased wt": gg.estimators.from_rule(
            model, gg.rules.debiased_wt(FLAGS.debiased_sigma)
        ),
    }
    chosen = {COSINE_METHODS[name] for name in FLAGS.cosine_methods}
    methods = {name: fn for name, fn in methods.items() if name in chosen}
    size, count = FLAGS.cosine_batch, FLAGS.cosine_batches
    images = gdata.normalize(dataset.test_images[: size * count], flatten=True)
    labels = dataset.test_labels[: size * count]
    cosines = {}
    for name, estimator in methods.items():
        estimate = jax.jit(estimator)
        values = []
        for index in range(count):
            batch = {
                "image": images[index * size : (index + 1) * size],
                "label": labels[index * size : (index + 1) * size],
            }
            g_hat = estimate(params, batch, jax.random.key(index))
            values.append(float(gg.metrics.cosine(g_hat, true_grad(params, batch))))
        cosines[name] = np.array(values)
        print(f"  6x{width} {name:28s} cosine {np.mean(values):.4f}", flush=True)
    rows = []
    for name, values in cosines.items():
        ratio, error = ratio_with_error(values, cosines["wperp exact"])
        rows.append(
            {
                "width": width,
                "name": name,
                "cosine": float(np.mean(values)),
                "sem": float(np.std(values, ddof=1) / np.sqrt(len(values))),
                "ratio_to_exact": ratio,
                "ratio_sem": error,
            }
        )
        print(
            f"  6x{width} {name:28s} cosine {rows[-1]['cosine']:.4f} +- "
            f"{rows[-1]['sem']:.4f}; / exact {ratio:.3f} +- {error:.3f}",
            flush=True,
        )
    return rows


def main(argv):
    del argv
    if FLAGS.quick:
        FLAGS.width, FLAGS.train_steps, FLAGS.examples = 64, 50, 4
        FLAGS.refine_steps, FLAGS.time_width, FLAGS.time_depth = 3, 128, 3
        FLAGS.rounds = min(FLAGS.rounds, 3)
    dataset = gdata.load()
    rows = {"fidelity": [], "timing": []}
    if FLAGS.ranks:
        print(f"fidelity: trained {FLAGS.depth}x{FLAGS.width} MLP", flush=True)
        rows["fidelity"] = fidelity(dataset)
    if FLAGS.rounds:
        print(
            f"timing: {FLAGS.time_depth}x{FLAGS.time_width} MLP, rank "
            f"{FLAGS.time_rank}, per-layer, on {jax.devices()[0].platform}",
            flush=True,
        )
        for batch_size in [int(b) for b in FLAGS.time_batches]:
            rows["timing"] += timing(dataset, batch_size)
    rows["cosines"] = []
    unknown = set(FLAGS.cosine_methods) - set(COSINE_METHODS)
    if unknown:
        raise app.UsageError(
            f"--cosine_methods: unknown {sorted(unknown)}; choose from "
            f"{sorted(COSINE_METHODS)}."
        )
    FLAGS.cosine_methods = sorted(set(FLAGS.cosine_methods) | {"wperp"})
    for width in [int(w) for w in FLAGS.cosine_widths]:
        print(f"whole-network cosines: trained 6x{width} MLP, per-layer", flush=True)
        rows["cosines"] += whole_network_cosines(dataset, width)
    rows["device"] = f"{jax.devices()[0].device_kind} ({platform.machine()})"
    with open(FLAGS.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
