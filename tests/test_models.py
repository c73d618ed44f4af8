"""The library's models (MLP, Chain) and what the engine computes on them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import local_updates

import guessgrad as gg


def reference_site_grads(model, params, batch):
    """dl_b/ds_l per example, by reverse mode through a chain written out by hand."""
    modules = model.layer_modules()

    def losses(perturbations):
        x = model.preprocess(batch["image"])
        for module, perturbation in zip(modules, perturbations):
            layer = {"params": params["params"][module.name]}
            site = module.apply(layer, x) + perturbation
            x = model.activation(site)
        return optax.softmax_cross_entropy_with_integer_labels(site, batch["label"])

    values = gg.site_values(model, params, batch)
    zeros = [jnp.zeros_like(values[m.name]) for m in modules]
    # Examples are independent, so the gradient of the summed loss at site l,
    # row b, is dl_b/ds_{l,b}.
    return jax.grad(lambda p: jnp.sum(losses(p)))(zeros)


@pytest.mark.parametrize("fixture", ["small_mlp", "normed_chain"])
def test_site_gradients_and_derivatives_match_a_chain_written_by_hand(fixture, request):
    model, params, batch = request.getfixturevalue(fixture)
    expected = reference_site_grads(model, params, batch)
    got = gg.site_gradients(model, params, batch)
    assert list(got) == [m.name for m in model.layer_modules()]
    for g, e in zip(got.values(), expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)

    keys = jax.random.split(jax.random.key(7), len(expected))
    tangents = [jax.random.normal(k, g.shape) for k, g in zip(keys, expected)]
    per_site = np.stack(
        [
            np.sum(np.asarray(g * t).reshape(g.shape[0], -1), -1)
            for g, t in zip(expected, tangents)
        ]
    )  # [L, B]
    joint = gg.directional_derivatives(model, params, batch, tangents, mode="joint")
    per_layer = gg.directional_derivatives(
        model, params, batch, tangents, mode="per_layer"
    )
    np.testing.assert_allclose(per_layer, per_site, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(joint, per_site.sum(0), rtol=1e-5, atol=1e-6)


def test_dense_local_update_is_an_outer_product(small_mlp):
    """For a dense layer: dW = sum_b x_b g_b^T / B and db = sum_b g_b / B, x_b the
    layer's input (the previous site after its ReLU)."""
    model, params, batch = small_mlp
    values = gg.site_values(model, params, batch)
    keys = jax.random.split(jax.random.key(1), len(values))
    site_grads = {
        name: jax.random.normal(k, v.shape)
        for k, (name, v) in zip(keys, values.items())
    }
    grads = local_updates(model, params, batch, site_grads)["params"]
    x = jax.nn.relu(values["dense_0"])
    g = site_grads["dense_1"]
    np.testing.assert_allclose(grads["dense_1"]["kernel"], x.T @ g / 4, rtol=1e-5)
    np.testing.assert_allclose(grads["dense_1"]["bias"], g.mean(0), rtol=1e-5)
    x0 = batch["image"].reshape(4, -1)
    np.testing.assert_allclose(
        grads["dense_0"]["kernel"], x0.T @ site_grads["dense_0"] / 4, rtol=1e-5
    )


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
