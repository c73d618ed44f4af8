"""Type aliases shared across guessgrad."""

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax

Array = jax.Array
PRNGKey = jax.Array
Params = Any  # a pytree of arrays: what `model.init(key, images)` returns
Grads = Any  # same tree structure, shapes and dtypes as Params
Batch = Mapping[str, Array]  # {"image": [B, ...] float, "label": [B] int}
Aux = dict[str, Array]


class Estimator(Protocol):
    """A gradient estimator that also returns what its forward pass measured."""

    def __call__(
        self, params: Params, batch: Batch, key: PRNGKey
    ) -> tuple[Grads, Aux]: ...


EstimateFn = Callable[[Params, Batch, PRNGKey], Grads]
