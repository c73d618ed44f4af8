"""W-perp without an SVD: how close to exact W-perp, at what step time, against ``wt``.

    python -m benchmarks.wperp                 # MLP 6x1024, batch 128 (about 10 minutes)
    python -m benchmarks.wperp --quick         # MLP 3x256, batch 128
    python -m benchmarks.wperp --cosine_widths=512,1024 --rounds=0   # + whole-network cosines

For each candidate (``gg.rules.wperp_ns`` options: the Krylov
subspace of the default and cheaper or dearer settings of it, the Chebyshev
filter, and ``wt``) and two kinds of weights:

* ``random``: the model's initialisation;
* ``trained``: the same model after ``--train_steps`` steps of backprop with
  AdamW 1e-3 on the packaged MNIST digits (``guessgrad.data.load()``),
  batch 128: real training, not a proxy.

it reports, over the hidden sites whose next map has more than ``k`` outputs
(below that every guess in J_b's row space is trivially inside the top-k),
against the exact top-``k`` right singular subspace ``V_k`` of each of
``--examples`` examples' ``J_b`` (float64):

* ``share``: mean ``|P_k y|^2 / |y|^2`` of the guesses;
* ``erank``: the effective rank ``(sum c)^2 / sum c^2`` of ``c_i = E[(v_i .
  y)^2 / |y|^2]``, i <= k: how evenly the guess covers the top-k directions
  (exact W-perp: about ``k``; a filter that keeps only ``v_1``: 1);
* ``rq``: ``E[y^T A y] / E[|y|^2]`` over the mean of A's top-k eigenvalues,
  ``A = J_b^T J_b`` (exact W-perp: 1; a guess on ``v_1`` alone: above 1);
* ``cos2``: mean squared cosine between the guess and the true site gradient;
* for the Krylov candidates, whose covariance is a projector ``P`` onto the
  found subspace: ``proj``, the relative Frobenius error ``|P - P_k| /
  |P_k|`` (0 exact; about 1.4 for an unrelated k-dimensional subspace), and
  ``mean cos``, the cosine between ``P g`` and ``P_k g`` for the true site
  gradient g: where the mean guess-times-derivative points against exact
  W-perp's (per example, averaged);

then the median time of the full jitted training step (estimate + AdamW) in
each mode, measured round-robin with ``wt`` in the same process, as a ratio
to ``wt``'s step in the same mode. ``--cosine_widths``: the whole-network
cosine of one estimate with the true gradient (``gg.metrics``) for exact
``wperp``, the default ``wperp_ns``, its filter and ``wt``, at trained
6xW MLPs, batch ``--cosine_batch``, over ``--cosine_batches`` batches.
Writes everything as JSON to ``--out``.
"""

from __future__ import annotations

import os

# The batched SVD of exact W-perp (guessgrad/_src/cpu_flags.py says why).
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false"
)

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
flags.DEFINE_bool("quick", False, "MLP 3x256 instead of 6x1024.")
flags.DEFINE_integer("batch", 128, "Batch size of the timed step and of training.")
flags.DEFINE_integer(
    "rank", 10, "k: the exact top-k subspace the guesses are scored against."
)
flags.DEFINE_integer(
    "train_steps", 300, "Backprop steps that make the trained weights."
)
flags.DEFINE_integer("examples", 16, "Examples whose exact subspace is computed.")
flags.DEFINE_integer("draws", 64, "Guesses drawn per example for the energy metrics.")
flags.DEFINE_integer(
    "rounds", 9, "Timed rounds (each runs every step once; 0: no timing)."
)
flags.DEFINE_float(
    "max_seconds", 300.0, "Stop timing after this long (at least 3 rounds)."
)
flags.DEFINE_list("candidates", None, "Candidate names to run (default: all).")
flags.DEFINE_list("modes", ["per_layer", "joint"], "Modes to time.")
flags.DEFINE_string("out", "benchmark_wperp.json", "Where to write the rows as JSON.")
flags.DEFINE_list(
    "cosine_widths", [], "Widths W of trained 6xW MLPs for whole-network cosines."
)
flags.DEFINE_integer("cosine_batch", 8, "Batch size of the whole-network cosines.")
flags.DEFINE_integer("cosine_batches", 4, "Batches the whole-network cosines average.")
flags.DEFINE_integer(
    "cosine_keys", 2, "Estimates per batch for the whole-network cosines."
)


# Krylov settings benchmarked besides the default: (block size, steps).
KRYLOV_SETTINGS = ((4, 4), (2, 4), (2, 14))


