r"""Visual prompt tuning of a frozen ViT with guessed gradients.

    python -m experiments.prompt_tuning
    python -m experiments.prompt_tuning --compare=backprop,wt --num_prompts=16 --prompt_depth=deep
    python -m experiments.prompt_tuning --checkpoint=ViT-B_16.npz --config=B/16 \
        --dataset=cifar100 --train_head --task=none --compare=directional,wt

The short form of ``python -m experiments.main
--config=experiments/configs/prompt_tuning.py``: that file's fields as
flags. On the embedded digits: pretrains a small ViT by backprop on the
digits (cached in <workdir>/backbone.npz, resumable), then freezes it and
trains only prompt tokens on a second task, the same digits shifted
(--task: "invert", light on dark becoming dark on light, by default; or
"rotate"), with each method of --compare, and prints the comparison (test
accuracy, wall time, examples/s; the frozen backbone's accuracy on the task
before tuning for reference). --checkpoint skips the pretraining and tunes
prompts on a public ViT checkpoint (the original JAX ViT release's .npz
files). Every run's files are in <workdir>/<method>.
"""

from __future__ import annotations

from absl import app

import guessgrad as gg
from experiments import common  # before guessgrad: it sets XLA_FLAGS for jax
from experiments.configs import prompt_tuning
from guessgrad import data

main = common.run_alias(
    "prompt_tuning",
    prompt_tuning.get_config,
    {
        "config": "model.config",
        "num_prompts": "model.num_prompts",
        "prompt_depth": "model.prompt_depth",
        "train_head": "model.train_head",
        "checkpoint": "model.backbone",
        "task": "transform",
        "pretrain_epochs": "pretrain.epochs",
        "pretrain_learning_rate": "pretrain.learning_rate",
    },
    help={
        "config": f"ViT size: one of {', '.join(gg.models.VIT_CONFIGS)}.",
        "num_prompts": "Prompt tokens.",
        "prompt_depth": "shallow: prompts prepended to the first layer's input; "
        "deep: a fresh set per layer.",
        "train_head": "Also train the linear head (Jia et al.'s VPT); needed when "
        "the task's classes differ from the checkpoint's.",
        "checkpoint": "A backbone in the public ViT .npz format (e.g. ViT-B_16.npz); "
        "skips the pretraining.",
        "task": "The second task: the data set's images shifted by one of "
        f"{', '.join(data.TRANSFORMS)}, or none (the data set as it is, e.g. with "
        "--checkpoint).",
        "pretrain_epochs": "Passes over the untransformed data while pretraining.",
        "pretrain_learning_rate": "Step size of the backprop pretraining.",
        "epochs": "Passes over the training set while tuning the prompts.",
        "learning_rate": "Step size of the prompt tuning.",
    },
    convert={"task": lambda task: None if task == "none" else task},
)

if __name__ == "__main__":
    app.run(main)
