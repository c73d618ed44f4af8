"""Claims about the measurements: known answers for cosines, effectiveness, bias, ranks, subspaces."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_batch

import guessgrad as gg
from guessgrad import metrics

MAX_Z = 5.0  # largest |z| allowed for Monte-Carlo checks (fixed seeds: deterministic)


@pytest.fixture(scope="module")
def mlp():
    """A 3-layer MLP of width 8 on 16 input features, 5 classes, batch of 8."""
    model = gg.models.MLP(depth=3, width=8, num_classes=5)
    batch = make_batch(jax.random.key(1), batch_size=8, shape=(2, 8))
    params = model.init(jax.random.key(0), batch["image"])
    backprop = gg.get_estimator("backprop", model)

    def true_grad_fn(p, b):
        return backprop(p, b, None)

    def loss_fn(p, b):
        return jnp.mean(gg.per_example_loss(model.apply(p, b["image"]), b["label"]))

    return model, params, batch, true_grad_fn, loss_fn


def one_example(batch, index=0):
    return jax.tree.map(lambda x: x[index : index + 1], batch)


# --- cosine -------------------------------------------------------------------------


def test_cosine_known_angles():
    v = {"x": jnp.array([1.0, 2.0]), "y": jnp.array([[2.0]])}
    assert float(metrics.cosine(v, v)) == pytest.approx(1.0, abs=1e-7)
    assert float(metrics.cosine(v, jax.tree.map(lambda x: -x, v))) == pytest.approx(
        -1.0, abs=1e-7
    )
    assert float(metrics.cosine(v, jax.tree.map(lambda x: 3 * x, v))) == pytest.approx(
        1.0, abs=1e-7
    )
    orthogonal = {"x": jnp.array([2.0, -1.0]), "y": jnp.array([[0.0]])}
    assert float(metrics.cosine(v, orthogonal)) == 0.0
    # One vector over all leaves, not a mean of per-leaf cosines: <v, w> = 2 + 0 + 2,
    # |v| = 3, |w| = sqrt(5).
    w = {"x": jnp.array([2.0, 0.0]), "y": jnp.array([[1.0]])}
    assert float(metrics.cosine(v, w)) == pytest.approx(4 / (3 * math.sqrt(5)))
    assert float(jax.jit(metrics.cosine)(v, w)) == pytest.approx(4 / (3 * math.sqrt(5)))


def test_cosine_with_zero_is_zero_without_nan():
    v = {"x": jnp.array([1.0, 2.0]), "y": jnp.array([3.0])}
    zero = jax.tree.map(jnp.zeros_like, v)
    assert float(metrics.cosine(v, zero)) == 0.0
    assert float(metrics.cosine(zero, zero)) == 0.0
    grads = jax.grad(lambda a: metrics.cosine(a, v))(zero)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_cosine_rejects_different_trees():
    with pytest.raises(ValueError, match="same structure"):
        metrics.cosine({"x": jnp.ones(2)}, {"y": jnp.ones(2)})
    with pytest.raises(ValueError, match="same shapes"):
        metrics.cosine({"x": jnp.ones(2)}, {"x": jnp.ones(3)})


def test_layer_and_module_cosines(mlp):
    _, params, *_ = mlp
    names = ["params/dense_0", "params/dense_1", "params/dense_2"]
    ones = metrics.layer_cosines(params, params)
    assert list(ones) == [f"{n}/{leaf}" for n in names for leaf in ("bias", "kernel")]
    np.testing.assert_allclose(list(ones.values()), 1.0, atol=1e-6)

    flipped = jax.tree.map(lambda x: x, params)
    flipped["params"]["dense_1"]["kernel"] = -params["params"]["dense_1"]["kernel"]
    by_leaf = metrics.layer_cosines(flipped, params)
    for name, value in by_leaf.items():
        expected = -1.0 if name == "params/dense_1/kernel" else 1.0
        assert float(value) == pytest.approx(expected, abs=1e-6), name

    # Kernel and bias together: (|b|^2 - |K|^2) / (|b|^2 + |K|^2) for the flipped module.
    by_module = metrics.module_cosines(flipped, params)
    assert list(by_module) == names
    kernel, bias = (params["params"]["dense_1"][k] for k in ("kernel", "bias"))
    k2, b2 = float(jnp.sum(kernel**2)), float(jnp.sum(bias**2))
    assert float(by_module["params/dense_1"]) == pytest.approx(
        (b2 - k2) / (b2 + k2), rel=1e-5
    )
    assert float(by_module["params/dense_0"]) == pytest.approx(1.0, abs=1e-6)


# --- cosines of estimates -------------------------------------------------------------


def test_estimate_cosines_known_answers(mlp):
    model, params, batch, true_grad_fn, _ = mlp
    key = jax.random.key(3)

    def measure(name, num_keys, **options):
        estimator = gg.get_estimator(name, model, **options)
        fn = functools.partial(metrics.estimate_cosines, estimator, true_grad_fn)
        return jax.jit(fn, static_argnames="num_keys")(
            params, batch, key, num_keys=num_keys
        )

    exact = measure("backprop", 2)
    for value in jax.tree.leaves(exact):
        assert float(value) == pytest.approx(1.0, abs=1e-6)
    # oracle_angle's estimate has exactly the requested cosine, whatever the key.
    assert float(measure("oracle_angle", 4, cosine=0.3)["cosine"]) == pytest.approx(
        0.3, abs=1e-5
    )


def test_estimate_cosines_average_over_independent_keys(mlp):
    model, params, batch, true_grad_fn, _ = mlp
    estimator = gg.get_estimator("activation_perturbation", model)
    key = jax.random.key(4)
    averaged = jax.jit(
        functools.partial(metrics.estimate_cosines, estimator, true_grad_fn),
        static_argnames="num_keys",
    )(params, batch, key, num_keys=3)

    @jax.jit
    def one_key(k):
        return metrics.layer_cosines(
            estimator(params, batch, k), true_grad_fn(params, batch)
        )

    loop = [one_key(k) for k in jax.random.split(key, 3)]
    assert len(averaged["leaf_cosines"]) == 6
    for name, value in averaged["leaf_cosines"].items():
        expected = np.mean([float(c[name]) for c in loop])
        assert float(value) == pytest.approx(expected, abs=1e-5), name
    with pytest.raises(ValueError, match="num_keys"):
        metrics.estimate_cosines(estimator, true_grad_fn, params, batch, key, 0)


def test_per_example_cosines_use_each_example_alone(mlp):
    model, params, batch, true_grad_fn, _ = mlp
    key = jax.random.key(5)
    estimator = jax.jit(gg.get_estimator("activation_perturbation", model))
    true_grad_fn = jax.jit(true_grad_fn)
    cosines = jax.jit(
        functools.partial(metrics.per_example_cosines, estimator, true_grad_fn)
    )(params, batch, key)
    keys = jax.random.split(key, 8)
    loop = [
        jax.jit(metrics.cosine)(
            estimator(params, one_example(batch, b), keys[b]),
            true_grad_fn(params, one_example(batch, b)),
        )
        for b in range(8)
    ]
    np.testing.assert_allclose(cosines, loop, atol=1e-5)

    ragged = {"image": batch["image"], "label": batch["label"][:3]}
    with pytest.raises(ValueError, match="leading"):
        metrics.per_example_cosines(estimator, true_grad_fn, params, ragged, key)


# --- one-step effectiveness -------------------------------------------------------------


def quadratic_loss(params, batch):
    """0.5 |theta|^2: gradient theta, best step along it exactly 1, decrease L itself."""
    del batch
    return 0.5 * jnp.sum(params**2)


THETA = jnp.array([1.0, -2.0, 0.5])


def scaled_gradient(scale):
    return lambda params, batch, key: scale * params


def test_one_step_effectiveness_on_a_quadratic():
    def run(estimator, **kwargs):
        return metrics.one_step_effectiveness(
            estimator, quadratic_loss, THETA, {}, jax.random.key(0), **kwargs
        )

    # Scale-free: any positive multiple of the gradient is as good as the gradient.
    for scale in (0.01, 1.0, 50.0):
        result = run(scaled_gradient(scale), scale="gradient_norm")
        assert float(result["ratio"]) == pytest.approx(1.0, rel=1e-6)
        assert float(result["backprop_eta"]) == pytest.approx(1.0)
        assert float(result["backprop_decrease"]) == pytest.approx(
            float(quadratic_loss(THETA, {})), rel=1e-6
        )
        assert not bool(result["backprop_at_edge"])
    # The opposite direction raises the loss at every step size.
    assert float(run(scaled_gradient(-1.0), scale="gradient_norm")["ratio"]) < 0

    # Paper's convention: the raw estimate 2g at eta = 0.1 takes the step 0.2 g,
    # backprop's best on the grid is 0.1 g (at the grid's edge):
    # decreases L (1 - 0.8^2) and L (1 - 0.9^2).
    result = run(scaled_gradient(2.0))
    assert float(result["ratio"]) == pytest.approx(
        (1 - 0.8**2) / (1 - 0.9**2), rel=1e-5
    )
    assert float(result["eta"]) == pytest.approx(0.1)
    assert bool(result["backprop_at_edge"])
    np.testing.assert_allclose(result["etas"], [1e-5, 1e-4, 1e-3, 1e-2, 1e-1])


def test_one_step_effectiveness_of_backprop_is_exactly_one(mlp):
    model, params, batch, true_grad_fn, loss_fn = mlp
    backprop = gg.get_estimator("backprop", model)
    for scale in metrics.SCALES:
        result = jax.jit(
            functools.partial(
                metrics.one_step_effectiveness,
                backprop,
                loss_fn,
                scale=scale,
                true_grad_fn=true_grad_fn,
            )
        )(params, batch, jax.random.key(0))
        assert float(result["ratio"]) == 1.0, scale
        assert float(result["eta"]) == float(result["backprop_eta"])
        assert float(result["backprop_decrease"]) > 0
    # The scale-free grid holds backprop's best step inside on this network.
    assert not bool(result["backprop_at_edge"])


def test_one_step_effectiveness_rejects_bad_options():
    args = (scaled_gradient(1.0), quadratic_loss, THETA, {}, jax.random.key(0))
    with pytest.raises(ValueError, match="scale must be one of"):
        metrics.one_step_effectiveness(*args, scale="raw")
    with pytest.raises(ValueError, match="etas"):
        metrics.one_step_effectiveness(*args, etas=[])


# --- bias ---------------------------------------------------------------------------


DIM = 40_000  # synthetic gradient's dimension: noise norms concentrate


def noisy_estimator(gradient, noise, offset=0.0):
    """g + offset + noise * eps, eps ~ N(0, I): biased by ``offset``."""

    def estimate(params, batch, key):
        return gradient + offset + noise * jax.random.normal(key, gradient.shape)

    return estimate


def expected_bias_curve(gradient, mean, noise, ks):
    """cos(mean + noise * eps_bar_K, g) with |eps_bar_K|^2 at its expectation DIM / K."""
    g, m = np.asarray(gradient, np.float64), np.asarray(mean, np.float64)
    ks = np.asarray(ks, np.float64)
    return (g @ m) / (np.linalg.norm(g) * np.sqrt(m @ m + noise**2 * g.size / ks))


@pytest.mark.slow
@pytest.mark.parametrize("biased", [False, True])
def test_bias_curve_matches_closed_form(biased):
    key_g, key_b, key = jax.random.split(jax.random.key(6), 3)
    gradient = jax.random.normal(key_g, (DIM,))
    offset = 1.5 * jax.random.normal(key_b, (DIM,)) if biased else 0.0
    # Noise 10 |g| / sqrt(DIM) in each coordinate: one guess has cosine about 0.1.
    noise = 10.0 * float(jnp.linalg.norm(gradient)) / math.sqrt(DIM)
    ks = (1, 10, 100, 1000)
    curve = metrics.bias_curve(
        noisy_estimator(gradient, noise, offset),
        lambda params, batch: gradient,
        gradient,
        {"x": jnp.zeros((1, 1))},
        key,
        ks,
        chunk_size=64,  # does not divide 1000: the last chunk's extra guesses are unused
    )
    expected = expected_bias_curve(gradient, gradient + offset, noise, ks)
    # <g, eps_bar_K> / |g|^2 has standard deviation noise / (|g| sqrt(K)) = 10 / sqrt(DIM K).
    tolerance = MAX_Z * 10.0 / np.sqrt(DIM * np.asarray(ks))
    np.testing.assert_array_less(np.abs(curve / expected - 1), tolerance)
    limit = float(metrics.cosine(gradient + offset, gradient))
    if biased:  # saturates at cos(E[g_hat], g), far below 1
        assert limit < 0.6
        assert float(curve[-1]) < limit + 0.01
    else:
        assert limit == pytest.approx(1.0, abs=1e-6)
        assert float(curve[-1]) > 0.9


def test_bias_curve_of_backprop_is_one(mlp):
    model, params, batch, true_grad_fn, _ = mlp
    backprop = gg.get_estimator("backprop", model)
    curve = metrics.bias_curve(
        backprop,
        true_grad_fn,
        params,
        one_example(batch),
        jax.random.key(7),
        (1, 5, 30),
    )
    np.testing.assert_allclose(curve, 1.0, atol=1e-6)


@pytest.mark.slow
def test_bias_curve_of_activation_perturbation_rises_towards_one(mlp):
    model, params, batch, true_grad_fn, _ = mlp
    estimator = gg.get_estimator("activation_perturbation", model)
    curve = jax.jit(
        functools.partial(metrics.bias_curve, estimator, true_grad_fn),
        static_argnames="ks",
    )(params, one_example(batch), jax.random.key(8), ks=(1, 10, 100, 1000))
    assert np.all(np.diff(curve) > 0), curve
    assert float(curve[-1]) > 0.98, curve


def test_bias_curve_rejects_bad_input(mlp):
    model, params, batch, true_grad_fn, _ = mlp
    backprop = gg.get_estimator("backprop", model)
    args = (backprop, true_grad_fn, params)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="batch of one"):
        metrics.bias_curve(*args, batch, key, (1, 2))
    with pytest.raises(ValueError, match="must not be empty"):
        metrics.bias_curve(*args, one_example(batch), key, ())
    with pytest.raises(ValueError, match="at least 1"):
        metrics.bias_curve(*args, one_example(batch), key, (0, 10))


def test_analytic_bias():
    grad = jnp.array([3.0, 4.0])
    bias, relative = metrics.analytic_bias(jnp.eye(2), grad)
    np.testing.assert_array_equal(bias, [0.0, 0.0])
    assert float(relative) == 0.0
    _, relative = metrics.analytic_bias(2.5 * jnp.eye(2), grad)
    assert float(relative) == pytest.approx(1.5)
    bias, relative = metrics.analytic_bias(jnp.diag(jnp.array([1.0, 0.0])), grad)
    np.testing.assert_allclose(bias, [0.0, -4.0])
    assert float(relative) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="square"):
        metrics.analytic_bias(jnp.ones((2, 3)), grad)


def test_analytic_bias_is_the_monte_carlo_bias_of_y_y_transpose_g():
    n, num_samples = 4, 20_000
    key_a, key_g, key_y = jax.random.split(jax.random.key(9), 3)
    root = jax.random.normal(key_a, (n, n)) / 2
    cov, grad = root @ root.T, jax.random.normal(key_g, (n,))
    y = jax.random.normal(key_y, (num_samples, n)) @ root.T  # Cov(y) = cov
    samples = np.asarray(y * (y @ grad)[:, None] - grad, np.float64)  # y y^T g - g
    bias, _ = metrics.analytic_bias(cov, grad)
    stderr = samples.std(0) / np.sqrt(num_samples)
    z = np.abs(samples.mean(0) - np.asarray(bias)) / stderr
    assert z.max() < MAX_Z, z


# --- weights ------------------------------------------------------------------------


def test_effective_rank_known_answers():
    for n in (1, 3, 7):
        assert float(metrics.effective_rank(jnp.eye(n))) == pytest.approx(n, rel=1e-5)
    u, v = jnp.arange(1.0, 6.0), jnp.array([1.0, -2.0, 0.5])
    assert float(metrics.effective_rank(jnp.outer(u, v))) == pytest.approx(
        1.0, abs=1e-4
    )
    # diag(2, 1): p = (2/3, 1/3).
    unequal = float(metrics.effective_rank(jnp.diag(jnp.array([2.0, 1.0]))))
    assert 1.0 < unequal < 2.0
    p = np.array([2 / 3, 1 / 3])
    assert unequal == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-5)
    # Invariant to scale and to rotations; 0 for the zero matrix.
    w = jax.random.normal(jax.random.key(10), (6, 4))
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(11), (6, 6)))
    for same in (3.0 * w, q @ w):
        assert float(metrics.effective_rank(same)) == pytest.approx(
            float(metrics.effective_rank(w)), rel=1e-5
        )
    assert float(metrics.effective_rank(jnp.zeros((3, 3)))) == 0.0
    with pytest.raises(ValueError, match="matrix"):
        metrics.effective_rank(jnp.ones(3))


def test_effective_ranks_of_the_kernels(mlp):
    _, params, *_ = mlp
    ranks = metrics.effective_ranks(params)
    assert list(ranks) == [f"params/dense_{i}/kernel" for i in range(3)]
    for name, value in ranks.items():
        kernel = params["params"][name.split("/")[1]]["kernel"]
        assert 1.0 < float(value) <= min(kernel.shape) + 1e-4, name


def test_power_singular_values():
    w = jax.random.normal(jax.random.key(12), (6, 4))
    np.testing.assert_allclose(metrics.power_singular_values(w, 1.0), w, atol=1e-5)
    # p = 0: the polar factor Q of W = Q H: orthonormal columns, Q^T W symmetric PSD.
    q = metrics.power_singular_values(w, 0.0)
    np.testing.assert_allclose(q.T @ q, jnp.eye(4), atol=1e-5)
    h = q.T @ w
    np.testing.assert_allclose(h, h.T, atol=1e-5)
    assert float(jnp.linalg.eigvalsh(h).min()) > 0
    # p = 2 on a symmetric PSD matrix squares it; the singular values become s^p.
    a = w.T @ w
    np.testing.assert_allclose(
        metrics.power_singular_values(a, 2.0), a @ a, rtol=1e-4, atol=1e-3
    )
    s = jnp.linalg.svd(w, compute_uv=False)
    np.testing.assert_allclose(
        jnp.linalg.svd(metrics.power_singular_values(w, 0.5), compute_uv=False),
        jnp.sqrt(s),
        rtol=1e-5,
    )


# --- gradient-activation subspaces --------------------------------------------------


def test_subspace_overlap_of_gradients_in_the_activations_span():
    key_x, key_a, key = jax.random.split(jax.random.key(13), 3)
    activations = jax.random.normal(key_x, (3, 10))  # [N, n], rank 3
    grad = jax.random.normal(key_a, (5, 3)) @ activations  # rows in their span
    overlap = metrics.subspace_overlap(grad, activations, [1, 3, 10], key)
    assert overlap["pca"].shape == overlap["random"].shape == (3,)
    assert float(overlap["pca"][0]) < 0.999
    np.testing.assert_allclose(overlap["pca"][1:], 1.0, atol=1e-5)
    assert float(overlap["random"][-1]) == pytest.approx(1.0, abs=1e-5)  # k = n
    scalar = metrics.subspace_overlap(grad, activations, 3, key)
    assert scalar["pca"].shape == ()
    assert float(scalar["pca"]) == pytest.approx(float(overlap["pca"][1]))
    jitted = jax.jit(metrics.subspace_overlap, static_argnames="k")
    np.testing.assert_allclose(
        jitted(grad, activations, k=(1, 3, 10), key=key)["random"],
        overlap["random"],
        atol=1e-6,
    )

    # Centred PCA: rows in the span of the centred activations (rank N - 1 = 2).
    centred = activations - activations.mean(0)
    grad = jax.random.normal(key_a, (5, 3)) @ centred
    overlap = metrics.subspace_overlap(grad, activations, 2, key, center=True)
    assert float(overlap["pca"]) == pytest.approx(1.0, abs=1e-5)


def test_subspace_overlap_of_a_dense_layers_gradient(mlp):
    """The first layer's kernel gradient, sum_b delta_b x_b^T, lies in the span of the inputs."""
    _, params, batch, true_grad_fn, _ = mlp
    inputs = batch["image"].reshape(8, -1)  # [8, 16]: rank 8 in 16 dimensions
    kernel_grad = true_grad_fn(params, batch)["params"]["dense_0"]["kernel"]
    overlap = metrics.subspace_overlap(
        kernel_grad.T, inputs, (4, 8), jax.random.key(14)
    )
    assert float(overlap["pca"][1]) == pytest.approx(1.0, abs=1e-5)
    assert float(overlap["random"][1]) < 0.99
    assert float(overlap["pca"][0]) > float(overlap["random"][0])


