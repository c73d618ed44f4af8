"""Gradient estimators: one typed function per method, and the engine that runs guess rules.

Every estimator is built from a model and keyword-only options and is a
pure function ``(params, batch, key) -> grads`` with the tree structure,
shapes and dtypes of ``params`` (``has_aux=True``: ``(grads, metrics)``,
the loss and accuracy its forward pass computed anyway, as ``jax.grad``'s
``has_aux``). Activation-space methods are a guess rule
(:mod:`guessgrad.rules`) run by :func:`from_rule`; ``backprop``,
``directional`` and ``oracle_angle`` work in weight space and take any
Flax module.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from guessgrad._src import engine, nnx_bridge
from guessgrad._src import lean as lean_lib
from guessgrad._src import rules as rules_lib
from guessgrad._src import sites as sites_lib
from guessgrad._src import wperp as wperp_lib
from guessgrad._src.base import Array, Batch, Estimator, Params, PRNGKey
from guessgrad._src.problem import (
    Problem,
    check_positive_int,
    exact_loss,
    map_guesses,
    model_rngs,
    trainable_losses_reached,
)
from guessgrad._src.sharding import mesh_of, on_mesh_of_arguments

DEFAULT_MODE = "per_layer"
MODES = engine.MODES

_PROBLEM_ARGS = """\
  loss_fn: ``(outputs, batch) -> [B]`` per-example losses, or a dict of
    named ones (local losses); the objective is the sum of their means
    over the batch. A loss ``[B, ...]`` is summed per example over its
    other axes unless declared as copies with :func:`guessgrad.copies`
    (then counted as their mean). Default: softmax cross-entropy of the
    outputs against integer ``batch["label"]``.
  inputs: ``batch ->`` the model's call argument (a tuple for several).
    Default: ``batch["image"]``.
  trainable: a pytree of bools with the structure of ``params`` (or of
    its ``"params"`` collection), or a callable from ``params`` to one
    (as ``optax.masked`` takes); for an ``nnx.Module``, any NNX filter
    (a ``Variable`` subclass such as a ``Prompt(nnx.Param)``,
    ``nnx.PathContains(...)``, ``nnx.All/Any/Not``). Frozen leaves get
    exact zeros and cost no guess work. Collections other than
    ``"params"`` are constants.
  has_aux: return ``(grads, metrics)`` instead of ``grads``: ``loss``
    (the objective), ``loss/<name>`` per loss when there are several,
    and ``accuracy`` with the default loss."""

_GUESSING_ARGS = """\
  num_guesses: K, the number of independent guesses averaged per step
    (vmapped; the estimate is the mean of the K one-guess estimates at
    the keys ``jax.random.split(key, K)``, or ``key`` itself for K = 1).
  normalize: rescale each example's guess to norm ``sqrt(n_l)`` before
    the directional derivative (zero guesses stay zero).
  mode: ``"per_layer"`` (default): one directional derivative per site,
    ``d_{l,b} = <dl_b/ds_l, y_{l,b}>``, exactly ``E[g_l] = Cov(y_l)
    dl/ds_l``, triangular tangent work; ``"joint"``: every site
    perturbed in one forward pass, ``d_b = sum_l <dl_b/ds_l,
    y_{l,b}>``, the same expectation for independent zero-mean guesses
    with more variance, one pass.
  lean: joint mode on a :class:`~guessgrad.models.Chain` keeping no
    per-layer activations (the forward is recomputed site by site);
    the same estimate for the same key."""

_RETURNS = """\
Returns:
  An estimator ``(params, batch, key) -> grads`` (``(grads, metrics)``
  with ``has_aux=True``), pure: the same key gives the same estimate,
  under ``jax.jit`` and ``jax.vmap`` over keys. The model runs with
  ``rngs=guessgrad.model_rngs(key)`` (dropout); arrays sharded on a mesh
  work with or without a context mesh.

  ``model`` is a Flax linen module (``params`` what ``model.init``
  returns) or a Flax NNX module (``params`` its Param state,
  ``nnx.state(model, nnx.Param)``; ``grads`` an ``nnx.State`` of the
  same structure, for ``optax`` or ``nnx.Optimizer``; its RNG streams
  are reseeded from ``key``)."""


# --- shared docstrings, and the forward-gradient recipe every guess rule runs in --


def _documented(fn):
    """Fills the shared ``{problem_args}``, ``{guessing_args}`` and ``{returns}`` of a docstring."""
    doc = inspect.cleandoc(fn.__doc__)
    for name, text in (
        ("{problem_args}", _PROBLEM_ARGS),
        ("{guessing_args}", _GUESSING_ARGS),
        ("{returns}", _RETURNS),
    ):
        doc = doc.replace(name, text)
    fn.__doc__ = doc
    return fn


def _check_guessing(num_guesses: int, mode: str, lean: bool, normalize: bool) -> None:
    check_positive_int("num_guesses", num_guesses)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")
    if lean and mode != "joint":
        raise ValueError(
            "lean=True needs mode='joint': per-layer derivatives carry one tangent per earlier "
            "site through every layer, as much memory as the activations lean mode avoids."
        )
    for name, value in (("normalize", normalize), ("lean", lean)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False; got {value!r}.")


def _finish(estimate: Callable, has_aux: bool, name: str, init=None) -> Estimator:
    """The public estimator: run on the arguments' mesh, metrics only when asked for.

    With ``init`` (a stateful rule), ``estimate`` is ``(params, batch, key,
    state) -> ((grads, metrics), state)`` and the estimator ``(params,
    batch, key, state) -> (grads, state)`` (``((grads, metrics), state)``
    with ``has_aux``), with ``init(params, batch, key=None) -> state``.
    """
    if not isinstance(has_aux, bool):
        raise TypeError(f"has_aux must be True or False; got {has_aux!r}.")
    on_mesh = on_mesh_of_arguments(estimate)
    if init is not None:

        def out(params: Params, batch: Batch, key: PRNGKey, state):
            result, state = on_mesh(params, batch, key, state)
            return (result if has_aux else result[0]), state

        out.init = on_mesh_of_arguments(init)
    elif has_aux:
        out = on_mesh
    else:

        def out(params: Params, batch: Batch, key: PRNGKey):
            return on_mesh(params, batch, key)[0]

    out = functools.wraps(estimate)(out) if out is not on_mesh else out
    out.__name__ = f"estimate_{name}"
    out.__qualname__ = out.__name__
    out.has_aux = has_aux
    return out


def _guessed(
    problem: Problem,
    rule: rules_lib.GuessRule,
    num_guesses: int,
    normalize: bool,
    mode: str,
):
    """``(estimate, init)``: the forward-gradient recipe for ``rule``.

    ``estimate(params, batch, key) -> (grads, metrics)`` and ``init`` None;
    for a stateful rule, ``estimate(params, batch, key, state) -> ((grads,
    metrics), state)``, the state a dict from each guessed site's path to
    the rule's state there (with ``num_guesses`` > 1, the first guess's next
    state is kept), and ``init(params, batch, key)`` builds it from the
    batch's context.
    """
    model = problem.model

    def context(params, batch, key):
        _, args, rngs, structure, train = problem.prepare(params, batch, key)
        ctx, param_grads = engine.step_context(
            model,
            train,
            args,
            batch,
            problem.loss_fn,
            rngs,
            structure,
            mode,
            rule.needs_label,
        )
        return ctx, param_grads, structure

    def estimate(params: Params, batch: Batch, key: PRNGKey, rule_state=None):
        ctx, param_grads, structure = context(params, batch, key)
        active = structure.active
        if rule_state is not None:
            _check_rule_state(rule_state, rule, ctx, active)

        def one_estimate(guess_key):
            guesses, states = {}, {}
            for s in active:
                guesses[s.path], new = rules_lib.site_guess_and_state(
                    rule,
                    ctx,
                    s.index,
                    guess_key,
                    normalize,
                    None if rule_state is None else rule_state.get(s.path),
                )
                if new is not None:
                    states[s.path] = new
            site_grads, aux = engine.guessed_site_gradients(ctx, guesses, mode)
            return site_grads, aux, states

        site_grads, (losses, outputs), states = map_guesses(
            one_estimate, key, num_guesses
        )
        site_grads = {p: jnp.mean(g, axis=0) for p, g in site_grads.items()}
        losses, outputs, states = jax.tree.map(
            lambda x: x[0], (losses, outputs, states)
        )
        grads = param_grads(site_grads)
        result = grads, problem.metrics(outputs, batch, losses)
        return (result, states) if rule.init is not None else result

    if rule.init is None:
        return estimate, None

    def init(params: Params, batch: Batch, key: PRNGKey | None = None):
        key = jax.random.key(0) if key is None else key
        ctx, _, structure = context(params, batch, key)
        return {
            s.path: rules_lib.init_site_state(rule, ctx, s.index, key)
            for s in structure.active
            if rules_lib.has_state(rule, ctx, s.index)
        }

    return estimate, jax.jit(init)


def _check_rule_state(rule_state, rule, ctx, active) -> None:
    """A state that is not this estimator's (another model, another rule) is a clear error."""
    expected = sorted(s.path for s in active if rules_lib.has_state(rule, ctx, s.index))
    if not isinstance(rule_state, dict) or sorted(rule_state) != expected:
        got = sorted(rule_state) if isinstance(rule_state, dict) else type(rule_state)
        raise ValueError(
            f"The estimator's state must be a dict with one entry per guessed site, "
            f"{expected}, as estimator.init(params, batch) builds it; got {got}."
        )


