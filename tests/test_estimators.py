"""Claims about each estimator's distribution: means, covariances, subspaces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LABEL_FREE, cosine, flat

import guessgrad as gg
from guessgrad._src import core
from guessgrad._src import guesses as rules

NUM_SAMPLES = 20_000
MAX_Z = 5.0  # largest |z| allowed over ~170 coordinates (fixed seeds: deterministic)


def sample_estimates(model, params, batch, name, num_samples=NUM_SAMPLES, **options):
    """[num_samples, P] independent estimates (one guess each), by vmap over keys."""
    estimate = gg.get_estimator(name, model, **options)
    keys = jax.random.split(jax.random.key(123), num_samples)
    return jax.jit(jax.vmap(lambda k: flat(estimate(params, batch, k))))(keys)


def assert_mean_matches(samples, expected):
    """Monte-Carlo mean within MAX_Z standard errors of `expected`, coordinate by coordinate."""
    samples, expected = (
        np.asarray(samples, np.float64),
        np.asarray(expected, np.float64),
    )
    mean = samples.mean(0)
    stderr = samples.std(0) / np.sqrt(samples.shape[0])
    # Coordinates the method never moves (dead units) vary only by float32 round-off.
    degenerate = stderr < 1e-6 * stderr.max()
    np.testing.assert_allclose(mean[degenerate], expected[degenerate], atol=1e-6)
    z = np.abs(mean - expected)[~degenerate] / stderr[~degenerate]
    assert z.max() < MAX_Z, f"max z-score {z.max():.2f} (mean {np.mean(z):.2f})"


# --- closed-form expectations, computed here from the dense weights ----------------


def dense_quantities(model, params, batch):
    """Per-example masks D_l, kernels K_l, activations x_l and true site grads G_l."""
    fns = gg.models.chain_fns(model)
    layer_params = core.split_params(fns, params)
    trace = core.forward(
        fns, layer_params, fns.preprocess(batch["image"]), batch["label"]
    )
    kernels = [np.asarray(p["kernel"], np.float64) for p in layer_params]
    masks = [np.asarray(s > 0, np.float64) for s in trace.sites]
    outputs = [np.asarray(jnp.maximum(s, 0), np.float64) for s in trace.sites]
    site_grads = jax.grad(lambda s: jnp.sum(core.per_example_loss(s, batch["label"])))(
        trace.sites[-1]
    )
    grads = [np.asarray(site_grads, np.float64)]
    for index in range(
        len(kernels) - 2, -1, -1
    ):  # exact backprop, written out for dense layers
        grads.insert(0, (grads[0] @ kernels[index + 1].T) * masks[index])
    return fns, layer_params, trace, kernels, masks, outputs, grads


def covariances(method, model, params, batch, rank=3):
    """Cov(y_{l,b}) for every hidden site l and example b: list of [B, n, n]."""
    _, _, _, kernels, masks, outputs, _ = dense_quantities(model, params, batch)
    last = len(kernels) - 1
    covs = []
    for index in range(last):
        d = masks[index]
        jac = np.einsum(
            "mn,bn->bmn", kernels[index + 1].T, d
        )  # J_b = W_{l+1} D_b, [B, m, n]
        if method in ("wt", "self_sharpening", "downstream") and (
            method == "wt" or index + 1 == last
        ):
            cov = np.einsum("bmi,bmj->bij", jac, jac)
        elif method in (
            "downstream",
            "self_sharpening",
        ):  # eps at x_{l+2}: J^T D_{l+1} J
            cov = np.einsum("bmi,bm,bmj->bij", jac, masks[index + 1], jac)
        elif method == "mixing":
            x = outputs[index]  # Cov_b = D_b X^T X D_b
            cov = np.einsum("bi,ki,kj,bj->bij", d, x, x, d)
        elif method == "wperp":
            _, s, vh = np.linalg.svd(jac, full_matrices=False)
            keep = (s[:, :rank] > s[:, :1] * 1e-5)[:, :, None]
            v = vh[:, :rank] * keep
            cov = np.einsum("bki,bkj->bij", v, v)
        else:
            raise ValueError(method)
        if method == "self_sharpening":
            cov = cov / 3.0  # U(-1, 1) has variance 1/3
        covs.append(cov)
    return covs


def expected_param_grads(method, model, params, batch, **options):
    fns, layer_params, trace, _kernels, _masks, _outputs, grads = dense_quantities(
        model, params, batch
    )
    covs = covariances(method, model, params, batch, **options)
    expected_sites = [np.einsum("bij,bj->bi", c, g) for c, g in zip(covs, grads[:-1])]
    last = grads[-1]
    if method == "self_sharpening":  # g = <e, e> e at the logits
        expected_sites.append(np.sum(last**2, -1, keepdims=True) * last)
    else:
        expected_sites.append(last)
    site_grads = [jnp.asarray(g, jnp.float32) for g in expected_sites]
    return flat(
        core.join_params(
            fns, core.local_parameter_grads(fns, layer_params, trace.inputs, site_grads)
        )
    )


UNBIASED = [
    ("directional", {}),
    ("directional", {"normalize": True}),
    ("activation_perturbation", {"normalize": False, "mode": "per_layer"}),
    ("activation_perturbation", {"normalize": True, "mode": "per_layer"}),
    ("activation_perturbation", {"normalize": False, "mode": "joint"}),
    ("activation_perturbation", {"normalize": True, "mode": "joint"}),
]


@pytest.mark.parametrize("name,options", UNBIASED)
def test_unbiased_methods_average_to_backprop(small_mlp, name, options):
    model, params, batch = small_mlp
    samples = sample_estimates(model, params, batch, name, **options)
    true = flat(gg.get_estimator("backprop", model)(params, batch, None))
    assert_mean_matches(samples, true)
    assert cosine(samples.mean(0), true) > 0.9


BIASED = [
    ("wt", {}, "per_layer"),
    ("wt", {}, "joint"),
    ("downstream", {}, "per_layer"),
    ("mixing", {}, "per_layer"),
    ("mixing", {}, "joint"),
    ("wperp", {"rank": 3}, "per_layer"),
    ("self_sharpening", {}, "per_layer"),
    ("self_sharpening", {}, "joint"),
]


@pytest.mark.parametrize("name,options,mode", BIASED)
def test_biased_methods_match_closed_form_expectation(small_mlp, name, options, mode):
    """E[g_l] = Cov(y_l) dl/ds_l, mapped to parameters by the local VJP."""
    model, params, batch = small_mlp
    samples = sample_estimates(
        model, params, batch, name, normalize=False, mode=mode, **options
    )
    expected = expected_param_grads(name, model, params, batch, **options)
    assert_mean_matches(samples, expected)
    # and the bias is real: the expectation is not the gradient's direction
    true = flat(gg.get_estimator("backprop", model)(params, batch, None))
    assert cosine(expected, true) < 0.999


def test_oracle_angle_has_the_requested_cosine_and_norm(small_mlp):
    model, params, batch = small_mlp
    true = flat(gg.get_estimator("backprop", model)(params, batch, None))
    for c in (0.02, 0.5, -0.3):
        est = flat(
            gg.get_estimator("oracle_angle", model, cosine=c)(
                params, batch, jax.random.key(4)
            )
        )
        np.testing.assert_allclose(cosine(est, true), c, atol=1e-5)
        np.testing.assert_allclose(
            jnp.linalg.norm(est), jnp.linalg.norm(true), rtol=1e-5
        )


@pytest.mark.slow
def test_num_guesses_averages_independent_single_guesses(small_mlp):
    model, params, batch = small_mlp
    key = jax.random.key(9)
    for name in ("wt", "directional"):
        averaged = flat(
            gg.get_estimator(name, model, num_guesses=8)(params, batch, key)
        )
        single = gg.get_estimator(name, model, num_guesses=1)
        loop = np.mean(
            [flat(single(params, batch, k)) for k in jax.random.split(key, 8)], 0
        )
        np.testing.assert_allclose(averaged, loop, rtol=1e-4, atol=1e-7)


# --- guesses: what they read, where they lie ----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", LABEL_FREE + ["self_sharpening"])
def test_labels_reach_the_estimate_only_through_the_derivative(name):
    """Batch of one, per-layer mode: g_l = d_l y_l. If y_l ignores the label, changing
    the label can only rescale each layer's estimate (same key, same guess)."""
    model = gg.models.MLP(depth=4, width=6, num_classes=5)
    image = jax.random.normal(jax.random.key(0), (1, 5))
    params = model.init(jax.random.key(1), image)
    estimate = (
        gg.get_estimator(name, model, mode="per_layer", rank=2)
        if "wperp" in name
        else gg.get_estimator(name, model, mode="per_layer")
    )
    key = jax.random.key(2)
    a = estimate(params, {"image": image, "label": jnp.array([0])}, key)["params"]
    b = estimate(params, {"image": image, "label": jnp.array([3])}, key)["params"]
    colinear = [abs(cosine(a[k]["kernel"], b[k]["kernel"])) for k in sorted(a)]
    if (
        name == "self_sharpening"
    ):  # its last-layer guess is the true error, which reads the label
        np.testing.assert_allclose(colinear[:-1], 1.0, atol=1e-5)
        assert colinear[-1] < 0.99
    else:
        np.testing.assert_allclose(colinear, 1.0, atol=1e-5)


