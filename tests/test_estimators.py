"""Claims about each estimator's distribution: means, covariances, subspaces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    LABEL_FREE,
    assert_mean_matches,
    cosine,
    flat,
    local_updates,
    sample_estimates,
)

import guessgrad as gg


def sample(model, params, batch, name, **options):
    """[NUM_SAMPLES, P] independent one-guess estimates of estimator ``name``."""
    return sample_estimates(gg.get_estimator(name, model, **options), params, batch)


# --- closed-form expectations, computed here from the dense weights ----------------


def dense_quantities(model, params, batch):
    """Per-example masks D_l, kernels K_l, activations x_{l+1} and true site grads G_l (float64).

    The site gradients are written out as backprop for dense layers, from the
    logits' gradient ``softmax - onehot`` down.
    """
    values = list(gg.site_values(model, params, batch).values())
    kernels = [
        np.asarray(params["params"][f"dense_{i}"]["kernel"], np.float64)
        for i in range(len(values))
    ]
    masks = [np.asarray(s > 0, np.float64) for s in values]
    outputs = [np.asarray(jnp.maximum(s, 0), np.float64) for s in values]
    logits = np.asarray(values[-1], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    grads = [probs - np.eye(logits.shape[-1])[np.asarray(batch["label"])]]
    for index in range(len(kernels) - 2, -1, -1):
        grads.insert(0, (grads[0] @ kernels[index + 1].T) * masks[index])
    return values, kernels, masks, outputs, grads


def covariances(method, model, params, batch, rank=3):
    """Cov(y_{l,b}) for every hidden site l and example b: list of [B, n, n]."""
    _, kernels, masks, outputs, _ = dense_quantities(model, params, batch)
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
    values, _kernels, _masks, _outputs, grads = dense_quantities(model, params, batch)
    covs = covariances(method, model, params, batch, **options)
    expected_sites = [np.einsum("bij,bj->bi", c, g) for c, g in zip(covs, grads[:-1])]
    last = grads[-1]
    if method == "self_sharpening":  # g = <e, e> e at the logits
        expected_sites.append(np.sum(last**2, -1, keepdims=True) * last)
    else:
        expected_sites.append(last)
    names = [f"dense_{i}" for i in range(len(values))]
    site_grads = {n: jnp.asarray(g, jnp.float32) for n, g in zip(names, expected_sites)}
    return flat(local_updates(model, params, batch, site_grads))


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
    samples = sample(model, params, batch, name, **options)
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
    samples = sample(model, params, batch, name, normalize=False, mode=mode, **options)
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


def test_only_rules_that_declare_needs_label_may_read_the_loss(small_mlp):
    """The engine's context refuses the loss gradient to a rule without needs_label;
    declared, it is the exact per-example gradient."""
    model, params, batch = small_mlp

    def peeking(ctx, site, key):
        return ctx.loss_gradient(site)

    with pytest.raises(ValueError, match="needs_label"):
        gg.estimators.from_rule(model, peeking)(params, batch, jax.random.key(0))
    ctx = gg.guess_context(model, params, batch, needs_label=True)
    exact = gg.site_gradients(model, params, batch)
    for index, name in enumerate(exact):
        np.testing.assert_allclose(
            ctx.loss_gradient(index), exact[name], rtol=1e-5, atol=1e-7
        )
    declared = gg.rules.GuessRule(peeking, terminal=peeking, needs_label=True)
    guesses = gg.site_guesses(declared, model, params, batch, jax.random.key(0))
    np.testing.assert_allclose(
        guesses["dense_0"], exact["dense_0"], rtol=1e-5, atol=1e-7
    )


def _top_subspace_projectors(params, values, index, rank):
    kernel = np.asarray(params["params"][f"dense_{index + 1}"]["kernel"], np.float64)
    mask = np.asarray(values[index] > 0, np.float64)
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
    guesses = gg.site_guesses(
        gg.rules.wperp(rank), model, params, batch, jax.random.key(2)
    )
    values = list(gg.site_values(model, params, batch).values())
    for index, y in enumerate(list(guesses.values())[:-1]):
        proj = _top_subspace_projectors(params, values, index, rank)
        y = np.asarray(y, np.float64)
        np.testing.assert_allclose(
            np.einsum("bij,bj->bi", proj, y), y, atol=1e-4 * np.abs(y).max()
        )
        assert np.all(np.linalg.norm(y, axis=-1) > 0)


def test_normalize_per_example_sets_norm_sqrt_n_and_keeps_zero():
    y = jnp.array([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    out = gg.rules.normalize_per_example(y)
    np.testing.assert_allclose(jnp.linalg.norm(out[0]), 2.0, rtol=1e-6)
    np.testing.assert_allclose(out[0] / out[0, 0], y[0] / y[0, 0])
    assert not np.any(np.isnan(out)) and np.all(out[1] == 0)


# --- a guess rule from outside the library ---------------------------------------------


def sign_wt(ctx, site, key):
    """sign(D_l W_{l+1}^T eps): W^T's guess, one bit per unit (not a rule of the library)."""
    target = ctx.target(site)
    eps = gg.rules.normal_like(key, ctx.value(target))
    return jnp.sign(ctx.pull(site, target, eps))


