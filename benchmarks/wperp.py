"""W-perp-NS: how close to exact W-perp, at what step time, against ``wt``.

    python -m benchmarks.wperp            # MLP 6x1024, batch 128 (a few minutes)
    python -m benchmarks.wperp --quick    # MLP 3x256, batch 128

For each candidate filter (``guesses.wperp_ns_hidden`` options, plus a
dense-only variant that forms ``G = W W^T`` once per layer and batch) and two
kinds of weights:

* ``random``: the model's initialisation;
* ``trained``: the same model after ``--train_steps`` steps of backprop with
  AdamW 1e-3 on the packaged MNIST digits (``guessgrad.data.load()``),
  batch 128: real training, not a proxy.

it reports, over the hidden sites whose next map has more than ``k`` outputs
(below that every guess in J_b's row space is trivially inside the top-k):

* ``share``: mean over examples and draws of ``|P_k y|^2 / |y|^2``, with P_k
  the projector on the exact top-``k`` right singular subspace of ``J_b`` (an
  SVD of the Jacobian of the next site map, for ``--examples`` examples);
* ``erank``: the effective rank ``(sum c)^2 / sum c^2`` of ``c_i = E[(v_i .
  y)^2 / |y|^2]``, i <= k: how evenly the guess covers the top-k directions
  (exact W-perp: about ``k``; a filter that keeps only ``v_1``: 1).

and the median time of the full jitted training step (estimate + AdamW) in
each mode, measured round-robin with ``wt`` in the same process, as a ratio
to ``wt``'s step in the same mode. Writes the rows as JSON to ``--out``.
"""

from __future__ import annotations

import os

# The batched SVD of exact W-perp; see SPEC.md's pitfalls.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false"
)

import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg
from absl import app, flags

import guessgrad as gg
from guessgrad import data as gdata
from guessgrad._src import (
    core,
    estimators,
)
from guessgrad._src import guesses as rules
from guessgrad._src.models import chain_fns

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


def _gram_shared_rule(degree: int, cutoff: float) -> rules.HiddenRule:
    """Dense-only: the vector filter with ``G = K K^T`` formed once per layer.

    ``J_b^T J_b v = D (G (D v))``: one n x n product per example and step
    instead of two through the kernel, after an ``n^2 m`` product shared by
    the batch. Pays off once ``degree * B`` exceeds about ``n``.
    """

    def rule(ctx, index, key):
        kernel = ctx.layer_params[index + 1]["kernel"]  # [n, m]: s_{l+1} = x @ K + b
        gram = kernel @ kernel.T
        nxt = ctx.sites[index + 1]
        eps = jax.random.normal(key, nxt.shape, nxt.dtype)
        start = ctx.mask(index, eps @ kernel.T)
        return rules.chebyshev_filter(
            lambda v: ctx.mask(index, v @ gram), start, degree, cutoff
        )

    return rule


def candidates(rank: int) -> dict[str, rules.HiddenRule | None]:
    """name -> hidden rule; None marks exact W-perp (energy only: too slow to time)."""
    out: dict[str, rules.HiddenRule | None] = {"wt": rules.wt_hidden}
    for iters in (0, 1, 2):
        out[f"block r{rank} q{iters}"] = rules.wperp_ns_hidden(
            rank, iters, 5, variant="block"
        )
    out["block r4 q1"] = rules.wperp_ns_hidden(4, 1, 5, variant="block")
    for degree in (1, 2, 4, 6):
        out[f"power d{degree}"] = rules.wperp_ns_hidden(
            rank, degree, cutoff=0.0, variant="vector"
        )
    for cutoff in (0.5, 1.0):
        for degree in (2, 4, 6, 8):
            out[f"cheb c{cutoff} d{degree}"] = rules.wperp_ns_hidden(
                rank, degree, cutoff=cutoff, variant="vector"
            )
    out["gram cheb c1.0 d6"] = _gram_shared_rule(6, 1.0)
    out["wperp exact"] = None
    return out