def test_rules_without_needs_label_get_no_labels(small_mlp):
    model, params, batch = small_mlp
    fns = gg.models.chain_fns(model)
    layer_params = core.split_params(fns, params)
    trace = core.forward(
        fns, layer_params, fns.preprocess(batch["image"]), batch["label"]
    )
    ctx = rules.context(
        fns, layer_params, trace.sites, batch["label"], rules.rule_from(rules.wt_hidden)
    )
    assert ctx.labels is None


def _hidden_guesses(rule, model, params, batch, key):
    fns = gg.models.chain_fns(model)
    layer_params = core.split_params(fns, params)
    trace = core.forward(
        fns, layer_params, fns.preprocess(batch["image"]), batch["label"]
    )
    ctx = rules.context(
        fns, layer_params, trace.sites, batch["label"], rules.rule_from(rule)
    )
    return (
        [rule(ctx, l, jax.random.fold_in(key, l)) for l in range(fns.num_sites - 1)],
        layer_params,
        trace,
    )


def _top_subspace_projectors(layer_params, trace, index, rank):
    kernel = np.asarray(layer_params[index + 1]["kernel"], np.float64)
    mask = np.asarray(trace.sites[index] > 0, np.float64)
    jac = np.einsum("mn,bn->bmn", kernel.T, mask)
    _, _, vh = np.linalg.svd(jac, full_matrices=False)
    v = vh[:, :rank]
    return np.einsum("bki,bkj->bij", v, v)


@pytest.mark.slow
def test_wperp_guesses_lie_in_top_k_right_singular_subspace():
    model = gg.models.MLP(depth=3, width=32, num_classes=10)
    batch = {
        "image": jax.random.normal(jax.random.key(0), (6, 20)),
        "label": jnp.zeros(6, jnp.int32),
    }
    params = model.init(jax.random.key(1), batch["image"])
    rank = 5
    ys, layer_params, trace = _hidden_guesses(
        rules.wperp_hidden(rank), model, params, batch, jax.random.key(2)
    )
    for index, y in enumerate(ys):
        proj = _top_subspace_projectors(layer_params, trace, index, rank)
        y = np.asarray(y, np.float64)
        np.testing.assert_allclose(
            np.einsum("bij,bj->bi", proj, y), y, atol=1e-4 * np.abs(y).max()
        )
        assert np.all(np.linalg.norm(y, axis=-1) > 0)
