"""One jit-compiled training step: any estimator composed with any Optax optimiser."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from guessgrad._src.base import (
    Aux,
    Batch,
    Estimator,
    Params,
    PRNGKey,
    is_stateful,
)


class TrainState(NamedTuple):
    """Everything a step reads and writes. The step's key is ``fold_in(key, step)``.

    ``estimator_state``: a stateful estimator's state (None for the rest),
    threaded from step to step and saved with the rest.
    """

    step: jax.Array
    params: Params
    opt_state: optax.OptState
    key: PRNGKey
    estimator_state: Any = None


def init_train_state(
    params: Params,
    optimizer: optax.GradientTransformation,
    key: PRNGKey,
    *,
    estimator: Estimator | None = None,
    batch: Batch | None = None,
) -> TrainState:
    """Step 0 state, placed on the default device.

    Placing it (committing it) up front matters: the step's outputs are
    committed arrays, and a first call on uncommitted ones would compile the
    step a second time. For several devices, pass the result to
    :func:`guessgrad.parallel.replicate`.

    A stateful estimator (one with ``init``, such as ``wperp_ns(...,
    variant="warm")``) needs its state: pass ``estimator`` and a ``batch``
    to build it with ``estimator.init(params, batch)``. A stateless
    ``estimator`` is accepted and adds nothing.
    """
    estimator_state = None
    if estimator is not None and is_stateful(estimator):
        if batch is None:
            raise ValueError(
                f"{getattr(estimator, '__name__', 'The estimator')} carries state "
                "across steps: init_train_state needs a batch to build it "
                "(init_train_state(params, optimizer, key, estimator=..., batch=...))."
            )
        estimator_state = estimator.init(params, batch)
    state = TrainState(
        jnp.zeros([], jnp.int32), params, optimizer.init(params), key, estimator_state
    )
    return jax.device_put(state, jax.devices()[0])


def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return jnp.array(True)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()


def make_train_step(
    estimator: Estimator,
    optimizer: optax.GradientTransformation,
    *,
    jit: bool = True,
    skip_nonfinite: bool = False,
    has_aux: bool | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Aux]]:
    """``(state, batch) -> (state, metrics)``: estimate, update, apply.

    ``estimator``: any ``(params, batch, key) -> grads``, e.g.
    ``guessgrad.estimators.wt(model)``, or a stateful one, ``(params,
    batch, key, state) -> (grads, state)`` with ``init``, whose state the
    step reads from and writes to ``state.estimator_state`` (build it with
    :func:`init_train_state`'s ``estimator`` and ``batch``). With ``has_aux`` (by default the
    estimator's own ``has_aux`` attribute, else False) it returns ``(grads,
    metrics)`` and its metrics (the loss its forward pass computed) are
    passed through. The key for
    step ``t`` is ``fold_in(state.key, t)``, so a run is reproducible from any
    saved state.

    ``metrics["finite"]`` (a bool) says whether the step's loss and update
    were finite (checked inside the step, one reduction per leaf). With
    ``skip_nonfinite=True`` a non-finite update is not applied: parameters
    and optimiser state stay as they were (the step counter still advances,
    so the next step draws a new key); otherwise it is applied and the
    caller decides (the experiment runner stops at the first such step).
    """

    if has_aux is None:
        has_aux = bool(getattr(estimator, "has_aux", False))
    stateful = is_stateful(estimator)
    name = getattr(estimator, "__name__", "The estimator")

    def step(state: TrainState, batch: Batch):
        key = jax.random.fold_in(state.key, state.step)
        estimator_state = state.estimator_state
        if stateful:
            if estimator_state is None:
                raise ValueError(
                    f"{name} carries state across steps and the TrainState holds none: "
                    "build it with init_train_state(params, optimizer, key, "
                    "estimator=estimator, batch=batch)."
                )
            out, estimator_state = estimator(state.params, batch, key, estimator_state)
        else:
            out = estimator(state.params, batch, key)
        if has_aux:
            grads, metrics = out
        else:
            grads, metrics = out, {}
        if jax.tree.structure(grads) != jax.tree.structure(state.params):
            raise ValueError(
                f"The estimator's grads must have the tree structure of params; got "
                f"{jax.tree.structure(grads)} for {jax.tree.structure(state.params)}. "
                + (
                    "An estimator returning (grads, metrics) needs has_aux=True."
                    if not has_aux and isinstance(grads, tuple) and len(grads) == 2
                    else ""
                )
            )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        finite = _all_finite((updates, metrics.get("loss")))
        params = optax.apply_updates(state.params, updates)
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(
                lambda a, b: jnp.where(finite, a, b), new, old
            )
            params = keep(params, state.params)
            opt_state = keep(opt_state, state.opt_state)
        metrics = {**metrics, "finite": finite}
        if skip_nonfinite and stateful:
            estimator_state = keep(estimator_state, state.estimator_state)
        new_state = TrainState(
            state.step + 1, params, opt_state, state.key, estimator_state
        )
        return new_state, metrics

    return jax.jit(step) if jit else step
