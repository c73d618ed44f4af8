"""The public contract: pure, jittable, vmappable, deterministic, with clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import ACTIVATION_SPACE, flat, make_batch

import guessgrad as gg
from guessgrad import experiment

OPTIONS = {"wperp": {"rank": 3}, "wperp_ns": {"rank": 3, "krylov_steps": 1}}


def estimator(name, model, **kwargs):
    return gg.get_estimator(name, model, **{**OPTIONS.get(name, {}), **kwargs})


@pytest.mark.slow
@pytest.mark.parametrize("name", list(gg.ESTIMATORS))
def test_contract_jit_vmap_determinism(name, small_mlp):
    model, params, batch = small_mlp
    traces = []

    def counted(params, batch, key):
        traces.append(1)
        return estimator(name, model)(params, batch, key)

    jitted = jax.jit(counted)
    key = jax.random.key(5)
    grads = jitted(params, batch, key)
    # exact tree structure, shapes and dtypes of params
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    jax.tree.map(
        lambda g, p: (g.shape, g.dtype) == (p.shape, p.dtype) or pytest.fail(name),
        grads,
        params,
    )
    # a second call with new values does not recompile
    jitted(jax.tree.map(lambda p: p * 1.01, params), batch, jax.random.key(6))
    assert len(traces) == 1
    # jit and non-jit agree; same key, same answer
    eager = estimator(name, model)(params, batch, key)
    np.testing.assert_allclose(flat(eager), flat(grads), rtol=2e-4, atol=1e-6)
    np.testing.assert_array_equal(flat(jitted(params, batch, key)), flat(grads))
    # vmap over keys equals a loop
    keys = jax.random.split(jax.random.key(8), 3)
    batched = jax.jit(jax.vmap(estimator(name, model), in_axes=(None, None, 0)))(
        params, batch, keys
    )
    for i, k in enumerate(keys):
        np.testing.assert_allclose(
            flat(jax.tree.map(lambda g, i=i: g[i], batched)),
            flat(jitted(params, batch, k)),
            rtol=2e-4,
            atol=1e-6,
        )
    # different keys give different guesses (backprop excepted)
    if name != "backprop":
        assert not np.allclose(
            flat(jitted(params, batch, keys[0])), flat(jitted(params, batch, keys[1]))
        )


def _separable_problem():
    """64 points in 6-d, 4 classes given by a fixed random linear map: learnable by an MLP."""
    x = jax.random.normal(jax.random.key(0), (64, 6))
    labels = jnp.argmax(x @ jax.random.normal(jax.random.key(1), (6, 4)), -1)
    return {"image": x, "label": labels.astype(jnp.int32)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(gg.ESTIMATORS))
def test_training_lowers_the_loss(name):
    batch = _separable_problem()
    model = gg.models.MLP(depth=3, width=16, num_classes=4)
    params = model.init(jax.random.key(2), batch["image"])
    optimizer = experiment.make_optimizer("adamw", 1e-2)
    step = gg.make_train_step(
        gg.get_estimator(name, model, **OPTIONS.get(name, {}), has_aux=True), optimizer
    )
    state = gg.init_train_state(params, optimizer, jax.random.key(3))
    _, first = step(state, batch)

    def body(state, _):
        return step(state, batch)

    state, metrics = jax.lax.scan(body, state, None, length=300)
    # the loss is the forward pass's own; it must fall by at least a quarter
    assert float(metrics["loss"][-20:].mean()) < 0.75 * float(first["loss"]), name


def test_unknown_names_and_options_list_the_valid_choices(small_mlp):
    model, _, _ = small_mlp
    with pytest.raises(ValueError, match="valid names: backprop, directional"):
        gg.get_estimator("wtt", model)
    with pytest.raises(
        ValueError, match=r"valid options: .*num_guesses=1.*normalize=True.*mode="
    ):
        gg.get_estimator("wt", model, rank=3)
    with pytest.raises(
        ValueError, match=r"mode must be one of \('joint', 'per_layer'\)"
    ):
        gg.get_estimator("wt", model, mode="both")
    with pytest.raises(ValueError, match="num_guesses must be a positive integer"):
        gg.get_estimator("mixing", model, num_guesses=0)
    with pytest.raises(
        ValueError, match="Unknown optimizer 'adam'; valid names: adamw, sgd"
    ):
        experiment.make_optimizer("adam", 1e-3)


@pytest.mark.parametrize(
    "batch,message",
    [
        ({"image": jnp.zeros((4, 6))}, 'must be a dict with "image"'),
        (
            {"image": jnp.zeros((4, 6), jnp.uint8), "label": jnp.zeros(4, jnp.int32)},
            "floating array",
        ),
        (
            {"image": jnp.zeros((4, 6)), "label": jnp.zeros((4, 1), jnp.int32)},
            r"shape \[B\]",
        ),
        (
            {"image": jnp.zeros((4, 6)), "label": jnp.zeros(3, jnp.int32)},
            "4 examples but",
        ),
        (
            {"image": jnp.zeros((4, 7)), "label": jnp.zeros(4, jnp.int32)},
            r"does not accept batch\[\"image\"\] of shape \(4, 7\)",
        ),
    ],
)
def test_bad_batches_say_what_was_expected(small_mlp, batch, message):
    model, params, _ = small_mlp
    for name in ("wt", "backprop"):
        with pytest.raises(ValueError, match=message):
            gg.get_estimator(name, model)(params, batch, jax.random.key(0))


def test_models_without_sites_are_rejected_with_a_hint_but_backprop_runs():
    import flax.linen as nn

    with pytest.raises(TypeError, match="Flax linen or NNX module"):
        gg.get_estimator("wt", object())
    model = nn.Dense(3)
    batch = {"image": jnp.ones((2, 4)), "label": jnp.zeros(2, jnp.int32)}
    params = model.init(jax.random.key(0), batch["image"])
    with pytest.raises(
        ValueError, match=r"marks no sites.*guessgrad.site.*mark_outputs"
    ):
        gg.get_estimator("wt", model)(params, batch, jax.random.key(0))
    # Backprop and directional need no sites: they work on any model.
    grads = gg.get_estimator("backprop", model)(params, batch, None)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    # Except directional with exact heads: without sites every parameter is a head.
    with pytest.raises(ValueError, match="marks no sites"):
        gg.get_estimator("directional", model, exact_heads=True)(
            params, batch, jax.random.key(0)
        )


def test_stable_adamw_is_adamw_until_the_update_rms_exceeds_one():
    lr, eps, wd = 1e-2, 1e-6, 1e-4
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    stable, reference = (
        gg.stable_adamw(lr, eps=eps, weight_decay=wd),
        optax.adamw(lr, 0.9, 0.99, eps, weight_decay=wd),
    )
    s_state, r_state = stable.init(params), reference.init(params)
    # steady gradients: g^2 / v_hat = 1 at step 1, so no clipping: identical to AdamW
    g = {"w": jnp.array([0.5, -1.0, 2.0])}
    s_up, s_state = stable.update(g, s_state, params)
    r_up, r_state = reference.update(g, r_state, params)
    np.testing.assert_allclose(s_up["w"], r_up["w"], rtol=1e-5)
    # a sudden 100x gradient: v_hat lags, RMS = sqrt(mean(g^2 / v_hat)) > 1 and divides the step
    spike = {"w": 100 * g["w"]}
    s_up, _ = stable.update(spike, s_state, params)
    r_up, _ = reference.update(spike, r_state, params)
    b2, count = 0.99, 2
    v_hat = ((1 - b2) * (b2 * g["w"] ** 2 + spike["w"] ** 2)) / (1 - b2**count)
    rms = jnp.sqrt(jnp.mean(spike["w"] ** 2 / v_hat))
    assert rms > 1
    np.testing.assert_allclose(s_up["w"], r_up["w"] / rms, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ACTIVATION_SPACE)
def test_lean_mode_gives_the_joint_estimate(name):
    """Recomputing the forward pass and regenerating the guesses from the same keys
    reproduces joint mode's estimate, with one guess and with several."""
    model = gg.models.MLP(depth=4, width=16, num_classes=5)
    batch = make_batch(jax.random.key(0), batch_size=8, shape=(12,))
    params = model.init(jax.random.key(1), batch["image"])
    for num_guesses in (1, 3):
        options = {**OPTIONS.get(name, {}), "mode": "joint", "num_guesses": num_guesses}
        joint = jax.jit(gg.get_estimator(name, model, **options))(
            params, batch, jax.random.key(3)
        )
        lean = jax.jit(gg.get_estimator(name, model, lean=True, **options))(
            params, batch, jax.random.key(3)
        )
        np.testing.assert_allclose(flat(lean), flat(joint), rtol=1e-5, atol=1e-6)


