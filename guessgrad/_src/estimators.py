"""Gradient estimators, built by name from a model and keyword-only options.

Every estimator is a pure function ``(params, batch, key) -> grads`` with the
tree structure, shapes and dtypes of ``params``. :func:`build_estimator`
returns the same function with a second output, the auxiliary metrics its
forward pass computed anyway (the batch loss and accuracy).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from guessgrad._src import core
from guessgrad._src import guesses as rules
from guessgrad._src.base import Array, Batch, EstimateFn, Estimator, Params, PRNGKey
from guessgrad._src.models import chain_fns

DEFAULT_MODE = "per_layer"


# Options every activation-space estimator takes, with their defaults.
COMMON_OPTIONS = {
    "num_guesses": 1,
    "normalize": True,
    "mode": DEFAULT_MODE,
    "lean": False,
}


def _check_common(num_guesses: int, mode: str, lean: bool = False) -> None:
    if (
        not isinstance(num_guesses, int)
        or isinstance(num_guesses, bool)
        or num_guesses < 1
    ):
        raise ValueError(
            f"num_guesses must be a positive integer; got {num_guesses!r}."
        )
    if mode not in core.MODES:
        raise ValueError(f"mode must be one of {core.MODES}; got {mode!r}.")
    if lean and mode != "joint":
        raise ValueError(
            "lean=True needs mode='joint': per-layer derivatives carry one tangent per earlier "
            "site through every layer, as much memory as the activations lean mode avoids."
        )


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")


def guess_keys(key: PRNGKey, num_guesses: int) -> PRNGKey:
    """Keys of the individual guesses: ``key`` itself for one guess, else ``split(key, K)``.

    So an estimate with K guesses is the mean of the K one-guess estimates at these keys.
    """
    return key[None] if num_guesses == 1 else jax.random.split(key, num_guesses)


def _metrics(logits: Array, labels: Array, losses: Array) -> dict[str, Array]:
    return {"loss": jnp.mean(losses), "accuracy": core.accuracy(logits, labels)}


def activation_space(
    model,
    rule: rules.GuessRule,
    *,
    num_guesses: int = 1,
    normalize: bool = True,
    mode: str = DEFAULT_MODE,
    lean: bool = False,
) -> Estimator:
    """The forward-gradient recipe in activation space, for any guess rule.

    For each site ``l`` and example ``b``: guess ``y_{l,b}`` (optionally
    rescaled to norm ``sqrt(n_l)``), measure directional derivatives by forward
    mode, set ``g_{l,b} = d y_{l,b}`` and map it to the site's parameters by the
    site map's own VJP. ``num_guesses`` independent estimates are averaged
    (vmapped). In expectation ``E[g_l] = Cov(y_l) dl/ds_l`` (exactly in
    ``per_layer`` mode; in ``joint`` mode when guesses of different sites are
    independent and zero-mean).

    ``lean=True`` (joint mode only) keeps no per-layer activations: one forward
    pass computes primal and tangent together, then a second recomputes the
    forward layer by layer and regenerates the same guesses from the same keys
    to form the updates. Same estimate, memory nearly flat in depth, about one
    extra forward pass of time.
    """
    _check_common(num_guesses, mode, lean)
    fns = chain_fns(model)

    def estimate_lean(params: Params, batch: Batch, key: PRNGKey):
        image, labels = core.validate_batch(batch)
        layer_params = core.split_params(fns, params)
        core.check_input(model, params, image)
        x0, keys = fns.preprocess(image), guess_keys(key, num_guesses)
        derivatives, losses, logits = jax.vmap(
            lambda k: core.lean_joint_derivative(
                fns, rule, layer_params, x0, labels, k, normalize
            )
        )(keys)
        grads = core.lean_parameter_grads(
            fns, rule, layer_params, x0, labels, keys, derivatives, normalize
        )
        return core.join_params(fns, grads), _metrics(logits[0], labels, losses[0])

    if lean:
        return estimate_lean

    def estimate(params: Params, batch: Batch, key: PRNGKey):
        image, labels = core.validate_batch(batch)
        layer_params = core.split_params(fns, params)
        core.check_input(model, params, image)
        trace = core.forward(fns, layer_params, fns.preprocess(image), labels)
        ctx = rules.context(fns, layer_params, trace.sites, labels, rule)

        def one_estimate(guess_key):
            guesses = rules.make_guesses(rule, ctx, guess_key)
            if normalize:
                guesses = tuple(core.normalize_per_example(y) for y in guesses)
            return core.site_gradient_estimates(trace, guesses, mode)

        site_grads = jax.vmap(one_estimate)(guess_keys(key, num_guesses))
        site_grads = tuple(jnp.mean(g, axis=0) for g in site_grads)
        grads = core.local_parameter_grads(fns, layer_params, trace.inputs, site_grads)
        return core.join_params(fns, grads), _metrics(
            trace.sites[-1], labels, trace.losses
        )

    return estimate


def _batch_loss_fn(model, batch: Batch) -> Callable[[Params], tuple[Array, dict]]:
    image, labels = core.validate_batch(batch)

    def loss_fn(params):
        core.check_input(model, params, image)
        logits = model.apply(params, image)
        losses = core.per_example_loss(logits, labels)
        return jnp.mean(losses), _metrics(logits, labels, losses)

    return loss_fn


# --- the estimators (registry entries) -----------------------------------------


def backprop(model) -> Estimator:
    """The oracle: the exact gradient of the mean cross-entropy by ``jax.grad``."""
    chain_fns(model)

    def estimate(params, batch, key):
        del key
        (_, metrics), grads = jax.value_and_grad(
            _batch_loss_fn(model, batch), has_aux=True
        )(params)
        return grads, metrics

    return estimate


def directional(model, *, num_guesses: int = 1, normalize: bool = False) -> Estimator:
    """Directional descent (weight perturbation): ``(grad L . v) v``, v ~ N(0, I) over all parameters.

    One v per guess, shared by the whole batch; unbiased. ``normalize`` rescales
    v to norm ``sqrt(N)`` (uniform on the sphere: still unbiased).
    """
    _check_common(num_guesses, "joint")
    chain_fns(model)

    def estimate(params, batch, key):
        loss_fn = _batch_loss_fn(model, batch)
        flat, unravel = ravel_pytree(params)

        def one_estimate(guess_key):
            v = jax.random.normal(guess_key, flat.shape, flat.dtype)
            if normalize:
                v = v * jnp.sqrt(v.size) / jnp.linalg.norm(v)
            (_, metrics), (derivative, _) = jax.jvp(loss_fn, (params,), (unravel(v),))
            return derivative * v, metrics

        estimates, metrics = jax.vmap(one_estimate)(guess_keys(key, num_guesses))
        return unravel(jnp.mean(estimates, axis=0)), jax.tree.map(
            lambda m: m[0], metrics
        )

    return estimate


def activation_perturbation(model, **common) -> Estimator:
    """Activity perturbation: y = eps ~ N(0, I) at every site. Unbiased."""
    return activation_space(
        model, rules.rule_from(rules.gaussian_hidden, lookahead=0), **common
    )


def wt(model, **common) -> Estimator:
    """W^T: ``y_l = D_l W_{l+1}^T eps``, eps ~ N(0, I) at ``s_{l+1}``. Cov = D W^T W D (biased)."""
    return activation_space(model, rules.rule_from(rules.wt_hidden), **common)


def downstream(model, *, depth: int = 1, **common) -> Estimator:
    """eps at ``x_{l+1+depth}`` pulled back to ``s_l`` by the VJP of the layers between. Biased."""
    _check_positive_int("depth", depth)
    rule = rules.rule_from(rules.downstream_hidden(depth), lookahead=depth)
    return activation_space(model, rule, **common)


def mixing(model, **common) -> Estimator:
    """Activation mixing: ``y_{l,b} = D_{l,b} sum_j alpha_{bj} x_{l+1,j}``. Cov = activations' (biased)."""
    return activation_space(
        model, rules.rule_from(rules.mixing_hidden, lookahead=0), **common
    )


