"""Networks guessgrad's estimators work on."""

from guessgrad._src.localmixer import (
    LOCALMIXER_CONFIGS,
    OBJECTIVES,
    LocalMixer,
    MixerBlock,
    local_mixer,
    local_mixer_args,
    replicated_cross_entropy,
)
from guessgrad._src.models import (
    MLP,
    Chain,
    ChainFns,
    Linear,
    chain_fns,
    fan_in_uniform,
)

__all__ = (
    "LOCALMIXER_CONFIGS",
    "MLP",
    "OBJECTIVES",
    "Chain",
    "ChainFns",
    "Linear",
    "LocalMixer",
    "MixerBlock",
    "chain_fns",
    "fan_in_uniform",
    "local_mixer",
    "local_mixer_args",
    "replicated_cross_entropy",
)
