r"""Visual prompt tuning of a frozen ViT with guessed gradients.

    python -m experiments.prompt_tuning
    python -m experiments.prompt_tuning --compare=backprop,wt --num_prompts=16 --prompt_depth=deep
    python -m experiments.prompt_tuning --checkpoint=ViT-B_16.npz --config=B/16 \
        --dataset=cifar100 --train_head --task=none --compare=directional,wt

On the embedded digits: pretrains a small ViT by backprop on the digits
(cached in <workdir>/backbone.npz, resumable), then freezes it and trains only
prompt tokens on a second task, the same digits shifted (--task: "invert",
light on dark becoming dark on light, by default; or "rotate"), with each
method of --compare, and prints the comparison (test accuracy, wall time,
examples/s; the frozen backbone's accuracy on the task before tuning for
reference). --checkpoint skips the pretraining and tunes prompts on a public
ViT checkpoint (the original JAX ViT release's .npz files). Every run's files
are in <workdir>/<method>; the shared flags are in experiments/common.py, the
logic in guessgrad.experiment.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence

from absl import app, flags

import guessgrad as gg
from experiments import common  # before guessgrad: it sets XLA_FLAGS for jax
from guessgrad import data, experiment

DEFAULT_EPOCHS = 5
DEFAULT_LEARNING_RATE = 1e-2
# Prompt tuning is where forward-mode methods pay off: these are the default comparison.
# downstream is left out: the prompt site's target (block 0's query projection)
# has no activation, so its guess is wt's exactly.
DEFAULT_METHODS = "backprop,directional,activation_perturbation,wt"
BACKBONE_FILE = "backbone.npz"

common.define_flags(
    epochs=DEFAULT_EPOCHS,
    learning_rate=DEFAULT_LEARNING_RATE,
    epochs_help="Passes over the training set while tuning the prompts.",
    learning_rate_help="Step size of the prompt tuning.",
    workdir_help="runs/<dataset>-prompt_tuning-vit-<config>-seed<seed>",
)
flags.FLAGS.set_default("compare", DEFAULT_METHODS)
_CONFIG = flags.DEFINE_string(
    "config", "tiny", f"ViT size: one of {', '.join(gg.models.VIT_CONFIGS)}."
)
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 8, "Prompt tokens.")
_PROMPT_DEPTH = flags.DEFINE_enum(
    "prompt_depth",
    "shallow",
    ["shallow", "deep"],
    "shallow: prompts prepended to the first layer's input; deep: a fresh set per layer.",
)
_TRAIN_HEAD = flags.DEFINE_bool(
    "train_head",
    False,
    "Also train the linear head (Jia et al.'s VPT); needed when the task's classes "
    "differ from the checkpoint's.",
)
_TASK = flags.DEFINE_string(
    "task",
    "invert",
    f"The second task: the data set's images shifted by one of {', '.join(data.TRANSFORMS)}, "
    "or none (the data set as it is, e.g. with --checkpoint).",
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "A backbone in the public ViT .npz format (e.g. ViT-B_16.npz); skips the pretraining.",
)
_PRETRAIN_EPOCHS = flags.DEFINE_integer(
    "pretrain_epochs", 10, "Passes over the untransformed data while pretraining."
)
_PRETRAIN_LEARNING_RATE = flags.DEFINE_float(
    "pretrain_learning_rate", 1e-3, "Step size of the backprop pretraining."
)


def _spec() -> experiment.ViTSpec:
    return experiment.ViTSpec(
        config=_CONFIG.value,
        num_prompts=_NUM_PROMPTS.value,
        prompt_depth=_PROMPT_DEPTH.value,
        train_head=_TRAIN_HEAD.value,
    )


def workdir_of(config: experiment.Config) -> str:
    """The experiment's folder: the cached backbone and one folder per method."""
    if config.workdir:
        return os.path.abspath(config.workdir)
    size = config.model.config.replace("/", "-")
    return os.path.abspath(
        os.path.join(
            "runs", f"{config.dataset}-prompt_tuning-vit-{size}-seed{config.seed}"
        )
    )