def wperp(model, *, rank: int = 10, **common) -> Estimator:
    """W-perp: y = V_k z in the top-``rank`` right singular subspace of ``W_{l+1} D_l`` (exact SVD)."""
    _check_positive_int("rank", rank)
    return activation_space(model, rules.rule_from(rules.wperp_hidden(rank)), **common)


def wperp_ns(
    model,
    *,
    rank: int = 10,
    power_iters: int = 6,
    ns_steps: int = 5,
    variant: str = "vector",
    cutoff: float = 1.0,
    **common,
) -> Estimator:
    """W-perp without an SVD: the guess filtered towards the top right singular subspace.

    ``variant="vector"`` (default): ``y = p(J^T J) J^T eps`` with ``p`` a
    degree-``power_iters`` Chebyshev filter whose band edge adapts to each
    example (``cutoff`` in [0, 1]; 0 = power filter), at ``1 + 2 *
    power_iters`` W^T-sized products. At 6x1024 the default puts 0.96 of each
    guess's energy in the exact top-10 subspace on random weights and 1.00 on
    trained ones, at 2.2x (per-layer) and 2.6x (joint) ``wt``'s step time
    (``rank`` and ``ns_steps`` unused). ``variant="block"``: ``rank`` vectors
    per example by subspace iteration with Newton-Schulz orthonormalisation
    (isotropic within the subspace, like exact W-perp), ``rank * (1 + 2 *
    power_iters)`` products.
    """
    _check_positive_int("rank", rank)
    if not isinstance(power_iters, int) or power_iters < 0:
        raise ValueError(
            f"power_iters must be a non-negative integer; got {power_iters!r}."
        )
    _check_positive_int("ns_steps", ns_steps)
    hidden = rules.wperp_ns_hidden(
        rank, power_iters, ns_steps, variant=variant, cutoff=cutoff
    )
    rule = rules.rule_from(hidden)
    return activation_space(model, rule, **common)


