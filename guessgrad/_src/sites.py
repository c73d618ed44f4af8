"""Sites: the values inside a Flax model whose per-example gradients are guessed.

A *site* is marked inside any linen or NNX module, next to the layer it follows::

    s = nn.Dense(256)(x)  # in an nnx.Module: s = self.dense_0(x)
    x = guessgrad.site(self, "dense_0", s, act=nn.relu)  # act(s + perturbation)

With guessgrad inactive (``model.init``, a plain ``model.apply``) a site is
just ``act(value)``: the model computes exactly what it would without marks.
While an estimator runs the model, a site records its raw value (Flax
collection ``guessgrad_sites``) and adds a perturbation read from the
collection ``guessgrad_perturbations``, whose tangent the estimator sets;
both travel through Flax's lifted transforms (``nn.remat``) like any other
variable. :func:`tap` records a value a site's guess may target (a local
head's logits) without perturbing it.

The structure (sites in forward order, each site's ``next`` target, the
losses each site feeds, the site or loss that updates each parameter) is
found once per input signature by tracing abstractly (:func:`analyse`):
dependencies are read off the jaxpr of the forward-mode pass, so a
``stop_gradient`` between blocks separates their losses with no annotation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.extend import core as jex_core

from guessgrad._src.base import Array, Params
from guessgrad._src.sharding import abstract_sharding, explicit_spec

SITES = "guessgrad_sites"
TAPS = "guessgrad_taps"
PERTURBATIONS = "guessgrad_perturbations"
_OWN_COLLECTIONS = (SITES, TAPS, PERTURBATIONS)


class _Next:
    """Default of ``site(next=...)``: the first later site whose value depends on this one."""

    def __repr__(self) -> str:
        return "NEXT"


NEXT = _Next()


@dataclasses.dataclass
class _Mark:
    """What one :func:`site` call declares (static: recorded while tracing)."""

    path: str
    module_path: tuple[str, ...]
    act: Callable[[Array], Array] | None
    next: Any
    feeds: tuple[str, ...] | None
    shape: tuple[int, ...]
    dtype: Any
    sharding: Any = None  # PartitionSpec on a mesh with Explicit axes, else None
    copy_axes: int | None = None


class _State(threading.local):
    def __init__(self):
        self.active = False  # an estimator is running the model
        self.cut = False  # stop_gradient before each perturbation (local VJPs)
        self.recorder: dict[str, dict[str, _Mark]] | None = None
        self.nnx: NNXScope | None = None  # the NNX forward pass in progress


@dataclasses.dataclass
class NNXScope:
    """One forward pass of an NNX model: the perturbations its sites add, by site path.

    NNX modules carry no scope: the model's runner (``nnx_bridge``) tags each
    module of the merged graph with its path and collects the values the
    sites record on their modules (:func:`nnx_bridge.record`), which NNX's
    transforms (``nnx.remat``) carry out like any other state.
    """

    perturbations: dict[str, Array]  # site path -> perturbation


@contextlib.contextmanager
def nnx_scope(scope: NNXScope):
    saved, _STATE.nnx = _STATE.nnx, scope
    try:
        yield scope
    finally:
        _STATE.nnx = saved


def _is_nnx(module) -> bool:
    from flax import nnx

    return isinstance(module, nnx.Module)


_STATE = _State()


@contextlib.contextmanager
def _running(*, cut: bool = False, recorder=None):
    saved = (_STATE.active, _STATE.cut, _STATE.recorder)
    _STATE.active, _STATE.cut, _STATE.recorder = True, cut, recorder
    try:
        yield
    finally:
        _STATE.active, _STATE.cut, _STATE.recorder = saved


def _path(module: nn.Module, name: str) -> tuple[tuple[str, ...], str]:
    if _is_nnx(module):
        return _nnx_path(module, name)
    if not isinstance(module, nn.Module) or module.scope is None:
        raise TypeError(
            f"guessgrad.site/tap need the bound Flax module they are called in "
            f"(pass `self` from inside a compact or setup-style method); got "
            f"{type(module).__name__}."
        )
    _check_name(name)
    module_path = tuple(module.scope.path)
    return module_path, "/".join(module_path + (name,))


def _check_name(name) -> None:
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(
            f"A site or tap name must be a non-empty string without '/'; got {name!r}."
        )


def _nnx_path(module, name: str) -> tuple[tuple[str, ...], str]:
    from guessgrad._src import nnx_bridge

    _check_name(name)
    module_path = nnx_bridge.module_path(module, running=_STATE.nnx is not None)
    return module_path, "/".join(module_path + (name,))


# In guessgrad's collections a site's entry is "@name", so it never meets a
# submodule's subtree of the same name.
_PREFIX = "@"

_TRANSFORM_HINT = (
    "a Flax transform that does not pass guessgrad's collections through (nn.scan "
    "does: a scanned site would be one stacked [layers, B, ...] value). Unroll those "
    "layers with a Python loop (nn.remat per layer keeps the memory saving)."
)


def _record(module: nn.Module, collection: str, name: str, value: Array) -> None:
    """Appends ``value`` to the entry of ``name`` (a module called twice leaves two)."""
    if _is_nnx(module):
        from guessgrad._src import nnx_bridge

        nnx_bridge.record(module, collection, name, value)
        return
    scope, key = module.scope, _PREFIX + name
    if not scope.is_mutable_collection(collection):
        where = "/".join(tuple(scope.path) + (name,))
        raise ValueError(f"Site or tap {where!r} sits inside {_TRANSFORM_HINT}")
    previous = (
        scope.get_variable(collection, key)
        if scope.has_variable(collection, key)
        else ()
    )
    scope.put_variable(collection, key, previous + (value,))


def _mark(module, name, value, *, act, next, feeds, apply_act: bool, copy_axes=None):
    if _STATE.active:
        module_path, path = _path(module, name)
        if _STATE.recorder is not None:
            if isinstance(feeds, str):
                feeds = (feeds,)
            _STATE.recorder[SITES].setdefault(
                path,
                _Mark(
                    path,
                    module_path,
                    act,
                    next,
                    None if feeds is None else tuple(feeds),
                    tuple(jnp.shape(value)),
                    jnp.result_type(value),
                    explicit_spec(value),
                    copy_axes,
                ),
            )
        _record(module, SITES, name, value)
        if _STATE.cut:
            value = jax.lax.stop_gradient(value)
        perturbation = _perturbation(module, name, path)
        if perturbation is not None:
            value = value + perturbation
    if act is not None and apply_act:
        value = act(value)
    return value


def _perturbation(module, name: str, path: str) -> Array | None:
    if _is_nnx(module):
        return _STATE.nnx.perturbations.get(path)
    if module.scope.has_variable(PERTURBATIONS, _PREFIX + name):
        return module.scope.get_variable(PERTURBATIONS, _PREFIX + name)
    return None


def site(
    module: nn.Module,
    name: str,
    value: Array,
    *,
    act: Callable[[Array], Array] | None = None,
    next: Any = NEXT,
    feeds: str | Sequence[str] | None = None,
    copy_axes: int | None = None,
) -> Array:
    """Marks ``value`` ([B, ...], per example) as a perturbation site; returns ``act(value + 0)``.

    Args:
      module: the module the site is marked in (``self``).
      name: the site's name, unique within ``module``; its full name is the
        module's path joined with it (``"block_0/mlp"``).
      value: the site's value, the quantity whose per-example gradient is
        guessed (usually a pre-activation).
      act: the elementwise nonlinearity right after the site (ReLU masks and
        mixing's post-activations come from it); None for none.
      next: what the W^T-type guesses pull back from: the default is the
        first later site whose value depends on this one (none: the site is
        terminal and gets the rule's output guess); a site or tap name
        (relative to this module, or a full path); None to make it terminal.
      feeds: the losses whose derivatives this site's estimate uses; default:
        every loss its value reaches (found from the graph).
      copy_axes: for losses declared as copies ``[B, c_1, ..., c_k]``
        (:func:`copies`; Ren et al.'s patch- and group-wise losses): how many
        leading copy axes this site's layout follows. Element ``[b, i_1, ...,
        i_j, ...]`` of the site then reaches only the copies ``[b, i_1, ...,
        i_j, *]``, and its estimate uses their summed derivative (the site's
        axis ``j`` holds ``c_j`` blocks when ``j`` is the last: the site
        ``[B, P, G * C]`` against copies ``[P, G]`` follows 2). Default (None
        or 0): the copies' derivatives summed, the derivative of their mean,
        which is right for every layout. Declare it only where the model
        really keeps the copies apart: it is never inferred from shapes.

    With no estimator running (``model.init``, ``model.apply``) this is
    exactly ``act(value)``.
    """
    _check_act(act, f"Site {name!r}")
    if copy_axes is not None and (
        not isinstance(copy_axes, int) or isinstance(copy_axes, bool) or copy_axes < 0
    ):
        raise ValueError(
            f"copy_axes must be a non-negative integer or None; got {copy_axes!r}."
        )
    return _mark(
        module,
        name,
        value,
        act=act,
        next=next,
        feeds=feeds,
        apply_act=True,
        copy_axes=copy_axes,
    )


def _check_act(act, where: str) -> None:
    if act is not None and not callable(act):
        hint = f" (nn.{act} or jax.nn.{act})" if isinstance(act, str) else ""
        raise TypeError(
            f"{where}: act must be the elementwise nonlinearity after the site, a "
            f"function{hint}, or None; got {act!r}."
        )


def tap(module: nn.Module, name: str, value: Array) -> Array:
    """Records ``value`` ([B, ...]) as a target a site's guess may pull back from; returns it unchanged."""
    if _STATE.active:
        _, path = _path(module, name)
        if _STATE.recorder is not None:
            _STATE.recorder[TAPS].setdefault(path, tuple(jnp.shape(value)))
        _record(module, TAPS, name, value)
    return value


# --- models that cannot be edited: marks from outside --------------------------------


class MarkedModel:
    """A model whose submodule outputs are sites, marked from outside by method interception.

    Made by :func:`mark_outputs`. It has the wrapped model's ``init`` and
    ``apply`` and the same parameters; estimators take it as a model.
    """

    def __init__(self, model: nn.Module, sites: Mapping[str, Any]):
        self.model = model
        self.sites = dict(sites)

    def init(self, *args, **kwargs):
        return self.model.init(*args, **kwargs)

    def apply(self, variables, *args, **kwargs):
        seen = set()

        calls: dict[str, int] = {}

        def interceptor(next_fun, args_, kwargs_, context):
            out = next_fun(*args_, **kwargs_)
            if context.method_name != "__call__" or not _STATE.active:
                return out
            path = "/".join(context.module.scope.path)
            if path not in self.sites:
                return out
            # A submodule called several times (shared weights): one site per
            # call, "out", "out_1", ...; its parameters get every call's update.
            count = calls.get(path, 0)
            calls[path] = count + 1
            seen.add(path)
            act = self.sites[path]
            return _mark(
                context.module,
                "out" if count == 0 else f"out_{count}",
                out,
                act=act,
                next=NEXT,
                feeds=None,
                apply_act=False,
            )

        with nn.intercept_methods(interceptor):
            result = self.model.apply(variables, *args, **kwargs)
        if _STATE.active:
            missing = sorted(set(self.sites) - seen)
            if missing:
                raise ValueError(
                    f"mark_outputs: no submodule at {missing} was called. Module paths are "
                    f"'/'-joined names as in params['params'] (e.g. 'Dense_0', 'block/Dense_1')."
                )
        return result

    def __repr__(self) -> str:
        return f"mark_outputs({type(self.model).__name__}, {sorted(self.sites)})"


def mark_outputs(model: nn.Module, sites: Mapping[str, Callable | None]) -> MarkedModel:
    """Marks the outputs of submodules of a model you cannot edit as sites.

    ``sites`` maps a submodule's path (its key path in ``params['params']``,
    '/'-joined: ``"Dense_0"``, ``"encoder/Dense_1"``) to the activation the
    model applies right after that output (``nn.relu``), or None. The
    activation is metadata for the guesses (masks, mixing): the model applies
    it itself. Each output becomes the site ``"<path>/out"``; a submodule
    called several times in one forward pass (shared weights) gives a site
    per call, ``"<path>/out"``, ``"<path>/out_1"``, ..., and its parameters
    the sum of their local updates, as marking each call would. Example::

        class Plain(nn.Module):  # from another project
            @nn.compact
            def __call__(self, x):
                x = nn.relu(nn.Dense(64)(x))
                return nn.Dense(10)(x)

        model = guessgrad.mark_outputs(Plain(), {"Dense_0": nn.relu, "Dense_1": None})
        estimate = guessgrad.get_estimator("wt", model)
    """
    if not hasattr(model, "apply"):
        raise TypeError(
            f"mark_outputs needs a Flax linen module; got {type(model).__name__}."
        )
    if not sites:
        raise ValueError("mark_outputs needs at least one submodule path to mark.")
    for path, act in sites.items():
        _check_act(act, f"mark_outputs' entry {path!r}")
    return MarkedModel(model, sites)


# --- running a model with sites -----------------------------------------------------


def _flat(tree) -> dict[str, Array]:
    """A sown collection -> {path: value}; each value sown once (else an error)."""
    out = {}
    for key, values in traverse_util.flatten_dict(dict(tree)).items():
        path = "/".join(key[:-1] + (key[-1][len(_PREFIX) :],))
        if len(values) != 1:
            raise ValueError(
                f"Site or tap {path!r} was marked {len(values)} times in one forward pass "
                f"(a module called more than once?). Give each call its own name."
            )
        out[path] = values[0]
    return out


def split_variables(variables) -> Params:
    """The user's variables without guessgrad's own collections."""
    if not isinstance(variables, Mapping) or "params" not in variables:
        got = (
            sorted(variables)
            if isinstance(variables, Mapping)
            else type(variables).__name__
        )
        raise ValueError(
            f'params must be what model.init returns, {{"params": ...}}; got {got}.'
        )
    return {k: v for k, v in variables.items() if k not in _OWN_COLLECTIONS}


def run(
    model,
    variables,
    args: tuple,
    *,
    perturbations=None,
    cut=False,
    rngs=None,
    recorder=None,
):
    """``model.apply`` with sites live: ``(outputs, {site: raw value}, {tap: value})``."""
    variables = dict(variables)
    if perturbations:
        variables[PERTURBATIONS] = traverse_util.unflatten_dict(
            {
                tuple(p.split("/")[:-1]) + (_PREFIX + p.split("/")[-1],): v
                for p, v in perturbations.items()
            }
        )
    with _running(cut=cut, recorder=recorder):
        outputs, state = model.apply(variables, *args, rngs=rngs, mutable=[SITES, TAPS])
    return outputs, _flat(state.get(SITES, {})), _flat(state.get(TAPS, {}))


# --- losses -------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class Copies:
    """A loss ``[B, c_1, ..., c_k]`` declared as copies of one per-example loss (see :func:`copies`)."""

    def __init__(self, value: Array):
        self.value = value

    def tree_flatten(self):
        return (self.value,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        return cls(*children)

    def __repr__(self) -> str:
        return f"copies({getattr(self.value, 'shape', self.value)})"


def copies(losses: Array) -> Copies:
    """Declares the trailing axes of a per-example loss ``[B, c_1, ..., c_k]`` as copies.

    Return it from ``loss_fn`` (alone or as a value of its dict). A loss with
    copies counts as its mean over them, and a site that declares
    ``copy_axes`` (:func:`site`) takes one derivative per copy: its element
    ``[b, i_1, ..., i_j, ...]`` is scaled by the derivatives of the copies
    ``[b, i_1, ..., i_j, *]`` only (Ren et al.'s patch- and group-wise
    losses). Every other site uses the derivative of the mean.

    Without this declaration a loss's axes after the batch axis are summed
    per example: ``jnp.square(out - y)`` ``[B, D]`` is the per-example sum of
    squared errors, a multi-label ``optax.sigmoid_binary_cross_entropy``
    ``[B, L]`` the sum over labels. Copies are never inferred from shapes.
    """
    if jnp.ndim(losses) < 2:
        raise ValueError(
            f"guessgrad.copies needs a loss [B, c_1, ...] with at least one copy axis "
            f"after the batch axis; got shape {jnp.shape(losses)}."
        )
    return Copies(losses)


def normalize_losses(losses, batch_size: int | None = None) -> dict[str, Array]:
    """``loss_fn``'s result as ``{name: [B] or [B, *copies]}``; checks it is per example.

    A loss declared with :func:`copies` keeps its copy axes; any other loss's
    axes after the batch axis are summed per example.
    """
    if isinstance(losses, Mapping):
        items = list(losses.items())
    else:
        items = [("loss", losses)]
    out = {}
    for name, value in items:
        declared = isinstance(value, Copies)
        if declared:
            value = value.value
        shape = jnp.shape(value)
        check_per_example(name, shape, batch_size)
        if len(shape) > 1 and not declared:
            value = jnp.sum(value.reshape(shape[0], -1), axis=-1)
        out[str(name)] = value
    return out


def check_per_example(name: str, shape, batch_size: int | None = None) -> None:
    """Raises a ValueError unless a loss of ``shape`` is per example, [B, ...]."""
    if len(shape) >= 1 and (batch_size is None or shape[0] == batch_size):
        return
    what = (
        "a scalar (reduced over the batch?)"
        if not shape
        else f"of shape {tuple(shape)} for a batch of {batch_size}"
    )
    raise ValueError(
        f"loss_fn must return per-example losses [B] (or [B, ...]: summed per "
        f"example, or declared as copies with guessgrad.copies), or a dict of "
        f"them; loss {name!r} is {what}. Return the losses before their mean "
        f"over the batch."
    )


def copies_of(shape: Sequence[int]) -> int:
    """How many copies a loss of ``shape`` [B, *copies] holds per example."""
    return math.prod(shape[1:])


# --- the structure, found once by abstract tracing ------------------------------------


@dataclasses.dataclass(frozen=True)
class SiteInfo:
    """One site as estimators see it.

    Attributes:
      path: full name, ``"block_0/mlp"``.
      index: position in forward order (guess keys are folded with it).
      shape, dtype: of the site's value, [B, ...].
      act: the nonlinearity after the site, or None.
      target: the site or tap its guess pulls back from, or None (terminal).
      feeds: the losses whose derivatives its estimate uses.
      layouts: per fed loss, how the loss's copy axes meet the site's axes:
        ``"example"`` (no copies), ``"copies"`` (copy axes lead the site's
        axes, one derivative per copy), ``"copies[:k]"`` (the site follows the
        first ``k`` copy axes: the other copies' derivatives summed) or
        ``"summed"`` (copies summed).
    """

    path: str
    index: int
    shape: tuple[int, ...]
    dtype: Any
    act: Callable | None
    target: str | None
    feeds: tuple[str, ...]
    layouts: tuple[str, ...]
    sharding: Any = None


@dataclasses.dataclass(frozen=True)
class Structure:
    """What :func:`analyse` finds: sites, taps, losses and who updates each parameter."""

    sites: tuple[SiteInfo, ...]
    taps: dict[str, tuple[int, ...]]
    losses: dict[str, tuple[int, ...]]
    param_paths: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]
    trainable: tuple[bool, ...]
    owners: tuple[
        tuple[str, ...], ...
    ]  # per parameter leaf: "site:<path>" / "loss:<name>"

    def _updating(self, kind: str) -> set[str]:
        """Names of the sites or losses (``kind``) that update a trainable leaf."""
        prefix = kind + ":"
        return {
            o[len(prefix) :]
            for own, train in zip(self.owners, self.trainable)
            if train
            for o in own
            if o.startswith(prefix)
        }

    @property
    def active(self) -> tuple[SiteInfo, ...]:
        """Sites that update a trainable parameter: the only ones guessed."""
        used = self._updating("site")
        return tuple(s for s in self.sites if s.path in used and s.feeds)

    @property
    def exact_losses(self) -> tuple[str, ...]:
        """Losses whose exact local gradient reaches a trainable parameter."""
        used = self._updating("loss")
        return tuple(name for name in self.losses if name in used)

    def site(self, path: str) -> SiteInfo:
        return next(s for s in self.sites if s.path == path)

    def table(self) -> str:
        """The structure as two plain-text tables: sites, then parameters."""
        active = {s.path for s in self.active}
        rows = [("site", "shape", "act", "guess pulls from", "losses fed", "guessed")]
        for s in self.sites:
            fed = (
                ", ".join(
                    name + ("" if layout == "example" else f" ({layout})")
                    for name, layout in zip(s.feeds, s.layouts)
                )
                or "none"
            )
            rows.append(
                (
                    s.path,
                    _shape(s.shape),
                    _act_name(s.act),
                    s.target or "(terminal: output guess)",
                    fed,
                    "yes"
                    if s.path in active
                    else (
                        "no (reaches no loss)"
                        if not s.feeds
                        else "no (nothing trainable)"
                    ),
                )
            )
        prow = [("parameter", "shape", "trainable", "updated by")]
        for path, shape, train, own in zip(
            self.param_paths, self.param_shapes, self.trainable, self.owners
        ):
            how = []
            for o in own:
                kind, name = o.split(":", 1)
                how.append(
                    f"site {name} (guess, local VJP)"
                    if kind == "site"
                    else f"loss {name} (exact local gradient)"
                )
            prow.append(
                (
                    path,
                    _shape(shape, batch=False),
                    "yes" if train else "no (zero)",
                    "; ".join(how) or "nothing (gradient zero)",
                )
            )
        lines = [
            f"{len(self.sites)} sites, {len(self.taps)} taps, losses: "
            + ", ".join(f"{k} {_shape(v)}" for k, v in self.losses.items())
        ]
        return "\n".join(lines + ["", _format(rows), "", _format(prow)])

    def __str__(self) -> str:
        return self.table()


def _shape(shape, batch=True) -> str:
    dims = ["B"] + [str(d) for d in shape[1:]] if batch else [str(d) for d in shape]
    return "[" + ", ".join(dims) + "]"


def _act_name(act) -> str:
    if act is None:
        return "-"
    return getattr(act, "__name__", type(act).__name__)


def _format(rows) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# Dependencies: which inputs of a jaxpr each output depends on (bitsets).

_SUB_JAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _sub_jaxpr(eqn):
    for name in _SUB_JAXPR_PARAMS:
        sub = eqn.params.get(name)
        if sub is None:
            continue
        jaxpr = getattr(sub, "jaxpr", sub)
        if (
            isinstance(jaxpr, jex_core.Jaxpr)
            and len(jaxpr.invars) == len(eqn.invars)
            and len(jaxpr.outvars) == len(eqn.outvars)
        ):
            return jaxpr
    return None


def _dependencies(jaxpr, in_bits: Sequence[int]) -> list[int]:
    env: dict = {}

    def read(atom) -> int:
        return 0 if isinstance(atom, jex_core.Literal) else env.get(atom, 0)

    for var, bits in zip(jaxpr.invars, in_bits):
        env[var] = bits
    for eqn in jaxpr.eqns:
        ins = [read(a) for a in eqn.invars]
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            outs = _dependencies(sub, ins)
        else:  # conservative: every output depends on every input
            union = 0
            for bits in ins:
                union |= bits
            outs = [union] * len(eqn.outvars)
        for var, bits in zip(eqn.outvars, outs):
            env[var] = bits
    return [read(a) for a in jaxpr.outvars]


def _tangent_dependencies(fn, fixed, point) -> list[int]:
    """Bitsets: which leaves of ``point`` each leaf of ``fn(fixed, .)``'s JVP output depends on.

    Everything is abstract (``jax.ShapeDtypeStruct``): this traces, it computes nothing.
    """
    leaves, treedef = jax.tree.flatten(point)

    def jvp_out(fixed, point_leaves, tangent_leaves):
        primal = jax.tree.unflatten(treedef, point_leaves)
        tangent = jax.tree.unflatten(treedef, tangent_leaves)
        return jax.tree.leaves(
            jax.jvp(lambda x: fn(fixed, x), (primal,), (tangent,))[1]
        )

    closed = jax.make_jaxpr(jvp_out)(fixed, leaves, leaves)
    num_fixed = len(jax.tree.leaves(fixed)) + len(leaves)
    bits = [0] * num_fixed + [1 << i for i in range(len(leaves))]
    return _dependencies(closed.jaxpr, bits)


def _struct(shape, dtype, spec):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=abstract_sharding(spec))


def _bits(x: int) -> list[int]:
    return [i for i in range(x.bit_length()) if (x >> i) & 1]


def _layout(
    site_shape, loss_shape, copy_axes: int | None = None, where: str = ""
) -> str:
    """``"example"``, ``"summed"``, ``"copies"`` (every copy axis) or ``"copies[:k]"``."""
    copies = tuple(loss_shape[1:])
    if not copies:
        return "example"

    def follows(k: int) -> bool:
        return (
            len(site_shape) > k
            and tuple(site_shape[1:k]) == copies[: k - 1]
            and site_shape[k] % copies[k - 1] == 0
        )

    if not copy_axes:  # undeclared or 0: never inferred from shapes
        return "summed"
    if copy_axes > len(copies) or not follows(copy_axes):
        raise ValueError(
            f"Site {where!r} of shape {tuple(site_shape)} declares copy_axes={copy_axes}, "
            f"but a loss it feeds has copies {copies}: the site's axes 1..{copy_axes} "
            f"must be {copies[:copy_axes]} (the last may hold a multiple of its size)."
        )
    return "copies" if copy_axes == len(copies) else f"copies[:{copy_axes}]"


def copy_axes_of(layout: str) -> int | None:
    """The number of copy axes a ``"copies..."`` layout follows (None: all of them)."""
    if layout == "copies":
        return None
    return int(layout[len("copies[:") : -1])


def _resolve(name, mark: _Mark, names: Sequence[str], kind: str):
    candidates = ["/".join(mark.module_path + (name,)), name]
    for candidate in candidates:
        if candidate in names:
            return candidate
    raise ValueError(
        f"Site {mark.path!r}: next={name!r} names no site or tap; {kind}: "
        f"{', '.join(names) or 'none'}."
    )


def analyse(
    model, variables, args, loss_fn, batch, rngs, trainable_leaves, need_sites=True
) -> Structure:
    """Traces the model abstractly (no FLOPs) and returns its :class:`Structure`.

    ``need_sites=False`` (weight-space methods) accepts a model without sites:
    the structure then holds the losses and the loss each parameter reaches.
    """
    params = split_variables(variables)
    recorder = {SITES: {}, TAPS: {}}

    def forward(params, args, batch, perturbations, cut=False, record=None):
        outputs, raw, taps = run(
            model,
            params,
            args,
            perturbations=perturbations,
            cut=cut,
            rngs=rngs,
            recorder=record,
        )
        return normalize_losses(loss_fn(outputs, batch)), raw, taps

    losses, raw, taps = jax.eval_shape(
        lambda p, a, b: forward(p, a, b, None, record=recorder), params, args, batch
    )
    marks = recorder[SITES]
    if not marks and need_sites:
        raise ValueError(
            f"{type(model).__name__} marks no sites. Mark the values to guess inside the "
            f"model with guessgrad.site(self, name, value, act=...), or from outside with "
            f"guessgrad.mark_outputs(model, {{submodule path: activation}})."
        )
    lost = [p for p in marks if p not in raw]
    if lost:
        raise ValueError(
            f"Sites {lost} were marked but their values did not come out of the model: "
            f"they sit inside {_TRANSFORM_HINT}"
        )
    paths = list(marks)  # forward order
    if paths:
        batch_size = marks[paths[0]].shape[0] if marks[paths[0]].shape else None
    else:
        batch_size = jax.tree.leaves(args)[0].shape[0]
    for name, value in losses.items():  # normalised inside forward: [B] or copies
        check_per_example(name, value.shape, batch_size)
    for p in paths:
        if not marks[p].shape or marks[p].shape[0] != batch_size:
            raise ValueError(
                f"Site {p!r} has shape {marks[p].shape}; every site must be per example, "
                f"[B, ...] with B = {batch_size}."
            )
    loss_names = list(losses)

    # Which losses, sites and taps each site's perturbation reaches.
    zeros = {
        p: _struct(marks[p].shape, marks[p].dtype, marks[p].sharding) for p in paths
    }
    out_bits = (
        _tangent_dependencies(lambda f, d: forward(*f, d), (params, args, batch), zeros)
        if paths
        else []
    )
    out_names = (
        [f"loss:{n}" for n in sorted(losses)]
        + [f"site:{n}" for n in sorted(raw)]
        + [f"tap:{n}" for n in sorted(taps)]
    )
    # Bit i is the i-th leaf of `zeros` as JAX flattens it (keys sorted): map to forward order.
    leaf_paths = [
        "/".join(_key_name(k) for k in kp)
        for kp, _ in jax.tree_util.tree_flatten_with_path(zeros)[0]
    ]
    forward_index = [paths.index(p) for p in leaf_paths]
    reached = {
        name: {forward_index[i] for i in _bits(b)}
        for name, b in zip(out_names, out_bits)
    }

    infos = []
    for index, path in enumerate(paths):
        mark = marks[path]
        fed = [n for n in loss_names if index in reached[f"loss:{n}"]]
        if mark.feeds is not None:
            unknown = [n for n in mark.feeds if n not in loss_names]
            unreached = [n for n in mark.feeds if n in loss_names and n not in fed]
            if unknown or unreached:
                raise ValueError(
                    f"Site {path!r}: feeds={list(mark.feeds)} names losses "
                    f"{unknown + unreached} it {'does not reach' if unreached else 'unknown'}; "
                    f"the losses are {loss_names}, and this site reaches {fed}."
                )
            fed = list(mark.feeds)
        target = _target(mark, index, paths, list(taps), reached)
        layouts = tuple(
            _layout(mark.shape, losses[n].shape, mark.copy_axes, path) for n in fed
        )
        infos.append(
            SiteInfo(
                path,
                index,
                mark.shape,
                mark.dtype,
                mark.act,
                target,
                tuple(fed),
                layouts,
                mark.sharding,
            )
        )

    # Who updates each parameter: dependencies of the cut forward on the parameters.
    leaves_with_path = jax.tree_util.tree_flatten_with_path(params)[0]
    param_paths = tuple(
        "/".join(_key_name(k) for k in kp) for kp, _ in leaves_with_path
    )
    param_bits = _tangent_dependencies(
        lambda f, p: forward(p, *f, None, cut=True)[:2], (args, batch), params
    )
    cut_names = [f"loss:{n}" for n in sorted(losses)] + [
        f"site:{n}" for n in sorted(raw)
    ]
    owners = [[] for _ in param_paths]
    for name, bits in zip(cut_names, param_bits):
        for leaf in _bits(bits):
            owners[leaf].append(name)
    order = {f"site:{p}": i for i, p in enumerate(paths)}
    order.update({f"loss:{n}": len(paths) + i for i, n in enumerate(loss_names)})
    owners = tuple(tuple(sorted(o, key=order.__getitem__)) for o in owners)
    trainable = (
        tuple(bool(t) for t in trainable_leaves)
        if trainable_leaves is not None
        else (True,) * len(param_paths)
    )
    return Structure(
        sites=tuple(infos),
        taps={p: tuple(s.shape) for p, s in taps.items()},
        losses={n: tuple(losses[n].shape) for n in loss_names},
        param_paths=param_paths,
        param_shapes=tuple(tuple(jnp.shape(x)) for _, x in leaves_with_path),
        trainable=trainable,
        owners=owners,
    )


def _target(mark: _Mark, index: int, paths, tap_paths, reached) -> str | None:
    if mark.next is None:
        return None
    if isinstance(mark.next, _Next):
        for later in paths[index + 1 :]:
            if index in reached[f"site:{later}"]:
                return later
        return None
    if not isinstance(mark.next, str):
        raise TypeError(
            f"Site {mark.path!r}: next must be a site or tap name, None or "
            f"left out; got {mark.next!r}."
        )
    target = _resolve(mark.next, mark, list(paths) + list(tap_paths), "sites and taps")
    kind = "tap" if target in tap_paths else "site"
    if target == mark.path or index not in reached[f"{kind}:{target}"]:
        raise ValueError(
            f"Site {mark.path!r}: its next target {target!r} does not depend on it (a "
            f"stop_gradient in between, or it comes earlier), so a guess pulled back from "
            f"it would be zero. Name a later site or tap it reaches, or next=None."
        )
    return target


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def as_args(value) -> tuple:
    """``inputs(batch)`` -> the model's positional call arguments."""
    return value if isinstance(value, tuple) else (value,)


def leaf_mask(trainable, variables) -> tuple[bool, ...] | None:
    """``trainable`` as one bool per leaf of ``variables`` (None: every leaf trainable).

    ``trainable`` is None, a pytree of bools shaped like ``variables`` (or
    like ``{"params": ...}`` alone), or a function of ``variables`` returning
    one. Collections other than ``"params"`` (BatchNorm's running averages,
    constants) are never trainable: they pass through unchanged.
    """
    with_path = jax.tree_util.tree_flatten_with_path(variables)[0]
    in_params = tuple(_key_name(path[0]) == "params" for path, _ in with_path)
    if trainable is None:
        return None if all(in_params) else in_params
    mask = trainable(variables) if callable(trainable) else trainable
    params_only = {"params": variables["params"]}
    for target in (variables, params_only):
        try:
            flags = jax.tree.leaves(jax.tree.map(lambda _, m: m, target, mask))
            whole = target is variables
            break
        except (ValueError, TypeError):
            continue
    else:
        raise ValueError(
            f"trainable must be a pytree of bools with the structure of params (or a callable "
            f"returning one, as optax.masked takes); its structure "
            f"{jax.tree.structure(mask)} does not match params' "
            f"{jax.tree.structure(variables)}."
        )
    for flag in flags:
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"trainable's leaves must be Python bools; got {flag!r}.")
    flags = iter(bool(f) for f in flags)
    if whole:
        out = tuple(next(flags) and p for p in in_params)
    else:  # shaped like {"params": ...}: the other collections are frozen
        out = tuple(next(flags) if p else False for p in in_params)
    if not any(out):
        raise ValueError("trainable marks no parameter as trainable.")
    return out
