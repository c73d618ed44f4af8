r"""The paper's Figure 1: cosine with the true gradient and one-step effectiveness along a backprop trajectory.

    python -m experiments.cosine                      # 6x1024 MLP, embedded digits, 300 steps, a few minutes
    python -m experiments.cosine --dataset=cifar10 --steps=3000 --points=30   # the paper's setting

Trains the network by backprop (AdamW) and, at ``--points`` evenly spaced
steps, measures every method of ``--methods`` on that step's batch with
:mod:`guessgrad.metrics`: the whole-network cosine of its estimate with the
true gradient (mean over ``--num_keys`` keys), the per-layer cosines, the
per-example cosine (the estimate and the gradient of one example alone, over
``--examples`` examples), and one-step effectiveness in both conventions
(the paper's: raw estimate, steps 1e-5..1e-1; scale-free: the estimate
rescaled to the gradient's norm, steps 10^(k/4)). Activation-space methods
are measured in every mode of ``--mode`` (default both): ``joint`` is the
paper's estimator, one directional derivative per example across every
layer; ``per_layer`` takes one per site, a larger cosine the paper does not
report. Prints the table (means over the trajectory, the paper's numbers
beside the joint rows), and writes cosine.json,
cosine.md and cosine.png (cosine vs step, log scale) to the workdir.
Its settings are ``experiments/configs/cosine.py``'s fields, each a flag.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np
from absl import app

from experiments import common, measuring
from experiments.configs.cosine import get_config
from guessgrad import metrics

NAME = "cosine"
# Figure 1 of the paper (6x1024 MLP, CIFAR-10): cosine and one-step effectiveness.
PAPER = {
    "directional": (0.0003, 1e-6),
    "activation_perturbation": (0.016, 6.9e-4),
    "mixing": (0.025, 3.4e-3),
    "wt": (0.030, 1.7e-3),
}

# This measurement's own fields, each a flag of its name: their help.
HELP = {
    "points": "Trajectory points measured (0 and --steps included).",
    "num_keys": "Independent guesses averaged per cosine.",
    "examples": "Examples of each batch for per-example cosines.",
}
common.define_flags(
    get_config(),
    {**measuring.FIELDS, **{name: name for name in HELP}},
    help={**measuring.HELP, **HELP},
)
measuring.one_of("model", measuring.MODELS)


def measure_point(
    config, setup: measuring.Setup, method: str, params, batch, key
) -> dict:
    """Every measurement of one method at one point (jitted per method)."""
    estimator, true_grad = setup.estimators[method], setup.true_grad_fn
    cos = metrics.estimate_cosines(
        estimator, true_grad, params, batch, key, config.num_keys
    )
    examples = jax.tree.map(lambda x: x[: config.examples], batch)
    per_example = metrics.per_example_cosines(
        estimator, true_grad, params, examples, key
    )
    steps = {
        scale: metrics.one_step_effectiveness(
            estimator,
            setup.loss_fn,
            params,
            batch,
            key,
            scale=scale,
            true_grad_fn=true_grad,
        )
        for scale in metrics.SCALES
    }
    return {
        "cosine": cos["cosine"],
        "module_cosines": cos["module_cosines"],
        "per_example_cosine": per_example.mean(),
        **{
            f"one_step_{scale}": {
                k: v[k] for k in ("ratio", "eta", "backprop_eta", "backprop_at_edge")
            }
            for scale, v in steps.items()
        },
    }


def summary(points: list[dict], method: str) -> dict:
    rows = [p["methods"][method] for p in points]

    def mean(key, sub=None):
        values = [r[key] if sub is None else r[key][sub] for r in rows]
        values = [v for v in values if v is not None and np.isfinite(v)]
        return float(np.mean(values)) if values else None

    modules = rows[0]["module_cosines"]
    return {
        "cosine": mean("cosine"),
        "per_example_cosine": mean("per_example_cosine"),
        "layer_cosines": {
            m: float(np.mean([r["module_cosines"][m] for r in rows])) for m in modules
        },
        "one_step_gradient_norm": mean("one_step_gradient_norm", "ratio"),
        "one_step_paper": mean("one_step_paper", "ratio"),
        "backprop_best_at_edge": {
            scale: sum(bool(r[f"one_step_{scale}"]["backprop_at_edge"]) for r in rows)
            for scale in metrics.SCALES
        },
    }


def table(results: dict, variants: Sequence[measuring.Variant]) -> str:
    """Means over the trajectory; the paper's numbers beside its own estimator.

    The paper measures one directional derivative per example across every
    layer (``joint``); ``per_layer`` rows (one derivative per site) have no
    paper counterpart.
    """
    header = [
        "method",
        "mode",
        "cosine",
        "per-example cosine",
        "mean layer cosine",
        "one-step (scale-free)",
        "one-step (paper grid)",
        "paper cosine",
        "paper one-step",
        "cosine / directional's",
        "paper cosine / directional's",
    ]
    base = results["summary"].get("directional", {}).get("cosine")
    rows = []
    for v in variants:
        s = results["summary"][v.label]
        paper = (
            PAPER.get(v.method, (None, None))
            if v.mode in (None, "joint")
            else (None, None)
        )
        layer = float(np.mean(list(s["layer_cosines"].values())))
        rows.append(
            [
                v.method,
                v.mode or "weights",
                measuring.number(s["cosine"], ".3g"),
                measuring.number(s["per_example_cosine"], ".3g"),
                measuring.number(layer, ".3g"),
                measuring.number(s["one_step_gradient_norm"], ".3g"),
                measuring.number(s["one_step_paper"], ".3g"),
                measuring.number(paper[0], ".3g"),
                measuring.number(paper[1], ".3g"),
                measuring.number(s["cosine"] / base if base else None, ".0f"),
                measuring.number(
                    paper[0] / PAPER["directional"][0] if paper[0] else None, ".0f"
                ),
            ]
        )
    return measuring.markdown(header, rows)


def plot(results: dict, methods: Sequence[str]):
    from matplotlib import ticker as mticker

    fig, (cos_ax, step_ax) = measuring.figure(2)
    steps = [p["step"] for p in results["points"]]
    for m in methods:
        cos_ax.plot(
            steps,
            [abs(p["methods"][m]["cosine"]) for p in results["points"]],
            "-o",
            ms=3,
            label=m,
        )
        step_ax.plot(
            steps,
            [
                p["methods"][m]["one_step_gradient_norm"]["ratio"]
                for p in results["points"]
            ],
            "-o",
            ms=3,
            label=m,
        )
    cos_ax.set(
        xlabel="backprop step",
        ylabel="|cosine| with the gradient",
        yscale="log",
        title="cosine along the trajectory",
    )
    step_ax.set(
        xlabel="backprop step",
        ylabel="one-step effectiveness (scale-free)",
        yscale="symlog",
        title="loss decrease / backprop's",
    )
    # Log-axis labels as plain numbers (0.8, not 8.04747x10^-1 on a narrow range).
    cos_ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda y, _: f"{y:.3g}"))
    cos_ax.yaxis.set_minor_formatter(mticker.NullFormatter())
    measuring.style([cos_ax, step_ax])
    fig.suptitle(
        f"{results['settings']['model_label']} on {results['settings']['dataset']}"
    )
    return fig


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        config = common.apply_flags(get_config())
        methods = measuring.parse_methods(config)
        variants = measuring.variants(config, methods)
        path = measuring.prepare_workdir(config, NAME)
        setup = measuring.setup(config, methods)
    except (ValueError, TypeError) as err:
        return measuring.fail(NAME, err)
    labels = [v.label for v in variants]
    measure = {
        m: jax.jit(functools.partial(measure_point, config, setup, m)) for m in labels
    }
    points = []
    key = jax.random.key(config.seed + 1)
    for step, params in measuring.trajectory(config, setup, config.points):
        batch = setup.batch(step)
        point_key = jax.random.fold_in(key, step)
        values = {
            m: measuring.to_host(fn(params, batch, point_key))
            for m, fn in measure.items()
        }
        points.append({"step": step, "methods": values})
        print(
            f"[{NAME}] step {step}: "
            + ", ".join(f"{m} {v['cosine']:.4f}" for m, v in values.items())
        )
    results = {
        "experiment": NAME,
        "settings": measuring.settings(config)
        | {
            "points": config.points,
            "num_keys": config.num_keys,
            "examples": config.examples,
        },
        "methods": labels,
        "variants": {v.label: {"method": v.method, **v.options} for v in variants},
        "points": points,
        "summary": {m: summary(points, m) for m in labels},
        "paper": {m: {"cosine": c, "one_step": s} for m, (c, s) in PAPER.items()},
        "paper_mode": "joint",
    }
    text = table(results, variants)
    print(text)
    measuring.save(path, NAME, results, text, plot(results, labels))
    measuring.paper_hint(config, NAME, steps=3000, points=30)
    return 0


if __name__ == "__main__":
    app.run(main)