def train(model, params, loader: gdata.Loader, steps: int):
    optimizer = optax.adamw(1e-3)
    step = gg.make_train_step(gg.build_estimator("backprop", model), optimizer)
    state = gg.init_train_state(params, optimizer, jax.random.key(1))
    metrics = {}
    for index in range(steps):
        state, metrics = step(state, loader.batch(index))
    return state.params, {k: float(v) for k, v in metrics.items()}


def exact_bases(
    ctx: rules.GuessContext, sites: list[int], rank: int
) -> tuple[dict[int, np.ndarray], float]:
    """Top-``rank`` right singular vectors of each example's J_b: [E, k, n] per site.

    From the top eigenvectors of ``J_b^T J_b`` in float64 (LAPACK's subset
    eigensolver: a full SVD of many 1024 x 1024 Jacobians takes minutes).
    Also returns the mean gap ratio ``sigma_{k+1}^2 / sigma_k^2``: the closer
    to 1, the harder any polynomial filter finds the top-k subspace (a
    degree-d filter separates a relative gap delta only once d is of order
    ``1 / sqrt(delta)``).
    """
    out, gaps = {}, []
    for index in sites:
        jac = np.asarray(ctx.next_jacobian(index), np.float64)  # [E, m, n]
        n = jac.shape[-1]
        vecs = []
        for j in jac:
            w, v = scipy.linalg.eigh(j.T @ j, subset_by_index=[n - rank - 1, n - 1])
            vecs.append(v[:, :0:-1].T)
            gaps.append(w[0] / w[1])
        out[index] = np.stack(vecs)
    return out, float(np.mean(gaps))


def site_gradients(model, params, batch, examples: int, sites: list[int]):
    """The true ``dl_b/ds_l`` of the first ``examples`` examples (by backprop)."""
    fns = chain_fns(model)
    layer_params = core.split_params(fns, params)
    image, labels = batch["image"][:examples], batch["label"][:examples]
    trace = core.forward(fns, layer_params, fns.preprocess(image), labels)

    def total_loss(perturbations):
        x = fns.preprocess(image)
        for index, (site_fn, theta) in enumerate(zip(fns.site_fns, layer_params)):
            site = site_fn(theta, x) + perturbations[index]
            x = fns.activation(site)
        return jnp.sum(core.per_example_loss(site, labels))

    grads = jax.grad(total_loss)(tuple(jnp.zeros_like(s) for s in trace.sites))
    return {i: np.asarray(grads[i], np.float64).reshape(examples, -1) for i in sites}


def energy_metrics(ys, bases, grads) -> dict[str, float]:
    """Energy of guesses ``ys[site]`` ([draws, E, n]) in the exact top-k subspace.

    ``share``: mean ``|P_k y|^2 / |y|^2``; ``erank``: effective rank of the
    mean energy profile over the top-k directions; ``cos2``: mean squared
    cosine between the guess and the true site gradient (what a one-guess
    forward gradient's quality scales with).
    """
    shares, eranks, cos2 = [], [], []
    for index, vk in bases.items():
        y = np.asarray(ys[index], np.float64)
        y = y.reshape(y.shape[:2] + (-1,))  # [draws, E, n]
        energy = np.maximum(np.sum(y**2, -1), 1e-300)
        coef = np.einsum("ekn,den->dek", vk, y) ** 2 / energy[..., None]
        shares.append(np.mean(np.sum(coef, -1)))
        c = np.mean(coef, 0)  # [E, k]
        eranks.append(np.mean(np.sum(c, -1) ** 2 / np.sum(c**2, -1)))
        g = grads[index]
        g_energy = np.maximum(np.sum(g**2, -1), 1e-300)
        cos2.append(np.mean(np.einsum("en,den->de", g, y) ** 2 / energy / g_energy))
    return {
        "share": float(np.mean(shares)),
        "erank": float(np.mean(eranks)),
        "cos2": float(np.mean(cos2)),
    }


