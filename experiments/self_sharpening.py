r"""The paper's Figure 4 (left): self-sharpening, the effective rank of the weights over training.

    python -m experiments.self_sharpening             # 3x256 MLP, self_sharpening against wt
    python -m experiments.self_sharpening --depth=6 --width=1024 --steps=5000

Trains each method of ``--methods`` with the one training loop
(:func:`guessgrad.experiment.run`, AdamW, a checkpoint at each of
``--points`` evaluations, all kept), then at every checkpoint measures the
effective rank (Roy and Vetterli: exp of the entropy of the normalised
singular values, :func:`guessgrad.metrics.effective_rank`) of each weight
matrix, and the method's cosine with the true gradient there. The paper
finds that self_sharpening's guesses collapse the weights' effective rank,
which raises its cosine while its accuracy falls behind. On an MLP it also
guesses through each next layer's ``U S^p V^T`` for every p of ``--powers``
(:func:`guessgrad.metrics.power_singular_values`), at the last method's final
weights, and reports the cosine and the effective rank against p (the
paper: sharper spectra, higher cosine). Prints the tables and writes
self_sharpening.json, .md and .png.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags

from experiments import measuring
from guessgrad import experiment, metrics
from guessgrad._src import guesses as rules
from guessgrad._src.estimators import activation_space

FLAGS = flags.FLAGS
NAME = "self_sharpening"

measuring.define_flags(steps=500, methods="self_sharpening,wt", depth=3, width=256)
flags.DEFINE_integer("points", 5, "Checkpoints measured along training.")
flags.DEFINE_list(
    "powers",
    ["0.1", "0.25", "0.5", "1", "2", "4"],
    "MLP: singular-value powers p of the W^T guess through U S^p V^T.",
)


def powered_wt(model, p: float):
    """The W^T guess of an MLP with each next layer's W replaced by U S^p V^T.

    At hidden site ``l`` (the pre-activation of ``dense_l``) the guess is
    ``D_l (W_{l+1}^{(p)})^T eps``, eps ~ N(0, I) at the next site (``p = 1`` is
    ``wt`` exactly); the logits get eps. Estimates are then formed as every
    activation-space estimator forms them (per-layer mode, normalised guesses).
    """

    def estimate(params, batch, key):
        layers = params["params"]
        powered = [
            metrics.power_singular_values(layers[f"dense_{i}"]["kernel"], p)
            for i in range(len(layers))
        ]

        def hidden(ctx, index, guess_key):
            eps = rules.normal_like(guess_key, ctx.value(ctx.target(index)))
            return ctx.mask(index, eps @ powered[index + 1].T)

        estimator = activation_space(model, rules.rule_from(hidden))
        return estimator(params, batch, key)[0]

    return estimate


def power_sweep(setup: measuring.Setup, params, powers) -> list[dict]:
    """Cosine with the gradient and mean effective rank of the powered W's, per p."""
    batch = setup.batch(FLAGS.steps)
    out = []
    for p in powers:
        cosine = metrics.estimate_cosines(
            powered_wt(setup.model, p),
            setup.true_grad_fn,
            params,
            batch,
            jax.random.key(FLAGS.seed),
            4,
        )["cosine"]
        kernels = [layer["kernel"] for layer in params["params"].values()][1:]
        rank = np.mean(
            [
                float(metrics.effective_rank(metrics.power_singular_values(w, p)))
                for w in kernels
            ]
        )
        out.append({"p": p, "cosine": float(cosine), "effective_rank": float(rank)})
    return out


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        methods = measuring.parse_methods()
        if FLAGS.points < 1:
            raise ValueError("--points must be at least 1.")
        path = measuring.prepare_workdir(NAME)
        setup = measuring.setup(methods)
        every = max(FLAGS.steps // FLAGS.points, 1)
        configs = {
            m: experiment.Config(
                method=m,
                dataset=FLAGS.dataset,
                data_dir=FLAGS.data_dir,
                model=setup.spec,
                learning_rate=FLAGS.learning_rate,
                batch_size=FLAGS.batch_size,
                steps=FLAGS.steps,
                eval_every=every,
                log_every=max(every // 10, 1),
                keep_checkpoints=FLAGS.points + 1,
                seed=FLAGS.seed,
                progress=False,
                workdir=os.path.join(path, m),
            )
            for m in methods
        }
        for config in configs.values():
            experiment.validate(config)
    except (ValueError, TypeError) as err:
        return measuring.fail(NAME, err)
    runs = {}
    for method, config in configs.items():
        results = experiment.run(config)
        cosine = jax.jit(
            lambda p, b, k, m=method: metrics.estimate_cosines(
                setup.estimators[m], setup.true_grad_fn, p, b, k, 4
            )["cosine"]
        )
        points = []
        for step in experiment.checkpoint_steps(config.workdir):
            params, _ = experiment.load_params(config.workdir, step)
            ranks = {
                name: float(r) for name, r in metrics.effective_ranks(params).items()
            }
            points.append(
                {
                    "step": step,
                    "effective_ranks": ranks,
                    "cosine": float(
                        cosine(params, setup.batch(step), jax.random.key(step))
                    ),
                }
            )
        runs[method] = {
            "test_accuracy": results.get("test_accuracy"),
            "status": results["status"],
            "points": points,
        }
    sweep = []
    if FLAGS.model == "mlp" and FLAGS.depth > 1:
        final, _ = experiment.load_params(configs[methods[-1]].workdir)
        sweep = power_sweep(setup, final, [float(p) for p in FLAGS.powers])
    results = {
        "experiment": NAME,
        "settings": measuring.settings() | {"points": FLAGS.points},
        "runs": runs,
        "power_sweep": sweep,
        "paper": "self_sharpening lowers the weights' effective rank, raising its cosine, "
        "while its accuracy falls behind W^T's",
    }
    layers = (
        list(runs[methods[0]]["points"][-1]["effective_ranks"])
        if runs[methods[0]]["points"]
        else []
    )
    header = ["method", "test acc", "cosine (last)"] + [
        f"eff. rank {l.split('/')[-2]}" for l in layers
    ]
    rows = []
    for m in methods:
        last = runs[m]["points"][-1] if runs[m]["points"] else None
        rows.append(
            [
                m,
                measuring.percent(runs[m]["test_accuracy"]),
                measuring.number(last and last["cosine"], ".3g"),
            ]
            + [
                measuring.number(last and last["effective_ranks"][l], ".1f")
                for l in layers
            ]
        )
    text = measuring.markdown(header, rows)
    if sweep:
        text += (
            f"\n\nW^T through U S^p V^T ({methods[-1]}'s final weights):\n\n"
            + measuring.markdown(
                ["p", "cosine", "mean effective rank"],
                [
                    [f"{r['p']:g}", f"{r['cosine']:.3g}", f"{r['effective_rank']:.1f}"]
                    for r in sweep
                ],
            )
        )
    print(text)
    fig, (rank_ax, cos_ax, power_ax) = measuring.figure(3, width=4.0)
    if sweep:
        power_ax.plot(
            [r["p"] for r in sweep],
            [r["cosine"] for r in sweep],
            "-o",
            ms=3,
            label="cosine",
        )
        twin = power_ax.twinx()
        twin.plot(
            [r["p"] for r in sweep],
            [r["effective_rank"] for r in sweep],
            "-s",
            ms=3,
            color="C1",
            label="effective rank",
        )
        twin.set(ylabel="mean effective rank")
        power_ax.set(
            xscale="log",
            xlabel="singular-value power p",
            ylabel="cosine",
            title="W^T through U S^p V^T",
        )
    for m in methods:
        steps = [p["step"] for p in runs[m]["points"]]
        mean_rank = [
            np.mean(list(p["effective_ranks"].values())) for p in runs[m]["points"]
        ]
        rank_ax.plot(steps, mean_rank, "-o", ms=3, label=m)
        cos_ax.plot(
            steps, [p["cosine"] for p in runs[m]["points"]], "-o", ms=3, label=m
        )
    rank_ax.set(
        xlabel="step",
        ylabel="mean effective rank of the weights",
        title="effective rank",
    )
    cos_ax.set(xlabel="step", ylabel="cosine with the gradient", title="cosine")
    measuring.style([rank_ax, cos_ax])
    measuring.save(path, NAME, results, text, fig)
    measuring.paper_hint(NAME, steps=5000)
    return 0


if __name__ == "__main__":
    app.run(main)
