"""The train loop: :func:`run` trains one configuration and writes its workdir.

A run reads as its steps: :func:`_set_up` (workdir checks, data, model,
step and state), :func:`_restore_or_start` (the latest readable checkpoint,
or a fresh metrics file; config.json), :func:`_loop` (train, log, evaluate,
checkpoint, stop on a signal or a divergence) and :func:`_finish`
(results.json and curves, or the reason it stopped).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

import guessgrad as gg
from guessgrad import data, parallel
from guessgrad.experiment import results as _results
from guessgrad.experiment.checkpoints import (
    CheckpointError,
    checkpoint_manager,
    close_quietly,
    restore_checkpoint,
    save_checkpoint,
)
from guessgrad.experiment.config import (
    Config,
    config_record,
    default_workdir,
    resolved_options,
    total_steps,
    validate,
)
from guessgrad.experiment.records import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    CURVES_FILE,
    METRICS_FILE,
    RESULTS_FILE,
    device_info,
    format_table,
    json_line,
    json_safe,
    plot_curves,
    read_metrics,
    truncate_metrics,
    write_json,
)
from guessgrad.experiment.signals import Interrupted, Signals
from guessgrad.experiment.steps import eval_loader, evaluate, make_eval_fn, train_step
from guessgrad.experiment.workdir import (
    LOCK_FILE,
    WorkdirLock,
    prepare_workdir,
    run_identity,
)

# Longest wait between progress-bar refreshes (each one is a host sync).
REFRESH_SECONDS = 1.0


def run(config: Config) -> dict[str, Any]:
    """Trains ``config.method`` on ``config.dataset`` and writes the workdir; returns the results.

    Returns the dict written to results.json (accuracies and losses on the
    train subset and the test set after the last step, steps, wall time,
    devices), with ``"status": "done"``. With ``config.stop_after`` before
    the end, stops with a checkpoint and returns ``{"status": "stopped",
    "step": ...}`` without writing results.json.

    A step whose loss or update is not finite ends the run: nothing after the
    last checkpoint is saved, and results.json gets ``"status": "diverged"``
    with the step, the last good checkpoint and the likely cause (also
    returned); so does a training loss that blows up while finite
    (``results.BLOWUP_FACTOR``). Ctrl-C (SIGINT) and SIGTERM stop at the end
    of the current step, after its metrics line and a checkpoint.

    Raises:
      ValueError: an invalid configuration (see :func:`validate`).
      WorkdirError: another run holds the workdir (its lock file names it);
        the workdir holds checkpoints and ``resume`` is False;
        ``resume`` is True and the saved run's configuration differs, or asks
        for fewer steps than were trained; it holds results but no
        checkpoint; or no checkpoint in it can be read.
      CheckpointError: a checkpoint could not be written (the run stopped there).
      guessgrad.data.DataMissingError: the data set is not prepared.
      Interrupted: a signal stopped the run (``step`` None: before training).
    """
    validate(config)
    with Signals(config.method) as signals:
        parallel.maybe_initialize_distributed()
        workdir = os.path.abspath(config.workdir or default_workdir(config))
        # One process of a multi-host job writes the workdir; it holds the lock.
        lock = (
            WorkdirLock(workdir, config.method)
            if jax.process_index() == 0
            else contextlib.nullcontext()
        )
        with lock:
            state = _set_up(config, workdir, signals)
            _restore_or_start(state)
            return _finish(state, _loop(state))


@dataclasses.dataclass
class _Run:
    """One run's pieces, and where its training stands."""

    config: Config
    workdir: str
    signals: Signals
    started: float  # time.perf_counter() at the start of this session
    num_steps: int
    saved_steps: list[int]
    had_files: bool
    dataset: data.Dataset
    loader: data.Loader
    eval_loaders: dict[str, data.Loader]
    eval_fn: Any
    step_fn: Any
    state: gg.TrainState
    manager: Any = None
    metrics_file: Any = None
    elapsed_before: float = 0.0
    session_start: float = 0.0
    window: list = dataclasses.field(default_factory=list)  # (step, batch loss)
    unchecked: list = dataclasses.field(default_factory=list)  # (step, finite flag)
    start_step: int = 0  # the step this session started from
    last_eval: dict[str, Any] | None = None
    synced_step: int = 0
    synced_time: float = 0.0
    start_loss: float | None = None  # the step-0 train loss (the blow-up rule's base)
    above: int = 0  # evaluations in a row above BLOWUP_FACTOR times it

    @property
    def label(self) -> str:
        return self.config.method

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.workdir, METRICS_FILE)

    @property
    def stop_step(self) -> int:
        stop_after = self.config.stop_after
        return self.num_steps if stop_after is None else min(stop_after, self.num_steps)

    def elapsed(self) -> float:
        """Training wall time, earlier sessions of a resumed run included."""
        return self.elapsed_before + time.perf_counter() - self.session_start


