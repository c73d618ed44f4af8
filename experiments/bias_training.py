r"""The paper's Figure 3 (middle and right): is a low cosine enough, and what does bias cost?

    python -m experiments.bias_training               # 3x256 MLP, W^T against the oracle, 3 optimisers
    python -m experiments.bias_training --method=mixing --dataset=cifar10 --steps=5000

Measures the mean cosine of ``--method``'s estimate with the true gradient at
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
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags

from experiments import measuring
from guessgrad import experiment, metrics

FLAGS = flags.FLAGS
NAME = "bias_training"
OPTIMIZERS = ("sgd", "momentum", "adamw")

measuring.define_flags(steps=500, methods="wt", depth=3, width=256)
flags.DEFINE_float("sgd_learning_rate", 0.1, "Step size of plain SGD.")
flags.DEFINE_float(
    "momentum_learning_rate", 0.01, "Step size of SGD with momentum 0.9."
)
flags.DEFINE_float("adamw_learning_rate", 1e-3, "Step size of AdamW.")
flags.DEFINE_integer(
    "cosine_batches", 4, "Batches the method's cosine is averaged over."
)
flags.DEFINE_enum(
    "oracle_scale",
    "directional",
    ["directional", "gradient"],
    "oracle_angle's step: directional, the paper's (g.u)u along the unit guess u "
    "(cosine times the gradient's norm); gradient, the gradient's norm.",
)


def measured_cosine(setup: measuring.Setup, method: str) -> float:
    """The method's mean cosine with the true gradient at initialisation."""
    fn = jax.jit(
        lambda p, b, k: metrics.estimate_cosines(
            setup.estimators[method], setup.true_grad_fn, p, b, k, 4
        )["cosine"]
    )
    values = [
        float(fn(setup.params, setup.batch(i), jax.random.key(FLAGS.seed + i)))
        for i in range(FLAGS.cosine_batches)
    ]
    return float(np.mean(values))


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        methods = measuring.parse_methods()
        if len(methods) != 1 or methods[0] == "oracle_angle":
            raise ValueError("--methods names one guessing method (e.g. wt).")
        if len(measuring.modes()) != 1:
            raise ValueError("--mode names one mode here (default joint, the paper's).")
        (variant,) = measuring.variants(methods)
        method = methods[0]
        path = measuring.prepare_workdir(NAME)
        setup = measuring.setup(methods)
        rates = {
            "sgd": FLAGS.sgd_learning_rate,
            "momentum": FLAGS.momentum_learning_rate,
            "adamw": FLAGS.adamw_learning_rate,
        }
        base = experiment.Config(
            dataset=FLAGS.dataset,
            data_dir=FLAGS.data_dir,
            model=setup.spec,
            batch_size=FLAGS.batch_size,
            steps=FLAGS.steps,
            eval_every=max(FLAGS.steps // 5, 1),
            log_every=max(FLAGS.steps // 50, 1),
            seed=FLAGS.seed,
            progress=False,
        )
        cosine = measured_cosine(setup, method)
        print(f"[{NAME}] {method}'s mean cosine at initialisation: {cosine:.4f}")
        configs = {
            (opt, name): dataclasses.replace(
                base,
                method=name,
                optimizer=opt,
                learning_rate=rates[opt],
                options=(
                    {"cosine": cosine, "scale": FLAGS.oracle_scale}
                    if name == "oracle_angle"
                    else variant.options
                ),
                workdir=os.path.join(path, opt, name),
            )
            for opt in OPTIMIZERS
            for name in (method, "oracle_angle")
        }
        for config in configs.values():
            experiment.validate(config)
    except (ValueError, TypeError) as err:
        return measuring.fail(NAME, err)
    runs = {}
    for (opt, name), config in configs.items():
        results = experiment.run(config)
        records = experiment.read_metrics(os.path.join(config.workdir, "metrics.jsonl"))
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
        "settings": measuring.settings()
        | {
            "method": method,
            "options": variant.options,
            "cosine": cosine,
            "oracle_scale": FLAGS.oracle_scale,
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
    print(f"oracle_angle ({FLAGS.oracle_scale} step) at cosine {cosine:.4f}\n{text}")
    fig, axes = measuring.figure(len(OPTIMIZERS), width=4.0)
    for ax, opt in zip(axes, OPTIMIZERS):
        for name in (method, "oracle_angle"):
            curve = np.array(runs[f"{opt}/{name}"]["curve"], dtype=float).reshape(-1, 2)
            ax.plot(curve[:, 0], curve[:, 1], label=name)
        ax.set(xlabel="step", ylabel="train loss", yscale="log", title=f"{opt}")
    measuring.style(axes)
    measuring.save(path, NAME, results, text, fig)
    measuring.paper_hint(NAME, steps=5000)
    return 0


if __name__ == "__main__":
    app.run(main)
