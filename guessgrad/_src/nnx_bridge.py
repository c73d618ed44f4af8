"""Flax NNX models: an ``nnx.Module`` run by the same engine as a linen model.

:class:`NNXModel` gives an ``nnx.Module`` the two methods the engine calls,
``init`` and ``apply(variables, *args, rngs=..., mutable=...)``, over
``variables = {"params": <the module's Param state as a pure dict>}``: each
call merges the module's graph with those parameters (its other state, RNG
streams included, as it was when the estimator was built), reseeds its RNG
streams from ``rngs`` (Dropout draws from the estimator's key) and runs it
with its sites live. Each module of the merged graph is tagged with its
path (a static attribute, so NNX transforms' copies of a module carry it),
and a site records its value on its module as a :class:`SiteRecord`
variable, which ``nnx.remat`` passes out of its trace like any other state.

:func:`estimator_factory` and :func:`inspector` wrap the public functions:
a user passes the module, ``nnx.state(module, nnx.Param)`` as ``params``
and, as ``trainable``, any NNX filter; estimates come back as an
``nnx.State`` of the same structure (frozen leaves exact zeros), ready for
``optax`` or ``nnx.Optimizer``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx, traverse_util

from guessgrad._src import sites as sites_lib
from guessgrad._src.base import is_stateful


def is_nnx(model) -> bool:
    return isinstance(model, nnx.Module)


def _path(parts) -> tuple[str, ...]:
    return tuple(str(p) for p in parts)


_PATH_ATTR = "_guessgrad_path"
_RECORD_ATTR = "_guessgrad_{collection}_{name}"


class SiteRecord(nnx.Variable):
    """The values a site or tap saw in one forward pass (a tuple: one per call).

    Its metadata ``shapes`` holds each value's shape where the site saw it: a
    transform that stacks the values it returns (``nnx.scan``, ``nnx.vmap``)
    changes the values' shapes but not the metadata.
    """


def module_path(module: nnx.Module, *, running: bool) -> tuple[str, ...]:
    """The path of ``module`` in the model an estimator runs; a ValueError for any other module."""
    path = getattr(module, _PATH_ATTR, None)
    if path is None:
        raise ValueError(
            f"A site or tap sits in an NNX {type(module).__name__} that is not a "
            "module of the model the estimator runs"
            + (
                " (the estimator runs a linen model)."
                if not running
                else " (a module built during the forward pass?)."
            )
        )
    return path


def record(module: nnx.Module, collection: str, name: str, value) -> None:
    """Appends ``value`` to the record of site or tap ``name`` of ``module``."""
    attr = _RECORD_ATTR.format(collection=collection, name=name)
    previous = vars(module).get(attr)
    values, shapes = ((), ()) if previous is None else _values_and_shapes(previous)
    setattr(
        module,
        attr,
        SiteRecord(values + (value,), shapes=shapes + (tuple(jax.numpy.shape(value)),)),
    )


def _values_and_shapes(variable: SiteRecord):
    return variable.get_value(), variable.get_metadata()["shapes"]


_STACKED = (
    "{what} ran inside an NNX transform that stacks what its modules "
    "record ({how}): a site there would be one [layers, B, ...] value, not one per "
    "layer. Unroll those layers with a Python loop (nnx.remat per layer keeps the "
    "memory saving)."
)


class NNXModel:
    """An ``nnx.Module`` as the engine's model (see the module docstring).

    Raises a ValueError for batch statistics (BatchNorm's running averages
    would be updated by the forward pass, which estimators do not return).
    """

    def __init__(self, module: nnx.Module):
        stats = nnx.to_flat_state(nnx.state(module, nnx.BatchStat))
        if len(stats):
            names = ", ".join("/".join(_path(p)) for p, _ in stats)
            raise ValueError(
                f"{type(module).__name__} has batch statistics ({names}): estimators "
                "run the model as a pure function of its parameters and cannot update "
                "them. Use LayerNorm (or a BatchNorm with use_running_average=True "
                "whose statistics are not BatchStat variables)."
            )
        self.name = type(module).__name__
        self.graphdef, self.template, self.rest = nnx.split(module, nnx.Param, ...)
        self.pure = nnx.to_pure_dict(self.template)

    def __repr__(self) -> str:
        return f"NNXModel({self.name})"

    def init(self, key, *args) -> dict[str, Any]:
        """The module's parameters as the engine holds them, ``{"params": pure dict}``."""
        del key, args
        return {"params": self.pure}

    def state(self, pure) -> nnx.State:
        """The Param state holding the leaves of ``pure`` (a pure dict of the params' structure)."""
        leaves = jax.tree.leaves(pure)
        return jax.tree.unflatten(jax.tree.structure(self.template), leaves)

    def apply(self, variables, *args, rngs=None, mutable=False):
        # Fresh variables in this trace (the RNG streams advance as the module runs).
        rest = jax.tree.map(lambda x: x, self.rest)
        module = nnx.merge(self.graphdef, self.state(variables["params"]), rest)
        if rngs:
            streams = {
                v.tag for _, v in nnx.to_flat_state(nnx.state(module, nnx.RngKey))
            }
            keys = {name: key for name, key in rngs.items() if name in streams}
            if keys:
                nnx.reseed(module, **keys)
        perturbations = {
            "/".join(path[:-1] + (path[-1][1:],)): value
            for path, value in traverse_util.flatten_dict(
                dict(variables.get(sites_lib.PERTURBATIONS, {}))
            ).items()
        }
        modules = [(_path(p), m) for p, m in nnx.iter_modules(module)]
        for path, m in modules:
            setattr(m, _PATH_ATTR, path)
        with sites_lib.nnx_scope(sites_lib.NNXScope(perturbations)):
            try:
                outputs = module(*args)
            except ValueError as error:
                # nnx.vmap refuses a new variable its out_axes do not cover.
                prefix = _RECORD_ATTR.format(collection="", name="")[:-1]
                if prefix not in str(error):
                    raise
                raise ValueError(
                    _STACKED.format(what="A site or tap", how="nnx.vmap")
                ) from error
        if not mutable:
            return outputs
        collections = {sites_lib.SITES: {}, sites_lib.TAPS: {}}
        for path, m in modules:
            for collection, records in collections.items():
                prefix = _RECORD_ATTR.format(collection=collection, name="")
                for attr, variable in vars(m).items():
                    if attr.startswith(prefix):
                        name = attr[len(prefix) :]
                        values, shapes = _values_and_shapes(variable)
                        if tuple(jax.numpy.shape(v) for v in values) != shapes:
                            raise ValueError(
                                _STACKED.format(
                                    what=f"Site or tap {'/'.join(path + (name,))!r}",
                                    how="nnx.scan, nnx.vmap",
                                )
                            )
                        records[path + ("@" + name,)] = values
        return outputs, {
            name: traverse_util.unflatten_dict(records)
            for name, records in collections.items()
        }

    def variables(self, params) -> dict[str, Any]:
        """``{"params": pure dict}`` of the ``nnx.State`` a user passes as params."""
        if isinstance(params, nnx.Module):
            raise TypeError(
                f"Pass the {self.name}'s parameters, nnx.state(model, nnx.Param), not "
                "the module itself."
            )
        if not isinstance(params, nnx.State):
            raise TypeError(
                f"params of an NNX model must be its Param state, nnx.state(model, "
                f"nnx.Param); got {type(params).__name__}."
            )
        pure = nnx.to_pure_dict(params)
        if jax.tree.structure(pure) != jax.tree.structure(self.pure):
            raise ValueError(
                f"params do not have the structure of {self.name}'s Param state, "
                "nnx.state(model, nnx.Param), as it was when the estimator was built."
            )
        return {"params": pure}

    def mask(self, trainable):
        """``trainable`` (None, an NNX filter, or a pytree of bools shaped like the params) as the engine's mask."""
        if trainable is None:
            return None
        if isinstance(trainable, nnx.State):
            trainable = nnx.to_pure_dict(trainable)
        if _is_filter(trainable):
            module = nnx.merge(self.graphdef, self.template, self.rest)
            chosen = {
                _path(p)
                for p, _ in nnx.to_flat_state(
                    nnx.state(module, nnx.All(nnx.Param, trainable))
                )
            }
            flat = traverse_util.flatten_dict(self.pure)
            trainable = traverse_util.unflatten_dict(
                {path: _path(path) in chosen for path in flat}
            )
        return {"params": trainable}


