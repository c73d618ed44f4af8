"""The forward-mode engine: directional derivatives, local VJPs, the oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import guessgrad as gg
from guessgrad._src import core


def reference_site_grads(model, params, batch):
    """dl_b/ds_l per example by reverse mode through explicitly perturbed sites."""
    fns = gg.models.chain_fns(model)
    layer_params = core.split_params(fns, params)

    def losses(perturbations):
        x = fns.preprocess(batch["image"])
        for index, (site_fn, theta) in enumerate(zip(fns.site_fns, layer_params)):
            site = site_fn(theta, x) + perturbations[index]
            x = fns.activation(site)
        return optax.softmax_cross_entropy_with_integer_labels(site, batch["label"])

    zeros = [
        jnp.zeros_like(s)
        for s in core.forward(
            fns, layer_params, fns.preprocess(batch["image"]), batch["label"]
        ).sites
    ]
    # Examples are independent, so the gradient of the summed loss at site l,
    # row b, is dl_b/ds_{l,b}.
    return jax.grad(lambda p: jnp.sum(losses(p)))(zeros)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["small_mlp", "normed_chain"])
def test_directional_derivatives_equal_grad_dot_tangent(fixture, request):
    model, params, batch = request.getfixturevalue(fixture)
    site_grads = reference_site_grads(model, params, batch)
    keys = jax.random.split(jax.random.key(7), len(site_grads))
    tangents = [jax.random.normal(k, g.shape) for k, g in zip(keys, site_grads)]
    per_site = np.stack(
        [
            np.sum(np.asarray(g * t).reshape(g.shape[0], -1), -1)
            for g, t in zip(site_grads, tangents)
        ]
    )  # [L, B]

    joint = gg.directional_derivatives(model, params, batch, tangents, mode="joint")
    per_layer = gg.directional_derivatives(
        model, params, batch, tangents, mode="per_layer"
    )
    np.testing.assert_allclose(per_layer, per_site, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(joint, per_site.sum(0), rtol=1e-5, atol=1e-6)


def test_backprop_equals_jax_grad_of_mean_cross_entropy(small_mlp):
    model, params, batch = small_mlp

    def loss(p):
        logits = model.apply(p, batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, batch["label"]
        ).mean()

    expected = jax.grad(loss)(params)
    got = gg.get_estimator("backprop", model)(params, batch, jax.random.key(0))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        got,
        expected,
    )


def test_local_vjp_of_exact_site_grads_is_backprop(small_mlp):
    """The local-VJP step is exact: fed the true dl_b/ds_l it returns jax.grad."""
    model, params, batch = small_mlp
    fns = gg.models.chain_fns(model)
    layer_params = core.split_params(fns, params)
    trace = core.forward(
        fns, layer_params, fns.preprocess(batch["image"]), batch["label"]
    )
    site_grads = reference_site_grads(model, params, batch)
    grads = core.join_params(
        fns, core.local_parameter_grads(fns, layer_params, trace.inputs, site_grads)
    )
    expected = gg.get_estimator("backprop", model)(params, batch, None)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        grads,
        expected,
    )


def test_dense_local_update_is_outer_product(small_mlp):
    """For a dense layer: dW = sum_b x_b g_b^T / B and db = sum_b g_b / B."""
    model, params, _batch = small_mlp
    fns = gg.models.chain_fns(model)
    layer_params = core.split_params(fns, params)
    x = jax.random.normal(jax.random.key(0), (4, 8))
    g = jax.random.normal(jax.random.key(1), (4, 8))
    (grad,) = core.local_parameter_grads(fns, layer_params[1:2], [x], [g])
    np.testing.assert_allclose(grad["kernel"], x.T @ g / 4, rtol=1e-6)
    np.testing.assert_allclose(grad["bias"], g.mean(0), rtol=1e-6)


def test_normalize_per_example_sets_norm_sqrt_n_and_keeps_zero():
    y = jnp.array([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    out = core.normalize_per_example(y)
    np.testing.assert_allclose(jnp.linalg.norm(out[0]), 2.0, rtol=1e-6)
    np.testing.assert_allclose(out[0] / out[0, 0], y[0] / y[0, 0])
    assert not np.any(np.isnan(out)) and np.all(out[1] == 0)


def test_mlp_structure_and_torch_default_init():
    model = gg.models.MLP(depth=3, width=128, num_classes=10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28)))["params"]
    assert [params[f"dense_{i}"]["kernel"].shape for i in range(3)] == [
        (784, 128),
        (128, 128),
        (128, 10),
    ]
    for name, fan_in in [("dense_0", 784), ("dense_1", 128)]:
        bound = 1 / np.sqrt(fan_in)
        for leaf in params[name].values():
            assert np.abs(leaf).max() <= bound
        # U(-a, a) has standard deviation a / sqrt(3); 16k+ kernel entries pin it to ~1%.
        np.testing.assert_allclose(
            np.std(params[name]["kernel"]), bound / np.sqrt(3), rtol=0.03
        )
