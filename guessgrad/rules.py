"""Guess rules: the public extension point for new guesses.

A rule is a function ``(ctx, site, key) -> y`` written against
:class:`GuessContext`; :func:`guessgrad.estimators.from_rule` turns it into
an estimator with every mode, ``num_guesses``, trainable subsets, local
losses and sharding. The library's own rules are here to read, reuse and
compose.
"""

from guessgrad._src.rules import (
    GuessContext,
    GuessFn,
    GuessInitFn,
    GuessRule,
    StatefulGuessFn,
    as_rule,
    downstream,
    gaussian,
    mixing,
    normal_like,
    normalize_per_example,
    true_error,
    wt,
)
from guessgrad._src.wperp import (
    KRYLOV_BLOCK,
    chebyshev_filter,
    debiased_wt,
    default_krylov_steps,
    krylov_subspace,
    orthonormal_rows,
    warm_subspace,
    wperp,
    wperp_ns,
    wperp_ns_products,
)

__all__ = (
    "KRYLOV_BLOCK",
    "GuessContext",
    "GuessFn",
    "GuessInitFn",
    "GuessRule",
    "StatefulGuessFn",
    "as_rule",
    "chebyshev_filter",
    "debiased_wt",
    "default_krylov_steps",
    "downstream",
    "gaussian",
    "krylov_subspace",
    "mixing",
    "normal_like",
    "normalize_per_example",
    "orthonormal_rows",
    "true_error",
    "warm_subspace",
    "wperp",
    "wperp_ns",
    "wperp_ns_products",
    "wt",
)
