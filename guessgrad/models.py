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
    Linear,
    fan_in_uniform,
)
from guessgrad._src.vit import (
    VIT_CONFIGS,
    ViT,
    load_vit_npz,
    prompt_mask,
    save_vit_npz,
    vit,
)

__all__ = (
    "LOCALMIXER_CONFIGS",
    "MLP",
    "OBJECTIVES",
    "VIT_CONFIGS",
    "Chain",
    "Linear",
    "LocalMixer",
    "MixerBlock",
    "ViT",
    "fan_in_uniform",
    "load_vit_npz",
    "local_mixer",
    "local_mixer_args",
    "prompt_mask",
    "replicated_cross_entropy",
    "save_vit_npz",
    "vit",
)