@nnx_bridge.estimator_factory
@_documented
def from_rule(
    model,
    rule: rules_lib.GuessRule | rules_lib.GuessFn,
    *,
    num_guesses: int = 1,
    normalize: bool = True,
    mode: str = DEFAULT_MODE,
    lean: bool = False,
    loss_fn: Callable | None = None,
    inputs: Callable | None = None,
    trainable=None,
    has_aux: bool = False,
) -> Estimator:
    r"""The forward-gradient estimator of any guess rule, on any model with sites.

    For each guessed site ``l`` and example ``b``: guess ``y_{l,b}`` (the
    rule), measure the directional derivative ``d_b`` of the example's loss
    along it by forward mode, set ``g_{l,b} = d_b y_{l,b}`` and map it to
    the parameters by the site's own local VJP (nothing flows back across
    sites). Parameters after the last site before a loss (heads, readouts)
    get their exact local gradient.

    Expectation: ``E[g_l] = Cov(y_l) dl/ds_l`` (exactly in per-layer mode;
    in joint mode when the guesses of different sites are independent and
    zero-mean). Unbiased iff ``Cov(y_l) = I`` on the gradient's span.

    Args:
      model: a Flax linen module with sites marked inside
        (:func:`guessgrad.site`) or a :func:`guessgrad.mark_outputs` model.
      rule: a :class:`~guessgrad.rules.GuessRule`, or a bare guess function
        ``(ctx, site, key) -> y`` (:class:`~guessgrad.rules.GuessContext`)
        for sites with a target; terminal sites then get ``eps ~ N(0, I)``.
        A rule with ``init`` carries state across steps (a warm start):
        the estimator is then ``(params, batch, key, state) -> (grads,
        state)`` (``((grads, metrics), state)`` with ``has_aux``), its
        state built by ``estimator.init(params, batch, key=None)``;
        :func:`guessgrad.make_train_step` threads it (``lean`` refuses it).
    {guessing_args}
    {problem_args}

    {returns}

    References:
      Singhal, Cheung, Chandra et al., How to Guess a Gradient (2023),
      Section 2, https://arxiv.org/abs/2312.04709.
    """
    rule = rules_lib.as_rule(rule)
    _check_guessing(num_guesses, mode, lean, normalize)
    problem = Problem(model, loss_fn, inputs, trainable)
    name = getattr(rule.guess, "__name__", "rule")
    if lean:
        if rule.init is not None:
            raise ValueError(
                "A stateful guess rule (one with init) runs in joint or per-layer mode, "
                "not lean: lean mode recomputes each site's context on the fly."
            )
        estimate = lean_lib.lean_estimator(problem, rule, num_guesses, normalize)
        init = None
    else:
        estimate, init = _guessed(problem, rule, num_guesses, normalize, mode)
    return _finish(estimate, has_aux, name, init=init)