def pretrained_backbone(
    config: experiment.Config, epochs: int, learning_rate: float
) -> str:
    """Pretrains the ViT of ``config`` by backprop on the untransformed data; returns the cached .npz.

    Runs in ``<workdir>/pretrain`` (resumable: an interrupted pretraining
    continues where it stopped) and writes ``<workdir>/backbone.npz`` once.
    """
    workdir = workdir_of(config)
    path = os.path.join(workdir, BACKBONE_FILE)
    if os.path.exists(path):
        print(f"[prompt_tuning] backbone: {path} (cached)")
        return path
    pretrain = dataclasses.replace(
        config,
        method="backprop",
        model=dataclasses.replace(
            config.model, num_prompts=0, backbone=None, train_head=False
        ),
        transform=None,
        augment=False,
        options={},
        epochs=epochs,
        steps=None,
        # One evaluation (and checkpoint) per epoch: the tuning's --eval_every
        # counts tuning steps.
        eval_every=max(data.num_train_examples(config.dataset) // config.batch_size, 1),
        learning_rate=learning_rate,
        workdir=os.path.join(workdir, "pretrain"),
        resume=True,
    )
    print(f"[prompt_tuning] pretraining the backbone by backprop in {pretrain.workdir}")
    results = experiment.run(pretrain)
    if results["status"] == "diverged":
        raise experiment.WorkdirError(
            f"Pretraining the backbone diverged: {results['message']} "
            f"(in {pretrain.workdir}; lower --pretrain_learning_rate or start another --workdir)."
        )
    if results["status"] != "done":
        raise experiment.Interrupted(
            results["step"], results["total_steps"], pretrain.workdir
        )
    params, _ = experiment.load_params(pretrain.workdir)
    gg.models.save_vit_npz(path, params)
    print(
        f"[prompt_tuning] backbone: {path} (test accuracy {results['test_accuracy']:.2%} "
        "on the untransformed data)"
    )
    return path


def prepare(config: experiment.Config) -> experiment.Config:
    """The tuning configuration: the backbone (pretrained here or --checkpoint), the task, the folder."""
    backbone = _CHECKPOINT.value or pretrained_backbone(
        config, _PRETRAIN_EPOCHS.value, _PRETRAIN_LEARNING_RATE.value
    )
    task = None if _TASK.value == "none" else _TASK.value
    workdir = workdir_of(config)
    if not flags.FLAGS["compare"].value:  # one method: its own folder, as --compare's
        workdir = os.path.join(workdir, config.method)
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, backbone=backbone),
        transform=task,
        workdir=workdir,
    )


def main(argv: Sequence[str]) -> int:
    """Pretrains (or loads) the backbone, then tunes prompts with each method; the exit status."""
    if _TASK.value != "none" and _TASK.value not in data.TRANSFORMS:
        print(
            f"prompt_tuning: unknown --task {_TASK.value!r}; valid: "
            f"{', '.join(data.TRANSFORMS)}, none.",
            file=sys.stderr,
        )
        return 2
    status = common.main(argv, "prompt_tuning", _spec, prepare)
    if status == 0:
        _print_frozen_accuracy()
    return status


def _print_frozen_accuracy() -> None:
    """The frozen backbone's test accuracy on the task before tuning (every run's step 0)."""
    base = workdir_of(common.config(_spec(), [flags.FLAGS["method"].value]))
    for method in os.listdir(base) if os.path.isdir(base) else []:
        records = experiment.read_metrics(
            os.path.join(base, method, experiment.METRICS_FILE)
        )
        first = next(
            (r for r in records if r["kind"] == "eval" and r["step"] == 0), None
        )
        if first is not None and method != "pretrain":
            print(
                f"before tuning (the frozen backbone, its prompts at initialisation): "
                f"test accuracy {first['test_accuracy']:.2%}"
            )
            return


if __name__ == "__main__":
    app.run(main)
