"""Fresh arrays that meet batch-sharded ones on a mesh with Explicit axes."""

from __future__ import annotations

import jax
from jax.sharding import AxisType, PartitionSpec

from guessgrad._src.base import Array


def explicit_spec(ref: Array, extra_leading: int = 0):
    """``ref``'s PartitionSpec when it is sharded on a mesh with Explicit axes, else None.

    ``extra_leading`` unsharded axes are prepended (for arrays that stack
    several values shaped like ``ref``).
    """
    sharding = getattr(jax.typeof(ref), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or AxisType.Explicit not in tuple(mesh.axis_types):
        return None
    return PartitionSpec(*((None,) * extra_leading + tuple(sharding.spec)))


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