def _rule_estimator(
    name,
    model,
    rule,
    num_guesses,
    normalize,
    mode,
    lean,
    loss_fn,
    inputs,
    trainable,
    has_aux,
) -> Estimator:
    estimator = from_rule(
        model,
        rule,
        num_guesses=num_guesses,
        normalize=normalize,
        mode=mode,
        lean=lean,
        loss_fn=loss_fn,
        inputs=inputs,
        trainable=trainable,
        has_aux=has_aux,
    )
    estimator.__name__ = estimator.__qualname__ = f"estimate_{name}"
    return estimator


# --- weight space ---------------------------------------------------------------


@nnx_bridge.estimator_factory
@_documented
def backprop(
    model,
    *,
    loss_fn: Callable | None = None,
    inputs: Callable | None = None,
    trainable=None,
    has_aux: bool = False,
) -> Estimator:
    """The exact gradient, by ``jax.grad`` through the model: the oracle every method is measured against.

    ``g = grad_theta L``, ``L = sum_k mean_b l_{k,b}`` over the losses ``k``
    (local losses are cut from each other by the model's ``stop_gradient``).

    Args:
      model: any Flax linen module (sites, if marked, are inert).
    {problem_args}

    {returns}
    """
    setup = exact_loss(Problem(model, loss_fn, inputs, trainable))

    def estimate(params, batch, key):
        loss, train = setup(params, batch, key)
        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(train.part)
        return train.full(grads), metrics

    return _finish(estimate, has_aux, "backprop")


@nnx_bridge.estimator_factory
@_documented
def directional(
    model,
    *,
    num_guesses: int = 1,
    normalize: bool = False,
    exact_heads: bool = False,
    loss_fn: Callable | None = None,
    inputs: Callable | None = None,
    trainable=None,
    has_aux: bool = False,
) -> Estimator:
    """Directional descent (weight perturbation, the forward gradient): ``g = (v^T grad L) v``.

    ``v ~ N(0, I)`` over the trainable parameters, one per guess, shared by
    the whole batch; ``grad L . v`` is one JVP. Unbiased: ``E[v v^T] = I``,
    so ``E[g] = grad L``, with variance growing with the parameter count.
    With several losses (local losses) each parameter takes the derivative
    of only the losses it reaches (found from the graph, as
    :func:`guessgrad.structure` reports), ``sum_k (grad L_k . v) v``: still
    unbiased, without the other blocks' derivatives as noise (Ren et al.'s
    LG-FG-W). Frozen parameters are not perturbed (exact zeros).

    Args:
      model: any Flax linen module.
      num_guesses: K independent directions averaged per step.
      normalize: rescale ``v`` to norm ``sqrt(N)`` (uniform on the sphere:
        still unbiased).
      exact_heads: parameters that reach a loss without passing a site
        (local heads, readouts: "updated by loss ... (exact local gradient)"
        in :func:`guessgrad.print_structure`) take their exact gradient
        instead of a perturbation, as in Ren et al.'s LG-FG-W and as the
        activation-space estimators do; the rest is perturbed. Needs a
        model with sites (without sites every parameter would be a head).
    {problem_args}

    {returns}

    References:
      Baydin, Pearlmutter, Syme, Wood, Torr, Gradients without
      Backpropagation (2022), Section 3, https://arxiv.org/abs/2202.08587.
      Ren, Kornblith, Liao, Hinton, Scaling Forward Gradient With Local
      Losses (2022), Section 3, https://arxiv.org/abs/2210.03310.
    """
    _check_guessing(num_guesses, "joint", False, normalize)
    if not isinstance(exact_heads, bool):
        raise TypeError(f"exact_heads must be True or False, got {exact_heads!r}.")
    problem = Problem(model, loss_fn, inputs, trainable, need_sites=exact_heads)
    setup = exact_loss(problem, analyse=True)

    def estimate(params, batch, key):
        loss, train, structure = setup(params, batch, key)
        leaves, treedef = jax.tree.flatten(train.part)
        reached = trainable_losses_reached(structure)
        owners = [o for o, m in zip(structure.owners, structure.trainable) if m]
        head = [
            exact_heads and all(o.startswith("loss:") for o in own) for own in owners
        ]
        perturbed = [leaf for leaf, h in zip(leaves, head) if not h]
        heads = [leaf for leaf, h in zip(leaves, head) if h]
        reached = [r for r, h in zip(reached, head) if not h]
        flat, unravel = ravel_pytree(perturbed)
        names = list(structure.losses)
        sizes = [leaf.size for leaf in perturbed]
        live = np.repeat([bool(r) for r in reached], sizes)

        def merged(perturbed, heads):
            it_p, it_h = iter(perturbed), iter(heads)
            return treedef.unflatten([next(it_h if h else it_p) for h in head])

        def one_estimate(guess_key):
            v = jax.random.normal(guess_key, flat.shape, flat.dtype)
            if normalize:
                v = v * jnp.sqrt(v.size) / jnp.linalg.norm(v)
            if not heads:  # one JVP: no residuals to keep
                (_, metrics), (derivative, per_loss) = jax.jvp(
                    lambda p: loss(merged(p, [])), (perturbed,), (unravel(v),)
                )
                head_grads = []
            else:
                # One linearisation serves both: the tangent along v, and the
                # heads' exact gradient by transposing it along the heads
                # only. (A gradient over the heads inside the JVP computes
                # the same, but XLA then keeps every head's input alive
                # until the tangent pass ends: +63 MB on LocalMixer M/8/16.)
                (_, metrics), linear = jax.linearize(
                    lambda p, h: loss(merged(p, h)), perturbed, heads
                )
                derivative, per_loss = linear(unravel(v), optax.tree.zeros_like(heads))
                (head_grads,) = jax.linear_transpose(
                    lambda h: linear(optax.tree.zeros_like(perturbed), h)[0], heads
                )(jnp.ones_like(derivative))
            if len(names) == 1 or not sizes:
                return derivative * v, head_grads, metrics
            # Each leaf's share, as one flat scale (slicing v per leaf and
            # concatenating would let XLA regenerate v once per leaf).
            scale = jnp.concatenate(
                [
                    jnp.broadcast_to(
                        sum(per_loss[f"loss/{n}"] for n in r) if r else 0.0,
                        (size,),
                    ).astype(v.dtype)
                    for r, size in zip(reached, sizes)
                ]
            )
            return jnp.where(live, scale * v, 0.0), head_grads, metrics

        estimates, head_grads, metrics = map_guesses(one_estimate, key, num_guesses)
        grads = merged(unravel(jnp.mean(estimates, axis=0)), [g[0] for g in head_grads])
        return train.full(grads), jax.tree.map(lambda m: m[0], metrics)

    return _finish(estimate, has_aux, "directional")