def self_sharpening(model, **common) -> Estimator:
    """1-layer downstream with eps ~ U(-1, 1); the last layer's guess is the true error.

    The one method whose guess reads the label (at the logits only). Pairs with
    StableAdamW.
    """
    rule = rules.rule_from(
        rules.downstream_hidden(1, noise="uniform"),
        last=rules.true_error_last,
        needs_label=True,
    )
    return activation_space(model, rule, **common)


def oracle_angle(model, *, cosine: float = 0.03) -> Estimator:
    """Oracle control: a guess at a fixed angle to the true gradient (uses ``jax.grad``).

    ``g_theta = cos(theta) g + sin(theta) g_perp`` with ``cos(theta) = cosine`` and
    g_perp a random direction orthogonal to the gradient g with ``|g_perp| = |g|``:
    the estimate has the gradient's norm and exactly the given cosine with it,
    and no bias in direction (E[g_theta] = cosine * g).
    """
    if not -1.0 <= float(cosine) <= 1.0:
        raise ValueError(f"cosine must lie in [-1, 1]; got {cosine!r}.")
    exact = backprop(model)

    def estimate(params, batch, key):
        grads, metrics = exact(params, batch, None)
        g, unravel = ravel_pytree(grads)
        g_norm = jnp.linalg.norm(g)
        unit = g / jnp.where(g_norm > 0, g_norm, 1.0)
        r = jax.random.normal(key, g.shape, g.dtype)
        r = r - jnp.dot(r, unit) * unit
        perp = r / jnp.maximum(jnp.linalg.norm(r), jnp.finfo(g.dtype).tiny) * g_norm
        sine = jnp.sqrt(1.0 - jnp.asarray(cosine, g.dtype) ** 2)
        return unravel(cosine * g + sine * perp), metrics

    return estimate


ESTIMATORS: dict[str, Callable[..., Estimator]] = {
    "backprop": backprop,
    "directional": directional,
    "activation_perturbation": activation_perturbation,
    "wt": wt,
    "downstream": downstream,
    "mixing": mixing,
    "wperp": wperp,
    "wperp_ns": wperp_ns,
    "self_sharpening": self_sharpening,
    "oracle_angle": oracle_angle,
}


def estimator_options(name: str) -> dict[str, object]:
    """The keyword options of estimator ``name`` and their defaults."""
    parameters = inspect.signature(_lookup(name)).parameters.values()
    options = {
        p.name: p.default
        for p in parameters
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        options.update(COMMON_OPTIONS)  # activation-space methods pass these on
    return options


def _lookup(name: str) -> Callable[..., Estimator]:
    if name not in ESTIMATORS:
        raise ValueError(
            f"Unknown estimator {name!r}; valid names: {', '.join(ESTIMATORS)}."
        )
    return ESTIMATORS[name]


def build_estimator(name: str, model, **options) -> Estimator:
    """Estimator ``name`` for ``model``: ``(params, batch, key) -> (grads, metrics)``."""
    factory = _lookup(name)
    valid = estimator_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listing = ", ".join(f"{k}={v!r}" for k, v in valid.items()) or "none"
        raise ValueError(
            f"Unknown option(s) {unknown} for estimator {name!r}; valid options: {listing}."
        )
    return factory(model, **options)


def get_estimator(name: str, model, **options) -> EstimateFn:
    """Estimator ``name`` for ``model`` as a pure function ``(params, batch, key) -> grads``.

    ``grads`` has exactly the tree structure, shapes and dtypes of ``params``.
    Works under ``jax.jit`` and ``jax.vmap`` over keys; the same key gives the
    same result. Unknown names or options raise a ValueError listing the valid
    choices.
    """
    estimator = build_estimator(name, model, **options)

    def estimate(params: Params, batch: Batch, key: PRNGKey):
        return estimator(params, batch, key)[0]

    estimate.__name__ = f"estimate_{name}"
    estimate.__doc__ = ESTIMATORS[name].__doc__
    return estimate


def directional_derivatives(
    model, params: Params, batch: Batch, tangents, *, mode: str = "joint"
) -> Array:
    """Directional derivatives of the per-example losses along site tangents.

    ``tangents[l]`` has the shape of site ``l`` ([B, n_l]). Returns ``d_b =
    sum_l <dl_b/ds_l, tangents[l]_b>`` ([B]) in ``joint`` mode, or the stacked
    ``d_{l,b}`` ([L, B]) in ``per_layer`` mode.
    """
    _check_common(1, mode)
    fns = chain_fns(model)
    image, labels = core.validate_batch(batch)
    layer_params = core.split_params(fns, params)
    trace = core.forward(fns, layer_params, fns.preprocess(image), labels)
    if len(tangents) != fns.num_sites:
        raise ValueError(
            f"Need one tangent per site ({fns.num_sites}); got {len(tangents)}."
        )
    if mode == "joint":
        return core.joint_derivative(trace, tuple(tangents))
    return jnp.stack(core.per_site_derivatives(trace, tuple(tangents)))
