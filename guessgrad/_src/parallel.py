"""Data parallelism: one device mesh, the batch sharded, parameters replicated.

Every estimator works per example (per-example losses, per-example tangents
and guesses), so the batch axis is the natural one to split. The recipe is
the standard ``jax.sharding`` one:

* a one-axis mesh over every device of every process (axis ``"data"``),
* batches sharded on their first axis over it (:func:`batch_sharding`),
* parameters, optimiser state and keys replicated on it (:func:`replicated`).

``jax.jit`` then partitions the step itself: each device computes its
``B / n`` examples (forward pass, guesses, tangents) and XLA inserts the
all-reduce that sums the per-device parameter gradients; ``mixing``, whose
guesses mix examples across the whole batch, gets the all-gathers it needs.
Random numbers do not depend on the sharding (JAX's semantics, and
``jax_threefry_partitionable``, on by default, generates them in place), so a
run on ``n`` devices matches the run on one device up to float rounding in
the reductions.

Typical use (the experiments do exactly this)::

    from guessgrad import parallel

    parallel.maybe_initialize_distributed()  # first JAX call; no-op on one host
    mesh = parallel.data_mesh()
    print(parallel.describe(mesh))
    parallel.check_batch_size(batch_size, mesh)
    loader = data.Loader(..., sharding=parallel.batch_sharding(mesh))
    state = parallel.replicate(gg.init_train_state(params, optimizer, key), mesh)
    step = parallel.make_parallel_train_step(estimator, optimizer, mesh)
    state, metrics = step(state, loader.batch(0))
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from guessgrad._src.base import Aux, Batch, Estimator
from guessgrad._src.train import TrainState, make_train_step

__all__ = [
    "DATA_AXIS",
    "ParallelTrainStep",
    "batch_sharding",
    "check_batch_size",
    "data_mesh",
    "describe",
    "make_parallel_train_step",
    "maybe_initialize_distributed",
    "replicate",
    "replicated",
    "shard_batch",
]

DATA_AXIS = "data"
# Set to 0 to keep maybe_initialize_distributed() from joining a multi-host job.
_OPT_OUT_ENV = "GUESSGRAD_DISTRIBUTED"


# --- multi-host start-up ------------------------------------------------------


def _env_int(*names: str) -> int | None:
    """The first of the environment variables ``names`` that is set, as an int."""
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError as err:
                raise ValueError(f"${name} must be an integer; got {value!r}.") from err
    return None


def _multihost_launcher() -> tuple[str, dict[str, Any]] | None:
    """Which launcher says this process is one of several, and the arguments to pass.

    Returns ``(description, kwargs for jax.distributed.initialize)``, or None
    on a single host. Only a launcher that reports more than one process
    counts, so a plain single-host run never starts the distributed runtime.
    """
    env = os.environ
    coordinator = env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS")
    num_processes = _env_int("JAX_NUM_PROCESSES", "NUM_PROCESSES")
    if coordinator and num_processes is not None and num_processes > 1:
        process_id = _env_int("JAX_PROCESS_ID", "PROCESS_ID")
        if process_id is None:
            raise ValueError(
                f"A multi-host job of {num_processes} processes with coordinator "
                f"{coordinator} needs this process's index in $JAX_PROCESS_ID "
                "(0 on the coordinator)."
            )
        kwargs = {
            "coordinator_address": coordinator,
            "num_processes": num_processes,
            "process_id": process_id,
        }
        return f"{num_processes} processes, coordinator {coordinator}", kwargs
    # SLURM under srun: the variables jax's own Slurm detection reads.
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    tasks = _env_int("SLURM_NTASKS")
    if all(name in env for name in slurm) and tasks is not None and tasks > 1:
        return f"SLURM, {tasks} tasks", {"cluster_detection_method": "slurm"}
    # Open MPI's mpirun.
    ranks = _env_int("OMPI_COMM_WORLD_SIZE")
    if "OMPI_MCA_orte_hnp_uri" in env and ranks is not None and ranks > 1:
        return f"Open MPI, {ranks} ranks", {"cluster_detection_method": "ompi"}
    # A Cloud TPU pod slice on GKE lists its hosts. (On TPU VMs the TPU
    # runtime joins the hosts of a pod slice by itself, without this.)
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if hosts and len([h for h in hosts.split(",") if h.strip()]) > 1:
        return f"Cloud TPU pod slice of {len(hosts.split(','))} hosts", {}
    return None


def maybe_initialize_distributed() -> bool:
    """Joins the multi-host job this process belongs to; on a single host, does nothing.

    Calls ``jax.distributed.initialize`` when the environment says this is one
    of several processes: ``$JAX_COORDINATOR_ADDRESS`` (or
    ``$COORDINATOR_ADDRESS``) with ``$JAX_NUM_PROCESSES > 1`` and
    ``$JAX_PROCESS_ID``; SLURM (``srun`` with more than one task); Open MPI
    (``mpirun`` with more than one rank); a Cloud TPU pod slice that lists
    several hosts. Set ``$GUESSGRAD_DISTRIBUTED=0`` to never join.

    Call it before anything else touches JAX (``jax.devices()``, any
    computation): JAX can only join a job before its backend starts. Safe to
    call again: later calls only report. It starts JAX's backend to answer.

    Returns:
      Whether this process computes together with other processes
      (``jax.process_count() > 1``).

    Raises:
      RuntimeError: the environment describes a multi-host job but JAX's
        backend had already started, so this process cannot join it.
      ValueError: the environment describes the job incompletely.
    """
    opted_out = os.environ.get(_OPT_OUT_ENV, "").strip().lower() in ("0", "false", "no")
    if not jax.distributed.is_initialized() and not opted_out:
        launcher = _multihost_launcher()
        if launcher is not None:
            description, kwargs = launcher
            try:
                jax.distributed.initialize(**kwargs)
            except RuntimeError as err:
                raise RuntimeError(
                    f"This process is part of a multi-host job ({description}), but "
                    "JAX's backend had already started, so it cannot join: call "
                    "guessgrad.parallel.maybe_initialize_distributed() before any "
                    f"other JAX call (or set ${_OPT_OUT_ENV}=0 to run this process "
                    f"alone). JAX said: {err}"
                ) from err
    return jax.process_count() > 1


# --- mesh and shardings -------------------------------------------------------


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh (axis ``"data"``) over ``devices``: default every device of every process.

    The axis is an ``Auto`` axis, so ``jax.jit`` propagates shardings through
    unannotated code.
    """
    if devices is None:
        devices = jax.devices()
    devices = list(devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device; got an empty list.")
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays split on their first (batch) axis over the mesh: ``P("data")``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh: ``P()``."""
    return NamedSharding(mesh, PartitionSpec())


def _num_shards(mesh: Mesh) -> int:
    if DATA_AXIS not in mesh.shape:
        raise ValueError(
            f"The mesh needs an axis named {DATA_AXIS!r} (make it with "
            f"guessgrad.parallel.data_mesh()); got axes {tuple(mesh.shape)}."
        )
    return mesh.shape[DATA_AXIS]


def check_batch_size(batch_size: int, mesh: Mesh) -> int:
    """Checks that the global batch splits evenly over the mesh; returns the per-device batch.

    Raises:
      TypeError: ``batch_size`` is not an integer.
      ValueError: ``batch_size`` is not a positive multiple of the number of
        devices on the mesh's ``"data"`` axis; the message suggests the
        nearest valid sizes.
    """
    n = _num_shards(mesh)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size must be a positive integer; got {batch_size!r}.")
    if batch_size < 1 or batch_size % n:
        below = (batch_size // n) * n
        options = f"{below} or {below + n}" if below > 0 else f"{n}"
        raise ValueError(
            f"The batch size {batch_size} does not split evenly over the {n} devices "
            f"of the data-parallel mesh: use a multiple of {n} (e.g. {options})."
        )
    return int(batch_size) // n


def describe(mesh: Mesh) -> str:
    """One line saying what the mesh computes on, for experiments to print at start.

    E.g. ``"data-parallel over 8 devices (TPU v2) on 1 host"`` or ``"1 device (cpu)"``.
    """
    devices = list(mesh.devices.flat)
    kinds = ", ".join(sorted({d.device_kind for d in devices}))
    if len(devices) == 1:
        return f"1 device ({kinds})"
    hosts = len({d.process_index for d in devices})
    return (
        f"data-parallel over {len(devices)} devices ({kinds}) on {hosts} "
        f"host{'s' if hosts != 1 else ''}"
    )


# --- placing arrays -----------------------------------------------------------


def _is_placed(leaf: Any, sharding: NamedSharding) -> bool:
    return isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(
        sharding, leaf.ndim
    )


def _reshard(leaf: jax.Array, sharding: NamedSharding) -> jax.Array:
    """A global array that spans other processes, moved to ``sharding`` by XLA."""
    return jax.jit(lambda x: x, out_shardings=sharding)(leaf)


def _from_process_local(leaf: Any, sharding: NamedSharding) -> jax.Array:
    """Multi-process placement of this process's host data (typed PRNG keys too)."""
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(
        leaf.dtype, jax.dtypes.prng_key
    ):
        data = _from_process_local(jax.random.key_data(leaf), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return _reshard(leaf, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf of ``tree`` (params, optimiser state, a TrainState) copied to every device.

    Every leaf comes back with the sharding ``replicated(mesh)``, the one a
    parallel train step's outputs have, so the step compiles once: a leaf
    that merely sits on the mesh's one device (a single-device array) is
    placed too. Leaves already placed so are returned as they are. With
    several processes, every process must pass the same values (the same
    seed gives the same initial state); each contributes its own copy.
    """
    sharding = replicated(mesh)
    multiprocess = jax.process_count() > 1

    def place(leaf):
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        if multiprocess:
            return _from_process_local(leaf, sharding)
        return jax.device_put(leaf, sharding)

    return jax.tree.map(place, tree)


def shard_batch(batch: Batch, mesh: Mesh) -> Batch:
    """A batch split on its first axis over the mesh's devices.

    On one host, ``batch`` is the global batch (numpy or jax arrays). With
    several processes, each passes its own part of the global batch (the
    rows for its devices, ``B / process_count`` of them) and gets back the
    global array. Leaves already sharded this way are returned as they are.

    Raises:
      ValueError: a leaf has no batch axis, or its batch axis does not split
        evenly over the (process-local) devices.
    """
    sharding = batch_sharding(mesh)
    n = _num_shards(mesh)
    multiprocess = jax.process_count() > 1
    local = len(
        {d for d in mesh.devices.flat if d.process_index == jax.process_index()}
    )

    def place(path, leaf):
        if _is_placed(leaf, sharding):
            return leaf
        shape = np.shape(leaf)
        name = jax.tree_util.keystr(path) or "the batch"
        if not shape:
            raise ValueError(
                f"{name} is a scalar; every batch entry needs a batch axis."
            )
        if multiprocess:
            if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
                return _reshard(leaf, sharding)
            if shape[0] % local:
                raise ValueError(
                    f"{name} has {shape[0]} rows on this process, which do not split "
                    f"evenly over its {local} devices."
                )
            return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))
        if shape[0] % n:
            raise ValueError(
                f"{name} has a batch of {shape[0]}, which does not split evenly over "
                f"the {n} devices of the data-parallel mesh; use a multiple of {n}."
            )
        return jax.device_put(leaf, sharding)

    return jax.tree_util.tree_map_with_path(place, batch)


# --- the training step --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParallelTrainStep:
    """``(state, batch) -> (state, metrics)``, data-parallel on ``mesh``.

    Attributes:
      mesh: the data-parallel mesh.
      jitted: the underlying ``jax.jit`` function (with explicit shardings),
        for ``.lower(state, batch).compile()`` and inspection.
      estimator: the estimator it steps with (a stateful one's ``init``
        builds ``TrainState.estimator_state``).
    """

    mesh: Mesh
    jitted: Callable[[TrainState, Batch], tuple[TrainState, Aux]]
    estimator: Estimator | None = None

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, Aux]:
        """Places ``state`` and ``batch`` if they are not yet (a no-op after step one), then steps."""
        return self.jitted(replicate(state, self.mesh), shard_batch(batch, self.mesh))

    def lower(self, state: TrainState, batch: Batch):
        """``jax.jit``'s ``lower`` on placed inputs."""
        return self.jitted.lower(
            replicate(state, self.mesh), shard_batch(batch, self.mesh)
        )


def make_parallel_train_step(
    estimator: Estimator,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    skip_nonfinite: bool = False,
    has_aux: bool | None = None,
) -> ParallelTrainStep:
    """:func:`guessgrad.make_train_step`, jitted with data-parallel shardings.

    ``has_aux`` as there: whether the estimator returns ``(grads, metrics)``
    (by default its own ``has_aux`` attribute).

    The step is the same computation (same keys, same updates); it is
    compiled with ``in_shardings=(replicated, batch-sharded)`` and
    ``out_shardings=(replicated, replicated)``, so the state stays replicated
    from step to step and each device works on its ``B / n`` examples.

    Plain ``make_train_step`` already runs data-parallel when its inputs are
    placed (state :func:`replicate`-d, batch sharded, e.g. by
    ``Loader(sharding=batch_sharding(mesh))``): ``jax.jit`` propagates the
    shardings and produces replicated outputs. This wrapper adds two
    guarantees: the output placement is pinned rather than inferred, and
    inputs that are not placed yet (a numpy batch, a freshly initialised
    state) are placed first instead of silently running on one device.
    """
    step = make_train_step(
        estimator,
        optimizer,
        jit=False,
        skip_nonfinite=skip_nonfinite,
        has_aux=has_aux,
    )
    state_sharding, data_sharding = replicated(mesh), batch_sharding(mesh)
    jitted = jax.jit(
        step,
        in_shardings=(state_sharding, data_sharding),
        out_shardings=(state_sharding, state_sharding),
    )
    return ParallelTrainStep(mesh=mesh, jitted=jitted, estimator=estimator)