ORACLE_SCALES = ("gradient", "directional")


@nnx_bridge.estimator_factory
@_documented
def oracle_angle(
    model,
    *,
    cosine: float = 0.03,
    scale: str = "gradient",
    loss_fn: Callable | None = None,
    inputs: Callable | None = None,
    trainable=None,
    has_aux: bool = False,
) -> Estimator:
    """Oracle control: a guess at a fixed angle to the true gradient (reads ``jax.grad``).

    ``g_theta = cos(theta) g + sin(theta) g_perp`` with ``cos(theta) =
    cosine`` and ``g_perp`` a random direction orthogonal to the gradient
    ``g`` with ``|g_perp| = |g|``: exactly the given cosine with ``g`` and
    no bias in direction. With several losses the angle is set per stage
    (the parameters that reach the same losses get their own ``g_perp``), so
    each stage's estimate has the given cosine with its own gradient.

    Args:
      model: any Flax linen module.
      cosine: ``cos(theta)``, in [-1, 1].
      scale: ``"gradient"``: the estimate is ``g_theta`` (``E = cosine *
        g``); ``"directional"``: the modified directional step ``(g . u) u``
        along the unit guess ``u = g_theta / |g|``, i.e. ``cosine * g_theta``
        (``E = cosine^2 g``), what a directional derivative along a guess at
        that angle gives (the paper's Figure 3, right).
    {problem_args}

    {returns}

    References:
      Singhal, Cheung, Chandra et al., How to Guess a Gradient (2023),
      Section 3 and Figure 3, https://arxiv.org/abs/2312.04709.
    """
    if not -1.0 <= float(cosine) <= 1.0:
        raise ValueError(f"cosine must lie in [-1, 1]; got {cosine!r}.")
    if scale not in ORACLE_SCALES:
        raise ValueError(
            f"scale must be one of {', '.join(ORACLE_SCALES)}; got {scale!r}."
        )
    setup = exact_loss(
        Problem(model, loss_fn, inputs, trainable, need_sites=False), analyse=True
    )

    def estimate(params, batch, key):
        loss, train, structure = setup(params, batch, None)
        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(train.part)
        g, unravel = ravel_pytree(grads)
        r = jax.random.normal(key, g.shape, g.dtype)
        sine = jnp.sqrt(1.0 - jnp.asarray(cosine, g.dtype) ** 2)
        stages = _stages(structure, grads)
        if len(stages) == 1:
            perp = _perpendicular(g, r)
        else:
            perp = sum(
                _perpendicular(jnp.where(stage, g, 0), jnp.where(stage, r, 0))
                for stage in stages
            )
        guess = cosine * g + sine * perp
        if scale == "directional":
            guess = cosine * guess
        return train.full(unravel(guess)), metrics

    return _finish(estimate, has_aux, "oracle_angle")


# --- activation space -------------------------------------------------------------


