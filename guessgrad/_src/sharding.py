"""Fresh arrays that meet batch-sharded ones on a mesh with Explicit axes."""

from __future__ import annotations

import contextlib
import functools

import jax
from jax.sharding import AxisType, PartitionSpec

from guessgrad._src.base import Array


def explicit_spec(ref: Array, extra_leading: int = 0):
    """``ref``'s PartitionSpec when it is sharded on a mesh with Explicit axes, else None.

    ``extra_leading`` unsharded axes are prepended (for arrays that stack
    several values shaped like ``ref``).
    """
    if _explicit_mesh(ref) is None:
        return None
    spec = jax.typeof(ref).sharding.spec
    return PartitionSpec(*((None,) * extra_leading + tuple(spec)))


def abstract_sharding(spec):
    """A PartitionSpec from :func:`explicit_spec` on the context mesh, for ``jax.ShapeDtypeStruct``.

    (A bare PartitionSpec there needs a concrete context mesh, which a
    function traced under ``jax.jit`` does not have.)
    """
    if spec is None:
        return None
    return jax.sharding.NamedSharding(jax.sharding.get_abstract_mesh(), spec)


def like(x: Array, ref: Array, extra_leading: int = 0) -> Array:
    """``x`` (made fresh: noise, zeros, cotangents) with ``ref``'s sharding under Explicit axes.

    On a mesh from ``jax.make_mesh`` the sharding is part of an array's type,
    so a replicated noise array cannot meet a batch-sharded site. Without
    such a mesh this returns ``x`` itself.
    """
    spec = explicit_spec(ref, extra_leading)
    return x if spec is None else jax.sharding.reshard(x, spec)


def like_batch(x: Array, ref: Array) -> Array:
    """``x`` [B, ...] sharded on its first axis as ``ref`` [B, ...] is (Explicit axes only)."""
    spec = explicit_spec(ref)
    if spec is None:
        return x
    lead = spec[0] if len(spec) else None
    return jax.sharding.reshard(x, PartitionSpec(lead, *([None] * (x.ndim - 1))))


def _explicit_mesh(x):
    """The mesh ``x`` is sharded on when it has Explicit axes, else None."""
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if mesh is None or mesh.empty or AxisType.Explicit not in tuple(mesh.axis_types):
        return None
    return mesh


def mesh_of(tree):
    """A context that sets the Explicit mesh ``tree``'s arrays are sharded on, if none is set.

    On a mesh from ``jax.make_mesh`` the sharding is part of an array's type,
    and making arrays with a PartitionSpec needs that mesh as the context
    mesh; ``jax.grad`` needs none. Outside ``jax.jit`` this sets the arrays'
    concrete mesh (``jax.set_mesh``), under it their abstract one.
    """
    if not jax.sharding.get_abstract_mesh().empty:
        return contextlib.nullcontext()
    for leaf in jax.tree.leaves(tree):
        if not hasattr(leaf, "dtype"):
            continue
        mesh = _explicit_mesh(leaf)
        if mesh is None:
            continue
        concrete = getattr(getattr(leaf, "sharding", None), "mesh", None)
        if isinstance(concrete, jax.sharding.Mesh) and not isinstance(
            leaf, jax.core.Tracer
        ):
            return jax.set_mesh(concrete)
        return jax.sharding.use_abstract_mesh(mesh)
    return contextlib.nullcontext()


def on_mesh_of_arguments(fn):
    """``fn(*args)`` run under :func:`mesh_of` its arguments (estimators, as ``jax.grad`` does)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with mesh_of((args, kwargs)):
            return fn(*args, **kwargs)

    return wrapped