def candidates(rank: int) -> dict[str, tuple]:
    """name -> (hidden rule or None for exact W-perp, Krylov (block, steps) or None)."""
    default_block = rules.KRYLOV_BLOCK
    default_steps = rules.default_krylov_steps(rank)
    out: dict[str, tuple] = {"wt": (rules.wt, None)}
    settings = [(default_block, default_steps)] + [
        s for s in KRYLOV_SETTINGS if s != (default_block, default_steps)
    ]
    for block, steps in settings:
        default = (block, steps) == (default_block, default_steps)
        name = f"krylov b{block} d{steps}" + (" (default)" if default else "")
        rule = rules.wperp_ns(rank, krylov_steps=steps, block_size=block)
        out[name] = (rule, (block, steps))
    out["filter d6"] = (rules.wperp_ns(rank, variant="vector", degree=6), None)
    out["wperp exact"] = (None, None)
    return out


def energy_metrics(ys, bases, grads) -> dict[str, float]:
    """Energy of guesses ``ys[site]`` ([draws, E, n]) against the exact top-k subspace.

    ``share``: mean ``|P_k y|^2 / |y|^2``; ``erank``: effective rank of the
    mean energy profile over the top-k directions; ``rq``: Rayleigh quotient
    ``E[|J y|^2] / E[|y|^2]`` over the mean top-k eigenvalue of ``J^T J``;
    ``cos2``: mean squared cosine between the guess and the true site
    gradient (what a one-guess forward gradient's quality scales with).
    """
    shares, eranks, rqs, cos2 = [], [], [], []
    for index, (vk, values, jac) in bases.items():
        y = np.asarray(ys[index], np.float64)
        y = y.reshape(y.shape[:2] + (-1,))  # [draws, E, n]
        energy = np.maximum(np.sum(y**2, -1), 1e-300)
        coef = np.einsum("ekn,den->dek", vk, y) ** 2 / energy[..., None]
        shares.append(np.mean(np.sum(coef, -1)))
        c = np.mean(coef, 0)  # [E, k]
        eranks.append(np.mean(np.sum(c, -1) ** 2 / np.sum(c**2, -1)))
        image = np.einsum("emn,den->dem", jac, y)
        rq = np.sum(image**2, (0, 2)) / np.sum(energy, 0)  # [E]
        rqs.append(np.mean(rq / np.mean(values, -1)))
        g = grads[index]
        g_energy = np.maximum(np.sum(g**2, -1), 1e-300)
        cos2.append(np.mean(np.einsum("en,den->de", g, y) ** 2 / energy / g_energy))
    return {
        "share": float(np.mean(shares)),
        "erank": float(np.mean(eranks)),
        "rq": float(np.mean(rqs)),
        "cos2": float(np.mean(cos2)),
    }


def subspace_metrics(ctx, sites, rank, setting, bases, grads, key) -> dict[str, float]:
    """Projector error and mean-direction cosine of the Krylov subspace against exact W-perp's."""
    block, steps = setting
    spaces = jax.jit(
        lambda k: [rules.krylov_subspace(ctx, i, k, rank, block, steps) for i in sites]
    )(key)
    errors, cosines = [], []
    for index, (ritz, keep) in zip(sites, spaces):
        error, cosine = subspace_scores(ritz, keep, bases[index][0], grads[index], rank)
        errors.append(error)
        cosines.append(cosine)
    return {"proj": float(np.mean(errors)), "mean_cos": float(np.mean(cosines))}


def draw_guesses(hidden, ctx, sites, draws: int, key) -> dict[int, np.ndarray]:
    @jax.jit
    def draw(keys):
        return jax.vmap(lambda k: tuple(hidden(ctx, i, k) for i in sites))(keys)

    return dict(zip(sites, draw(jax.random.split(key, draws))))


def exact_wperp_guesses(bases, draws: int, seed: int) -> dict[int, np.ndarray]:
    """Exact W-perp's guesses ``V_k z`` from the exact bases (no second SVD)."""
    rng = np.random.default_rng(seed)
    out = {}
    for index, (vk, _, _) in bases.items():
        z = rng.standard_normal((draws,) + vk.shape[:2])
        out[index] = np.einsum("dek,ekn->den", z, vk)
    return out


def gradient_in_top_k(bases, grads) -> float:
    """Mean share of the true site gradient's energy in the exact top-k subspace."""
    shares = []
    for index, (vk, _, _) in bases.items():
        g = grads[index]
        proj = np.einsum("ekn,en->ek", vk, g)
        shares.append(
            np.mean(np.sum(proj**2, -1) / np.maximum(np.sum(g**2, -1), 1e-300))
        )
    return float(np.mean(shares))


