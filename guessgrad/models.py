"""Networks guessgrad's estimators work on."""

from guessgrad._src.models import (
    MLP,
    Chain,
    ChainFns,
    Linear,
    chain_fns,
    fan_in_uniform,
)

__all__ = ("MLP", "Chain", "ChainFns", "Linear", "chain_fns", "fan_in_uniform")