@dataclasses.dataclass
class _Outcome:
    """How the loop ended, besides finishing or stopping."""

    diverged_at: int | None = None  # the first step with a non-finite loss or update
    loss: float | None = None  # its batch loss
    last_saved: int | None = None  # the last checkpoint's step
    blown_up: tuple[int, float, float] | None = None  # (step, train loss, start loss)


# --- set-up --------------------------------------------------------------------------


def _set_up(config: Config, workdir: str, signals: Signals) -> _Run:
    """Checks the workdir, loads the data, builds the model, the step and the initial state."""
    started = time.perf_counter()
    label = config.method
    print(f"[{label}] workdir: {workdir}")
    mesh = parallel.data_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    print(f"[{label}] computing on {parallel.describe(mesh)}: {jax.devices()}")
    steps_per_epoch = data.num_train_examples(config.dataset) // config.batch_size
    num_steps = total_steps(config, steps_per_epoch)
    had_files = os.path.isdir(workdir) and any(
        name != LOCK_FILE for name in os.listdir(workdir)
    )
    saved_steps = prepare_workdir(
        workdir,
        resume=config.resume,
        identity=run_identity(config_record(config), resolved_options(config)),
        num_steps=num_steps,
        label=label,
    )
    signals.check_before_training(workdir)
    dataset = data.transform(
        data.load(config.dataset, config.data_dir), config.transform
    )
    signals.check_before_training(workdir)
    init_key, data_key, train_key = jax.random.split(jax.random.key(config.seed), 3)
    loader, eval_loaders = _loaders(config, dataset, data_key, mesh)
    optimizer, step_fn = train_step(config, dataset.num_classes, mesh)
    model = config.model.build(dataset.num_classes)
    init_images = loader.batch(0)["image"]
    if config.model.flatten:
        init_images = init_images.reshape(init_images.shape[0], -1)
    params = config.model.init_params(model, init_key, init_images)
    # Replicated over the mesh (the batch is sharded over it): data parallel on
    # every local device, and over hosts under jax.distributed.
    state = gg.init_train_state(
        params, optimizer, train_key, estimator=step_fn.estimator, batch=loader.batch(0)
    )
    state = parallel.replicate(state, mesh)
    # Trace the step before anything is written: what an estimator refuses only
    # on seeing the model and batch fails here. The step's first call reuses the trace.
    jax.eval_shape(step_fn.jitted, state, loader.batch(0))
    signals.check_before_training(workdir)
    return _Run(
        config=config,
        workdir=workdir,
        signals=signals,
        started=started,
        num_steps=num_steps,
        saved_steps=saved_steps,
        had_files=had_files,
        dataset=dataset,
        loader=loader,
        eval_loaders=eval_loaders,
        eval_fn=make_eval_fn(model),
        step_fn=step_fn,
        state=state,
    )