def test_lean_mode_needs_joint_mode(small_mlp):
    model, _, _ = small_mlp
    with pytest.raises(ValueError, match="lean=True needs mode='joint'"):
        gg.get_estimator("wt", model, lean=True, mode="per_layer")


def test_train_step_compiles_once_on_device_placed_batches(small_mlp):
    """The state from init_train_state and the step's output state hit the same cache entry."""
    model, params, batch = small_mlp
    batch = jax.device_put(batch, jax.devices()[0])  # committed, as data.Loader gives
    optimizer = experiment.make_optimizer("adamw", 1e-3)
    step = gg.make_train_step(gg.get_estimator("wt", model, has_aux=True), optimizer)
    state = gg.init_train_state(params, optimizer, jax.random.key(0))
    for _ in range(3):
        state, _ = step(state, batch)
    assert step._cache_size() == 1
    assert int(state.step) == 3


def _estimator_temp_bytes(name, depth, **options):
    model = gg.models.MLP(depth=depth, width=256, num_classes=10)
    batch = make_batch(jax.random.key(0), batch_size=256, shape=(64,))
    params = model.init(jax.random.key(1), batch["image"])
    estimator = jax.jit(gg.get_estimator(name, model, **options))
    compiled = estimator.lower(params, batch, jax.random.key(2)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
@pytest.mark.parametrize("name", ["wt", "mixing"])
def test_lean_mode_memory_does_not_grow_with_depth(name):
    """XLA's compiled temporaries (parameters and updates excluded): from 4 to 12 layers
    of 256 units at batch 256, backprop's grow by more than one activation per layer
    (measured 1.32 -> 4.99 MB) and the lean estimator's stay put (wt: 1.31 -> 1.05 MB;
    joint mode without lean: 1.32 -> 3.44 MB). An activation is 256 KB: the slack
    is two activations, where eight more layers would add at least eight. (Without
    pass 1's layer-by-layer dependence, XLA:CPU ran the primal chain first: 1.59 ->
    3.70 MB.)"""
    activation = 256 * 256 * 4
    lean = [_estimator_temp_bytes(name, d, mode="joint", lean=True) for d in (4, 12)]
    backprop = [_estimator_temp_bytes("backprop", d) for d in (4, 12)]
    assert backprop[1] - backprop[0] > 6 * activation
    assert lean[1] - lean[0] <= 2 * activation


def test_a_train_step_says_when_an_estimator_returns_metrics_undeclared(small_mlp):
    model, params, batch = small_mlp
    optimizer = optax.sgd(0.1)
    state = gg.init_train_state(params, optimizer, jax.random.key(0))
    with_metrics = gg.estimators.wt(model, has_aux=True)

    def undeclared(params, batch, key):  # a wrapper that loses the attribute
        return with_metrics(params, batch, key)

    with pytest.raises(ValueError, match="needs has_aux=True"):
        gg.make_train_step(undeclared, optimizer)(state, batch)
    state, metrics = gg.make_train_step(undeclared, optimizer, has_aux=True)(
        state, batch
    )
    assert set(metrics) == {"loss", "accuracy", "finite"}
    state, metrics = gg.make_train_step(gg.estimators.wt(model), optimizer)(
        state, batch
    )
    assert set(metrics) == {"finite"} and int(state.step) == 2


@pytest.mark.parametrize("name", list(gg.ESTIMATORS))
def test_every_estimator_documents_every_argument(name):
    """The typed functions: every keyword option has a type annotation and a line under
    Args; the guess's references are linked (all but the oracle, backprop)."""
    import inspect

    fn = gg.ESTIMATORS[name]
    assert getattr(gg.estimators, name) is fn
    doc = inspect.getdoc(fn)
    args = doc.split("Args:")[1].split("Returns:")[0]
    for p in inspect.signature(fn).parameters.values():
        assert f"\n  {p.name}:" in "\n" + args, (name, p.name)
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "trainable":
            assert p.annotation is not inspect.Parameter.empty, (name, p.name)
    if name != "backprop":
        assert "https://arxiv.org/abs/" in doc.split("References:")[1]


def test_readme_quickstart_and_guess_rule_examples_run(capsys):
    """The README's Quickstart block, and the guess-rule guide's blocks up to its rule,
    run as written (a few steps instead of hundreds)."""
    import os
    import re

    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "README.md")) as f:
        section = f.read().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    quickstart = re.findall(r"```python\n(.*?)```", section, re.DOTALL)[0]
    exec(re.sub(r"range\(\d+\)", "range(3)", quickstart), {})  # noqa: S102
    assert "batch accuracy" in capsys.readouterr().out

    with open(os.path.join(root, "docs", "guides", "guess_rules.md")) as f:
        guide = f.read().split("\n## Studying a guess", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", guide, re.DOTALL)
    assert any("def sign_wt" in block for block in blocks)
    namespace = {}
    for block in blocks:
        exec(block, namespace)  # noqa: S102
    grads, params = namespace["grads"], namespace["params"]
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert np.any(flat(grads) != 0) and np.all(np.isfinite(flat(grads)))
