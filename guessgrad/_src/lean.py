"""Lean mode: the memory-lean joint pass on a :class:`~guessgrad.models.Chain` (private).

A chain's sites declare their own maps ``s_l = f_l(theta_l, x_l)``, with
an elementwise activation between them, so the forward can be recomputed
site by site. Lean mode uses that to keep no per-layer activations: pass 1
runs primal and tangent together, layer by layer, drawing each site's guess
as the site is reached; pass 2 recomputes the forward layer by layer,
regenerates the same guesses from the same keys and applies each site's
local VJP at once. The guesses are the engine's rules, read through
:class:`ChainContext`, which implements the same
:class:`~guessgrad.rules.GuessContext` as the engine's context, so an
estimate equals the joint-mode estimate of :mod:`guessgrad._src.engine` for
the same keys. Reached through ``lean=True`` on any activation-space
estimator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from guessgrad._src.base import Array, Batch, Params, PRNGKey
from guessgrad._src.losses import per_example_loss
from guessgrad._src.models import Chain
from guessgrad._src.problem import Problem, guess_keys, map_guesses
from guessgrad._src.rules import GuessRule, scale_examples, site_guess


class ChainFns(NamedTuple):
    """Pure functions of a :class:`Chain`, as estimators use them.

    Attributes:
      names: the ``params`` key of each site map, in order.
      site_fns: ``site_fns[l](theta_l, x_l) -> s_l``.
      activation: ``sigma``, applied between consecutive sites.
      preprocess: ``image -> x_0``.
    """

    names: tuple[str, ...]
    site_fns: tuple[Callable[[Params, Array], Array], ...]
    activation: Callable[[Array], Array]
    preprocess: Callable[[Array], Array]

    @property
    def num_sites(self) -> int:
        return len(self.site_fns)


def chain_fns(model: nn.Module) -> ChainFns:
    """Splits a :class:`Chain` into the pure per-site functions estimators use."""
    if not isinstance(model, Chain):
        raise TypeError(
            f"Estimators need a guessgrad.models.Chain (e.g. guessgrad.models.MLP); "
            f"got {type(model).__name__}. Subclass Chain and return your site maps "
            f"from layer_modules()."
        )
    modules = tuple(model.layer_modules())
    names = tuple(m.name for m in modules)
    if any(name is None for name in names) or len(set(names)) != len(names):
        raise ValueError(
            f"Every module from layer_modules() needs a unique name; got {names}."
        )

    def make_site_fn(module):
        return lambda layer_params, x: module.apply({"params": layer_params}, x)

    return ChainFns(
        names=names,
        site_fns=tuple(make_site_fn(m) for m in modules),
        activation=model.activation,
        preprocess=model.preprocess,
    )


def split_params(fns: ChainFns, params: Params) -> tuple[Params, ...]:
    """``model.init`` output -> one parameter tree per site, checking its structure."""
    if not hasattr(params, "keys") or set(params.keys()) != {"params"}:
        got = (
            sorted(params.keys()) if hasattr(params, "keys") else type(params).__name__
        )
        raise ValueError(
            f'params must be what model.init returns, {{"params": ...}}; got {got}.'
        )
    inner = params["params"]
    if set(inner.keys()) != set(fns.names):
        raise ValueError(
            f"params['params'] has entries {sorted(inner.keys())} but the model's site maps are "
            f"{list(fns.names)}."
        )
    return tuple(inner[name] for name in fns.names)


def join_params(fns: ChainFns, layer_trees: Sequence[Params]) -> Params:
    """Inverse of :func:`split_params`."""
    return {"params": dict(zip(fns.names, layer_trees))}


class ChainContext(NamedTuple):
    """The :class:`~guessgrad.rules.GuessContext` of lean mode: a chain's sites by index.

    Targets are site indices. ``sites`` holds only what the pass has computed
    (a site and the ``lookahead`` sites after it); ``labels`` is None unless
    the rule needs them.
    """

    fns: ChainFns
    layer_params: tuple[Params, ...]
    sites: tuple[Array, ...]
    labels: Array | None = None

    @property
    def num_sites(self) -> int:
        return len(self.sites)

    def is_terminal(self, index: int) -> bool:
        """Whether site ``index`` is the last (the logits): it gets the rule's output guess."""
        return index == self.num_sites - 1

    def target(self, index: int, depth: int = 1) -> int:
        """The site ``depth`` links after ``index`` (the logits if past the end)."""
        return min(index + depth, self.num_sites - 1)

    def value(self, target: int) -> Array:
        return self.sites[target]

    def has_act(self, target: int) -> bool:
        """Whether an activation follows ``target`` (every site but the logits)."""
        return target < self.num_sites - 1

    def output(self, index: int) -> Array:
        """``x_{l+1} = sigma(s_l)``, the activation after site ``l``."""
        return self.fns.activation(self.sites[index])

    def mask(self, index: int, tangent: Array) -> Array:
        """``D_l v = sigma'(s_l) * v`` (for ReLU, the 0/1 mask of active units)."""
        return jax.jvp(self.fns.activation, (self.sites[index],), (tangent,))[1]

    def downstream_map(
        self, index: int, target: int, post_activation: bool
    ) -> Callable:
        """``s_l -> s_target`` (then ``sigma`` if ``post_activation``), through the chain's maps."""

        def run(site):
            for later in range(index + 1, target + 1):
                site = self.fns.site_fns[later](
                    self.layer_params[later], self.fns.activation(site)
                )
            return self.fns.activation(site) if post_activation else site

        return run

    def pull(
        self, index: int, target: int, cotangent: Array, post_activation: bool = False
    ) -> Array:
        """VJP of :meth:`downstream_map` at ``s_l``: a cotangent at ``target`` pulled back to ``s_l``."""
        run = self.downstream_map(index, target, post_activation)
        _, vjp = jax.vjp(run, self.sites[index])
        return vjp(cotangent)[0]

    def next_maps(self, index: int) -> tuple[Callable, Callable]:
        """``(push, pull)``: ``v -> J_b v`` and ``u -> J_b^T u`` for the next site, batched.

        Linearisation of the next site map at ``s_l`` and its transpose: one
        forward of the map, then each call is one product the size of ``W^T eps``.
        """
        site = self.sites[index]
        run = self.downstream_map(index, index + 1, post_activation=False)
        _, push = jax.linearize(run, site)
        transpose = jax.linear_transpose(push, site)
        return push, lambda u: transpose(u)[0]

    def next_jacobian(self, index: int) -> Array:
        """Per-example Jacobian ``J_b = d s_{l+1,b} / d s_{l,b}`` (``W_{l+1} D_{l,b}`` for dense): [B, m, n]."""
        run = self.downstream_map(index, index + 1, post_activation=False)

        def one(site):  # [...] -> [m, n], flattened
            jac = jax.jacrev(lambda s: run(s[None])[0])(site)
            return jac.reshape(-1, site.size)

        return jax.vmap(one)(self.sites[index])

    def loss_gradient(self, index: int) -> Array:
        """``softmax(s_L) - onehot(label)``: the exact ``dl_b/ds_L`` (reads the label)."""
        logits = self.sites[index]
        return jax.nn.softmax(logits) - jax.nn.one_hot(
            self.labels, logits.shape[-1], dtype=logits.dtype
        )