def _loaders(
    config: Config, dataset: data.Dataset, key: jax.Array, mesh
) -> tuple[data.Loader, dict[str, data.Loader]]:
    """The training batches (sharded over ``mesh``), and the train subset and test set to evaluate."""
    loader = data.Loader(
        dataset.train_images,
        dataset.train_labels,
        config.batch_size,
        key,
        # Augmentation crops and flips [B, H, W, C] images; it flattens after.
        flatten=config.model.flatten and not config.augment,
        sharding=parallel.batch_sharding(mesh),
    )
    num_train_eval = min(config.train_eval_examples, len(dataset.train_labels))
    eval_loaders = {
        "train": eval_loader(
            dataset.train_images[:num_train_eval],
            dataset.train_labels[:num_train_eval],
            config,
            mesh,
        ),
        "test": eval_loader(dataset.test_images, dataset.test_labels, config, mesh),
    }
    return loader, eval_loaders


def _restore_or_start(run: _Run) -> None:
    """Restores the latest readable checkpoint (or starts a metrics file); writes config.json."""
    os.makedirs(run.workdir, exist_ok=True)
    run.manager = checkpoint_manager(
        os.path.join(run.workdir, CHECKPOINT_DIR), run.config.keep_checkpoints
    )
    if run.saved_steps:
        state, meta = restore_checkpoint(run.manager, run.state, run.workdir, run.label)
        run.state = parallel.replicate(state, run.step_fn.mesh)
        run.elapsed_before = float(meta["elapsed_s"])
        run.window = [(int(s), np.float32(x)) for s, x in meta["window_losses"]]
        truncate_metrics(run.metrics_path, int(run.state.step))
        print(
            f"[{run.label}] resumed from the checkpoint at step {int(run.state.step)}"
        )
    else:
        if run.config.resume and run.had_files:
            print(
                f"[{run.label}] --resume: no checkpoint in {run.workdir}; starting from step 0"
            )
        open(run.metrics_path, "w").close()
    dataset = run.dataset
    write_json(
        os.path.join(run.workdir, CONFIG_FILE),
        {
            "config": config_record(run.config) | {"workdir": run.workdir},
            "estimator_options": resolved_options(run.config),
            "total_steps": run.num_steps,
            "steps_per_epoch": run.loader.steps_per_epoch,
            "num_params": int(sum(x.size for x in jax.tree.leaves(run.state.params))),
            "num_train_examples": len(dataset.train_labels),
            "num_test_examples": len(dataset.test_labels),
            "train_eval_examples": min(
                run.config.train_eval_examples, len(dataset.train_labels)
            ),
            "device": device_info(),
        },
    )
    run.start_step = int(run.state.step)
    run.session_start = time.perf_counter()


# --- the loop ------------------------------------------------------------------------


def _loop(run: _Run) -> _Outcome:
    """Trains to the stop step (or a signal or a divergence); always leaves a checkpoint behind."""
    progress = _progress_bar(run)
    outcome = _Outcome()
    failed = False
    try:
        with open(run.metrics_path, "a", encoding="utf-8") as run.metrics_file:
            _train_steps(run, progress, outcome)
            _settle(run, outcome)
    except KeyboardInterrupt:  # raised where no handler could be installed
        run.signals.signum = run.signals.signum or signal.SIGINT
        outcome.diverged_at = _first_nonfinite(run)
        if outcome.diverged_at is None:
            _checkpoint(run, int(run.state.step))
    except CheckpointError:
        failed = True
        raise
    finally:
        progress.close()
        if failed:
            close_quietly(run.manager)
        else:
            run.manager.wait_until_finished()
            outcome.last_saved = max(run.manager.all_steps(), default=None)
            run.manager.close()
    return outcome


