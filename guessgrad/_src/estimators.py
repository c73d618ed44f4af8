"""Gradient estimators, built by name from a model and keyword-only options.

Every estimator is a pure function ``(params, batch, key) -> grads`` with the
tree structure, shapes and dtypes of ``params``. :func:`build_estimator`
returns the same function with a second output, the auxiliary metrics its
forward pass computed anyway (the batch loss and accuracy).
"""

from __future__ import annotations

import collections
import inspect
import re
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from guessgrad._src import core, engine
from guessgrad._src import guesses as rules
from guessgrad._src import sites as sites_lib
from guessgrad._src.base import Array, Batch, EstimateFn, Estimator, Params, PRNGKey
from guessgrad._src.models import Chain, chain_fns
from guessgrad._src.sharding import (
    abstract_sharding,
    explicit_spec,
    mesh_of,
    on_mesh_of_arguments,
)

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


DROPOUT_SALT = 0x64726F70  # the model's "dropout" rng: fold_in(key, this)


def model_rngs(key: PRNGKey) -> dict[str, PRNGKey]:
    """The rngs an estimator called with ``key`` runs the model with: ``{"dropout": ...}``.

    Every forward pass of one estimate uses them, so ``model.apply(params, x,
    rngs=guessgrad.model_rngs(key))`` reproduces its dropout masks (for
    ``jax.grad`` of the same objective, or to inspect them). The guesses draw
    from ``key`` itself, independently of these.
    """
    return {"dropout": jax.random.fold_in(key, DROPOUT_SALT)}


def default_loss(outputs: Array, batch: Batch) -> Array:
    """Softmax cross-entropy of ``outputs`` against integer ``batch["label"]``: [B]."""
    return core.per_example_loss(outputs, batch["label"])


def default_inputs(batch: Batch) -> Array:
    """``batch["image"]``."""
    return batch["image"]