@nnx_bridge.estimator_factory
@_documented
def activation_perturbation(
    model,
    *,
    mask: bool = False,
    num_guesses: int = 1,
    normalize: bool = True,
    mode: str = DEFAULT_MODE,
    lean: bool = False,
    loss_fn: Callable | None = None,
    inputs: Callable | None = None,
    trainable=None,
    has_aux: bool = False,
) -> Estimator:
    """Activity perturbation: ``y_{l,b} = eps ~ N(0, I)`` at every site.

    Unbiased: ``Cov(y) = I``, so ``E[g_l] = dl/ds_l`` (normalised, ``Cov =
    I`` still, by symmetry). ``mask=True``: ``y = D_l eps``, the guess
    through the site's activation derivative (the ReLU mask) after any
    normalisation, Ren et al.'s update: the derivative is the same (the
    loss sees the site through its activation), the estimate is zero where
    the unit is inactive; still unbiased, less variance.

    Args:
      model: a Flax linen module with sites (:func:`guessgrad.site`).
      mask: multiply each guess by ``D_l`` (``sigma'(s_l)``).
    {guessing_args}
    {problem_args}

    {returns}

    References:
      Ren, Kornblith, Liao, Hinton, Scaling Forward Gradient With Local
      Losses (2022), Section 3 (activity perturbation),
      https://arxiv.org/abs/2210.03310.
    """
    if not isinstance(mask, bool):
        raise TypeError(f"mask must be True or False; got {mask!r}.")
    rule = rules_lib.GuessRule(rules_lib.gaussian, lookahead=0, mask_after=mask)
    return _rule_estimator(
        "activation_perturbation",
        model,
        rule,
        num_guesses,
        normalize,
        mode,
        lean,
        loss_fn,
        inputs,
        trainable,
        has_aux,
    )


@nnx_bridge.estimator_factory
@_documented
def wt(
    model,
    *,
    num_guesses: int = 1,
    normalize: bool = True,
    mode: str = DEFAULT_MODE,
    lean: bool = False,
    loss_fn: Callable | None = None,
    inputs: Callable | None = None,
    trainable=None,
    has_aux: bool = False,
) -> Estimator:
    """W^T: ``y_{l,b} = D_{l,b} W_{l+1}^T eps``, ``eps ~ N(0, I)`` at the next site.

    For any layer between a site and its target, ``W_{l+1}^T eps`` is the
    VJP of the map from ``s_l`` to the target. ``Cov(y) = D W^T W D``, so
    ``E[g_l] = D_l W_{l+1}^T W_{l+1} D_l dl/ds_l``: biased towards the top
    singular directions of ``W_{l+1} D_l``, where the gradient
    ``D_l W_{l+1}^T dl/ds_{l+1}`` lives. Terminal sites: ``eps``.

    Args:
      model: a Flax linen module with sites (:func:`guessgrad.site`).
    {guessing_args}
    {problem_args}

    {returns}

    References:
      Singhal, Cheung, Chandra et al., How to Guess a Gradient (2023),
      Section 2.1, https://arxiv.org/abs/2312.04709.
    """
    return _rule_estimator(
        "wt",
        model,
        rules_lib.GuessRule(rules_lib.wt),
        num_guesses,
        normalize,
        mode,
        lean,
        loss_fn,
        inputs,
        trainable,
        has_aux,
    )


@nnx_bridge.estimator_factory
@_documented
def downstream(
    model,
    *,
    depth: int = 1,
    num_guesses: int = 1,
    normalize: bool = True,
    mode: str = DEFAULT_MODE,
    lean: bool = False,
    loss_fn: Callable | None = None,
    inputs: Callable | None = None,
    trainable=None,
    has_aux: bool = False,
) -> Estimator:
    """``depth`` layers downstream: ``eps`` at ``x_{l+1+depth}``, pulled back to ``s_l``.

    ``y_{l,b} = J_{l->l+depth}^T eps`` by the VJP of the layers between
    (the last target if past the end); ``depth=1``: ``D_l W_{l+1}^T
    D_{l+1} eps``. ``Cov(y) = J^T J``: biased, more so with depth.

    Args:
      model: a Flax linen module with sites (:func:`guessgrad.site`).
      depth: how many ``next`` links downstream ``eps`` is drawn (>= 1).
    {guessing_args}
    {problem_args}

    {returns}

    References:
      Singhal, Cheung, Chandra et al., How to Guess a Gradient (2023),
      Section 2.1, https://arxiv.org/abs/2312.04709.
    """
    check_positive_int("depth", depth)
    rule = rules_lib.GuessRule(rules_lib.downstream(depth), lookahead=depth)
    return _rule_estimator(
        "downstream",
        model,
        rule,
        num_guesses,
        normalize,
        mode,
        lean,
        loss_fn,
        inputs,
        trainable,
        has_aux,
    )


@nnx_bridge.estimator_factory
@_documented
def mixing(
    model,
    *,
    num_guesses: int = 1,
    normalize: bool = True,
    mode: str = DEFAULT_MODE,
    lean: bool = False,
    loss_fn: Callable | None = None,
    inputs: Callable | None = None,
    trainable=None,
    has_aux: bool = False,
) -> Estimator:
    """Activation mixing: ``y_{l,b} = D_{l,b} sum_j alpha_{bj} x_{l+1,j}``, ``alpha ~ N(0, 1)^{B x B}``.

    A random combination of the batch's activations after site ``l``
    (fresh ``alpha`` per site), masked by the example's ``D_l``. ``Cov(y) =
    D (sum_j x_j x_j^T) D``, the activations' second moment: biased towards
    the subspace the activations span, which the gradients share.

    Args:
      model: a Flax linen module with sites (:func:`guessgrad.site`).
    {guessing_args}
    {problem_args}

    {returns}

    References:
      Singhal, Cheung, Chandra et al., How to Guess a Gradient (2023),
      Section 2.2, https://arxiv.org/abs/2312.04709.
    """
    rule = rules_lib.GuessRule(rules_lib.mixing, lookahead=0)
    return _rule_estimator(
        "mixing",
        model,
        rule,
        num_guesses,
        normalize,
        mode,
        lean,
        loss_fn,
        inputs,
        trainable,
        has_aux,
    )