def time_steps(model, params, batch, named_rules, modes, rounds, max_seconds):
    optimizer = optax.adamw(1e-4)
    state = gg.init_train_state(params, optimizer, jax.random.key(0))
    entries = []
    for name, hidden in named_rules.items():
        for mode in modes:
            if name == "wt":
                estimator = gg.get_estimator("wt", model, mode=mode, has_aux=True)
            else:
                estimator = gg.estimators.from_rule(
                    model, hidden, mode=mode, has_aux=True
                )
            step = (
                gg.make_train_step(estimator, optimizer).lower(state, batch).compile()
            )
            jax.block_until_ready(step(state, batch))
            entries.append({"name": name, "mode": mode, "step": step, "times": []})
            print(f"  compiled {name} ({mode})", flush=True)
    start = time.perf_counter()
    for index in range(rounds):
        for entry in entries:
            t0 = time.perf_counter()
            jax.block_until_ready(entry["step"](state, batch))
            entry["times"].append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds and index >= 2:
            break
    medians = {(e["name"], e["mode"]): statistics.median(e["times"]) for e in entries}
    return medians, len(entries[0]["times"]) if entries else 0


def format_table(rows: list[dict], modes) -> str:
    kinds = ("random", "trained")
    metrics = ("share", "erank", "rq", "cos2", "proj", "mean_cos")
    head = "| candidate |" + "".join(f" {m} {k} |" for k in kinds for m in metrics)
    head += "".join(f" ms {m} | x wt {m} |" for m in modes)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    digits = {"erank": 1, "cos2": 4}
    for r in rows:
        line = f"| {r['name']} |"
        for k in kinds:
            for m in metrics:
                value = r.get(f"{m}_{k}")
                line += " - |" if value is None else f" {value:.{digits.get(m, 3)}f} |"
        for m in modes:
            ms, ratio = r.get(f"ms_{m}"), r.get(f"x_wt_{m}")
            line += " - | - |" if ms is None else f" {ms:.1f} | {ratio:.2f} |"
        lines.append(line)
    return "\n".join(lines)


COSINE_METHODS = (
    ("wt", "wt", {}),
    ("wperp exact", "wperp", {}),
    ("wperp_ns (Krylov, default)", "wperp_ns", {}),
    ("wperp_ns filter", "wperp_ns", {"variant": "vector"}),
)


def whole_network_cosines(dataset, width: int) -> list[dict]:
    """Cosine of one estimate with the true gradient at a trained 6x``width`` MLP, per method and mode."""
    loader = gdata.Loader(
        dataset.train_images, dataset.train_labels, 128, jax.random.key(0), flatten=True
    )
    model = gg.models.MLP(6, width, dataset.num_classes)
    params = model.init(jax.random.key(0), loader.batch(0)["image"])
    params, _ = train(model, params, loader, FLAGS.train_steps)

    backprop = gg.get_estimator("backprop", model)

    def true_grad(p, batch):
        return backprop(p, batch, None)

    rows = []
    for mode in ("joint", "per_layer"):
        for name, method, options in COSINE_METHODS:
            if method.startswith("wperp"):
                options = {"rank": FLAGS.rank, **options}
            estimator = jax.jit(gg.get_estimator(method, model, mode=mode, **options))
            values = []
            for index in range(FLAGS.cosine_batches):
                full = loader.batch(10_000 + index)
                batch = {k: v[: FLAGS.cosine_batch] for k, v in full.items()}
                report = gg.metrics.estimate_cosines(
                    estimator,
                    true_grad,
                    params,
                    batch,
                    jax.random.key(index),
                    num_keys=FLAGS.cosine_keys,
                )
                values.append(float(report["cosine"]))
            rows.append(
                {
                    "width": width,
                    "mode": mode,
                    "name": name,
                    "cosine": float(np.mean(values)),
                    "sem": float(np.std(values) / np.sqrt(len(values))),
                }
            )
            print(
                f"  6x{width} {mode:9s} {name:28s} cosine {rows[-1]['cosine']:.4f}",
                flush=True,
            )
    return rows


