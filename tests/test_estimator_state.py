"""Estimators that carry state across steps, and W-perp's warm start built on it.

A stateful rule (``GuessRule(init=...)``) makes a stateful estimator,
``(params, batch, key, state) -> (grads, state)`` with ``init(params,
batch)``; ``make_train_step`` threads the state and the runner checkpoints
it. ``wperp_ns(variant="warm")`` keeps a shared basis ``S`` per site: its
guesses come from the Krylov space grown from ``A_b S`` (``A_b = J_b^T
J_b``), its next state is ``orth(sum_b A_b S)``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import TINY, flat

import guessgrad as gg
from guessgrad import experiment


@pytest.fixture(scope="module")
def mlp_16():
    """MLP 4x16 at initialisation, batch 16 (equal to the width), 5 classes."""
    model = gg.models.MLP(depth=4, width=16, num_classes=5)
    batch = {
        "image": jax.random.normal(jax.random.key(0), (16, 16)),
        "label": jnp.arange(16) % 5,
    }
    return model, model.init(jax.random.key(1), batch["image"]), batch


def _hidden(model, params, batch):
    found = gg.structure(model, params, batch)
    return {s.index: s.path for s in found.sites if s.target is not None}


def _projector(rows):
    """[B, k, n] orthonormal (or zero) rows -> [B, n, n] projector on their span."""
    rows = np.asarray(rows, np.float64)
    return np.einsum("bki,bkj->bij", rows, rows)


def _span_projector(block):
    """[p, n] rows -> the projector on their span (by SVD, float64)."""
    _, s, vh = np.linalg.svd(np.asarray(block, np.float64), full_matrices=False)
    live = vh[s > s[0] * 1e-6]
    return live.T @ live


# --- the state API, on a rule that counts its steps -------------------------------


def _counting_rule():
    """``wt``'s guess, with a per-site state counting the steps it has seen."""

    def guess(ctx, site, key, state):
        return gg.rules.wt(ctx, site, key), {"steps": state["steps"] + 1}

    def init(ctx, site, key):
        del ctx, site, key
        return {"steps": jnp.zeros([], jnp.int32)}

    return gg.rules.GuessRule(guess=guess, init=init)


@pytest.mark.parametrize("mode", gg.MODES)
def test_a_stateful_rule_estimates_as_its_stateless_twin_and_its_state_is_threaded(
    mlp_16, mode
):
    model, params, batch = mlp_16
    stateful = gg.estimators.from_rule(
        model, _counting_rule(), mode=mode, num_guesses=2, has_aux=True
    )
    stateless = gg.estimators.from_rule(
        model, gg.rules.wt, mode=mode, num_guesses=2, has_aux=True
    )
    assert gg.is_stateful(stateful) and not gg.is_stateful(stateless)
    state = stateful.init(params, batch)
    assert sorted(state) == sorted(_hidden(model, params, batch).values())

    key = jax.random.key(3)
    (grads, metrics), following = jax.jit(stateful)(params, batch, key, state)
    want_grads, want_metrics = jax.jit(stateless)(params, batch, key)
    np.testing.assert_allclose(flat(grads), flat(want_grads), rtol=1e-6, atol=1e-7)
    assert float(metrics["loss"]) == pytest.approx(float(want_metrics["loss"]), 1e-6)
    # One step per call, however many guesses it averages.
    assert {p: int(s["steps"]) for p, s in following.items()} == dict.fromkeys(state, 1)

    # make_train_step: the state advances once per step, the parameters as
    # the stateless estimator's step moves them.
    optimizer = optax.sgd(0.1)
    train = gg.init_train_state(
        params, optimizer, jax.random.key(0), estimator=stateful, batch=batch
    )
    plain = gg.init_train_state(params, optimizer, jax.random.key(0))
    step = gg.make_train_step(stateful, optimizer)
    plain_step = gg.make_train_step(stateless, optimizer)
    for _ in range(3):
        train, _ = step(train, batch)
        plain, _ = plain_step(plain, batch)
    assert {p: int(s["steps"]) for p, s in train.estimator_state.items()} == (
        dict.fromkeys(state, 3)
    )
    np.testing.assert_allclose(
        flat(train.params), flat(plain.params), rtol=1e-6, atol=1e-7
    )