# --- the two passes ----------------------------------------------------------------
#
# The engine's passes keep every layer's linearisation (masks, inputs) alive until
# the tangents are pushed: as much memory as backprop's stored activations. The
# lean passes below keep none. Pass 1 runs primal and tangent together, layer
# by layer, drawing each site's guess as the site is reached; pass 2 recomputes
# the forward pass layer by layer, regenerates the same guesses from the same
# keys and applies each site's local VJP at once. The order is pinned by data
# dependences (:func:`_after`): a guess is drawn only once its site exists,
# pass 1's layer l+1 runs only after layer l's tangent is formed (else the
# scheduler may run the whole primal chain first and keep every site alive),
# pass 2's layer l+1 only after layer l's update is formed, and pass 2 starts from
# pass 1's result, so XLA cannot merge the two passes, which would bring the
# stored activations back.


def local_grad(site_fn: Callable, theta: Params, x: Array, site_grad: Array) -> Params:
    """One site map's VJP w.r.t. its own parameters at cotangent ``site_grad / B``."""
    _, vjp = jax.vjp(lambda p: site_fn(p, x), theta)
    return vjp(site_grad / site_grad.shape[0])[0]


def _barrier(*values):
    return jax.lax.optimization_barrier(values)


def _after(value, dep):
    """``value`` (an array or typed PRNG keys), made to depend on every leaf of ``dep`` by data.

    XLA:CPU expands optimisation barriers before it merges common
    subexpressions and schedules, so a barrier alone neither keeps pass 2
    apart from pass 1 nor stops the scheduler running a pass's forward ahead
    of its updates (which keeps every layer's activations alive). A select on
    "the first element of each leaf of ``dep`` is finite" is a dependence XLA
    must honour. It changes ``value`` (to NaN, or 0 for integers) only where
    that element is not finite, and then every update is NaN or inf anyway.
    """
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(value)
        data = _after(jax.random.key_data(value), dep)
        return jax.random.wrap_key_data(data, impl=impl)
    finite = jnp.all(
        jnp.stack([jnp.isfinite(leaf.ravel()[0]) for leaf in jax.tree.leaves(dep)])
    )
    fill = jnp.nan if jnp.issubdtype(value.dtype, jnp.floating) else 0
    return jnp.where(finite, value, jnp.asarray(fill, value.dtype))


def _window_context(fns: ChainFns, rule, layer_params, labels, index: int, site: Array):
    """A guess context holding site ``index`` and the ``rule.lookahead`` sites after it (recomputed)."""
    sites = [None] * fns.num_sites
    sites[index] = site
    for later in range(index + 1, min(index + rule.lookahead, fns.num_sites - 1) + 1):
        site = fns.site_fns[later](layer_params[later], fns.activation(site))
        sites[later] = site
    return ChainContext(
        fns, tuple(layer_params), tuple(sites), labels if rule.needs_label else None
    )


