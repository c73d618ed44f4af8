r"""The paper's Figure 3 (left): bias, the cosine of the mean of K guesses for one example.

    python -m experiments.bias                        # 3x256 MLP after 100 backprop steps, K up to 1000
    python -m experiments.bias --depth=6 --width=1024 --dataset=cifar10   # the paper's network

Trains the network by backprop for ``--steps`` steps, then for each of
``--examples`` training examples and each method of ``--methods`` averages K
independent guesses (K = 1 .. ``--max_guesses``, log-spaced) and measures the
cosine of the mean with that example's true gradient
(:func:`guessgrad.metrics.bias_curve`). Unbiased methods (directional,
activation perturbation) keep rising towards 1; biased ones (W^T, mixing)
saturate at the cosine of their expectation. Prints the curve per method
(mean over the examples), and writes bias.json, bias.md and bias.png.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags

from experiments import measuring
from guessgrad import metrics

FLAGS = flags.FLAGS
NAME = "bias"

measuring.define_flags(
    steps=100,
    methods="directional,activation_perturbation,mixing,wt",
    depth=3,
    width=256,
)
flags.DEFINE_integer("max_guesses", 1000, "The largest K.")
flags.DEFINE_integer("examples", 4, "Examples whose curves are averaged.")


def ks(max_guesses: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to and including ``max_guesses``."""
    out = [m * 10**e for e in range(8) for m in (1, 2, 5) if m * 10**e < max_guesses]
    return (*out, max_guesses)


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        methods = measuring.parse_methods()
        if FLAGS.max_guesses < 1 or FLAGS.examples < 1:
            raise ValueError("--max_guesses and --examples must be at least 1.")
        path = measuring.prepare_workdir(NAME)
        setup = measuring.setup(methods)
    except (ValueError, TypeError) as err:
        return measuring.fail(NAME, err)
    grid = ks(FLAGS.max_guesses)
    params = measuring.trained_params(setup)
    batch = setup.batch(FLAGS.steps)
    curves = {}
    for method in methods:
        curve = jax.jit(
            functools.partial(
                metrics.bias_curve,
                setup.estimators[method],
                setup.true_grad_fn,
                ks=grid,
            )
        )
        per_example = [
            np.asarray(
                curve(
                    params,
                    jax.tree.map(lambda x, i=i: x[i : i + 1], batch),
                    jax.random.key(FLAGS.seed + 1 + i),
                )
            )
            for i in range(FLAGS.examples)
        ]
        curves[method] = np.mean(per_example, axis=0).tolist()
        print(
            f"[{NAME}] {method}: "
            + ", ".join(f"K={k} {c:.3f}" for k, c in zip(grid, curves[method]))
        )
    results = {
        "experiment": NAME,
        "settings": measuring.settings()
        | {"max_guesses": FLAGS.max_guesses, "examples": FLAGS.examples},
        "methods": methods,
        "ks": list(grid),
        "curves": curves,
        # The paper's claim (Figure 3, left), not a number: unbiased methods keep
        # rising, biased ones saturate.
        "paper": "unbiased methods keep rising with K; biased ones (W^T, mixing) saturate",
    }
    shown = [k for k in grid if k in (1, 10, 100, 1000) or k == grid[-1]]
    rows = (
        [
            [m]
            + [f"{curves[m][grid.index(k)]:.3f}" for k in shown]
            + [
                "rising"
                if curves[m][-1] - curves[m][grid.index(shown[-2])] > 0.02
                else "saturated"
            ]
            for m in methods
        ]
        if len(shown) > 1
        else [[m, f"{curves[m][0]:.3f}", "-"] for m in methods]
    )
    header = ["method"] + [f"K={k}" for k in shown] + ["last decade"]
    text = measuring.markdown(header, rows)
    print(text)
    fig, (ax,) = measuring.figure(1)
    for m in methods:
        ax.plot(grid, curves[m], "-o", ms=3, label=m)
    ax.set(
        xscale="log",
        xlabel="guesses averaged (K)",
        ylabel="cosine of the mean with the gradient",
        title=f"bias: {results['settings']['model_label']}, {FLAGS.examples} examples",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    measuring.save(path, NAME, results, text, fig)
    return 0


if __name__ == "__main__":
    app.run(main)
