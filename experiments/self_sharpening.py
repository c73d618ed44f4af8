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
which raises its cosine while its accuracy falls behind. Prints the table
and writes self_sharpening.json, .md and .png.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags

from experiments import measuring
from guessgrad import experiment, metrics

FLAGS = flags.FLAGS
NAME = "self_sharpening"

measuring.define_flags(steps=500, methods="self_sharpening,wt", depth=3, width=256)
flags.DEFINE_integer("points", 5, "Checkpoints measured along training.")


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
    results = {
        "experiment": NAME,
        "settings": measuring.settings() | {"points": FLAGS.points},
        "runs": runs,
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
    print(text)
    fig, (rank_ax, cos_ax) = measuring.figure(2)
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
    for ax in (rank_ax, cos_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    measuring.save(path, NAME, results, text, fig)
    return 0


if __name__ == "__main__":
    app.run(main)