def test_what_a_stateful_estimator_needs_is_said(mlp_16):
    model, params, batch = mlp_16
    estimator = gg.estimators.from_rule(model, _counting_rule())
    optimizer = optax.sgd(0.1)
    with pytest.raises(ValueError, match="needs a batch"):
        gg.init_train_state(params, optimizer, jax.random.key(0), estimator=estimator)
    bare = gg.init_train_state(params, optimizer, jax.random.key(0))
    with pytest.raises(ValueError, match="holds none.*init_train_state"):
        gg.make_train_step(estimator, optimizer)(bare, batch)
    # A state from another model (fewer sites) names the sites it needs.
    other = gg.models.MLP(depth=3, width=16, num_classes=5)
    other_params = other.init(jax.random.key(1), batch["image"])
    other_state = gg.estimators.from_rule(other, _counting_rule()).init(
        other_params, batch
    )
    with pytest.raises(ValueError, match="one entry per guessed site.*dense_2"):
        estimator(params, batch, jax.random.key(0), other_state)
    with pytest.raises(ValueError, match="not lean"):
        gg.estimators.from_rule(model, _counting_rule(), mode="joint", lean=True)
    with pytest.raises(ValueError, match="subspace must be at least rank"):
        gg.estimators.wperp_ns(model, rank=4, variant="warm", subspace=3)
    with pytest.raises(ValueError, match="variant must be one of"):
        gg.estimators.wperp_ns(model, variant="cold")


# --- W-perp's warm start -----------------------------------------------------------


def test_warm_wperp_is_exact_when_its_basis_spans_the_site(mlp_16):
    """With ``subspace`` = the site's width, ``A_b S`` spans J_b's row space, so
    Rayleigh-Ritz gives exact W-perp's top-k projector, and as many directions as
    there are live units when fewer than k."""
    model, params, batch = mlp_16
    ctx = gg.guess_context(model, params, batch)
    for rank in (1, 3, 10):
        rule = gg.rules.wperp_ns(rank, variant="warm", subspace=16, krylov_steps=0)
        for index in _hidden(model, params, batch):
            basis = rule.init(ctx, index, jax.random.key(index))
            assert basis.shape == (16, 16)
            np.testing.assert_allclose(basis @ basis.T, np.eye(16), atol=1e-5)
            ritz, keep, _ = gg.rules.warm_subspace(ctx, index, rank, 0, basis)
            found = _projector(np.asarray(ritz) * np.asarray(keep)[..., None])
            jac = np.asarray(ctx.next_jacobian(index), np.float64)
            _, s, vh = np.linalg.svd(jac, full_matrices=False)
            live = s > s[:, :1] * 1e-5
            top = vh[:, :rank] * live[:, :rank, None]
            np.testing.assert_allclose(found, _projector(top), atol=2e-4)
            np.testing.assert_array_equal(
                np.asarray(keep).sum(-1), live[:, :rank].sum(-1)
            )


def test_warm_state_steps_by_the_batch_mean_gram_operator(mlp_16):
    """The next basis spans ``sum_b J_b^T J_b S`` (one subspace-iteration step),
    and the guesses lie in each example's row space (zero on dead units)."""
    model, params, batch = mlp_16
    ctx = gg.guess_context(model, params, batch)
    rule = gg.rules.wperp_ns(3, variant="warm", subspace=5, krylov_steps=1, warmup=0)
    for index in _hidden(model, params, batch):
        basis = rule.init(ctx, index, jax.random.key(index))
        guess, following = rule.guess(ctx, index, jax.random.key(9), basis)
        jac = np.asarray(ctx.next_jacobian(index), np.float64)  # [B, m, n]
        gram = np.einsum("bmi,bmj->ij", jac, jac)
        want = _span_projector(np.asarray(basis, np.float64) @ gram)
        np.testing.assert_allclose(_span_projector(following), want, atol=1e-4)
        y = np.asarray(guess, np.float64)
        row_space = np.einsum("bmi,bmj->bij", jac, jac)
        dead = np.all(np.abs(row_space) < 1e-12, axis=-1)  # units J_b ignores
        assert dead.any()  # the test needs dead units to mean anything
        np.testing.assert_array_equal(y[dead], 0.0)


