"""Guess rules: what each method believes ``dl_b/ds_l`` looks like, and the context they read.

A guess rule is a function ``guess(ctx, site, key) -> y``: given the
:class:`GuessContext` of one batch, the index of a site and a PRNG key, it
returns a guess ``y`` with the site's shape ``[B, ...]``, one direction per
example. A rule sees only what is known at guess time (site values,
activations and their derivatives, the maps between a site and the site or
tap its ``next`` names), never the label or the loss, unless it declares
``needs_label``. The engine does the rest: the directional derivatives
``d_b`` by forward mode, ``g_{l,b} = d_b y_{l,b}``, the local VJPs to the
parameters, every mode, ``num_guesses``, trainable subsets, local losses
and sharding (:func:`guessgrad.estimators.from_rule`).

The W^T family pulls back through the map from a site to its target with
the rest of the graph fixed, so it works for any layers in between (dense,
grouped, attention, a norm, a residual), not only for a dense matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from guessgrad._src.base import Array, PRNGKey
from guessgrad._src.sharding import explicit_spec, like

Target = (
    Any  # an opaque handle: a site or tap name on the engine, an index in lean mode
)


@runtime_checkable
class GuessContext(Protocol):
    """What a guess rule may read about one batch.

    Sites are numbered in forward order (``site`` below is that index);
    targets are opaque handles returned by :meth:`target`. Every array is
    batched: ``[B, ...]`` with one entry per example.
    """

    def is_terminal(self, site: int) -> bool:
        """Whether ``site`` has no target (its ``next`` is None: the logits, a head's output)."""
        ...

    def target(self, site: int, depth: int = 1) -> Target:
        """The site or tap ``depth`` ``next`` links after ``site`` (stops at the last one)."""
        ...

    def value(self, target: Target | int) -> Array:
        """The value of a target, or of a site given by its index (before its activation)."""
        ...

    def has_act(self, target: Target) -> bool:
        """Whether an activation follows ``target``."""
        ...

    def output(self, site: int) -> Array:
        """``x_{l+1} = sigma(s_l)``: the site's value after its activation."""
        ...

    def mask(self, site: int, tangent: Array) -> Array:
        """``D_l v = sigma'(s_l) * v`` (for ReLU, the 0/1 mask of active units)."""
        ...

    def pull(
        self, site: int, target: Target, cotangent: Array, post_activation: bool = False
    ) -> Array:
        """A cotangent at ``target`` pulled back to ``site``'s value (the VJP of the map
        between them, the rest of the graph fixed): ``D_l W_{l+1}^T u`` for a dense
        layer. ``post_activation``: the cotangent is at ``target``'s activation."""
        ...

    def next_maps(
        self, site: int
    ) -> tuple[Callable[[Array], Array], Callable[[Array], Array]]:
        """``(push, pull)``: ``v -> J_b v`` and ``u -> J_b^T u``, ``J_b`` the per-example
        Jacobian of the map from ``site`` to its target, applied to whole batches."""
        ...

    def next_jacobian(self, site: int) -> Array:
        """``J_b = d target_b / d s_{l,b}`` per example, flattened: [B, m, n]."""
        ...

    def loss_gradient(self, site: int) -> Array:
        """The exact per-example gradient of the losses ``site`` feeds (``needs_label`` rules only)."""
        ...


GuessFn = Callable[[GuessContext, int, PRNGKey], Array]
"""``(ctx, site, key) -> y``: a guess with the site's shape ``[B, ...]``."""

StatefulGuessFn = Callable[[GuessContext, int, PRNGKey, Any], tuple[Array, Any]]
"""``(ctx, site, key, state) -> (y, state)``: a guess that reads and updates the
site's state (a rule with ``init``)."""

GuessInitFn = Callable[[GuessContext, int, PRNGKey], Any]
"""``(ctx, site, key) -> state``: a stateful rule's state at a site before any step."""


def normal_like(key: PRNGKey, ref: Array) -> Array:
    """N(0, I) noise with ``ref``'s shape, dtype (and sharding, on an Explicit mesh)."""
    return like(jax.random.normal(key, ref.shape, ref.dtype), ref)


def gaussian(ctx: GuessContext, site: int, key: PRNGKey) -> Array:
    """Activity perturbation: ``y = eps ~ N(0, I)`` at the site."""
    return normal_like(key, ctx.value(site))


def true_error(ctx: GuessContext, site: int, key: PRNGKey) -> Array:
    """The exact per-example loss gradient at the site (``softmax - onehot`` at logits).

    Reads the loss: a rule using it must declare ``needs_label=True``.
    """
    del key
    return ctx.loss_gradient(site)


def wt(ctx: GuessContext, site: int, key: PRNGKey) -> Array:
    """``y = D_l W_{l+1}^T eps``, eps ~ N(0, I) at the next site: the VJP of the map to it."""
    target = ctx.target(site)
    return ctx.pull(site, target, normal_like(key, ctx.value(target)))


NOISES = ("normal", "uniform")


def downstream(depth: int, noise: str = "normal") -> GuessFn:
    """eps at ``x_{l+1+depth}`` (the last target if past the end), pulled back to ``s_l``.

    ``depth=1``: ``D_l W_{l+1}^T D_{l+1} eps``. ``noise`` is ``"normal"`` (N(0, I))
    or ``"uniform"`` (U(-1, 1)).
    """
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}; got {noise!r}.")

    def guess(ctx: GuessContext, site: int, key: PRNGKey) -> Array:
        target = ctx.target(site, depth)
        ref = ctx.value(target)
        if noise == "uniform":
            eps = like(jax.random.uniform(key, ref.shape, ref.dtype, -1.0, 1.0), ref)
        else:
            eps = normal_like(key, ref)
        return ctx.pull(site, target, eps, post_activation=ctx.has_act(target))

    return guess


