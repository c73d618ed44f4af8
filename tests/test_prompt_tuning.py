"""Prompt tuning through the experiment runner: a frozen backbone, shifted data, the entry point."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import REPO

import guessgrad as gg
from guessgrad import data, experiment


def _backbone(path, num_classes=10):
    model = gg.models.vit("tiny", num_classes)
    params = model.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))
    gg.models.save_vit_npz(path, params)
    return params


def test_transforms_shift_the_images_and_keep_the_labels():
    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 1)
    labels = np.array([4, 7], np.int32)
    dataset = data.Dataset("toy", images, labels, images[:1], labels[:1], 10)
    inverted = data.transform(dataset, "invert")
    np.testing.assert_array_equal(inverted.train_images, 255 - images)
    np.testing.assert_array_equal(inverted.train_labels, labels)
    rotated = data.transform(dataset, "rotate")
    np.testing.assert_array_equal(
        rotated.test_images[0, :, :, 0], np.rot90(images[0, :, :, 0])
    )
    assert data.transform(dataset, None) is dataset
    with pytest.raises(ValueError, match="invert, rotate"):
        data.transform(dataset, "blur")


@pytest.mark.slow
def test_prompt_tuning_moves_only_the_prompts(tmp_path):
    backbone = _backbone(str(tmp_path / "backbone.npz"))
    config = experiment.Config(
        method="wt",
        model=experiment.ViTSpec(
            num_prompts=2, backbone=str(tmp_path / "backbone.npz")
        ),
        transform="invert",
        optimizer="adamw",  # weight decay would move frozen leaves were it not masked
        learning_rate=1e-2,
        batch_size=16,
        steps=3,
        eval_every=3,
        log_every=3,
        train_eval_examples=64,
        eval_batch_size=500,
        progress=False,
        workdir=str(tmp_path / "run"),
    )
    results = experiment.run(config)
    assert results["transform"] == "invert" and results["steps"] == 3
    tuned, _ = experiment.load_params(str(tmp_path / "run"))
    initial = config.model.init_params(
        config.model.build(10), jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32)
    )
    assert not np.allclose(tuned["params"]["prompts"], initial["params"]["prompts"])
    frozen = {k: v for k, v in tuned["params"].items() if k != "prompts"}
    jax.tree.map(np.testing.assert_array_equal, frozen, backbone["params"])


@pytest.mark.slow
def test_backbone_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="ViT-B_16.npz"):
        experiment.ViTSpec(backbone=str(tmp_path / "missing.npz")).validate()
    _backbone(str(tmp_path / "five.npz"), num_classes=5)
    spec = experiment.ViTSpec(backbone=str(tmp_path / "five.npz"))
    model = spec.build(10)
    with pytest.raises(ValueError, match="train_head"):
        spec.init_params(model, jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))
    with pytest.raises(ValueError, match="nothing to"):
        experiment.ViTSpec(
            num_prompts=0, backbone=str(tmp_path / "five.npz")
        ).validate()


@pytest.mark.slow
def test_the_experiment_pretrains_and_compares(tmp_path):
    def cli(*extra):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "experiments.prompt_tuning",
                "--pretrain_epochs=1",
                "--steps=4",
                "--eval_every=4",
                "--log_every=2",
                "--batch_size=32",
                "--compare=backprop,wt",
                f"--workdir={tmp_path}",
                "--progress=false",
                *extra,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )

    first = cli()
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "backbone.npz").exists()
    assert "before tuning" in first.stdout
    with open(tmp_path / "compare.json", encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    assert [r["method"] for r in rows] == ["backprop", "wt"]
    assert all(r["examples_per_s"] > 0 for r in rows)
    bad = cli("--task=blur")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