def test_warm_wperp_covariance_is_a_rank_k_projector(mlp_16):
    """Monte-Carlo E[y y^T] over 2000 keys (normalize off) against the projector
    on the guesses' own Ritz subspace: isotropic over k directions, as W-perp."""
    model, params, batch = mlp_16
    ctx = gg.guess_context(model, params, batch)
    rank, index = 3, 1
    rule = gg.rules.wperp_ns(rank, variant="warm", subspace=8, krylov_steps=0)
    basis = rule.init(ctx, index, jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 2000)
    ys = jax.vmap(lambda k: rule.guess(ctx, index, k, basis)[0])(keys)
    ys = np.asarray(ys, np.float64)
    covariance = np.einsum("dbi,dbj->bij", ys, ys) / len(keys)
    ritz, keep, _ = gg.rules.warm_subspace(ctx, index, rank, 0, basis)
    projector = _projector(np.asarray(ritz) * np.asarray(keep)[..., None])
    error = np.linalg.norm(covariance - projector, axis=(1, 2))
    relative = error / np.linalg.norm(projector, axis=(1, 2))
    assert np.mean(relative) < 1.5 * np.sqrt((rank + 1) / 2000) + 0.01


def test_warm_wperp_trains_with_its_state_in_the_train_state(mlp_16):
    model, params, batch = mlp_16
    estimator = gg.estimators.wperp_ns(
        model, rank=3, variant="warm", subspace=6, has_aux=True
    )
    optimizer = optax.adam(1e-2)
    state = gg.init_train_state(
        params, optimizer, jax.random.key(0), estimator=estimator, batch=batch
    )
    first = {p: np.asarray(s) for p, s in state.estimator_state.items()}
    step = gg.make_train_step(estimator, optimizer)
    losses = []
    for _ in range(40):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.8 * losses[0]
    for path, basis in state.estimator_state.items():
        assert basis.shape == first[path].shape
        assert not np.allclose(basis, first[path])  # it moved with the weights
        np.testing.assert_allclose(basis @ basis.T, np.eye(6), atol=1e-5)


# --- the runner ---------------------------------------------------------------------

WARM = dataclasses.replace(
    TINY,
    method="wperp_ns",
    options={"variant": "warm", "rank": 2, "subspace": 4},
    steps=12,
    eval_every=6,
)


def test_the_runner_checkpoints_the_estimator_state_and_resumes_exactly(tmp_path):
    full = experiment.run(dataclasses.replace(WARM, workdir=str(tmp_path / "full")))
    parts = str(tmp_path / "parts")
    stopped = experiment.run(dataclasses.replace(WARM, workdir=parts, stop_after=7))
    assert stopped["status"] == "stopped"
    resumed = experiment.run(dataclasses.replace(WARM, workdir=parts, resume=True))
    assert resumed["test_loss"] == pytest.approx(full["test_loss"], rel=1e-6)
    full_params, _ = experiment.load_params(str(tmp_path / "full"))
    resumed_params, _ = experiment.load_params(parts)
    np.testing.assert_allclose(
        flat(full_params), flat(resumed_params), rtol=1e-6, atol=1e-7
    )

    # The checkpoint holds the state, restored bit for bit.
    manager = experiment.checkpoints.checkpoint_manager(
        str(tmp_path / "roundtrip"), keep=1
    )
    state = gg.TrainState(
        jnp.array(3, jnp.int32),
        {"w": jnp.ones(2)},
        (),
        jax.random.key(5),
        {"dense_0": jax.random.normal(jax.random.key(6), (4, 16))},
    )
    experiment.checkpoints.save_checkpoint(manager, state, {"step": 3})
    template = state._replace(
        estimator_state={"dense_0": jnp.zeros((4, 16))}, key=jax.random.key(0)
    )
    restored, _ = experiment.checkpoints._restore_one(manager, 3, template)
    np.testing.assert_array_equal(
        restored.estimator_state["dense_0"], state.estimator_state["dense_0"]
    )
    np.testing.assert_array_equal(
        jax.random.key_data(restored.key), jax.random.key_data(state.key)
    )
