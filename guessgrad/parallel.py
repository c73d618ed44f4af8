"""Data parallelism: one device mesh, the batch sharded, parameters replicated.

A one-axis mesh over every device of every process (axis ``"data"``),
batches sharded on their first axis over it (:func:`batch_sharding`), and
parameters, optimiser state and keys replicated on it (:func:`replicated`);
``jax.jit`` then partitions the train step itself
(:func:`make_parallel_train_step`).
"""

from guessgrad._src.parallel import (
    DATA_AXIS,
    ParallelTrainStep,
    batch_sharding,
    check_batch_size,
    data_mesh,
    describe,
    make_parallel_train_step,
    maybe_initialize_distributed,
    replicate,
    replicated,
    shard_batch,
)

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
