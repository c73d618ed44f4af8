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
    """A gradient estimator: ``(params, batch, key) -> grads``.

    ``grads`` has the tree structure, shapes and dtypes of ``params``. An
    estimator built with ``has_aux=True`` returns ``(grads, metrics)`` and
    says so in its ``has_aux`` attribute.
    """

    def __call__(self, params: Params, batch: Batch, key: PRNGKey) -> Any: ...


EstimateFn = Callable[[Params, Batch, PRNGKey], Grads]


def is_stateful(estimator: Callable) -> bool:
    """Whether ``estimator`` carries state across steps: ``(params, batch, key, state)
    -> (grads, state)``, with ``estimator.init(params, batch) -> state``."""
    return callable(getattr(estimator, "init", None))