@nnx_bridge.estimator_factory
@_documented
def wperp(
    model,
    *,
    rank: int = 10,
    num_guesses: int = 1,
    normalize: bool = True,
    mode: str = DEFAULT_MODE,
    lean: bool = False,
    loss_fn: Callable | None = None,
    inputs: Callable | None = None,
    trainable=None,
    has_aux: bool = False,
) -> Estimator:
    """W-perp: ``y_{l,b} = V_k z``, ``V_k`` the top-``rank`` right singular vectors of ``J_b = W_{l+1} D_{l,b}``.

    ``z ~ N(0, I_k)``, ``J_b`` the per-example Jacobian of the map to the
    next site, by an exact SVD (float32 or float64 sites). ``Cov(y) = V_k
    V_k^T``, a rank-k projector: the bias is ``-(I - P_k) dl/ds_l`` only
    (directions with zero singular value get no weight).

    Args:
      model: a Flax linen module with sites (:func:`guessgrad.site`).
      rank: k, the subspace's dimension.
    {guessing_args}
    {problem_args}

    {returns}

    References:
      Wang, Markou, Campbell, Towards Scalable Backpropagation-Free Gradient
      Estimation (2025), https://arxiv.org/abs/2511.03110.
    """
    check_positive_int("rank", rank)
    return _rule_estimator(
        "wperp",
        model,
        rules_lib.GuessRule(wperp_lib.wperp(rank)),
        num_guesses,
        normalize,
        mode,
        lean,
        loss_fn,
        inputs,
        trainable,
        has_aux,
    )


@nnx_bridge.estimator_factory
@_documented
def wperp_ns(
    model,
    *,
    rank: int = 10,
    variant: str = "krylov",
    krylov_steps: int | None = None,
    block_size: int = wperp_lib.KRYLOV_BLOCK,
    degree: int = wperp_lib.FILTER_DEGREE,
    cutoff: float = 1.0,
    subspace: int | None = None,
    warmup: int = wperp_lib.WARMUP_ITERATIONS,
    num_guesses: int = 1,
    normalize: bool = True,
    mode: str = DEFAULT_MODE,
    lean: bool = False,
    loss_fn: Callable | None = None,
    inputs: Callable | None = None,
    trainable=None,
    has_aux: bool = False,
) -> Estimator:
    """W-perp without an SVD: guesses in the top right singular subspace of ``J_b = W_{l+1} D_{l,b}``.

    Products with ``J_b`` and ``J_b^T`` only (JVPs and VJPs of the next map).

    * ``variant="krylov"`` (default, faithful): per example, a block Krylov
      space ``[Y, A Y, ..., A^d Y]`` of ``A = J_b^T J_b``, ``Y = J_b^T
      Omega`` (``block_size`` Gaussian columns, ``d = krylov_steps``), and
      Rayleigh-Ritz give ``V_k``; ``y = V_k z``, ``z ~ N(0, I_k)``:
      covariance a rank-k projector, as exact W-perp's. Cost ``block_size
      * (2 d + 2)`` products the size of ``W^T eps`` (60 at rank 10).
    * ``variant="vector"`` (cheaper, not W-perp's covariance): ``y =
      p(J_b^T J_b) J_b^T eps``, ``p`` a degree-``degree`` Chebyshev filter
      whose band edge adapts to each example; piles the guess onto the very
      top directions. ``1 + 2 degree`` products; ``rank`` unused.
    * ``variant="warm"`` (stateful): the Krylov space grows from ``A S``,
      ``S`` a basis of ``subspace`` directions per site that the estimator
      carries from step to step, refined each step by one step of subspace
      iteration with the batch's mean ``A`` (no extra product). The
      estimator is then ``(params, batch, key, state) -> (grads, state)``
      with ``init(params, batch)``; :func:`guessgrad.make_train_step`
      threads the state and the runner saves it in its checkpoints. Cost
      ``subspace * (2 d + 3)`` products (``d = krylov_steps``, default 0).

    Args:
      model: a Flax linen module with sites (:func:`guessgrad.site`).
      rank: k, the subspace's dimension (Krylov).
      variant: ``"krylov"``, ``"vector"`` or ``"warm"``.
      krylov_steps: d, the Krylov space's steps. Default: enough for
        ``max(3 rank, 16)`` dimensions (14 at rank 10, 7 at ranks up to 5),
        where the mean direction's cosine with exact W-perp's exceeds 0.999;
        0 for the warm variant (its space is ``A S`` alone).
      block_size: Gaussian start vectors of the Krylov space.
      degree: the vector variant's filter degree.
      cutoff: the vector variant's band edge as a fraction of the largest
        eigenvalue seen, in [0, 1] (0: the power filter ``A^degree``).
      subspace: the warm variant's shared basis size P (at least ``rank``;
        default ``rank + 3``, where the mean estimate's cosine with exact
        W-perp's was 0.997 at ranks 3 and 10 on a trained 3x256 MLP).
      warmup: the warm variant's subspace-iteration steps in ``init``.
    {guessing_args}
    {problem_args}

    {returns}

    References:
      Wang, Markou, Campbell, Towards Scalable Backpropagation-Free Gradient
      Estimation (2025), https://arxiv.org/abs/2511.03110 (W-perp-NS).
    """
    check_positive_int("rank", rank)
    check_positive_int("block_size", block_size)
    check_positive_int("degree", degree)
    guess = wperp_lib.wperp_ns(
        rank,
        variant=variant,
        krylov_steps=krylov_steps,
        block_size=block_size,
        degree=degree,
        cutoff=cutoff,
        subspace=subspace,
        warmup=warmup,
    )
    return _rule_estimator(
        "wperp_ns",
        model,
        rules_lib.as_rule(guess),
        num_guesses,
        normalize,
        mode,
        lean,
        loss_fn,
        inputs,
        trainable,
        has_aux,
    )


