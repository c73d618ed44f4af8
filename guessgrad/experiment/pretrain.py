"""A backbone pretrained by backprop for prompt tuning: trained once, cached, resumable."""

from __future__ import annotations

import dataclasses
import os

import guessgrad as gg
from guessgrad import data
from guessgrad.experiment.checkpoints import WorkdirError, load_params
from guessgrad.experiment.config import Config, Pretraining
from guessgrad.experiment.records import METRICS_FILE, read_metrics
from guessgrad.experiment.signals import Interrupted
from guessgrad.experiment.train import run

BACKBONE_FILE = "backbone.npz"
PRETRAIN_DIR = "pretrain"


def pretrained_backbone(
    config: Config, workdir: str, pretraining: Pretraining | None = None
) -> str:
    """Pretrains the ViT of ``config`` by backprop on the untransformed data; returns the cached ``.npz``.

    The model is ``config.model`` without prompts, backbone or head training,
    every parameter learning, for ``pretraining``'s epochs and learning
    rate (default :class:`Pretraining`); the data ``config.dataset`` without
    ``config.transform``. Runs in ``<workdir>/pretrain`` (resumable: an
    interrupted pretraining continues where it stopped) and writes
    ``<workdir>/backbone.npz`` once; later calls return it at once.

    Raises:
      WorkdirError: the pretraining diverged.
      Interrupted: a signal stopped it (its checkpoint is kept).
    """
    pretraining = Pretraining() if pretraining is None else pretraining
    path = os.path.join(workdir, BACKBONE_FILE)
    if os.path.exists(path):
        print(f"[pretrain] backbone: {path} (cached)")
        return path
    steps_per_epoch = data.num_train_examples(config.dataset) // config.batch_size
    pretrain = dataclasses.replace(
        config,
        method="backprop",
        model=dataclasses.replace(
            config.model, num_prompts=0, backbone=None, train_head=False
        ),
        transform=None,
        augment=False,
        options={},
        epochs=pretraining.epochs,
        steps=None,
        # One evaluation (and checkpoint) per epoch: the tuning's eval_every
        # counts tuning steps.
        eval_every=max(steps_per_epoch, 1),
        learning_rate=pretraining.learning_rate,
        workdir=os.path.join(workdir, PRETRAIN_DIR),
        resume=True,
        stop_after=None,
    )
    print(f"[pretrain] pretraining the backbone by backprop in {pretrain.workdir}")
    results = run(pretrain)
    if results["status"] == "diverged":
        raise WorkdirError(
            f"Pretraining the backbone diverged: {results['message']} "
            f"(in {pretrain.workdir}; lower the pretraining's learning rate or start "
            "in another workdir)."
        )
    if results["status"] != "done":
        raise Interrupted(results["step"], results["total_steps"], pretrain.workdir)
    params, _ = load_params(pretrain.workdir)
    gg.models.save_vit_npz(path, params)
    print(
        f"[pretrain] backbone: {path} (test accuracy {results['test_accuracy']:.2%} "
        "on the untransformed data)"
    )
    return path


def frozen_accuracy(workdir: str) -> float | None:
    """The step-0 test accuracy of a tuning run in ``<workdir>/<method>``: the frozen backbone's."""
    for method in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []:
        if method == PRETRAIN_DIR:
            continue
        records = read_metrics(os.path.join(workdir, method, METRICS_FILE))
        first = next(
            (r for r in records if r["kind"] == "eval" and r["step"] == 0), None
        )
        if first is not None:
            return first["test_accuracy"]
    return None