def _is_filter(trainable) -> bool:
    """An NNX filter: a Variable type, a filterlib object, a string or ``(path, value) -> bool``."""
    if isinstance(trainable, type):
        return True
    if isinstance(trainable, str | type(...)) or callable(trainable):
        return True
    return type(trainable).__module__.startswith("flax.nnx")


def estimator_factory(factory: Callable) -> Callable:
    """``factory(model, ...) -> estimator`` that also takes an ``nnx.Module`` (see the module docstring)."""

    @functools.wraps(factory)
    def make(model, *args, trainable=None, **kwargs):
        if not is_nnx(model):
            return factory(model, *args, trainable=trainable, **kwargs)
        bridge = NNXModel(model)
        estimator = factory(bridge, *args, trainable=bridge.mask(trainable), **kwargs)
        has_aux = getattr(estimator, "has_aux", False)

        def grads_of(out):
            if has_aux:
                return bridge.state(out[0]["params"]), out[1]
            return bridge.state(out["params"])

        if is_stateful(estimator):

            def estimate(params, batch, key, state):
                out, state = estimator(bridge.variables(params), batch, key, state)
                return grads_of(out), state

            def init(params, batch, key=None):
                return estimator.init(bridge.variables(params), batch, key)

            estimate = functools.wraps(estimator)(estimate)
            estimate.init = init
        else:

            @functools.wraps(estimator)
            def estimate(params, batch, key):
                # variables() checked that params have the template's structure.
                return grads_of(estimator(bridge.variables(params), batch, key))

        estimate.has_aux = has_aux
        return estimate

    return make


def inspector(fn: Callable) -> Callable:
    """``fn(model, params, ...)`` that also takes an ``nnx.Module`` and its Param state."""

    @functools.wraps(fn)
    def inspect(model, params, *args, **kwargs):
        if not is_nnx(model):
            return fn(model, params, *args, **kwargs)
        bridge = NNXModel(model)
        if "trainable" in kwargs:
            kwargs["trainable"] = bridge.mask(kwargs["trainable"])
        return fn(bridge, bridge.variables(params), *args, **kwargs)

    return inspect
