r"""The paper's Figure 4: self-sharpening, the guesses and the weights losing rank over training.

    python -m experiments.self_sharpening             # 3x256 MLP, 500 steps per run
    python -m experiments.self_sharpening --depth=6 --width=128 --dataset=cifar10 \
        --steps=50000 --train_learning_rate=1e-4      # the paper's setting

Two parts, both trained with StableAdamW (the paper's optimiser for them):

* **Powered W^T** (MLP): for every p of ``--powers`` the network is trained
  with the W^T guess through each next layer's ``U S^p V^T``
  (:func:`powered_wt`; p = 1 is ``wt``; StableAdamW without weight decay at
  ``--train_learning_rate``, as the paper), and at ``--points`` steps the
  guess's cosine with the true gradient, the mean effective rank (Roy and
  Vetterli, :func:`guessgrad.metrics.effective_rank`) of the weights and that
  of the guessed kernel updates are recorded: Figure 4, where larger p
  concentrates the guesses on a few directions, the weights' rank falls and
  the cosine rises over training.
* **The methods** of ``--methods`` (``self_sharpening``, ``wt``), trained
  with the one training loop (:func:`guessgrad.experiment.run`,
  ``--optimizer``, default stable_adamw), measured at every checkpoint the
  same way.

A third panel keeps the static sweep: the W^T guess through ``U S^p V^T``
at the last method's final weights, its cosine and effective rank against
p. Prints the tables and writes self_sharpening.json, .md and .png.
Its settings are ``experiments/configs/self_sharpening.py``'s fields, each a flag.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import app

import guessgrad as gg
from experiments import common, measuring
from experiments.configs.self_sharpening import get_config
from guessgrad import experiment, metrics

NAME = "self_sharpening"
# This measurement's own fields, each a flag of its name: their help.
HELP = {
    "points": "Checkpoints measured along training.",
    "powers": "MLP: singular-value powers p of the W^T guess through U S^p V^T.",
    "train_learning_rate": "StableAdamW step size of the guessed training runs "
    "(the paper: 1e-4 over 50,000 steps).",
    "optimizer": "Optimiser of the methods' runs (the paper's).",
}
common.define_flags(
    get_config(),
    {**measuring.FIELDS, **{name: name for name in HELP}},
    help={**measuring.HELP, **HELP},
    convert={"powers": lambda powers: [float(p) for p in powers]},
)
measuring.one_of("model", measuring.MODELS)


def powered_estimator(model, p: float):
    """:func:`powered_wt` as an estimator with metrics, ``(params, batch, key) -> (grads, aux)``."""

    def estimate(params, batch, key):
        layers = params["params"]
        powered = [
            metrics.power_singular_values(layers[f"dense_{i}"]["kernel"], p)
            for i in range(len(layers))
        ]

        def guess(ctx, index, guess_key):
            eps = gg.rules.normal_like(guess_key, ctx.value(ctx.target(index)))
            return ctx.mask(index, eps @ powered[index + 1].T)

        estimator = gg.estimators.from_rule(model, guess, has_aux=True)
        return estimator(params, batch, key)

    return estimate


def powered_wt(model, p: float):
    """The W^T guess of an MLP with each next layer's W replaced by U S^p V^T.

    At hidden site ``l`` (the pre-activation of ``dense_l``) the guess is
    ``D_l (W_{l+1}^{(p)})^T eps``, eps ~ N(0, I) at the next site (``p = 1`` is
    ``wt`` exactly); the logits get eps. Estimates are then formed as every
    activation-space estimator forms them (per-layer mode, normalised guesses).
    """

    estimator = powered_estimator(model, p)

    def estimate(params, batch, key):
        return estimator(params, batch, key)[0]

    return estimate


def mean_rank(tree) -> float:
    """Mean effective rank of the 2-D leaves (kernels) of ``tree``."""
    return float(np.mean([float(r) for r in metrics.effective_ranks(tree).values()]))


def measure(setup: measuring.Setup, estimate, params, step: int) -> dict:
    """Cosine with the gradient, and the weights' and one guess's mean effective rank."""
    batch, key = setup.batch(step), jax.random.key(step)
    cosine = metrics.estimate_cosines(
        estimate, setup.true_grad_fn, params, batch, key, 4
    )["cosine"]
    return {
        "step": step,
        "cosine": float(cosine),
        "weight_rank": mean_rank(params),
        "guess_rank": mean_rank(estimate(params, batch, key)),
    }


def powered_training(config, setup: measuring.Setup, p: float) -> list[dict]:
    """Trains with the W^T guess through ``U S^p V^T`` (StableAdamW, no weight decay)."""
    optimizer = gg.stable_adamw(config.train_learning_rate, weight_decay=0.0)
    estimate = jax.jit(powered_wt(setup.model, p))
    points = []
    for step, params in measuring.trajectory(
        config, setup, config.points + 1, powered_estimator(setup.model, p), optimizer
    ):
        points.append(measure(setup, estimate, params, step))
    return points


def power_sweep(config, setup: measuring.Setup, params) -> list[dict]:
    """Cosine with the gradient and mean effective rank of the powered W's, per p of ``--powers``."""
    batch = setup.batch(config.steps)
    out = []
    for p in config.powers:
        cosine = metrics.estimate_cosines(
            powered_wt(setup.model, p),
            setup.true_grad_fn,
            params,
            batch,
            jax.random.key(config.seed),
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
        config = common.apply_flags(get_config())
        methods = measuring.parse_methods(config)
        if config.points < 1:
            raise ValueError("--points must be at least 1.")
        if len(measuring.modes(config)) != 1:
            raise ValueError("--mode names one mode here (default joint, the paper's).")
        variants = {v.label: v for v in measuring.variants(config, methods)}
        path = measuring.prepare_workdir(config, NAME)
        setup = measuring.setup(config, methods)
        every = max(config.steps // config.points, 1)
        configs = {
            m: experiment.Config(
                method=m,
                dataset=config.dataset,
                data_dir=config.data_dir,
                model=setup.spec,
                optimizer=config.optimizer,
                options=variants[m].options,
                learning_rate=config.train_learning_rate,
                batch_size=config.batch_size,
                steps=config.steps,
                eval_every=every,
                log_every=max(every // 10, 1),
                keep_checkpoints=config.points + 1,
                seed=config.seed,
                progress=False,
                workdir=os.path.join(path, m),
            )
            for m in methods
        }
        for run_config in configs.values():
            experiment.validate(run_config)
    except (ValueError, TypeError) as err:
        return measuring.fail(NAME, err)
    runs = {}
    for method, run_config in configs.items():
        results = experiment.run(run_config)
        estimate = jax.jit(setup.estimators[method])
        points = []
        for step in experiment.checkpoint_steps(run_config.workdir):
            params, _ = experiment.load_params(run_config.workdir, step)
            point = measure(setup, estimate, params, step)
            point["effective_ranks"] = {
                name: float(r) for name, r in metrics.effective_ranks(params).items()
            }
            points.append(point)
        runs[method] = {
            "test_accuracy": results.get("test_accuracy"),
            "status": results["status"],
            "points": points,
        }
    powered, sweep = {}, []
    if config.model == "mlp" and config.depth > 1:
        for p in config.powers:
            powered[f"{p:g}"] = powered_training(config, setup, p)
            last = powered[f"{p:g}"][-1]
            print(
                f"[{NAME}] p={p:g}: cosine {last['cosine']:.3f}, weight rank "
                f"{last['weight_rank']:.1f}, guess rank {last['guess_rank']:.1f} "
                f"at step {last['step']}"
            )
        final, _ = experiment.load_params(configs[methods[-1]].workdir)
        sweep = power_sweep(config, setup, final)
    results = {
        "experiment": NAME,
        "settings": measuring.settings(config) | {"points": config.points},
        "runs": runs,
        "powered_training": powered,
        "power_sweep": sweep,
        "paper": "self_sharpening lowers the weights' effective rank, raising its cosine, "
        "while its accuracy falls behind W^T's",
    }
    layers = (
        list(runs[methods[0]]["points"][-1]["effective_ranks"])
        if runs[methods[0]]["points"]
        else []
    )
    header = ["method", "test acc", "cosine (last)", "guess rank (last)"] + [
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
                measuring.number(last and last["guess_rank"], ".1f"),
            ]
            + [
                measuring.number(last and last["effective_ranks"][l], ".1f")
                for l in layers
            ]
        )
    text = measuring.markdown(header, rows)
    if powered:
        text += "\n\nTrained with W^T through U S^p V^T (StableAdamW), first and last point:\n\n"
        text += measuring.markdown(
            ["p", "cosine", "weight rank", "guess rank"],
            [
                [p]
                + [
                    f"{pts[0][k]:{f}} -> {pts[-1][k]:{f}}"
                    for k, f in (
                        ("cosine", ".3g"),
                        ("weight_rank", ".1f"),
                        ("guess_rank", ".1f"),
                    )
                ]
                for p, pts in powered.items()
            ],
        )
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
    fig, (p_cos_ax, p_rank_ax, rank_ax, cos_ax, power_ax) = measuring.figure(
        5, width=3.6
    )
    for p, pts in powered.items():
        steps = [q["step"] for q in pts]
        p_cos_ax.plot(steps, [q["cosine"] for q in pts], "-o", ms=3, label=f"p={p}")
        p_rank_ax.plot(
            steps, [q["weight_rank"] for q in pts], "-o", ms=3, label=f"weights p={p}"
        )
        p_rank_ax.plot(
            steps, [q["guess_rank"] for q in pts], ":", label=f"guesses p={p}"
        )
    p_cos_ax.set(
        xlabel="step", ylabel="cosine with the gradient", title="W^T via U S^p V^T"
    )
    p_rank_ax.set(xlabel="step", ylabel="mean effective rank", title="rank")
    if powered:
        measuring.style([p_cos_ax, p_rank_ax])
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
        weight_ranks = [p["weight_rank"] for p in runs[m]["points"]]
        rank_ax.plot(steps, weight_ranks, "-o", ms=3, label=m)
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
    measuring.paper_hint(config, NAME, width=128, steps=50000, train_learning_rate=1e-4)
    return 0


if __name__ == "__main__":
    app.run(main)
