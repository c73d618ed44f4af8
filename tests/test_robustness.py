"""Runs that fail loudly and lose nothing: divergence, signals, bad labels, corrupt checkpoints, early checks."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import REPO, TINY, cli, read_json, untimed
from orbax.checkpoint._src.path import step as step_lib

import guessgrad as gg
from guessgrad import data, experiment


def _strict_json(path):
    """Parses a file as strict JSON (NaN / Infinity literals are refused)."""

    def refuse(token):
        raise ValueError(f"non-standard JSON literal {token} in {path}")

    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=refuse)


def _strict_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line, parse_constant=lambda t: pytest.fail(t)) for line in f]


# --- divergence -----------------------------------------------------------------------


def test_an_absurd_learning_rate_ends_diverged_with_valid_json(tmp_path):
    config = dataclasses.replace(
        TINY,
        model=experiment.MLPSpec(),
        method="wt",
        optimizer="sgd",
        learning_rate=1e3,
        steps=60,
        eval_every=20,
        log_every=5,
        workdir=str(tmp_path),
    )
    results = experiment.run(config)
    assert results["status"] == "diverged"
    saved = _strict_json(tmp_path / "results.json")
    assert saved["status"] == "diverged"
    assert saved["step"] == results["step"] < 60
    assert "learning_rate" in saved["message"]
    records = _strict_lines(tmp_path / "metrics.jsonl")
    assert records[-1]["kind"] == "diverged"
    assert records[-1]["step"] == saved["step"]
    assert all(r["step"] < saved["step"] for r in records[:-1])
    # Nothing at or after the non-finite step was checkpointed.
    steps = experiment.checkpoint_steps(str(tmp_path))
    assert all(s < saved["step"] for s in steps)
    assert saved["last_checkpoint_step"] == (steps[-1] if steps else None)


@pytest.mark.slow
def test_the_cli_exits_non_zero_on_divergence(tmp_path):
    result = cli(
        "--method=wt",
        "--optimizer=sgd",
        "--learning_rate=1e3",
        "--steps=40",
        f"--workdir={tmp_path}",
    )
    assert result.returncode == 1, result.stderr
    assert "non-finite at step" in result.stderr
    assert "Traceback" not in result.stderr
    assert _strict_json(tmp_path / "results.json")["status"] == "diverged"


@pytest.mark.parametrize("rate", ["inf", "nan", "0", "-1e-3"])
def test_a_learning_rate_that_is_not_finite_and_positive_is_refused(rate, tmp_path):
    result = cli(f"--learning_rate={rate}", f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 2
    assert "learning_rate must be a finite number > 0" in result.stderr
    assert not (tmp_path / "w").exists()


def test_skip_nonfinite_keeps_the_parameters_of_a_non_finite_step():
    model = gg.models.MLP(depth=2, width=8, num_classes=3)
    batch = {"image": jnp.ones((4, 5)), "label": jnp.array([0, 1, 2, 0])}
    params = model.init(jax.random.key(0), batch["image"])
    optimizer = optax.sgd(0.1)

    def estimator(
        params, batch, key
    ):  # a NaN in one leaf, as a blown-up estimate gives
        grads = jax.tree.map(jnp.ones_like, params)
        first = jax.tree.leaves(grads)[0]
        return jax.tree.map(
            lambda g: g.at[(0,) * g.ndim].set(jnp.nan) if g is first else g, grads
        ), {"loss": jnp.float32(1.0)}

    state = gg.init_train_state(params, optimizer, jax.random.key(1))
    skipped, metrics = gg.make_train_step(
        estimator, optimizer, skip_nonfinite=True, has_aux=True
    )(state, batch)
    assert not bool(metrics["finite"])
    assert int(skipped.step) == 1
    same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), skipped.params, params)
    assert all(jax.tree.leaves(same))
    applied, metrics = gg.make_train_step(estimator, optimizer, has_aux=True)(
        state, batch
    )
    assert not bool(metrics["finite"])
    assert not all(
        bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(applied.params)
    )


# --- labels ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [15, -1])
@pytest.mark.parametrize("method", ["backprop", "wt", "directional", "mixing"])
def test_an_out_of_range_label_is_refused_eagerly_and_nan_under_jit(bad, method):
    model = gg.models.MLP(depth=2, width=8, num_classes=10)
    batch = {
        "image": jax.random.normal(jax.random.key(0), (4, 6)),
        "label": jnp.array([1, bad, 3, 4]),
    }
    params = model.init(jax.random.key(1), batch["image"])
    estimate = gg.get_estimator(method, model)
    with pytest.raises(ValueError, match=rf"0\.\.9.*\[1\] = {bad}"):
        estimate(params, batch, jax.random.key(2))
    grads = jax.jit(estimate)(params, batch, jax.random.key(2))
    assert not all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_the_data_layer_checks_labels():
    with pytest.raises(
        ValueError, match=r"my split: labels must be in 0\.\.9.*\[2\] = 10"
    ):
        gg.check_labels(np.array([0, 9, 10]), 10, where="my split")
    gg.check_labels(np.array([0, 9]), 10)
    images = np.zeros((4, 2, 2, 1), np.uint8)
    with pytest.raises(ValueError, match=r"\[3\] = -1"):
        data.Loader(
            images,
            np.array([0, 1, 2, -1]),
            2,
            None,
            flatten=True,
            shuffle=False,
            num_classes=3,
        )


# --- early checks ---------------------------------------------------------------------


def test_a_workdir_that_is_a_file_is_refused_before_loading(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("")
    result = cli(f"--workdir={path}")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("is a file; choose another --workdir.")
    assert "Traceback" not in result.stderr
    assert "computing on" not in result.stdout  # stopped before the run began


def test_a_workdir_that_cannot_be_written_is_refused(tmp_path):
    if os.geteuid() == 0:  # root writes through mode bits: a place nobody can write
        place = "/proc/guessgrad-run"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        place = str(locked / "run")
    result = cli(f"--workdir={place}")
    assert result.returncode == 2
    assert "cannot be written" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_batch_larger_than_the_training_set_is_refused(tmp_path):
    result = cli("--batch_size=8001", f"--workdir={tmp_path}")
    assert result.returncode == 2
    assert "8000 examples" in result.stderr
    assert "Traceback" not in result.stderr


def test_resuming_with_fewer_steps_than_were_trained_is_refused(tmp_path):
    config = dataclasses.replace(TINY, workdir=str(tmp_path))
    experiment.run(config)
    with pytest.raises(experiment.WorkdirError, match="has trained 10 steps"):
        experiment.run(dataclasses.replace(config, steps=5, resume=True))
    assert read_json(tmp_path / "results.json")["steps"] == 10


def test_results_without_checkpoints_are_not_overwritten(tmp_path):
    config = dataclasses.replace(TINY, workdir=str(tmp_path))
    experiment.run(config)
    before = (tmp_path / "results.json").read_text()
    for name in os.listdir(tmp_path / "checkpoints"):
        os.rename(tmp_path / "checkpoints" / name, tmp_path / f"moved-{name}")
    with pytest.raises(experiment.WorkdirError, match="no checkpoint to resume from"):
        experiment.run(config)
    assert (tmp_path / "results.json").read_text() == before


# --- checkpoints ----------------------------------------------------------------------


def _break(step_dir):
    """Truncates every array file of a checkpoint and empties its _METADATA files."""
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                f.truncate(0 if name == "_METADATA" else size // 2)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    config = dataclasses.replace(TINY, steps=20, eval_every=5, workdir=str(tmp_path))
    full = experiment.run(dataclasses.replace(config, workdir=str(tmp_path / "full")))
    parts = tmp_path / "parts"
    experiment.run(dataclasses.replace(config, workdir=str(parts), stop_after=15))
    assert experiment.checkpoint_steps(str(parts)) == [10, 15]
    _break(parts / "checkpoints" / "15")
    resumed = experiment.run(
        dataclasses.replace(config, workdir=str(parts), resume=True)
    )
    err = capsys.readouterr().err
    assert "checkpoint of step 15 could not be read" in err
    assert (parts / "corrupt-checkpoint-15").is_dir()
    assert resumed["test_accuracy"] == full["test_accuracy"]
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-6)
    full_records = experiment.read_metrics(str(tmp_path / "full" / "metrics.jsonl"))
    parts_records = experiment.read_metrics(str(parts / "metrics.jsonl"))
    assert untimed(parts_records) == untimed(full_records)


def test_no_readable_checkpoint_names_the_folder_to_delete(tmp_path):
    config = dataclasses.replace(
        TINY, workdir=str(tmp_path), stop_after=5, eval_every=5
    )
    experiment.run(config)
    _break(tmp_path / "checkpoints" / "5")
    with pytest.raises(experiment.WorkdirError, match=f"Delete {tmp_path}"):
        experiment.run(dataclasses.replace(config, stop_after=None, resume=True))


def test_a_stale_temporary_checkpoint_folder_is_cleaned(tmp_path):
    config = dataclasses.replace(
        TINY, workdir=str(tmp_path), stop_after=5, eval_every=5
    )
    experiment.run(config)
    stale = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-123"
    stale.mkdir()
    assert step_lib.is_tmp_checkpoint(stale)  # a save Orbax itself would not finish
    results = experiment.run(dataclasses.replace(config, stop_after=None, resume=True))
    assert not stale.exists()
    assert results["steps"] == config.steps
    assert experiment.checkpoint_steps(str(tmp_path))[-1] == config.steps


# --- signals, on a real process -------------------------------------------------------

_LONG = (
    "--method=backprop",
    "--width=16",
    "--batch_size=32",
    "--steps=3000",
    "--eval_every=1000",
    "--log_every=100",
    "--progress=false",
)


def _signal_mid_run(workdir, signals, gap=0.05):
    """Starts a long run, sends ``signals`` once its first train line is written."""
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments.mlp", *_LONG, f"--workdir={workdir}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if os.path.exists(metrics):
            with open(metrics, encoding="utf-8") as f:
                if '"train"' in f.read():
                    break
        time.sleep(0.02)
    else:
        process.kill()
        pytest.fail("the run wrote no train line in 120 s")
    for sig in signals:
        process.send_signal(sig)
        time.sleep(gap)
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    result = cli(*_LONG, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize(
    "signals, code",
    [
        ([signal.SIGINT], 130),
        ([signal.SIGTERM], 143),
        ([signal.SIGINT, signal.SIGINT], 130),
    ],
    ids=["sigint", "sigterm", "double-sigint"],
)
def test_a_signal_saves_says_so_and_resumes_to_the_same_run(
    signals, code, uninterrupted, tmp_path
):
    workdir = tmp_path / "run"
    returncode, _, err = _signal_mid_run(str(workdir), signals)
    assert returncode == code, err
    assert "Traceback" not in err and "Segmentation" not in err
    steps = experiment.checkpoint_steps(str(workdir))
    assert steps, err
    name = signal.Signals(signals[0]).name
    assert f"{name} at step {steps[-1]} of 3000; checkpoint saved in {workdir}" in err
    assert "--resume" in err
    assert not [n for n in os.listdir(workdir / "checkpoints") if "tmp" in n]
    # Every completed step's metrics line is there.
    records = _strict_lines(workdir / "metrics.jsonl")
    trains = [r["step"] for r in records if r["kind"] == "train"]
    assert trains == list(range(100, steps[-1] + 1, 100))

    resumed = cli(*_LONG, f"--workdir={workdir}", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert untimed(experiment.read_metrics(str(workdir / "metrics.jsonl"))) == untimed(
        experiment.read_metrics(str(uninterrupted / "metrics.jsonl"))
    )
    full_params, _ = experiment.load_params(str(uninterrupted))
    resumed_params, _ = experiment.load_params(str(workdir))
    jax.tree.map(np.testing.assert_array_equal, full_params, resumed_params)