@nnx_bridge.estimator_factory
@_documented
def self_sharpening(
    model,
    *,
    num_guesses: int = 1,
    normalize: bool = True,
    mode: str = DEFAULT_MODE,
    lean: bool = False,
    loss_fn: Callable | None = None,
    inputs: Callable | None = None,
    trainable=None,
    has_aux: bool = False,
) -> Estimator:
    """1-layer downstream with ``eps ~ U(-1, 1)``; the terminal sites' guess is the true error.

    ``y_{l,b} = D_l W_{l+1}^T D_{l+1} eps`` at hidden sites and ``dl_b/ds_L``
    (``softmax - onehot`` at the logits) at terminal ones: the one method
    whose guess reads the label. Biased (``Cov = J^T J / 3``); trained with
    plain Adam its weights' effective rank collapses and the guesses sharpen
    (pairs with :func:`guessgrad.stable_adamw`).

    Args:
      model: a Flax linen module with sites (:func:`guessgrad.site`).
    {guessing_args}
    {problem_args}

    {returns}

    References:
      Singhal, Cheung, Chandra et al., How to Guess a Gradient (2023),
      Section 3 (self-sharpening), https://arxiv.org/abs/2312.04709.
    """
    rule = rules_lib.GuessRule(
        rules_lib.downstream(1, noise="uniform"),
        terminal=rules_lib.true_error,
        needs_label=True,
    )
    return _rule_estimator(
        "self_sharpening",
        model,
        rule,
        num_guesses,
        normalize,
        mode,
        lean,
        loss_fn,
        inputs,
        trainable,
        has_aux,
    )


# --- helpers of the weight-space estimators (oracle_angle, directional) ----------


def _perpendicular(g: Array, r: Array) -> Array:
    """``r`` made orthogonal to ``g`` and scaled to ``|g|``."""
    g_norm = jnp.linalg.norm(g)
    unit = g / jnp.where(g_norm > 0, g_norm, 1.0)
    r = r - jnp.dot(r, unit) * unit
    return r / jnp.maximum(jnp.linalg.norm(r), jnp.finfo(g.dtype).tiny) * g_norm


def _stages(structure, trainable_grads) -> list:
    """Per set of losses reached, a mask over the raveled trainable leaves (numpy, static)."""
    reached = trainable_losses_reached(structure)
    sizes = [x.size for x in jax.tree.leaves(trainable_grads)]
    groups = sorted(set(reached))
    if len(groups) == 1:
        return [None]
    ids = np.repeat([groups.index(r) for r in reached], sizes)
    return [ids == k for k in range(len(groups))]


# --- the estimators by name --------------------------------------------------------

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
"""The estimators by name (the command line's ``--method``): each a function of this module."""

# Arguments every estimator takes that describe the problem or the call, not the method.
PROBLEM_OPTIONS = ("loss_fn", "inputs", "trainable", "has_aux")


def estimator_options(name: str) -> dict[str, object]:
    """The method's keyword options of estimator ``name`` and their defaults.

    The arguments every estimator takes (``loss_fn``, ``inputs``,
    ``trainable``, ``has_aux``) are not listed.
    """
    parameters = inspect.signature(_lookup(name)).parameters.values()
    return {
        p.name: p.default
        for p in parameters
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in PROBLEM_OPTIONS
    }


def _lookup(name: str) -> Callable[..., Estimator]:
    if name not in ESTIMATORS:
        raise ValueError(
            f"Unknown estimator {name!r}; valid names: {', '.join(ESTIMATORS)}."
        )
    return ESTIMATORS[name]


def get_estimator(
    name: str,
    model,
    *,
    loss_fn: Callable | None = None,
    inputs: Callable | None = None,
    trainable=None,
    has_aux: bool = False,
    **options,
) -> Estimator:
    """Estimator ``name`` for ``model``: ``ESTIMATORS[name](model, **options)``, checked.

    For code that chooses the method by name (a command line, a sweep).
    Unknown names or options raise a ValueError listing the valid ones
    (:func:`estimator_options`). Arguments and result as the estimator's
    own function, e.g. :func:`guessgrad.estimators.wt`.
    """
    factory = _lookup(name)
    valid = estimator_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listing = ", ".join(f"{k}={v!r}" for k, v in valid.items()) or "none"
        raise ValueError(
            f"Unknown option(s) {unknown} for estimator {name!r}; valid options: {listing}."
        )
    return factory(
        model,
        loss_fn=loss_fn,
        inputs=inputs,
        trainable=trainable,
        has_aux=has_aux,
        **options,
    )


def build_estimator(
    name: str, model, *, loss_fn=None, inputs=None, trainable=None, **options
) -> Estimator:
    """``get_estimator(..., has_aux=True)``: kept for one release; use ``has_aux=True``."""
    return get_estimator(
        name,
        model,
        loss_fn=loss_fn,
        inputs=inputs,
        trainable=trainable,
        has_aux=True,
        **options,
    )


# --- what the engine sees of a model ----------------------------------------------


@nnx_bridge.inspector
def structure(
    model, params: Params, batch: Batch, *, loss_fn=None, inputs=None, trainable=None
) -> sites_lib.Structure:
    """The model's site structure: sites in forward order, their targets and losses,
    and the site or loss that updates each parameter. ``print`` it for a table."""
    problem = Problem(model, loss_fn, inputs, trainable)
    with mesh_of((params, batch)):
        return problem.prepare(params, batch, jax.random.key(0))[3]


def print_structure(
    model, params: Params, batch: Batch, **kwargs
) -> sites_lib.Structure:
    """Prints :func:`structure` as a table (what is guessed, what gets an exact gradient)."""
    found = structure(model, params, batch, **kwargs)
    print(found.table())
    return found


