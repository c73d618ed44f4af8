"""StableAdamW: AdamW with per-tensor update clipping."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class StableAdamWState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def stable_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-6,
    weight_decay: float = 1e-4,
) -> optax.GradientTransformation:
    r"""AdamW with update clipping (StableAdamW; Wortsman et al. 2023, "Stable and
    low-precision training for large-scale vision-language models").

    Per tensor, the AdamW step is divided by ``max(1, RMS_t)`` with

    .. math::
        \mathrm{RMS}_t = \sqrt{\operatorname{mean}\left(g_t^2 / \max(\hat v_t, \epsilon^2)\right)},

    which tames steps when the second-moment estimate lags a sudden large
    gradient, without gradient clipping's global threshold.

    Example:
      >>> import jax.numpy as jnp
      >>> opt = stable_adamw(1e-3)
      >>> state = opt.init({"w": jnp.ones(3)})
      >>> updates, state = opt.update({"w": jnp.ones(3)}, state, {"w": jnp.ones(3)})
    """

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return StableAdamWState(jnp.zeros([], jnp.int32), zeros, zeros)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "stable_adamw needs params for weight decay: call update(grads, state, params)."
            )
        count = state.count + 1
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate

        def leaf(g, m, v, p):
            rms = jnp.sqrt(jnp.mean(g**2 / jnp.maximum(v, eps**2)))
            step = m / (jnp.sqrt(v) + eps) + weight_decay * p
            return -lr * step / jnp.maximum(1.0, rms)

        new_updates = jax.tree.map(leaf, updates, mu_hat, nu_hat, params)
        return new_updates, StableAdamWState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)
