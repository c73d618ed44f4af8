"""W-perp-NS: the filtered guess against the exact top-k subspace of J_b = W D.

Thresholds sit below values measured on this setup (quoted in each test), so
that a seed change does not flip them but a broken filter does. At 6x1024,
batch 128 (``python -m benchmarks.wperp``) the default (degree 6, adaptive
cutoff 1) puts 0.956 of the energy in the exact top-10 on random weights and
0.997 on trained ones (degree 4: 0.79 / 0.99; ``wt``: 0.055 / 0.23).
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_batch

import guessgrad as gg
from guessgrad import data as gdata
from guessgrad._src import core, estimators
from guessgrad._src import guesses as rules

RANK = 10
DEFAULT_DEGREE = (
    inspect.signature(estimators.wperp_ns).parameters["power_iters"].default
)


def _context(model, params, batch, labels=False):
    fns = gg.models.chain_fns(model)
    layer_params = core.split_params(fns, params)
    trace = core.forward(
        fns, layer_params, fns.preprocess(batch["image"]), batch["label"]
    )
    return rules.GuessContext(
        fns, layer_params, trace.sites, batch["label"] if labels else None
    )


def _draw(rule, ctx, sites, draws=16):
    """Guesses at ``sites`` for ``draws`` keys: a list of [draws, B, n]."""

    @jax.jit
    def run(keys):
        return jax.vmap(
            lambda k: [rule(ctx, i, jax.random.fold_in(k, i)) for i in sites]
        )(keys)

    return [
        np.asarray(y, np.float64)
        for y in run(jax.random.split(jax.random.key(0), draws))
    ]


def _top_right_singular(ctx, index, rank):
    jac = np.asarray(ctx.next_jacobian(index), np.float64)
    _, _, vh = np.linalg.svd(jac, full_matrices=False)
    return vh[:, :rank]  # [B, k, n]


def _share(rule, ctx, sites, rank=RANK):
    """Mean over draws, examples and sites of ``|P_k y|^2 / |y|^2``."""
    shares = []
    for index, y in zip(sites, _draw(rule, ctx, sites)):
        v = _top_right_singular(ctx, index, rank)
        inside = np.sum(np.einsum("bkn,dbn->dbk", v, y) ** 2, -1)
        shares.append(np.mean(inside / np.sum(y**2, -1)))
    return float(np.mean(shares))


@pytest.fixture(scope="module")
def random_128():
    """MLP 4x128 at initialisation, 16 Gaussian inputs of 64 features; hidden sites 0, 1
    (site 2's next map has 10 outputs: every guess is trivially inside its top 10)."""
    model = gg.models.MLP(depth=4, width=128, num_classes=10)
    batch = {
        "image": jax.random.normal(jax.random.key(0), (16, 64)),
        "label": jnp.zeros(16, jnp.int32),
    }
    params = model.init(jax.random.key(1), batch["image"])
    return _context(model, params, batch)


@pytest.fixture(scope="module")
def trained_128():
    """MLP 3x128 after 200 backprop steps (AdamW 1e-3, batch 64) on the packaged digits."""
    dataset = gdata.load()
    loader = gdata.Loader(
        dataset.train_images, dataset.train_labels, 64, jax.random.key(0), flatten=True
    )
    model = gg.models.MLP(depth=3, width=128, num_classes=10)
    params = model.init(jax.random.key(0), loader.batch(0)["image"])
    optimizer = optax.adamw(1e-3)
    step = gg.make_train_step(gg.build_estimator("backprop", model), optimizer)
    state = gg.init_train_state(params, optimizer, jax.random.key(1))
    for index in range(200):
        state, _ = step(state, loader.batch(index))
    batch = loader.batch(500)
    batch = {"image": batch["image"][:16], "label": batch["label"][:16]}
    return _context(model, state.params, batch)


def test_default_puts_its_energy_in_the_exact_top_k_on_random_weights(random_128):
    """Measured: default (degree 6, cutoff 1) 0.996; unfiltered W^T 0.34."""
    filtered = _share(rules.wperp_ns_hidden(RANK, DEFAULT_DEGREE), random_128, [0, 1])
    unfiltered = _share(rules.wt_hidden, random_128, [0, 1])
    assert filtered > 0.95
    assert unfiltered < 0.45


def test_default_puts_its_energy_in_the_exact_top_k_on_trained_weights(trained_128):
    """Measured: default 0.997, degree 1 0.92, unfiltered W^T 0.41."""
    assert _share(rules.wperp_ns_hidden(RANK, DEFAULT_DEGREE), trained_128, [0]) > 0.97
    assert _share(rules.wperp_ns_hidden(RANK, 1), trained_128, [0]) > 0.85
    assert _share(rules.wt_hidden, trained_128, [0]) < 0.5


@pytest.mark.slow
def test_more_iterations_put_more_energy_in_the_top_k(random_128):
    """Measured: degree 1, 2, 4: 0.78, 0.905, 0.984; the power filter at degree 2: 0.82."""
    shares = [
        _share(rules.wperp_ns_hidden(RANK, degree), random_128, [0, 1])
        for degree in (1, 2, 4)
    ]
    assert shares[0] + 0.1 < shares[1] < shares[2]
    power = _share(rules.wperp_ns_hidden(RANK, 2, cutoff=0.0), random_128, [0, 1])
    assert power + 0.05 < shares[1]  # Chebyshev beats plain powers at equal cost


@pytest.mark.slow
def test_block_variant_improves_with_iterations(random_128):
    """Measured: 10 vectors, 2 iterations 0.70, 4 iterations 0.82."""
    two = _share(rules.wperp_ns_hidden(RANK, 2, 5, variant="block"), random_128, [0, 1])
    four = _share(
        rules.wperp_ns_hidden(RANK, 4, 5, variant="block"), random_128, [0, 1]
    )
    assert two > 0.6
    assert four > two + 0.06


@pytest.mark.slow
def test_guesses_vanish_on_dead_units_and_read_no_label(small_mlp):
    model, params, batch = small_mlp
    ctx = _context(model, params, batch)  # labels=None: reading them would fail
    assert ctx.labels is None
    for variant in rules.WPERP_NS_VARIANTS:
        rule = rules.wperp_ns_hidden(3, 2, variant=variant)
        for index in range(ctx.num_sites - 1):
            y = np.asarray(rule(ctx, index, jax.random.key(index)))
            dead = np.asarray(ctx.sites[index]) <= 0
            assert dead.any()
            assert np.all(y[dead] == 0)
            assert np.all(np.isfinite(y)) and np.any(y != 0)


def test_a_wholly_dead_example_gets_a_zero_guess(small_mlp):
    model, params, batch = small_mlp
    ctx = _context(model, params, batch)
    sites = list(ctx.sites)
    sites[0] = sites[0].at[0].set(-1.0)  # example 0: every unit of site 0 dead
    ctx = ctx._replace(sites=tuple(sites))
    for cutoff in (0.0, 1.0):
        y = np.asarray(
            rules.wperp_ns_hidden(3, 4, cutoff=cutoff)(ctx, 0, jax.random.key(0))
        )
        assert np.all(np.isfinite(y))
        assert np.all(y[0] == 0) and np.any(y[1:] != 0)


@pytest.mark.slow
def test_works_on_a_non_dense_chain(normed_chain):
    """Dense + layer norm inside the next site map, tanh between: the guess lies in
    J_b's row space (LayerNorm's null directions excluded) and favours its top."""
    model, params, batch = normed_chain
    ctx = _context(model, params, batch)
    rank = 2
    for index in range(ctx.num_sites - 1):
        jac = np.asarray(ctx.next_jacobian(index), np.float64)
        _, s, vh = np.linalg.svd(jac, full_matrices=False)
        live = s > s[:, :1] * 1e-6
        for rule in (
            rules.wperp_ns_hidden(rank, 4),
            rules.wperp_ns_hidden(rank, 2, variant="block"),
        ):
            (y,) = _draw(rule, ctx, [index], draws=8)
            coef = np.einsum("bkn,dbn->dbk", vh * live[..., None], y)
            np.testing.assert_allclose(np.sum(coef**2, -1), np.sum(y**2, -1), rtol=1e-4)
    filtered = _share(rules.wperp_ns_hidden(rank, 4), ctx, [0, 1], rank)
    unfiltered = _share(rules.wt_hidden, ctx, [0, 1], rank)
    assert filtered > unfiltered + 0.1


def _reference_filter(lam, start, degree, cutoff):
    """The filter of ``chebyshev_filter``'s docstring on ``A = diag(lam)``, in float64."""
    norm = np.linalg.norm
    if cutoff == 0:
        return lam**degree * start
    previous, image = start, lam * start
    rho = norm(image) / norm(start)
    current = 2 * image / (cutoff * rho) - start
    for _ in range(degree - 1):
        image = lam * current
        rho = max(rho, norm(image) / norm(current))
        following = 2 * (2 * image / (cutoff * rho) - current) - previous
        previous, current = current / norm(following), following / norm(following)
    return current


@pytest.mark.parametrize("cutoff", [0.0, 0.5, 1.0])
def test_chebyshev_filter_is_the_stated_polynomial(cutoff):
    """On a diagonal operator the output is ``p(lambda) * start`` for the stated
    recurrence, a polynomial of the stated degree in lambda."""
    lam = np.asarray([3.0, 2.9, 2.5, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3, 0.1, 0.05, 0.0])
    start = np.asarray([1.0, -2.0, 0.5, 1.5, 1.0, 2.0, -1.0, 0.3, 1.0, -0.5, 2.0, 1.0])
    degree = 4
    out = rules.chebyshev_filter(
        lambda v: jnp.asarray(lam, jnp.float32) * v,
        jnp.asarray(start[None], jnp.float32),
        degree,
        cutoff,
    )
    out = np.asarray(out[0], np.float64)
    expected = _reference_filter(lam, start, degree, cutoff)
    cosine = out @ expected / (np.linalg.norm(out) * np.linalg.norm(expected))
    assert cosine > 1 - 1e-5
    # p = out / start at the 12 eigenvalues is fitted exactly by degree 4, not 3.
    residual = [
        np.polynomial.polynomial.polyfit(lam, expected / start, d, full=True)[1]
        for d in (degree - 1, degree)
    ]
    scale = np.sum((expected / start) ** 2)
    assert residual[1][0] < 1e-12 * scale < residual[0][0]


def test_the_band_edge_stays_below_the_top_so_the_top_always_grows():
    """With cutoff 1 the adaptive edge is a lower bound on ||A||: whatever the start,
    the top eigenvalue's share of the output exceeds its share of the input, even
    when the start is already concentrated there (a fixed edge above ||A|| would
    leave every eigenvalue in the bounded band)."""
    lam = np.linspace(0.0, 1.0, 50)
    for weight_on_top in (1e-3, 0.5, 0.99):
        start = np.full(50, np.sqrt((1 - weight_on_top) / 49))
        start[-1] = np.sqrt(weight_on_top)
        out = np.asarray(
            rules.chebyshev_filter(
                lambda v: jnp.asarray(lam, jnp.float32) * v,
                jnp.asarray(start[None], jnp.float32),
                6,
                1.0,
            )[0],
            np.float64,
        )
        assert out[-1] ** 2 / np.sum(out**2) > weight_on_top


def test_options_are_checked():
    with pytest.raises(ValueError, match="variant"):
        rules.wperp_ns_hidden(RANK, 2, variant="lanczos")
    for cutoff in (-1.0, 1.5):
        with pytest.raises(ValueError, match="cutoff"):
            rules.wperp_ns_hidden(RANK, 2, cutoff=cutoff)


@pytest.mark.slow
def test_estimator_with_the_rule_trains_under_jit():
    model = gg.models.MLP(depth=3, width=16, num_classes=5)
    batch = make_batch(jax.random.key(4), batch_size=8, shape=(6,))
    params = model.init(jax.random.key(5), batch["image"])
    for mode in gg.MODES:
        estimator = estimators.activation_space(
            model,
            rules.rule_from(rules.wperp_ns_hidden(RANK, DEFAULT_DEGREE)),
            mode=mode,
        )
        grads, _ = jax.jit(estimator)(params, batch, jax.random.key(6))
        flat = jax.flatten_util.ravel_pytree(grads)[0]
        assert np.all(np.isfinite(flat)) and np.any(flat != 0)
