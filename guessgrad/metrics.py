"""Measurements of gradient estimates: cosines, one-step effectiveness, bias, ranks, subspaces.

The paper's measurements of how good a guessed gradient is, as pure
functions that work on any model: they take an estimator
``(params, batch, key) -> grads`` (:func:`guessgrad.get_estimator`) and, for
the true gradient, a function ``true_grad_fn(params, batch) -> grads``, e.g.
``jax.grad(loss_fn)``. Every function is jit- and vmap-friendly.
"""

from guessgrad._src.metrics import (
    GRADIENT_NORM_ETAS,
    PAPER_ETAS,
    SCALES,
    LossFn,
    TrueGradFn,
    analytic_bias,
    bias_curve,
    cosine,
    effective_rank,
    effective_ranks,
    estimate_cosines,
    layer_cosines,
    module_cosines,
    one_step_effectiveness,
    per_example_cosines,
    power_singular_values,
    subspace_overlap,
)

__all__ = [
    "GRADIENT_NORM_ETAS",
    "PAPER_ETAS",
    "SCALES",
    "LossFn",
    "TrueGradFn",
    "analytic_bias",
    "bias_curve",
    "cosine",
    "effective_rank",
    "effective_ranks",
    "estimate_cosines",
    "layer_cosines",
    "module_cosines",
    "one_step_effectiveness",
    "per_example_cosines",
    "power_singular_values",
    "subspace_overlap",
]
