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
Its settings are ``experiments/configs/bias.py``'s fields, each a flag.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app

import guessgrad as gg
from experiments import common, measuring
from experiments.configs.bias import get_config
from guessgrad import metrics

NAME = "bias"
# This measurement's own fields, each a flag of its name: their help.
HELP = {
    "max_guesses": "The largest K.",
    "examples": "Examples whose curves are averaged.",
}
common.define_flags(
    get_config(),
    {**measuring.FIELDS, **{name: name for name in HELP}},
    help={**measuring.HELP, **HELP},
)
measuring.one_of("model", measuring.MODELS)


def ks(max_guesses: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to and including ``max_guesses``."""
    out = [m * 10**e for e in range(8) for m in (1, 2, 5) if m * 10**e < max_guesses]
    return (*out, max_guesses)


def analytic_wt(setup: measuring.Setup, params, example) -> list[dict]:
    """Per hidden layer of an MLP: the bias of the (unnormalised) W^T guess, from its covariance.

    At site ``l`` the guess ``y = D_l W_{l+1} eps`` (eps ~ N(0, I)) has
    ``C = E[y y^T] = D_l W_{l+1} W_{l+1}^T D_l``, so ``E[g_hat] = C g`` with
    ``g`` the example's gradient at the site: the relative bias
    ``|(C - I) g| / |g|`` (:func:`guessgrad.metrics.analytic_bias`) and the
    cosine ``cos(C g, g)`` the mean of many guesses tends to. (Activation
    perturbation has ``C = I``: no bias.)
    """
    found = gg.structure(setup.model, params, example)
    site_grads = gg.site_gradients(setup.model, params, example)
    raw = gg.site_values(setup.model, params, example)
    layers = []
    for index, info in enumerate(found.sites[:-1]):
        g, s = site_grads[info.path][0], raw[info.path][0]
        d = (
            jax.jvp(info.act, (s,), (jnp.ones_like(s),))[1]
            if info.act
            else jnp.ones_like(s)
        )
        w = params["params"][f"dense_{index + 1}"]["kernel"]
        cov = (d[:, None] * w) @ (w.T * d[None, :])
        _, relative = metrics.analytic_bias(cov, g)
        layers.append(
            {
                "layer": index,
                "relative_bias": float(relative),
                "expected_cosine": float(metrics.cosine(cov @ g, g)),
            }
        )
    return layers


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        config = common.apply_flags(get_config())
        methods = measuring.parse_methods(config)
        if config.max_guesses < 1 or config.examples < 1:
            raise ValueError("--max_guesses and --examples must be at least 1.")
        path = measuring.prepare_workdir(config, NAME)
        setup = measuring.setup(config, methods)
        methods = [v.label for v in measuring.variants(config, methods)]
    except (ValueError, TypeError) as err:
        return measuring.fail(NAME, err)
    grid = ks(config.max_guesses)
    params = measuring.trained_params(config, setup)
    batch = setup.batch(config.steps)
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
                    jax.random.key(config.seed + 1 + i),
                )
            )
            for i in range(config.examples)
        ]
        curves[method] = np.mean(per_example, axis=0).tolist()
        print(
            f"[{NAME}] {method}: "
            + ", ".join(f"K={k} {c:.3f}" for k, c in zip(grid, curves[method]))
        )
    analytic = []
    if config.model == "mlp":
        analytic = [
            analytic_wt(setup, params, jax.tree.map(lambda x, i=i: x[i : i + 1], batch))
            for i in range(config.examples)
        ]
    results = {
        "experiment": NAME,
        "settings": measuring.settings(config)
        | {"max_guesses": config.max_guesses, "examples": config.examples},
        "methods": methods,
        "ks": list(grid),
        "curves": curves,
        "analytic_wt": analytic,
        # The paper's claim (Figure 3, left), not a number: unbiased methods keep
        # rising, biased ones saturate.
        "paper": "unbiased methods keep rising with K; biased ones (W^T, mixing) saturate",
    }
    shown = [k for k in grid if k in (1, 10, 100, 1000) or k == grid[-1]]
    # The gain of the last step of the grid shown: an unbiased method's squared
    # cosine keeps growing about linearly in K until it nears 1; a biased one's stops.
    previous = grid.index(shown[-2]) if len(shown) > 1 else 0
    rows = [
        [m]
        + [f"{curves[m][grid.index(k)]:.3f}" for k in shown]
        + [f"{curves[m][-1] - curves[m][previous]:+.3f}"]
        for m in methods
    ]
    header = (
        ["method"]
        + [f"K={k}" for k in shown]
        + [f"gain K={shown[-2] if len(shown) > 1 else shown[0]}..{shown[-1]}"]
    )
    text = measuring.markdown(header, rows)
    if analytic:
        per_layer = [
            (
                np.mean([a[layer]["relative_bias"] for a in analytic]),
                np.mean([a[layer]["expected_cosine"] for a in analytic]),
            )
            for layer in range(len(analytic[0]))
        ]
        text += (
            "\n\nAnalytic bias of the unnormalised W^T guess, C = D W W^T D (mean over the examples):\n\n"
            + measuring.markdown(
                ["hidden layer", "relative bias ‖(C - I) g‖ / ‖g‖", "cos(C g, g)"],
                [
                    [str(i), f"{b:.3g}", f"{c:.3f}"]
                    for i, (b, c) in enumerate(per_layer)
                ],
            )
        )
    print(text)
    fig, (ax,) = measuring.figure(1)
    for m in methods:
        ax.plot(grid, curves[m], "-o", ms=3, label=m)
    ax.set(
        xscale="log",
        xlabel="guesses averaged (K)",
        ylabel="cosine of the mean with the gradient",
        title=f"bias: {results['settings']['model_label']}, {config.examples} examples",
    )
    measuring.style(ax)
    measuring.save(path, NAME, results, text, fig)
    measuring.paper_hint(config, NAME)
    return 0


if __name__ == "__main__":
    app.run(main)