def _train_steps(run: _Run, progress, outcome: _Outcome) -> None:
    """The steps from the restored one; returns at the stop step, a divergence or a signal."""
    config, start_step = run.config, run.start_step
    if start_step == 0:
        _log(run, _evaluation(run, 0))
    run.start_loss, run.above = _results.blowup_history(read_metrics(run.metrics_path))
    run.synced_step, run.synced_time = start_step, time.perf_counter()
    for step in range(start_step, run.stop_step):
        run.state, metrics = run.step_fn(run.state, run.loader.batch(step))
        done = step + 1
        run.window.append((done, metrics["loss"]))
        run.unchecked.append((done, metrics["finite"]))
        is_log = done % config.log_every == 0
        is_eval = done % config.eval_every == 0 or done == run.num_steps
        timed_out = time.perf_counter() - run.synced_time > REFRESH_SECONDS
        if is_log or is_eval or timed_out or done == run.stop_step:
            outcome.diverged_at = _sync(run, done, is_log, progress)
            if outcome.diverged_at is not None:
                return
        if is_eval and _evaluate_and_save(run, done, progress, outcome):
            return
        if run.signals.signum is not None:
            return


def _sync(run: _Run, done: int, is_log: bool, progress) -> int | None:
    """Reads the finite flags (a host sync); logs the mean loss and the rate. Returns a non-finite step."""
    diverged_at = _first_nonfinite(run)
    if diverged_at is not None:
        return diverged_at
    now = time.perf_counter()
    rate = (
        (done - run.synced_step)
        * run.config.batch_size
        / max(now - run.synced_time, 1e-9)
    )
    postfix = {"ex/s": f"{rate:,.0f}"}
    if is_log:
        loss = _mean_loss(run.window)
        _log(run, {"kind": "train", "step": done, "loss": loss, "examples_per_s": rate})
        run.window = []
        postfix["loss"] = f"{loss:.4f}"
    progress.set_postfix(postfix, refresh=False)
    progress.update(done - run.synced_step)
    run.synced_step, run.synced_time = done, now
    return None


def _evaluate_and_save(run: _Run, done: int, progress, outcome: _Outcome) -> bool:
    """Evaluates and checkpoints step ``done``; True when the loss has blown up."""
    run.last_eval = _evaluation(run, done)
    _log(run, run.last_eval)
    progress.write(
        f"[{run.label}] step {done}: train acc {run.last_eval['train_accuracy']:.2%}, "
        f"test acc {run.last_eval['test_accuracy']:.2%}, "
        f"test loss {run.last_eval['test_loss']:.4f}"
    )
    _checkpoint(run, done)
    # Evaluation time does not count against throughput.
    run.synced_time = time.perf_counter()
    run.above = run.above + 1 if _results.is_above(run.last_eval, run.start_loss) else 0
    if run.above >= _results.BLOWUP_EVALS or (run.above and done == run.num_steps):
        outcome.blown_up = (done, run.last_eval["train_loss"], run.start_loss)
        _log(run, {"kind": "diverged", "step": done, "loss": outcome.blown_up[1]})
        return True
    return False


def _settle(run: _Run, outcome: _Outcome) -> None:
    """After the loop: the flags not yet read, a checkpoint of an unfinished run, a divergence line."""
    if outcome.diverged_at is None:
        outcome.diverged_at = _first_nonfinite(run)
    if outcome.diverged_at is None and int(run.state.step) < run.num_steps:
        _checkpoint(run, int(run.state.step))
    if outcome.diverged_at is not None:
        loss = dict(jax.device_get(run.window)).get(outcome.diverged_at)
        outcome.loss = None if loss is None else float(loss)
        _log(
            run, {"kind": "diverged", "step": outcome.diverged_at, "loss": outcome.loss}
        )


def _first_nonfinite(run: _Run) -> int | None:
    """The first step since the last sync whose loss or update was not finite."""
    flags = jax.device_get([flag for _, flag in run.unchecked])
    bad = next((s for (s, _), ok in zip(run.unchecked, flags) if not ok), None)
    run.unchecked.clear()
    return bad


def _evaluation(run: _Run, step: int) -> dict[str, Any]:
    record = {"kind": "eval", "step": step, "epoch": step / run.loader.steps_per_epoch}
    for split, loader in run.eval_loaders.items():
        result = evaluate(run.eval_fn, run.state.params, loader)
        record[f"{split}_loss"] = result["loss"]
        record[f"{split}_accuracy"] = result["accuracy"]
    record["wall_time_s"] = run.elapsed()
    return record