def draw_guesses(hidden, ctx, sites, draws: int, key) -> dict[int, np.ndarray]:
    @jax.jit
    def draw(keys):
        return jax.vmap(lambda k: tuple(hidden(ctx, i, k) for i in sites))(keys)

    return dict(zip(sites, draw(jax.random.split(key, draws))))


def exact_wperp_guesses(bases, draws: int, seed: int) -> dict[int, np.ndarray]:
    """Exact W-perp's guesses ``V_k z`` from the exact bases (no second SVD)."""
    rng = np.random.default_rng(seed)
    out = {}
    for index, vk in bases.items():
        z = rng.standard_normal((draws,) + vk.shape[:2])
        out[index] = np.einsum("dek,ekn->den", z, vk)
    return out


def gradient_in_top_k(bases, grads) -> float:
    """Mean share of the true site gradient's energy in the exact top-k subspace."""
    shares = []
    for index, vk in bases.items():
        g = grads[index]
        proj = np.einsum("ekn,en->ek", vk, g)
        shares.append(
            np.mean(np.sum(proj**2, -1) / np.maximum(np.sum(g**2, -1), 1e-300))
        )
    return float(np.mean(shares))


def sub_context(model, params, batch, examples: int) -> rules.GuessContext:
    fns = chain_fns(model)
    layer_params = core.split_params(fns, params)
    image, labels = batch["image"][:examples], batch["label"][:examples]
    trace = core.forward(fns, layer_params, fns.preprocess(image), labels)
    return rules.GuessContext(fns, layer_params, trace.sites)


def time_steps(model, params, batch, named_rules, modes, rounds, max_seconds):
    optimizer = optax.adamw(1e-4)
    state = gg.init_train_state(params, optimizer, jax.random.key(0))
    entries = []
    for name, hidden in named_rules.items():
        for mode in modes:
            if name == "wt":
                estimator = gg.build_estimator("wt", model, mode=mode)
            else:
                estimator = estimators.activation_space(
                    model, rules.rule_from(hidden), mode=mode
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
    head = "| candidate |" + "".join(
        f" share {k} | erank {k} | cos2 {k} |" for k in kinds
    )
    head += "".join(f" ms {m} | x wt {m} |" for m in modes)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = f"| {r['name']} |"
        for k in kinds:
            line += f" {r[f'share_{k}']:.3f} | {r[f'erank_{k}']:.1f} |"
            line += f" {r[f'cos2_{k}']:.4f} |"
        for m in modes:
            ms, ratio = r.get(f"ms_{m}"), r.get(f"x_wt_{m}")
            line += " - | - |" if ms is None else f" {ms:.1f} | {ratio:.2f} |"
        lines.append(line)
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
        for name, hidden in named.items():
            if hidden is None:
                ys = exact_wperp_guesses(bases, FLAGS.draws, seed=7)
            else:
                ys = draw_guesses(hidden, ctx, sites, FLAGS.draws, jax.random.key(7))
            metrics = energy_metrics(ys, bases, grads)
            rows[name].update({f"{m}_{kind}": v for m, v in metrics.items()})

    timed = {n: h for n, h in named.items() if h is not None}
    modes = FLAGS.modes if FLAGS.rounds > 0 else []
    medians, rounds = time_steps(
        model,
        random_params,
        eval_batch,
        timed,
        modes,
        FLAGS.rounds,
        FLAGS.max_seconds,
    )
    for (name, mode), median in medians.items():
        rows[name][f"ms_{mode}"] = 1e3 * median
        rows[name][f"x_wt_{mode}"] = median / medians[("wt", mode)]
    rows = list(rows.values())
    table = format_table(rows, modes)
    print(
        f"\nMLP {depth}x{width}, batch {FLAGS.batch}, k={rank}, {FLAGS.examples} examples x "
        f"{FLAGS.draws} draws per site, sites {sites}; {rounds} timed rounds\n{table}"
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
            },
            f,
            indent=1,
        )
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
