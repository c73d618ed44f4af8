r"""The paper's Figure 3 (middle and right): is a low cosine enough, and what does bias cost?

    python -m experiments.bias_training               # 3x256 MLP, W^T against the oracle, 3 optimisers
    python -m experiments.bias_training --methods=mixing --dataset=cifar10 --steps=5000

Measures the mean cosine of ``--methods``' estimate with the true gradient at
initialisation (:func:`guessgrad.metrics.estimate_cosines`, over a few
batches; in ``--mode``, default joint, the paper's estimator), then trains, with the one training loop of every experiment
(:func:`guessgrad.experiment.run`), both ``--method`` and ``oracle_angle`` at
that cosine (an unbiased guess with the same angle; by default the paper's
step ``(g . u) u`` along the unit guess u, ``--oracle_scale``), with plain SGD, SGD
with momentum and AdamW. If the loss curves of the oracle are good where the
method's are not, bias (not the angle) is what holds the method back; the
paper finds momentum makes bias hurt more. Prints the table and writes
bias_training.json, bias_training.md and bias_training.png (train loss vs
step, one panel per optimiser); each run is in ``<workdir>/<optimizer>/<method>``.
Its settings are ``experiments/configs/bias_training.py``'s fields, each a flag.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import app

from experiments import common, measuring
from experiments.configs.bias_training import get_config
from guessgrad import experiment, metrics

NAME = "bias_training"
OPTIMIZERS = ("sgd", "momentum", "adamw")
SCALES = ("directional", "gradient")
# This measurement's own fields, each a flag of its name: their help.
HELP = {
    "sgd_learning_rate": "Step size of plain SGD.",
    "momentum_learning_rate": "Step size of SGD with momentum 0.9.",
    "adamw_learning_rate": "Step size of AdamW.",
    "cosine_batches": "Batches the method's cosine is averaged over.",
    "oracle_scale": "oracle_angle's step: directional, the paper's (g.u)u along the "
    "unit guess u (cosine times the gradient's norm); gradient, the gradient's norm.",
}
common.define_flags(
    get_config(),
    {**measuring.FIELDS, **{name: name for name in HELP}},
    help={**measuring.HELP, **HELP},
)
measuring.one_of("model", measuring.MODELS)
measuring.one_of("oracle_scale", SCALES)


def measured_cosine(config, setup: measuring.Setup, method: str) -> float:
    """The method's mean cosine with the true gradient at initialisation."""
    fn = jax.jit(
        lambda p, b, k: metrics.estimate_cosines(
            setup.estimators[method], setup.true_grad_fn, p, b, k, 4
        )["cosine"]
    )
    values = [
        float(fn(setup.params, setup.batch(i), jax.random.key(config.seed + i)))
        for i in range(config.cosine_batches)
    ]
    return float(np.mean(values))


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        config = common.apply_flags(get_config())
        methods = measuring.parse_methods(config)
        if len(methods) != 1 or methods[0] == "oracle_angle":
            raise ValueError("--methods names one guessing method (e.g. wt).")
        if len(measuring.modes(config)) != 1:
            raise ValueError("--mode names one mode here (default joint, the paper's).")
        (variant,) = measuring.variants(config, methods)
        method = methods[0]
        path = measuring.prepare_workdir(config, NAME)
        setup = measuring.setup(config, methods)
        rates = {
            "sgd": config.sgd_learning_rate,
            "momentum": config.momentum_learning_rate,
            "adamw": config.adamw_learning_rate,
        }
        base = experiment.Config(
            dataset=config.dataset,
            data_dir=config.data_dir,
            model=setup.spec,
            batch_size=config.batch_size,
            steps=config.steps,
            eval_every=max(config.steps // 5, 1),
            log_every=max(config.steps // 50, 1),
            seed=config.seed,
            progress=False,
        )
        cosine = measured_cosine(config, setup, method)
        print(f"[{NAME}] {method}'s mean cosine at initialisation: {cosine:.4f}")
        configs = {
            (opt, name): dataclasses.replace(
                base,
                method=name,
                optimizer=opt,
                learning_rate=rates[opt],
                options=(
                    {"cosine": cosine, "scale": config.oracle_scale}
                    if name == "oracle_angle"
                    else variant.options
                ),
                workdir=os.path.join(path, opt, name),
            )
            for opt in OPTIMIZERS
            for name in (method, "oracle_angle")
        }
        for run_config in configs.values():
            experiment.validate(run_config)
    except (ValueError, TypeError) as err:
        return measuring.fail(NAME, err)
    runs = {}
    for (opt, name), run_config in configs.items():
        results = experiment.run(run_config)
        records = experiment.read_metrics(
            os.path.join(run_config.workdir, "metrics.jsonl")
        )
        runs[f"{opt}/{name}"] = {
            "optimizer": opt,
            "method": name,
            "status": results["status"],
            "test_accuracy": results.get("test_accuracy"),
            "train_loss": results.get("train_loss"),
            "curve": [[r["step"], r["loss"]] for r in records if r["kind"] == "train"],
        }
    results = {
        "experiment": NAME,
        "settings": measuring.settings(config)
        | {
            "method": method,
            "options": variant.options,
            "cosine": cosine,
            "oracle_scale": config.oracle_scale,
            "learning_rates": dict(rates),
        },
        "runs": runs,
        "paper": "oracle_angle at a guessing method's cosine trains well; the method's "
        "bias hurts, more so with momentum",
    }
    header = [
        "optimizer",
        f"{method} test acc",
        "oracle test acc",
        f"{method} train loss",
        "oracle train loss",
    ]
    rows = []
    for opt in OPTIMIZERS:
        a, o = runs[f"{opt}/{method}"], runs[f"{opt}/oracle_angle"]
        rows.append(
            [
                f"{opt} (lr {rates[opt]:g})",
                *(
                    "diverged"
                    if r["status"] == "diverged"
                    else measuring.percent(r["test_accuracy"])
                    for r in (a, o)
                ),
                *(measuring.number(r["train_loss"]) for r in (a, o)),
            ]
        )
    text = measuring.markdown(header, rows)
    print(f"oracle_angle ({config.oracle_scale} step) at cosine {cosine:.4f}\n{text}")
    fig, axes = measuring.figure(len(OPTIMIZERS), width=4.0)
    for ax, opt in zip(axes, OPTIMIZERS):
        for name in (method, "oracle_angle"):
            curve = np.array(runs[f"{opt}/{name}"]["curve"], dtype=float).reshape(-1, 2)
            ax.plot(curve[:, 0], curve[:, 1], label=name)
        ax.set(xlabel="step", ylabel="train loss", yscale="log", title=f"{opt}")
    measuring.style(axes)
    measuring.save(path, NAME, results, text, fig)
    measuring.paper_hint(config, NAME, steps=5000)
    return 0


if __name__ == "__main__":
    app.run(main)