def _lean_guess(fns, rule, layer_params, labels, index, site, key, normalize):
    key = _after(key, site)  # the noise is drawn once the site exists
    ctx = _window_context(fns, rule, layer_params, labels, index, site)
    return site_guess(rule, ctx, index, key, normalize)


def _loss(labels, loss_of):
    """Per-example losses of the logits: cross-entropy against ``labels``, or ``loss_of``."""
    if loss_of is not None:
        return loss_of
    return lambda logits: per_example_loss(logits, labels)


def lean_joint_derivative(
    fns, rule, layer_params, x0, labels, key, normalize: bool, loss_of=None
):
    """Pass 1: ``(d [B], losses [B], logits)`` with no per-layer state kept."""
    site = fns.site_fns[0](layer_params[0], x0)
    tangent = _lean_guess(fns, rule, layer_params, labels, 0, site, key, normalize)
    for index in range(1, fns.num_sites):
        site, tangent = _barrier(_after(site, tangent), tangent)

        def step(prev_site, index=index):
            return fns.site_fns[index](layer_params[index], fns.activation(prev_site))

        site, tangent = jax.jvp(step, (site,), (tangent,))
        tangent = tangent + _lean_guess(
            fns, rule, layer_params, labels, index, site, key, normalize
        )
    losses, derivative = jax.jvp(_loss(labels, loss_of), (site,), (tangent,))
    return derivative, losses, site


def lean_parameter_grads(
    fns,
    rule,
    layer_params,
    x0,
    labels,
    keys,
    derivatives,
    normalize: bool,
    loss_of=None,
):
    """Pass 2: recompute layer by layer, regenerate the guesses of ``keys`` [K] and form
    ``sum_b (mean_k d_{k,b} y_{k,l,b}) dS_l/dtheta_l / B`` for each site at once."""
    # Pass 2 starts from pass 1's result (no merging of the two passes).
    x, keys = _after(x0, derivatives), _after(keys, derivatives)
    grads = []
    for index in range(fns.num_sites):
        site = fns.site_fns[index](layer_params[index], x)
        guesses_k = jax.vmap(
            lambda key, index=index, site=site: _lean_guess(
                fns, rule, layer_params, labels, index, site, key, normalize
            )
        )(keys)
        site_grad = jnp.mean(jax.vmap(scale_examples)(derivatives, guesses_k), axis=0)
        grad = local_grad(fns.site_fns[index], layer_params[index], x, site_grad)
        if index + 1 < fns.num_sites:
            # Layer l+1 starts only once layer l's update exists, so x_l dies here.
            x = fns.activation(_after(site, grad))
        grads.append(grad)
    return tuple(grads)


def lean_estimator(
    problem: Problem, rule: GuessRule, num_guesses: int, normalize: bool
):
    """The joint-mode estimate of ``rule`` on ``problem``'s chain, by the two lean passes.

    Returns ``(params, batch, key) -> (grads, metrics)``.
    """
    model = problem.model
    if not isinstance(model, Chain):
        raise TypeError(
            f"lean=True needs a model whose sites declare their own maps (a "
            f"guessgrad.models.Chain, e.g. MLP): pass two recomputes the forward site by "
            f"site. {type(model).__name__} marks its sites inline; use lean=False."
        )
    fns = chain_fns(model)
    if rule.needs_label and not problem.default_loss:
        raise ValueError(
            "lean=True with a rule that reads the loss gradient (self_sharpening) needs the "
            "default loss; use lean=False for another loss_fn."
        )

    def estimate(params: Params, batch: Batch, key: PRNGKey):
        variables, args, _, _, train = problem.prepare(
            params, batch, key, analyse=False
        )
        layer_params = split_params(fns, variables)
        x0, keys = fns.preprocess(*args), guess_keys(key, num_guesses)
        if problem.default_loss:
            labels, loss_of = batch["label"], None
        else:
            labels = None

            def loss_of(logits):
                losses = problem.losses(logits, batch)
                if len(losses) != 1 or jnp.ndim(next(iter(losses.values()))) != 1:
                    raise ValueError(
                        "lean=True needs one per-example loss [B] from loss_fn."
                    )
                return next(iter(losses.values()))

        derivatives, losses, logits = map_guesses(
            lambda k: lean_joint_derivative(
                fns, rule, layer_params, x0, labels, k, normalize, loss_of
            ),
            key,
            num_guesses,
        )
        grads = lean_parameter_grads(
            fns, rule, layer_params, x0, labels, keys, derivatives, normalize, loss_of
        )
        grads = join_params(fns, grads)
        if train.mask is not None:
            grads = train.full(
                [g for g, m in zip(jax.tree.leaves(grads), train.mask) if m]
            )
        return grads, problem.metrics(logits[0], batch, {"loss": losses[0]})

    return estimate
