"""Networks guessgrad's estimators work on."""

from guessgrad._src.models import MLP as MLP
from guessgrad._src.models import Chain as Chain
from guessgrad._src.models import ChainFns as ChainFns
from guessgrad._src.models import Linear as Linear
from guessgrad._src.models import chain_fns as chain_fns
from guessgrad._src.models import fan_in_uniform as fan_in_uniform

__all__ = ("MLP", "Chain", "ChainFns", "Linear", "chain_fns", "fan_in_uniform")