def format_cosines(rows: list[dict]) -> str:
    lines = [
        "| MLP | mode | method | cosine | +- | / exact wperp |",
        "|---|---|---|---:|---:|---:|",
    ]
    exact = {
        (r["width"], r["mode"]): r["cosine"] for r in rows if r["name"] == "wperp exact"
    }
    for r in rows:
        ratio = r["cosine"] / exact[(r["width"], r["mode"])]
        lines.append(
            f"| 6x{r['width']} | {r['mode']} | {r['name']} | {r['cosine']:.4f} | {r['sem']:.4f} | {ratio:.2f} |"
        )
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    depth, width = (3, 256) if FLAGS.quick else (6, 1024)
    rank = FLAGS.rank
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({platform.machine()}); "
        f"MLP {depth}x{width}, batch {FLAGS.batch}, k={rank}",
        flush=True,
    )
    named = candidates(rank)
    if FLAGS.candidates:
        unknown = sorted(set(FLAGS.candidates) - set(named))
        if unknown:
            raise app.UsageError(f"Unknown candidates {unknown}; valid: {list(named)}")
        named = {n: named[n] for n in ["wt"] + FLAGS.candidates if n in named}
    dataset = gdata.load()
    loader = gdata.Loader(
        dataset.train_images,
        dataset.train_labels,
        FLAGS.batch,
        jax.random.key(0),
        flatten=True,
    )
    model = gg.models.MLP(depth, width, dataset.num_classes)
    eval_batch = loader.batch(FLAGS.train_steps + 1)
    random_params = model.init(jax.random.key(0), eval_batch["image"])
    t0 = time.perf_counter()
    trained_params, train_metrics = train(
        model, random_params, loader, FLAGS.train_steps
    )
    print(
        f"trained {FLAGS.train_steps} backprop steps in {time.perf_counter() - t0:.0f} s: "
        f"loss {train_metrics['loss']:.3f}, batch accuracy {train_metrics['accuracy']:.3f}",
        flush=True,
    )

    widths = [width] * (depth - 1) + [dataset.num_classes]
    sites = [i for i in range(depth - 1) if widths[i + 1] > rank]
    rows = {name: {"name": name} for name in named}
    grad_shares, gaps = {}, {}
    for kind, params in (("random", random_params), ("trained", trained_params)):
        if not FLAGS.examples:
            break
        ctx = sub_context(model, params, eval_batch, FLAGS.examples)
        t0 = time.perf_counter()
        bases, gap = exact_bases(ctx, sites, rank)
        gaps[kind] = gap
        grads = site_gradients(model, params, eval_batch, FLAGS.examples, sites)
        grad_shares[kind] = gradient_in_top_k(bases, grads)
        print(
            f"{kind}: exact subspaces in {time.perf_counter() - t0:.0f} s; the true "
            f"gradient has {grad_shares[kind]:.3f} of its energy in them; "
            f"sigma_(k+1)^2 / sigma_k^2 = {gap:.4f}",
            flush=True,
        )
        for name, (hidden, setting) in named.items():
            if hidden is None:
                ys = exact_wperp_guesses(bases, FLAGS.draws, seed=7)
            else:
                ys = draw_guesses(hidden, ctx, sites, FLAGS.draws, jax.random.key(7))
            metrics = energy_metrics(ys, bases, grads)
            if setting is not None:
                metrics.update(
                    subspace_metrics(
                        ctx, sites, rank, setting, bases, grads, jax.random.key(8)
                    )
                )
            rows[name].update({f"{m}_{kind}": v for m, v in metrics.items()})
        del bases

    timed = {n: h for n, (h, _) in named.items() if h is not None}
    modes = FLAGS.modes if FLAGS.rounds > 0 else []
    medians, rounds = time_steps(
        model, random_params, eval_batch, timed, modes, FLAGS.rounds, FLAGS.max_seconds
    )
    for (name, mode), median in medians.items():
        rows[name][f"ms_{mode}"] = 1e3 * median
        rows[name][f"x_wt_{mode}"] = median / medians[("wt", mode)]
    rows = list(rows.values())
    table = format_table(rows, modes)
    print(
        f"\nMLP {depth}x{width}, batch {FLAGS.batch}, k={rank}, {FLAGS.examples} examples x "
        f"{FLAGS.draws} draws per site, sites {sites}; {rounds} timed rounds\n{table}",
        flush=True,
    )
    cosines = []
    for cosine_width in FLAGS.cosine_widths:
        cosines += whole_network_cosines(dataset, int(cosine_width))
    if cosines:
        print(
            f"\nWhole-network cosine with the true gradient, trained 6xW MLPs "
            f"({FLAGS.train_steps} backprop steps), batch {FLAGS.cosine_batch}, "
            f"{FLAGS.cosine_batches} batches x {FLAGS.cosine_keys} keys, k={rank}:\n"
            + format_cosines(cosines)
        )
    with open(FLAGS.out, "w") as f:
        json.dump(
            {
                "device": jax.devices()[0].device_kind,
                "jax": jax.__version__,
                "depth": depth,
                "width": width,
                "batch": FLAGS.batch,
                "rank": rank,
                "train_steps": FLAGS.train_steps,
                "train_metrics": train_metrics,
                "gradient_share_in_top_k": grad_shares,
                "gap_ratio_k_plus_1_over_k": gaps,
                "timed_rounds": rounds,
                "rows": rows,
                "cosines": cosines,
            },
            f,
            indent=1,
        )
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