@nnx_bridge.inspector
@on_mesh_of_arguments
def site_values(
    model,
    params: Params,
    batch: Batch,
    *,
    inputs: Callable | None = None,
    key: PRNGKey | None = None,
) -> dict[str, Array]:
    """``{site: s_l}``: every site's value ([B, ...], before its activation), in forward order.

    Taps (:func:`guessgrad.tap`) are included under their names. ``key``:
    the estimator's key, to see the values under its dropout masks
    (:func:`guessgrad.model_rngs`); None runs the model deterministically.
    """
    problem = Problem(model, None, inputs, need_sites=False)
    variables = sites_lib.split_variables(params)
    args = sites_lib.as_args(problem.inputs(batch))
    rngs = None if key is None else model_rngs(key)
    problem.check_input(variables, args, rngs)
    _, raw, taps = sites_lib.run(model, variables, args, rngs=rngs)
    return {**raw, **taps}


@nnx_bridge.inspector
@on_mesh_of_arguments
def site_gradients(
    model,
    params: Params,
    batch: Batch,
    *,
    loss_fn: Callable | None = None,
    inputs: Callable | None = None,
    key: PRNGKey | None = None,
) -> dict[str, Array]:
    """``{site: dl_b/ds_{l,b}}``: the exact per-example gradient at every site (reverse mode).

    What every guess is measured against: ``l_b`` is the example's
    objective (the sum over losses of each loss's mean over its copies), and
    the parameter gradient of the batch loss is each site's local VJP of
    these over ``B``. Arguments as the estimators'; ``key`` as in
    :func:`site_values`.
    """
    problem = Problem(model, loss_fn, inputs)
    variables, args, rngs, found, _ = problem.prepare(params, batch, key)
    return engine.exact_site_gradients(
        model, variables, args, batch, problem.loss_fn, rngs, found
    )


@nnx_bridge.inspector
@on_mesh_of_arguments
def directional_derivatives(
    model,
    params: Params,
    batch: Batch,
    tangents,
    *,
    mode: str = "joint",
    loss_fn=None,
    inputs=None,
) -> Array:
    """Directional derivatives of the per-example losses along site tangents.

    ``tangents`` holds one tangent per site, in forward order (or a dict from
    site name to tangent), each with the shape of its site ([B, ...]).
    Returns ``d_b = sum_l <dl_b/ds_l, tangents[l]_b>`` ([B]) in ``joint``
    mode, or the stacked ``d_{l,b}`` ([L, B]) in ``per_layer`` mode, where
    ``l_b`` is the sum over losses of each loss's mean over its copies.
    """
    _check_guessing(1, mode, False, False)
    problem = Problem(model, loss_fn, inputs)
    variables, args, rngs, found, _ = problem.prepare(params, batch, None)
    paths = [s.path for s in found.sites]
    if not isinstance(tangents, dict):
        if len(tangents) != len(paths):
            raise ValueError(
                f"Need one tangent per site ({len(paths)}); got {len(tangents)}."
            )
        tangents = dict(zip(paths, tangents))
    unknown = sorted(set(tangents) - set(paths))
    if unknown:
        raise ValueError(f"No sites named {unknown}; the sites are {paths}.")
    _, _, ctx = engine.linearize(
        model,
        variables,
        args,
        batch,
        problem.loss_fn,
        rngs,
        found,
        list(tangents),
        recompute=engine.recomputes(mode, len(tangents)),
    )
    out = engine.derivatives(ctx, tangents, mode)
    return out if mode == "joint" else jnp.stack([out[p] for p in tangents])


@nnx_bridge.inspector
def guess_context(
    model,
    params: Params,
    batch: Batch,
    *,
    needs_label: bool = False,
    loss_fn: Callable | None = None,
    inputs: Callable | None = None,
    trainable=None,
    key: PRNGKey | None = None,
) -> rules_lib.GuessContext:
    """The :class:`~guessgrad.rules.GuessContext` a rule reads on this batch.

    The engine's context for the sites that update a trainable parameter,
    from one linearisation of the forward pass: call a rule on it
    (``rule(ctx, site, key)``) or use its maps (``ctx.next_maps(site)``,
    ``ctx.next_jacobian(site)``) to study a guess. ``needs_label`` lets
    ``ctx.loss_gradient`` read the loss; ``key`` as in :func:`site_values`.
    Call it under the mesh of sharded arguments (``jax.set_mesh``) or with
    unsharded ones.
    """
    problem = Problem(model, loss_fn, inputs, trainable)
    variables, args, rngs, found, _ = problem.prepare(params, batch, key)
    _, _, ctx = engine.linearize(
        model,
        variables,
        args,
        batch,
        problem.loss_fn,
        rngs,
        found,
        [s.path for s in found.active],
        needs_label,
    )
    return ctx


@on_mesh_of_arguments
def site_guesses(
    rule: rules_lib.GuessRule | rules_lib.GuessFn,
    model,
    params: Params,
    batch: Batch,
    key: PRNGKey,
    *,
    normalize: bool = False,
    loss_fn: Callable | None = None,
    inputs: Callable | None = None,
    trainable=None,
) -> dict[str, Array]:
    """``{site: y_l}``: the guesses ``rule`` makes at ``key`` on this batch (one guess).

    Exactly the guesses an estimator built by :func:`from_rule` with the
    same options draws for a one-guess estimate at ``key``: for inspecting a
    rule (its covariance, its cosine with :func:`site_gradients`) without
    writing the context by hand.
    """
    rule = rules_lib.as_rule(rule)
    ctx = guess_context(
        model,
        params,
        batch,
        needs_label=rule.needs_label,
        loss_fn=loss_fn,
        inputs=inputs,
        trainable=trainable,
        key=key,
    )
    return {
        s.path: rules_lib.site_guess(rule, ctx, s.index, key, normalize)
        for s in ctx.structure.active
    }
