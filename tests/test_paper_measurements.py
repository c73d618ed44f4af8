"""What the paper's measurements rest on: the joint estimator's cosine, the oracle's step.

Singhal et al. measure one directional derivative per example across every
layer (``mode="joint"``), and compare guesses with an oracle whose step is
the directional derivative along a unit guess at a fixed angle.
"""

import math

import jax
import numpy as np
import pytest
from helpers import assert_mean_matches, cosine, flat
from zoo import ZOO

import guessgrad as gg
from guessgrad import metrics


def _biases_only(model, batch):
    """An MLP with only its biases trainable and one example: there the parameter
    estimate of a site is its site estimate (the bias enters the site additively)."""
    params = model.init(jax.random.key(0), batch["image"])
    trainable = jax.tree_util.tree_map_with_path(
        lambda path, _: path[-1].key == "bias", params
    )
    return params, trainable


@pytest.mark.slow
def test_joint_mode_cosine_is_the_closed_form_of_one_derivative_across_all_layers():
    """Joint activation perturbation with raw noise: ``g_hat = (a . eps) eps`` over
    every site at once, so ``cos(g_hat, a) = |a . eps| / (|a| |eps|)``, whose mean
    in N dimensions is ``Gamma(N/2) / (sqrt(pi) Gamma((N+1)/2))``. One derivative
    per site (per_layer) has a larger cosine, which the paper does not report."""
    model = gg.models.MLP(depth=3, width=8, num_classes=5)  # sites 8 + 8 + 5
    batch = {
        "image": jax.random.normal(jax.random.key(1), (1, 6)),
        "label": jax.numpy.array([2]),
    }
    params, trainable = _biases_only(model, batch)
    n = 8 + 8 + 5
    closed_form = math.exp(math.lgamma(n / 2) - math.lgamma((n + 1) / 2)) / math.sqrt(
        math.pi
    )
    exact = gg.get_estimator("backprop", model, trainable=trainable)
    keys = 4000

    def cosines(mode):
        estimate = gg.get_estimator(
            "activation_perturbation",
            model,
            trainable=trainable,
            mode=mode,
            normalize=False,
        )
        true = exact(params, batch, None)
        return np.asarray(
            jax.jit(
                jax.vmap(
                    lambda k: metrics.cosine(
                        flat(estimate(params, batch, k)), flat(true)
                    )
                )
            )(jax.random.split(jax.random.key(2), keys)),
            np.float64,
        )

    joint, per_layer = cosines("joint"), cosines("per_layer")
    stderr = joint.std() / math.sqrt(keys)
    assert abs(joint.mean() - closed_form) < 4 * stderr
    assert per_layer.mean() > joint.mean() + 10 * stderr


def test_the_oracles_two_step_lengths():
    """``scale="gradient"``: the gradient's norm, cosine c. ``scale="directional"``:
    the paper's ``(g . u) u`` along the unit guess u, c times as long; its mean is
    ``c^2 g``."""
    model, params, batch, problem = ZOO["two_block_local"]()
    g = flat(gg.get_estimator("backprop", model, **problem)(params, batch, None))
    c = 0.3
    full = gg.get_estimator("oracle_angle", model, cosine=c, **problem)
    step = gg.get_estimator(
        "oracle_angle", model, cosine=c, scale="directional", **problem
    )
    key = jax.random.key(0)
    a, b = flat(full(params, batch, key)), flat(step(params, batch, key))
    np.testing.assert_allclose(np.linalg.norm(a), np.linalg.norm(g), rtol=1e-5)
    np.testing.assert_allclose(b, c * a, rtol=1e-6, atol=1e-8)
    assert cosine(b, g) == pytest.approx(c, abs=1e-5)
    # (g . u) u with u = b / |b|: the directional derivative along the unit guess.
    u = b / np.linalg.norm(b)
    np.testing.assert_allclose(b, np.dot(g, u) * u, rtol=1e-4, atol=1e-7)
    samples = jax.jit(jax.vmap(lambda k: flat(step(params, batch, k))))(
        jax.random.split(jax.random.key(1), 20_000)
    )
    assert_mean_matches(samples, c**2 * g)
    with pytest.raises(ValueError, match="scale must be one of gradient, directional"):
        gg.get_estimator("oracle_angle", model, scale="unit")