def test_random_subspace_captures_k_over_n_of_the_squared_norm():
    n, ks, num_keys = 20, (1, 5, 10), 2000
    grad = jax.random.normal(jax.random.key(15), (1, n))
    activations = jax.random.normal(jax.random.key(16), (30, n))
    keys = jax.random.split(jax.random.key(17), num_keys)
    squared = np.asarray(
        jax.vmap(
            lambda k: metrics.subspace_overlap(grad, activations, ks, k)["random"] ** 2
        )(keys)
    )  # [num_keys, len(ks)]
    z = np.abs(squared.mean(0) - np.asarray(ks) / n) / (
        squared.std(0) / np.sqrt(num_keys)
    )
    assert z.max() < MAX_Z, z


def test_subspace_overlap_rejects_bad_input():
    grad, activations, key = jnp.ones((2, 5)), jnp.ones((4, 5)), jax.random.key(0)
    with pytest.raises(ValueError, match="at most the dimension 5"):
        metrics.subspace_overlap(grad, activations, 6, key)
    with pytest.raises(ValueError, match="must not be empty"):
        metrics.subspace_overlap(grad, activations, [], key)
    with pytest.raises(ValueError, match="at least 1"):
        metrics.subspace_overlap(grad, activations, [0, 2], key)
    with pytest.raises(ValueError, match="transpose"):
        metrics.subspace_overlap(jnp.ones((5, 2)), activations, 2, key)
    with pytest.raises(ValueError, match=r"\[N, n\]"):
        metrics.subspace_overlap(grad, jnp.ones(5), 2, key)