def _checkpoint(run: _Run, step: int) -> None:
    # The batch losses since the last "train" line, so a resumed run logs the same mean.
    first = step - step % run.config.log_every
    pending = [
        [s, float(x)] for s, x in jax.device_get(run.window) if first < s <= step
    ]
    save_checkpoint(
        run.manager,
        run.state,
        {"step": step, "elapsed_s": run.elapsed(), "window_losses": pending},
    )


def _log(run: _Run, record: dict[str, Any]) -> None:
    run.metrics_file.write(json_line(record))
    run.metrics_file.flush()


def _mean_loss(window) -> float:
    return float(
        np.mean(np.asarray(jax.device_get([loss for _, loss in window]), np.float64))
    )


def _progress_bar(run: _Run):
    from tqdm.auto import tqdm

    return tqdm(
        total=run.num_steps,
        initial=int(run.state.step),
        desc=run.label,
        unit="step",
        dynamic_ncols=True,
        disable=not run.config.progress,
        leave=True,
    )


# --- the end -------------------------------------------------------------------------


def _finish(run: _Run, outcome: _Outcome) -> dict[str, Any]:
    """results.json of a finished or diverged run; the stop of an unfinished one."""
    config, step = run.config, int(run.state.step)
    options = resolved_options(config)
    if outcome.diverged_at is not None:
        return _results.diverged(
            config, run.workdir, outcome.diverged_at, outcome.loss,
            outcome.last_saved, options,
        )  # fmt: skip
    if outcome.blown_up is not None:
        return _results.blew_up(
            config, run.workdir, *outcome.blown_up, run.num_steps, options
        )
    if run.signals.signum is not None and step < run.num_steps:
        print(
            f"[{run.label}] {signal.Signals(run.signals.signum).name} at step {step} of "
            f"{run.num_steps}; checkpoint saved in {run.workdir}",
            file=sys.stderr,
        )
        raise Interrupted(step, run.num_steps, run.workdir, run.signals.signum)
    if step < run.num_steps:
        print(
            f"[{run.label}] stopped at step {step} of {run.num_steps}; "
            f"checkpoint saved in {run.workdir}"
        )
        return {
            "status": "stopped",
            "step": step,
            "total_steps": run.num_steps,
            "workdir": run.workdir,
        }
    return _write_results(run)


def _write_results(run: _Run) -> dict[str, Any]:
    """results.json, curves.png and the table of a run that trained every step."""
    config, step = run.config, int(run.state.step)
    if run.last_eval is None:  # resumed a finished run: its final evaluation, again
        run.last_eval = _evaluation(run, step)
    records = read_metrics(run.metrics_path)
    train_records = [r for r in records if r["kind"] == "train"]
    wall_time = run.elapsed() if step > run.start_step else run.elapsed_before
    last = run.last_eval
    results = {
        "status": "done",
        **_results.run_fields(config, resolved_options(config)),
        "steps": step,
        "epochs": step / run.loader.steps_per_epoch,
        "train_accuracy": last["train_accuracy"],
        "train_loss": last["train_loss"],
        "test_accuracy": last["test_accuracy"],
        "test_loss": last["test_loss"],
        "last_batch_loss": train_records[-1]["loss"] if train_records else None,
        "wall_time_s": wall_time,
        "session_wall_time_s": time.perf_counter() - run.started,
        "examples_per_s": _results.mean_rate(train_records),
        "workdir": run.workdir,
        **device_info(),
    }
    write_json(os.path.join(run.workdir, RESULTS_FILE), results)
    title = (
        f"{config.method} on {config.dataset}, {_results.model_title(config)}, "
        f"{config.optimizer} lr={config.learning_rate:g}"
    )
    plot_curves(records, os.path.join(run.workdir, CURVES_FILE), title)
    print(format_table([results]))
    print(
        f"[{run.label}] results in {run.workdir}: {CONFIG_FILE}, {METRICS_FILE}, "
        f"{RESULTS_FILE}, {CURVES_FILE}"
    )
    return json_safe(results)