class Problem:
    """A model with its loss, inputs and trainable subset, as every estimator reads them.

    ``prepare`` checks a call's arguments and returns what the estimators
    need; the model's site structure is analysed once per input signature
    (abstractly) and cached.
    """

    def __init__(
        self, model, loss_fn=None, inputs=None, trainable=None, need_sites=True
    ):
        if not hasattr(model, "apply"):
            raise TypeError(
                f"Estimators need a Flax linen module with sites marked inside "
                f"(guessgrad.site) or a guessgrad.mark_outputs(...) model; got "
                f"{type(model).__name__}."
            )
        for name, fn in (("loss_fn", loss_fn), ("inputs", inputs)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable; got {fn!r}.")
        if trainable is not None and not (
            callable(trainable) or jax.tree.leaves(trainable)
        ):
            raise ValueError(
                f"trainable must be a pytree of bools or a callable; got {trainable!r}."
            )
        self.model = model
        self.default_loss = loss_fn is None
        self.default_inputs = inputs is None
        self.loss_fn = default_loss if loss_fn is None else loss_fn
        self.inputs = default_inputs if inputs is None else inputs
        self.trainable = trainable
        self.need_sites = need_sites  # False: weight-space methods take any model

    def check_batch(self, batch: Batch) -> None:
        if self.default_loss:
            core.validate_batch(batch)
        elif self.default_inputs:
            core.validate_batch(batch, need_label=False)

    def losses(self, outputs, batch) -> dict[str, Array]:
        return sites_lib.normalize_losses(self.loss_fn(outputs, batch))

    def prepare(self, params: Params, batch: Batch, key, *, analyse: bool = True):
        """``(variables, args, rngs, structure or None, Trainable)`` for one call."""
        self.check_batch(batch)
        variables = sites_lib.split_variables(params)
        args = sites_lib.as_args(self.inputs(batch))
        rngs = None if key is None else model_rngs(key)
        mask = sites_lib.leaf_mask(self.trainable, variables)
        self.check_input(variables, args, rngs)
        structure = (
            self.structure(variables, args, batch, rngs, mask) if analyse else None
        )
        return variables, args, rngs, structure, engine.Trainable(variables, mask)

    def check_input(self, variables, args, rngs) -> None:
        """Applies the model abstractly to ``args`` (cached per signature); raises what went wrong.

        An input shape the parameters do not fit, or a variable collection the
        model would update, is a ValueError saying so; any other error is
        re-raised as it is, with a note naming the call.
        """
        signature = (
            self.model,
            _signature((variables, args)),
            rngs is None,
        )
        if _CHECKED_INPUTS.get(signature):
            return
        shapes = jax.tree.map(jnp.shape, args)
        where = (
            f'batch["image"] of shape {shapes[0]}'
            if self.default_inputs
            else f"inputs(batch) of shapes {shapes}"
        )
        try:
            jax.eval_shape(
                lambda v, a: self.model.apply(v, *a, rngs=_abstract_rngs(rngs)),
                _abstract(variables),
                _abstract(args),
            )
        except flax.errors.ScopeParamShapeError as err:
            raise ValueError(
                f"The model with these params does not accept {where}: "
                f"{_first_line(err)}"
            ) from err
        except flax.errors.ModifyScopeVariableError as err:
            found = re.search(r'collection "([^"]+)"', str(err))
            collection = repr(found.group(1)) if found else "a variable collection"
            raise ValueError(
                f"The model updates {collection} while it runs ({_first_line(err)}). "
                f"Estimators run it with its variables fixed: "
                f"collections other than 'params' are read-only constants (BatchNorm with "
                f"use_running_average=True, any lookup table). A layer that mutates its "
                f"state during training, such as BatchNorm(use_running_average=False), "
                f"mixes the examples of a batch, which per-example derivatives cannot "
                f"account for: use a per-example normalisation (nn.LayerNorm, "
                f"nn.GroupNorm, nn.RMSNorm) or the running averages."
            ) from err
        except Exception as err:
            err.add_note(
                f"guessgrad: raised while applying {type(_unwrap(self.model)).__name__} "
                f"to {where} with the given params (collections {sorted(variables)})."
            )
            raise
        _CHECKED_INPUTS.put(signature, True)

    def structure(self, variables, args, batch, rngs, mask) -> sites_lib.Structure:
        """The model's :class:`~guessgrad.Structure`, analysed once per model, loss, inputs and signature.

        The cache is shared by every estimator of the same model (equal linen
        modules, the same ``loss_fn`` and ``inputs`` functions), so building
        several estimators traces the model's structure once.
        """
        signature = (
            self.model,
            self.loss_fn,
            self.inputs,
            self.need_sites,
            _signature((variables, args, batch)),
            mask,
            rngs is None,
        )
        found = _STRUCTURES.get(signature)
        if found is None:
            found = sites_lib.analyse(
                self.model,
                _abstract(variables),
                _abstract(args),
                self.loss_fn,
                _abstract(batch),
                _abstract_rngs(rngs),
                mask,
                self.need_sites,
            )
            _STRUCTURES.put(signature, found)
        return found

    def metrics(self, outputs, batch, losses: dict[str, Array]) -> dict[str, Array]:
        out = {"loss": sum(jnp.mean(v) for v in losses.values())}
        if len(losses) > 1:
            out.update({f"loss/{k}": jnp.mean(v) for k, v in losses.items()})
        if self.default_loss:
            out["accuracy"] = core.accuracy(outputs, batch["label"])
        return out


class _Cache:
    """A small least-recently-used map (analyses hold no arrays, only shapes and names).

    Keys hold the model itself: equal linen modules (same class and fields)
    share an entry, other models count by identity, and a key that cannot
    be hashed is simply not cached.
    """

    def __init__(self, size: int):
        self.size = size
        self.entries: collections.OrderedDict = collections.OrderedDict()

    def get(self, key):
        try:
            hash(key)
        except TypeError:
            return None
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        return None

    def put(self, key, value) -> None:
        try:
            hash(key)
        except TypeError:
            return
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


_STRUCTURES = _Cache(128)
_CHECKED_INPUTS = _Cache(512)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _unwrap(model):
    return getattr(model, "model", model)  # a MarkedModel's wrapped module


def _abstract(tree):
    def one(x):
        if _is_key(x):
            return x
        return jax.ShapeDtypeStruct(
            jnp.shape(x),
            jnp.result_type(x),
            sharding=abstract_sharding(explicit_spec(x)),
        )

    return jax.tree.map(one, tree)


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _abstract_rngs(rngs):
    # Random draws do not change shapes or dependencies: any fixed key serves the analysis.
    return None if rngs is None else {k: jax.random.key(0) for k in rngs}


def _signature(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(
        (jnp.shape(x), str(jnp.result_type(x)), str(explicit_spec(x))) for x in leaves
    )


def activation_space(
    model,
    rule: rules.GuessRule,
    *,
    num_guesses: int = 1,
    normalize: bool = True,
    mode: str = DEFAULT_MODE,
    lean: bool = False,
    loss_fn=None,
    inputs=None,
    trainable=None,
) -> Estimator:
    """The forward-gradient recipe in activation space, for any guess rule and model.

    For each guessed site ``l`` and example ``b``: guess ``y_{l,b}``
    (optionally rescaled to norm ``sqrt(n_l)``), measure directional
    derivatives by forward mode, set ``g_{l,b} = d y_{l,b}`` and map it to the
    parameters by the site's own local VJP. ``num_guesses`` independent
    estimates are averaged (vmapped). In expectation ``E[g_l] = Cov(y_l)
    dl/ds_l`` (exactly in ``per_layer`` mode; in ``joint`` mode when guesses
    of different sites are independent and zero-mean). Only sites that update
    a trainable parameter are guessed.

    ``lean=True`` (joint mode, :class:`~guessgrad.models.Chain` models, whose
    sites declare their own maps) keeps no per-layer activations: one forward
    pass computes primal and tangent together, then a second recomputes the
    forward layer by layer and regenerates the same guesses from the same keys
    to form the updates. Same estimate, memory nearly flat in depth, about one
    extra forward pass of time.
    """
    _check_common(num_guesses, mode, lean)
    problem = Problem(model, loss_fn, inputs, trainable)
    if lean:
        return _lean(problem, rule, num_guesses, normalize)

    def estimate(params: Params, batch: Batch, key: PRNGKey):
        variables, args, rngs, structure, train = problem.prepare(params, batch, key)
        active = structure.active
        _, _, ctx = engine.linearize(
            model,
            variables,
            args,
            batch,
            problem.loss_fn,
            rngs,
            structure,
            [s.path for s in active],
            rule.needs_label,
            recompute=engine.recomputes(mode, len(active)),
        )

        def one_estimate(guess_key):
            guesses = {
                s.path: rules.site_guess(rule, ctx, s.index, guess_key, normalize)
                for s in active
            }
            return engine.site_gradients(ctx, guesses, mode)

        site_grads, (losses, outputs) = jax.vmap(one_estimate)(
            guess_keys(key, num_guesses)
        )
        site_grads = {p: jnp.mean(g, axis=0) for p, g in site_grads.items()}
        losses, outputs = jax.tree.map(lambda x: x[0], (losses, outputs))
        grads = engine.local_parameter_grads(
            model, train, args, batch, problem.loss_fn, rngs, structure, site_grads
        )
        return grads, problem.metrics(outputs, batch, losses)

    return estimate


def _lean(problem: Problem, rule, num_guesses: int, normalize: bool) -> Estimator:
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
        layer_params = core.split_params(fns, variables)
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

        derivatives, losses, logits = jax.vmap(
            lambda k: core.lean_joint_derivative(
                fns, rule, layer_params, x0, labels, k, normalize, loss_of
            )
        )(keys)
        grads = core.lean_parameter_grads(
            fns, rule, layer_params, x0, labels, keys, derivatives, normalize, loss_of
        )
        grads = core.join_params(fns, grads)
        if train.mask is not None:
            grads = train.full(
                [g for g, m in zip(jax.tree.leaves(grads), train.mask) if m]
            )
        return grads, problem.metrics(logits[0], batch, {"loss": losses[0]})

    return estimate


def _exact(problem: Problem, *, analyse: bool = False):
    """``(params, batch, key) -> (loss_fn of the trainable part, Trainable[, Structure])``."""

    def setup(params, batch, key):
        _, args, rngs, structure, train = problem.prepare(
            params, batch, key, analyse=analyse
        )

        def loss_fn(part):
            outputs = problem.model.apply(train.rebuild(part), *args, rngs=rngs)
            metrics = problem.metrics(outputs, batch, problem.losses(outputs, batch))
            return metrics["loss"], metrics

        return (loss_fn, train, structure) if analyse else (loss_fn, train)

    return setup


def losses_reached(structure: sites_lib.Structure) -> tuple[tuple[str, ...], ...]:
    """Per parameter leaf, the losses it reaches: its sites' ``feeds``, or the loss it meets first."""
    feeds = {s.path: s.feeds for s in structure.sites}
    reached = []
    for owners in structure.owners:
        names: set[str] = set()
        for owner in owners:
            kind, name = owner.split(":", 1)
            names.update(feeds[name] if kind == "site" else (name,))
        reached.append(tuple(sorted(names)))
    return tuple(reached)


def trainable_losses_reached(structure: sites_lib.Structure) -> list[tuple[str, ...]]:
    """:func:`losses_reached` for the trainable leaves only, in their order."""
    return [r for r, m in zip(losses_reached(structure), structure.trainable) if m]


# --- the estimators (registry entries) -----------------------------------------


def backprop(model, *, loss_fn=None, inputs=None, trainable=None) -> Estimator:
    """The oracle: the exact gradient of the sum of the mean losses, by ``jax.grad`` through Flax."""
    setup = _exact(Problem(model, loss_fn, inputs, trainable))

    def estimate(params, batch, key):
        loss, train = setup(params, batch, key)
        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(train.part)
        return train.full(grads), metrics

    return estimate


def directional(
    model,
    *,
    num_guesses: int = 1,
    normalize: bool = False,
    loss_fn=None,
    inputs=None,
    trainable=None,
) -> Estimator:
    """Directional descent (weight perturbation): ``(grad L . v) v``, v ~ N(0, I) over the trainable parameters.

    One v per guess, shared by the whole batch; unbiased. ``normalize`` rescales
    v to norm ``sqrt(N)`` (uniform on the sphere: still unbiased). Frozen
    parameters are not perturbed (their estimate is exactly zero). With
    several losses (local losses) each parameter takes the derivative of only
    the losses it reaches (found from the graph, as :func:`guessgrad.structure`
    reports), ``sum_k (grad L_k . v) v``: still unbiased, without the other
    blocks' derivatives as noise (Ren et al.'s LG-FG-W, block-wise).
    """
    _check_common(num_guesses, "joint")
    problem = Problem(model, loss_fn, inputs, trainable, need_sites=False)
    setup = _exact(problem, analyse=True)

    def estimate(params, batch, key):
        loss, train, structure = setup(params, batch, key)
        flat, unravel = ravel_pytree(train.part)
        names = list(structure.losses)
        reached = trainable_losses_reached(structure)

        def one_estimate(guess_key):
            v = jax.random.normal(guess_key, flat.shape, flat.dtype)
            if normalize:
                v = v * jnp.sqrt(v.size) / jnp.linalg.norm(v)
            tangent = unravel(v)
            (_, metrics), (derivative, per_loss) = jax.jvp(
                loss, (train.part,), (tangent,)
            )
            if len(names) == 1:
                return derivative * v, metrics
            leaves, treedef = jax.tree.flatten(tangent)
            local = [
                sum(per_loss[f"loss/{n}"] for n in r) * leaf
                if r
                else jnp.zeros_like(leaf)
                for r, leaf in zip(reached, leaves)
            ]
            return ravel_pytree(jax.tree.unflatten(treedef, local))[0], metrics

        estimates, metrics = jax.vmap(one_estimate)(guess_keys(key, num_guesses))
        grads = unravel(jnp.mean(estimates, axis=0))
        return train.full(grads), jax.tree.map(lambda m: m[0], metrics)

    return estimate


def activation_perturbation(model, *, mask: bool = False, **common) -> Estimator:
    """Activity perturbation: y = eps ~ N(0, I) at every site. Unbiased.

    ``mask=True``: y = D eps (eps, normalised when ``normalize``, through the
    site's activation derivative: the ReLU mask), Ren et al.'s update: the
    derivative is the same (the loss sees the site through its activation),
    the estimate is zero where the unit is inactive; still unbiased, less
    variance.
    """
    if not isinstance(mask, bool):
        raise TypeError(f"mask must be True or False; got {mask!r}.")
    rule = rules.rule_from(
        rules.gaussian_hidden, last=rules.gaussian_last, lookahead=0, mask_after=mask
    )
    return activation_space(model, rule, **common)


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
    variant: str = "krylov",
    power_iters: int | None = None,
    block_size: int | None = None,
    ns_steps: int = 5,
    cutoff: float = 1.0,
    **common,
) -> Estimator:
    """W-perp without an SVD: guesses in the top right singular subspace of ``J = W_{l+1} D_l``.

    ``variant="krylov"`` (default): per example, a block Krylov space of
    ``J^T J`` (``block_size`` vectors, default 2; ``power_iters`` steps,
    default enough for ``max(3 rank, 16)`` dimensions: 14 at rank 10, 7 at
    ranks up to 5) and Rayleigh-Ritz give the top-``rank`` subspace ``V_k``;
    ``y = V_k z``, isotropic over it like exact W-perp (covariance a rank-k
    projector), at ``block_size * (2 power_iters + 2)`` W^T-sized products
    (60 at rank 10, 32 at ranks up to 5). ``variant="vector"``: ``y = p(J^T J)
    J^T eps``, a degree-``power_iters`` (default 6) Chebyshev filter whose
    band edge adapts to each example (``cutoff`` in [0, 1]; 0 = power
    filter), ``1 + 2 * power_iters`` products; it piles the guess onto the
    very top directions (not W-perp's covariance; ``rank`` unused).
    ``variant="block"``: ``rank`` vectors by subspace iteration
    (``power_iters``, default 2) with ``ns_steps`` Newton-Schulz steps.
    """
    _check_positive_int("rank", rank)
    if power_iters is not None and (
        not isinstance(power_iters, int) or power_iters < 0
    ):
        raise ValueError(
            f"power_iters must be a non-negative integer or None; got {power_iters!r}."
        )
    if block_size is not None:
        _check_positive_int("block_size", block_size)
    _check_positive_int("ns_steps", ns_steps)
    hidden = rules.wperp_ns_hidden(
        rank,
        power_iters,
        ns_steps,
        variant=variant,
        cutoff=cutoff,
        block_size=block_size,
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


ORACLE_SCALES = ("gradient", "directional")


def oracle_angle(
    model,
    *,
    cosine: float = 0.03,
    scale: str = "gradient",
    loss_fn=None,
    inputs=None,
    trainable=None,
) -> Estimator:
    """Oracle control: a guess at a fixed angle to the true gradient (uses ``jax.grad``).

    ``g_theta = cos(theta) g + sin(theta) g_perp`` with ``cos(theta) = cosine`` and
    g_perp a random direction orthogonal to the gradient g with ``|g_perp| = |g|``:
    the estimate has exactly the given cosine with g and no bias in direction.

    ``scale="gradient"`` (default): the estimate is ``g_theta``, the
    gradient's norm (``E = cosine * g``). ``scale="directional"``: the
    paper's modified directional step ``(g . u) u`` along the unit guess
    ``u = g_theta / |g|``, i.e. ``cosine * g_theta`` (``E = cosine^2 g``): what
    a directional derivative along a guess at that angle gives, the step
    Figure 3 (right) of Singhal et al. trains with; for SGD and momentum a
    learning rate ``1 / cosine`` times the other's. With several losses
    (local losses) the angle is set per stage: the parameters that reach the
    same losses (as :func:`guessgrad.structure` reports) get their own
    ``g_perp``, so each stage's estimate has the given cosine with that
    stage's gradient, and the whole estimate has it with the whole gradient.
    """
    if not -1.0 <= float(cosine) <= 1.0:
        raise ValueError(f"cosine must lie in [-1, 1]; got {cosine!r}.")
    if scale not in ORACLE_SCALES:
        raise ValueError(
            f"scale must be one of {', '.join(ORACLE_SCALES)}; got {scale!r}."
        )
    setup = _exact(
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

    return estimate


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


# Arguments every estimator takes that describe the problem, not the method.
PROBLEM_OPTIONS = ("loss_fn", "inputs", "trainable")


def estimator_options(name: str) -> dict[str, object]:
    """The method's keyword options of estimator ``name`` and their defaults.

    The problem's arguments (``loss_fn``, ``inputs``, ``trainable``), which
    every estimator takes, are not listed.
    """
    parameters = inspect.signature(_lookup(name)).parameters.values()
    options = {
        p.name: p.default
        for p in parameters
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in PROBLEM_OPTIONS
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


def build_estimator(
    name: str, model, *, loss_fn=None, inputs=None, trainable=None, **options
) -> Estimator:
    """Estimator ``name`` for ``model``: ``(params, batch, key) -> (grads, metrics)``.

    Args:
      name: a key of :data:`ESTIMATORS`.
      model: a Flax linen module with sites marked inside (:func:`guessgrad.site`),
        a :func:`guessgrad.mark_outputs` model, or a :class:`guessgrad.models.Chain`
        (``backprop``, ``directional`` and ``oracle_angle`` take any module).
      loss_fn: ``(outputs, batch) -> [B]`` per-example losses, or a dict of
        named ones (local losses); the objective is the sum of their means
        over the batch. A loss ``[B, ...]`` is summed per example over its
        other axes, unless declared as copies with :func:`guessgrad.copies`
        (then counted as their mean). Default: softmax cross-entropy of the
        outputs against integer ``batch["label"]``.
      inputs: ``batch -> `` the model's call argument (a tuple for several).
        Default: ``batch["image"]``.
      trainable: a pytree of bools with the structure of ``params`` (or of
        ``{"params": ...}`` alone), or a callable from ``params`` to one (as
        ``optax.masked`` takes). Frozen leaves get exact zeros; sites that
        update no trainable leaf are not guessed. Collections other than
        ``"params"`` (BatchNorm's running averages) are constants: never
        trainable, zero estimates.

    The model runs with ``rngs=guessgrad.model_rngs(key)`` (dropout). Arrays
    sharded on a mesh work with or without a context mesh.
      **options: the method's options (:func:`estimator_options`).

    Metrics: ``loss`` (the objective), ``loss/<name>`` per loss when there are
    several, and ``accuracy`` with the default loss.
    """
    factory = _lookup(name)
    valid = estimator_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listing = ", ".join(f"{k}={v!r}" for k, v in valid.items()) or "none"
        raise ValueError(
            f"Unknown option(s) {unknown} for estimator {name!r}; valid options: {listing}."
        )
    estimator = factory(
        model, loss_fn=loss_fn, inputs=inputs, trainable=trainable, **options
    )
    return on_mesh_of_arguments(estimator)


def get_estimator(
    name: str, model, *, loss_fn=None, inputs=None, trainable=None, **options
) -> EstimateFn:
    """Estimator ``name`` for ``model`` as a pure function ``(params, batch, key) -> grads``.

    Arguments as :func:`build_estimator`. ``grads`` has exactly the tree
    structure, shapes and dtypes of ``params``. Works under ``jax.jit`` and
    ``jax.vmap`` over keys; the same key gives the same result. Unknown names
    or options raise a ValueError listing the valid choices.
    """
    estimator = build_estimator(
        name, model, loss_fn=loss_fn, inputs=inputs, trainable=trainable, **options
    )

    def estimate(params: Params, batch: Batch, key: PRNGKey):
        return estimator(params, batch, key)[0]

    estimate.__name__ = f"estimate_{name}"
    estimate.__doc__ = ESTIMATORS[name].__doc__
    return estimate


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
    _check_common(1, mode)
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
