"""The experiment runner on other models: the LocalMixer, augmentation, model specs, tfds data."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from helpers import cli, read_json, untimed

from guessgrad import data, experiment

# A few steps of the tiny mixer on small batches; the whole test set is still evaluated.
MIXER = experiment.Config(
    method="wt",
    model=experiment.LocalMixerSpec(),
    batch_size=32,
    steps=6,
    eval_every=6,
    log_every=3,
    train_eval_examples=200,
    eval_batch_size=500,
    progress=False,
)


@pytest.mark.slow
def test_localmixer_run_writes_every_output(tmp_path):
    results = experiment.run(dataclasses.replace(MIXER, workdir=str(tmp_path)))

    saved = read_json(tmp_path / "config.json")["config"]
    assert saved["model"] == {
        "kind": "localmixer",
        "config": "tiny",
        "objective": "local_greedy",
    }
    assert experiment.model_spec_from_json(saved["model"]) == MIXER.model
    assert results["model"] == "LocalMixer tiny (local_greedy)"
    assert results["steps"] == 6 and 0.0 <= results["test_accuracy"] <= 1.0
    records = experiment.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 6]
    assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    assert (tmp_path / "curves.png").exists() and (tmp_path / "results.json").exists()
    assert experiment.checkpoint_steps(str(tmp_path)) == [6]
    params, _ = experiment.load_params(str(tmp_path))
    assert set(params["params"]) == {
        "block_0",
        "block_1",
        "head_0",
        "head_1",
        "readout",
    }


@pytest.mark.slow
def test_localmixer_augmented_resume_equals_uninterrupted_run(tmp_path):
    # Stopped at step 5 (between the evaluations at 4 and 8), resumed to 8.
    config = dataclasses.replace(MIXER, augment=True, steps=8, eval_every=4)
    full = experiment.run(dataclasses.replace(config, workdir=str(tmp_path / "full")))
    parts = str(tmp_path / "parts")
    experiment.run(dataclasses.replace(config, workdir=parts, stop_after=5))
    with pytest.raises(experiment.WorkdirError, match="model"):
        experiment.run(
            dataclasses.replace(
                config,
                workdir=parts,
                resume=True,
                model=experiment.LocalMixerSpec(objective="local"),
            )
        )
    with pytest.raises(experiment.WorkdirError, match="augment"):
        experiment.run(
            dataclasses.replace(config, workdir=parts, resume=True, augment=False)
        )
    resumed = experiment.run(dataclasses.replace(config, workdir=parts, resume=True))

    full_params, _ = experiment.load_params(str(tmp_path / "full"))
    resumed_params, step = experiment.load_params(parts)
    assert step == 8
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        full_params,
        resumed_params,
    )
    assert resumed["test_loss"] == pytest.approx(full["test_loss"], rel=1e-6)
    assert untimed(experiment.read_metrics(os.path.join(parts, "metrics.jsonl"))) == (
        untimed(experiment.read_metrics(str(tmp_path / "full" / "metrics.jsonl")))
    )


def _fixed_getitems(*args, generator, serialized=False):
    # tfds 4.9.10's mock data source calls its _getitems without self (see test_data.py).
    del serialized
    return [generator[k] for k in args[-1]]


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(
            experiment.LocalMixerSpec(), marks=pytest.mark.slow, id="localmixer"
        ),
        pytest.param(experiment.MLPSpec(width=16), id="mlp"),
    ],
)
def test_augmented_run_on_mock_cifar10(model, monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.testing import mocking

    monkeypatch.setattr(mocking, "_getitems", _fixed_getitems)
    config = dataclasses.replace(
        MIXER,
        model=model,
        dataset="cifar10",
        data_dir=str(tmp_path / "data"),
        augment=True,
        steps=2,
        eval_every=2,
        batch_size=16,
        workdir=str(tmp_path / "run"),
    )
    with tfds.testing.mock_data(num_examples=40):
        results = experiment.run(config)
    assert results["steps"] == 2 and results["augment"] is True
    assert np.isfinite(results["test_loss"])
    saved = read_json(tmp_path / "run" / "config.json")
    assert saved["num_train_examples"] == saved["num_test_examples"] == 40


def test_model_specs_name_workdirs_and_check_their_settings(tmp_path):
    assert experiment.default_workdir(experiment.Config()) == os.path.join(
        "runs", "mnist10k-mixing-3x128-seed0"
    )
    cifar = experiment.Config(
        method="wt",
        dataset="cifar10",
        model=experiment.LocalMixerSpec(config="M/8/16"),
        seed=2,
    )
    assert experiment.default_workdir(cifar) == os.path.join(
        "runs", "cifar10-wt-localmixer-M-8-16-local_greedy-seed2"
    )
    experiment.validate(cifar)
    with pytest.raises(ValueError, match="8x8 patch grid.*28x28.*fit: tiny"):
        experiment.validate(dataclasses.replace(cifar, dataset="mnist10k"))
    with pytest.raises(ValueError, match="valid names: tiny, S/1/1"):
        experiment.validate(
            experiment.Config(model=experiment.LocalMixerSpec(config="huge"))
        )
    with pytest.raises(ValueError, match="global, local, local_greedy"):
        experiment.validate(
            experiment.Config(model=experiment.LocalMixerSpec(objective="greedy"))
        )
    with pytest.raises(ValueError, match="width must be a positive integer"):
        experiment.validate(experiment.Config(model=experiment.MLPSpec(width=0)))
    with pytest.raises(ValueError, match="valid kinds: mlp, localmixer, vit"):
        experiment.model_spec_from_json({"kind": "resnet"})
    for spec in (
        experiment.MLPSpec(2, 8),
        experiment.LocalMixerSpec("S/1/1", "global"),
    ):
        assert experiment.model_spec_from_json(spec.to_json()) == spec
    assert (
        data.image_shape("cifar10") == (32, 32, 3)
        and data.num_classes("cifar100") == 100
    )
    assert not os.listdir(tmp_path)


def localmixer_cli(*args, timeout=120):
    return cli(*args, module="experiments.localmixer", timeout=timeout)


def test_cli_rejects_bad_model_flags_in_one_line():
    result = localmixer_cli(
        "--config=M/8/16"
    )  # an 8x8 grid does not divide 28x28 digits
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "localmixer: " in result.stderr and "tiny" in result.stderr
    result = localmixer_cli("--objective=greedy")
    assert result.returncode == 2 and "global, local, local_greedy" in result.stderr


@pytest.mark.slow
def test_cli_trains_the_tiny_mixer(tmp_path):
    result = localmixer_cli(
        "--method=activation_perturbation",
        "--mask",
        "--objective=local",
        "--steps=3",
        "--eval_every=3",
        "--batch_size=32",
        f"--workdir={tmp_path}",
        "--noprogress",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"results in {tmp_path}" in result.stdout
    saved = read_json(tmp_path / "config.json")
    assert saved["estimator_options"]["mask"] is True
    assert saved["config"]["model"]["objective"] == "local"
    assert read_json(tmp_path / "results.json")["steps"] == 3
    # A second run into the same workdir is refused without --resume.
    again = localmixer_cli(f"--workdir={tmp_path}", "--steps=3", "--objective=local")
    assert again.returncode == 1 and "--resume" in again.stderr