@pytest.mark.slow
def test_a_rule_written_outside_the_library_has_its_closed_form_expectation(small_mlp):
    """u = D W^T eps is Gaussian with covariance C = D W^T W D, so by the arcsine law
    E[sign(u) sign(u)^T]_ij = (2 / pi) arcsin(C_ij / sqrt(C_ii C_jj)) on live units
    (and 0 on dead ones): E[g_l] is that matrix times dl/ds_l."""
    model, params, batch = small_mlp
    _, kernels, masks, _, grads = dense_quantities(model, params, batch)
    expected_sites = {}
    for index in range(len(kernels) - 1):
        jac = np.einsum("mn,bn->bmn", kernels[index + 1].T, masks[index])
        c = np.einsum("bmi,bmj->bij", jac, jac)
        scale = np.sqrt(np.einsum("bii->bi", c))
        outer = scale[:, :, None] * scale[:, None, :]
        corr = np.divide(c, outer, out=np.zeros_like(c), where=outer > 0)
        cov = 2 / np.pi * np.arcsin(np.clip(corr, -1, 1))
        expected_sites[f"dense_{index}"] = np.einsum("bij,bj->bi", cov, grads[index])
    expected_sites[f"dense_{len(kernels) - 1}"] = grads[-1]  # eps at the logits
    expected = local_updates(
        model, params, batch, {k: jnp.float32(v) for k, v in expected_sites.items()}
    )
    estimate = gg.estimators.from_rule(model, sign_wt, normalize=False)
    assert_mean_matches(sample_estimates(estimate, params, batch), flat(expected))


@pytest.mark.slow
def test_a_rule_written_outside_the_library_gets_every_mode_and_option(small_mlp):
    model, params, batch = small_mlp
    key = jax.random.key(3)
    joint = gg.estimators.from_rule(model, sign_wt, mode="joint", num_guesses=3)
    lean = gg.estimators.from_rule(
        model, sign_wt, mode="joint", num_guesses=3, lean=True
    )
    np.testing.assert_allclose(
        flat(lean(params, batch, key)),
        flat(jax.jit(joint)(params, batch, key)),
        rtol=1e-5,
        atol=1e-7,
    )

    # Only the first layer trainable: the rest are exact zeros, and the first layer's
    # estimate is the full estimate's (per-layer mode: each site on its own).
    def first_only(p):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "dense_0" in jax.tree_util.keystr(path), p
        )

    full = gg.estimators.from_rule(model, sign_wt)(params, batch, key)["params"]
    part = gg.estimators.from_rule(model, sign_wt, trainable=first_only)(
        params, batch, key
    )["params"]
    np.testing.assert_allclose(flat(part["dense_0"]), flat(full["dense_0"]), rtol=1e-6)
    assert not np.any(flat(part["dense_1"])) and not np.any(flat(part["dense_2"]))
    _, metrics = gg.estimators.from_rule(model, sign_wt, has_aux=True)(
        params, batch, key
    )
    assert set(metrics) == {"loss", "accuracy"}