def mixing(ctx: GuessContext, site: int, key: PRNGKey) -> Array:
    """``y_b = D_{l,b} sum_j alpha_{bj} x_{l+1,j}`` with alpha ~ N(0, 1)^{B x B}, fresh per site."""
    outputs = ctx.output(site)  # [B, ...]
    batch = outputs.shape[0]
    alpha = jax.random.normal(key, (batch, batch), outputs.dtype)
    # On an Explicit mesh the batch axis is sharded: say the result is sharded like it.
    mixed = jnp.einsum(
        "bj,j...->b...", alpha, outputs, out_sharding=explicit_spec(outputs)
    )
    return ctx.mask(site, mixed)


class GuessRule(NamedTuple):
    """A method's guess, as the engine runs it.

    Attributes:
      guess: ``(ctx, site, key) -> y`` for sites with a target.
      terminal: the same for sites without one (the logits, a local head's
        output); default :func:`gaussian`.
      needs_label: whether a guess reads the loss (``ctx.loss_gradient``).
      lookahead: how many targets after a site ``guess`` reads (W^T reads the
        next one, ``downstream(k)`` k of them), so lean mode, which keeps no
        activations, knows how far ahead to recompute.
      mask_after: pass every guess through the site's activation derivative
        ``D_l`` after any normalisation (Ren et al.'s ReLU mask on activity
        perturbation).
      init: for a rule that carries state from step to step (a warm start),
        ``(ctx, site, key) -> state``, the state of each site with a target
        before the first step; ``guess`` is then ``(ctx, site, key, state)
        -> (y, state)`` (:data:`StatefulGuessFn`), and its estimator is
        stateful: ``(params, batch, key, state) -> (grads, state)`` with
        ``init(params, batch)``. The state is a pytree of arrays whose shapes
        do not depend on the batch size; terminal sites have none.
    """

    guess: GuessFn | StatefulGuessFn
    terminal: GuessFn = gaussian
    needs_label: bool = False
    lookahead: int = 1
    mask_after: bool = False
    init: GuessInitFn | None = None


def as_rule(rule: GuessRule | GuessFn) -> GuessRule:
    """``rule`` itself, or a bare guess function made a :class:`GuessRule` (defaults otherwise)."""
    if isinstance(rule, GuessRule):
        return rule
    if callable(rule):
        return GuessRule(guess=rule)
    raise TypeError(
        f"A guess rule is a GuessRule or a function (ctx, site, key) -> guess; got "
        f"{type(rule).__name__}."
    )


def scale_examples(scale: Array, y: Array) -> Array:
    """[B] * [B, ...] -> [B, ...]."""
    return scale.reshape(scale.shape + (1,) * (y.ndim - 1)) * y


def normalize_per_example(y: Array) -> Array:
    """Rescales each example's guess to norm ``sqrt(n)`` (n = its size); zero stays zero."""
    flat = y.reshape(y.shape[0], -1)
    norm = jnp.linalg.norm(flat, axis=-1)
    scale = jnp.where(
        norm > 0, jnp.sqrt(flat.shape[-1]) / jnp.where(norm > 0, norm, 1.0), 0.0
    )
    return scale_examples(scale.astype(y.dtype), y)


def has_state(rule: GuessRule, ctx: GuessContext, site: int) -> bool:
    """Whether ``rule`` keeps state at ``site`` (a stateful rule, a site with a target)."""
    return rule.init is not None and not ctx.is_terminal(site)


def init_site_state(rule: GuessRule, ctx: GuessContext, site: int, key: PRNGKey):
    """A stateful rule's state at ``site`` before any step, seeded by ``fold_in(key, site)``."""
    return rule.init(ctx, site, jax.random.fold_in(key, site))


def site_guess_and_state(
    rule: GuessRule,
    ctx: GuessContext,
    site: int,
    key: PRNGKey,
    normalize: bool = False,
    state: Any = None,
) -> tuple[Array, Any]:
    """The guess at ``site`` and the site's next state (None where the rule keeps none).

    ``fold_in(key, site)`` seeds the guess. A stateful rule given no
    ``state`` starts from its ``init`` (a cold start, seeded from the same
    key). ``normalize`` rescales each example's guess to norm ``sqrt(size)``
    (:func:`normalize_per_example`); a ``mask_after`` rule's guess then goes
    through ``D_l``, so masking keeps an isotropic guess unbiased:
    ``E[D eps eps^T D] = D D``.
    """
    site_key = jax.random.fold_in(key, site)
    new_state = None
    if ctx.is_terminal(site):
        guess = rule.terminal(ctx, site, site_key)
    elif rule.init is not None:
        if state is None:
            state = rule.init(ctx, site, jax.random.split(site_key)[0])
        guess, new_state = rule.guess(ctx, site, site_key, state)
    else:
        guess = rule.guess(ctx, site, site_key)
    if normalize:
        guess = normalize_per_example(guess)
    if rule.mask_after:
        guess = ctx.mask(site, guess)
    return guess, new_state


def site_guess(
    rule: GuessRule,
    ctx: GuessContext,
    site: int,
    key: PRNGKey,
    normalize: bool = False,
) -> Array:
    """The guess at ``site`` (:func:`site_guess_and_state` without the state; a
    stateful rule starts cold)."""
    return site_guess_and_state(rule, ctx, site, key, normalize)[0]
