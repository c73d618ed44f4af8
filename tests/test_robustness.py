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
from guessgrad.experiment import workdir as experiment_workdir


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


# --- shared machines: locks, early kills, full disks, finite blow-ups, start-up signals ---


def test_a_second_run_on_a_locked_workdir_is_refused_before_it_touches_anything(
    tmp_path,
):
    config = dataclasses.replace(TINY, workdir=str(tmp_path))
    with experiment_workdir.WorkdirLock(str(tmp_path), "first"):
        holder = (tmp_path / experiment.LOCK_FILE).read_text()
        assert f"pid {os.getpid()}" in holder
        with pytest.raises(experiment.WorkdirError, match="in use by another run"):
            experiment.run(config)
        assert sorted(os.listdir(tmp_path)) == [experiment.LOCK_FILE]
    assert experiment.run(config)["status"] == "done"
    assert (tmp_path / experiment.LOCK_FILE).read_text() == ""  # released


def test_the_lock_of_a_run_that_died_is_taken_over(tmp_path, capsys):
    (tmp_path / experiment.LOCK_FILE).write_text(
        "pid 999999 on elsewhere, since then\n"
    )
    config = dataclasses.replace(TINY, workdir=str(tmp_path))
    assert experiment.run(config)["status"] == "done"
    assert "taking over the workdir lock" in capsys.readouterr().out


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path, resume):
    """What a SIGKILL before the first checkpoint leaves: the step-0 evaluation (and
    maybe train lines), no checkpoint. Nothing to resume: the run starts over."""
    first = experiment.run(dataclasses.replace(TINY, workdir=str(tmp_path / "ref")))
    lines = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    (killed / "checkpoints").mkdir()
    again = experiment.run(
        dataclasses.replace(TINY, workdir=str(killed), resume=resume)
    )
    assert again["test_loss"] == first["test_loss"]
    assert untimed(
        [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    ) == untimed([json.loads(x) for x in lines])


def test_a_finite_blow_up_ends_diverged_at_its_second_bad_evaluation(tmp_path):
    config = dataclasses.replace(
        TINY, learning_rate=1e4, steps=40, eval_every=10, workdir=str(tmp_path)
    )
    results = experiment.run(config)
    assert results["status"] == "diverged"
    records = _strict_lines(tmp_path / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    start = evals[0]["train_loss"]
    above = [
        r["step"] for r in evals if r["train_loss"] > experiment.BLOWUP_FACTOR * start
    ]
    assert results["step"] == above[1] < 40  # the second evaluation in a row above
    assert all(np.isfinite(r["train_loss"]) for r in evals)
    assert records[-1] == {
        "kind": "diverged",
        "step": results["step"],
        "loss": evals[-1]["train_loss"],
    }
    assert "learning_rate" in results["message"]
    assert experiment.checkpoint_steps(str(tmp_path))[-1] == results["step"]


def _as_unprivileged(args):
    """``args`` run without root's override of file permissions (as a plain user is)."""
    if os.geteuid() != 0:
        return args
    drop = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", *args]


@pytest.mark.slow
@pytest.mark.skipif(
    os.geteuid() == 0 and not os.path.exists("/usr/bin/setpriv"),
    reason="root without setpriv cannot lose write access",
)
def test_a_workdir_that_becomes_unwritable_stops_the_run_in_one_line(tmp_path):
    workdir = tmp_path / "run"
    args = [*_LONG[:-3], "--eval_every=100", "--log_every=50", "--progress=false"]
    process = subprocess.Popen(
        _as_unprivileged(
            [sys.executable, "-m", "experiments.mlp", *args, f"--workdir={workdir}"]
        ),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (workdir / "checkpoints" / "100").is_dir():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    subprocess.run(["chmod", "-R", "a-w", str(workdir)], check=True)
    try:
        started = time.monotonic()
        _, err = process.communicate(timeout=120)
        seconds = time.monotonic() - started
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(workdir)], check=True)
    assert process.returncode == 1
    assert seconds < 30
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "Could not write the checkpoint of step" in last and "--resume" in last
    assert 100 in experiment.checkpoint_steps(str(workdir))
    resumed = cli(*args, "--steps=300", f"--workdir={workdir}", "--resume")
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.slow
def test_two_runs_on_one_workdir_one_is_refused_and_the_metrics_stay_one_run(
    tmp_path,
):
    first = subprocess.Popen(
        [sys.executable, "-m", "experiments.mlp", *_LONG, f"--workdir={tmp_path}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and '"train"' in metrics.read_text()):
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    # The first run is paused (alive, holding the workdir) while the second
    # starts: else it may finish its few thousand small steps first.
    first.send_signal(signal.SIGSTOP)
    try:
        second = cli(*_LONG, f"--workdir={tmp_path}", "--resume")
    finally:
        first.send_signal(signal.SIGCONT)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=120)
    assert second.returncode == 1
    assert "in use by another run" in second.stderr.strip().splitlines()[-1]
    assert f"pid {first.pid}" in second.stderr
    steps = [r["step"] for r in _strict_lines(metrics) if r["kind"] == "train"]
    assert steps == sorted(set(steps))


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.2, 1.0, 3.0])
def test_a_signal_while_starting_ends_at_once_with_the_status(delay, tmp_path):
    """Imports, JAX's start-up, flag parsing: never a traceback, never a run that
    trains on; 130 for Ctrl-C and nothing in the workdir but what a run would resume."""
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments.mlp", *_LONG, f"--workdir={tmp_path}/w"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err
    if not (tmp_path / "w" / "checkpoints").exists():
        assert "SIGINT" in err


_DEFAULT_FLAGS_SCRIPT = """
import os
import guessgrad as gg
assert gg._cpu_flags.FLAG in os.environ["XLA_FLAGS"], os.environ.get("XLA_FLAGS")
import jax, jax.numpy as jnp
model = gg.models.MLP(depth=3, width=32, num_classes=10)
batch = {"image": jax.random.normal(jax.random.key(0), (16, 20)),
         "label": jnp.arange(16) % 10}
params = model.init(jax.random.key(1), batch["image"])
for name, options in [("wperp", {"rank": 3}), ("wperp_ns", {"rank": 3})]:
    estimate = jax.jit(gg.get_estimator(name, model, mode="joint", **options))
    for i in range(8):
        jax.block_until_ready(estimate(params, batch, jax.random.key(i)))
print("ok")
"""


@pytest.mark.slow
def test_estimators_with_factorisations_finish_under_jaxs_default_flags():
    result = _python(_DEFAULT_FLAGS_SCRIPT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def _python(script, xla_flags=None, timeout=120):
    """``python -c script`` with ``XLA_FLAGS`` as given (unset: JAX's defaults)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    return subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_importing_guessgrad_after_jax_started_on_a_cpu_warns_once():
    script = (
        "import warnings, jax; jax.devices()\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import guessgrad\n"
        "print(sum('XLA_FLAGS' in str(x.message) for x in w))\n"
    )
    result = _python(script)
    assert result.stdout.strip() == "1", result.stderr
    result = _python(script, "--xla_cpu_enable_concurrency_optimized_scheduler=true")
    assert result.stdout.strip() == "0", result.stderr  # the user's own choice stands
