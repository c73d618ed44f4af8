"""Gradient estimators, one function per method (``guessgrad.estimators.wt(model, ...)``).

Each returns a pure ``(params, batch, key) -> grads`` for a model with
sites; :func:`from_rule` makes one from any guess rule
(:mod:`guessgrad.rules`). :data:`ESTIMATORS` maps the command line's
method names to these functions.
"""

from guessgrad._src.estimators import (
    DEFAULT_MODE,
    ESTIMATORS,
    MODES,
    activation_perturbation,
    backprop,
    directional,
    downstream,
    estimator_options,
    from_rule,
    get_estimator,
    mixing,
    oracle_angle,
    self_sharpening,
    wperp,
    wperp_ns,
    wt,
)

__all__ = (
    "DEFAULT_MODE",
    "ESTIMATORS",
    "MODES",
    "activation_perturbation",
    "backprop",
    "directional",
    "downstream",
    "estimator_options",
    "from_rule",
    "get_estimator",
    "mixing",
    "oracle_angle",
    "self_sharpening",
    "wperp",
    "wperp_ns",
    "wt",
)
