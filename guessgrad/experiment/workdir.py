"""The work directory: one run at a time in it, and what an earlier run left there.

:func:`prepare_workdir` decides whether a run may start or resume in a
directory (checkpoints need ``resume``; a resumed run must compute the same
thing; results without a checkpoint are kept, not overwritten), and
:class:`WorkdirLock` keeps a second run out while one is in it.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any, Self

from guessgrad.experiment.checkpoints import WorkdirError, checkpoint_steps
from guessgrad.experiment.records import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    RESULTS_FILE,
    jsonable,
    load_json,
)

# Config fields that, with the estimator's resolved options, define what a run computes.
IDENTITY_FIELDS = (
    "method",
    "dataset",
    "model",
    "transform",
    "augment",
    "optimizer",
    "learning_rate",
    "batch_size",
    "seed",
)


LOCK_FILE = ".lock"


class WorkdirLock:
    """One run per workdir: an exclusive ``flock`` on ``<workdir>/.lock``.

    The file names the holder (host, pid, start time) for the message a
    second run gets. The kernel releases the lock when the holder exits in
    any way (SIGKILL and the OOM killer included), so a lock left by a dead
    run is stale and simply taken over, with a line saying so. On a clean
    exit the file is emptied.
    """

    def __init__(self, workdir: str, label: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.label = label
        self.file = None

    def __enter__(self) -> Self:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise WorkdirError(
                f"{os.path.dirname(self.path)} is in use by another run ({holder}); "
                "wait for it to finish, or choose another --workdir."
            ) from None
        handle.seek(0)
        earlier = handle.read().strip()
        if earlier:
            print(
                f"[{self.label}] taking over the workdir lock of an earlier run that "
                f"is no longer running ({earlier})"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(
            f"pid {os.getpid()} on {platform.node()}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        handle.flush()
        self.file = handle
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self.file is None:
            return
        try:
            self.file.seek(0)
            self.file.truncate()
        except OSError:
            pass  # an unwritable workdir: the lock still goes with the process
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
        self.file = None


def check_workdir(path: str) -> None:
    """Raises a ValueError when ``path`` cannot be a work directory (a file, not writable)."""
    path = os.path.abspath(path)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is a file" if existing == path else f"lies under a file, {existing}"
        raise ValueError(f"The work directory {path} {what}; choose another --workdir.")
    try:  # os.access says yes to root on read-only mounts: try it
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ValueError(
            f"The work directory {path} cannot be written ({existing}: "
            f"{err.strerror or err}); choose another --workdir."
        ) from None


def prepare_workdir(
    workdir: str,
    *,
    resume: bool,
    identity: Mapping[str, Any],
    num_steps: int,
    label: str,
) -> list[int]:
    """Checks ``workdir`` for a run that computes ``identity``; returns its checkpoint steps.

    ``identity`` is :func:`identity` of the run's configuration. Temporary
    folders of a save that never finished are Orbax's to remove (when the
    run's checkpoint manager starts); they are not checkpoints.

    Raises:
      WorkdirError: checkpoints without ``resume``; a saved run that computes
        something else or trained more than ``num_steps``; results of an
        earlier run but no checkpoint.
    """
    steps = checkpoint_steps(workdir)
    if steps:
        _check_resumable(workdir, steps, resume, identity, num_steps)
        return steps
    results = os.path.join(workdir, RESULTS_FILE)
    if os.path.isfile(results) and os.path.getsize(results) > 0:
        raise WorkdirError(
            f"{workdir} holds the {RESULTS_FILE} of an earlier run but no "
            "checkpoint to resume from; choose another --workdir, or delete it to start over."
        )
    metrics = os.path.join(workdir, METRICS_FILE)
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        # A run killed before its first checkpoint: nothing to resume, nothing to keep.
        print(
            f"[{label}] {workdir} holds the {METRICS_FILE} of a run that "
            "stopped before its first checkpoint; starting over from step 0"
        )
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if os.path.isdir(directory):
        # No finished checkpoint: at most Orbax's temporary folders of an aborted save.
        shutil.rmtree(directory)
    return steps


def _check_resumable(
    workdir: str,
    steps: list[int],
    resume: bool,
    identity: Mapping[str, Any],
    num_steps: int,
) -> None:
    if not resume:
        raise WorkdirError(
            f"{workdir} already holds checkpoints of an earlier run (steps {', '.join(map(str, steps))}).\n"
            "Pass --resume (Config.resume=True) to continue that run, or choose another --workdir."
        )
    record = load_json(os.path.join(workdir, CONFIG_FILE))
    saved = run_identity(record.get("config", {}), record.get("estimator_options", {}))
    differ = [f for f in identity if f in saved and saved[f] != identity[f]]
    if differ:
        details = "; ".join(
            f"{f}: saved {saved[f]!r}, now {identity[f]!r}" for f in differ
        )
        raise WorkdirError(
            f"Cannot resume the run in {workdir} with a different configuration ({details}).\n"
            "Resume with the saved settings, or choose another --workdir."
        )
    if steps[-1] > num_steps:
        raise WorkdirError(
            f"The run in {workdir} has trained {steps[-1]} steps; this configuration "
            f"asks for {num_steps}. Resume with at least {steps[-1]} steps "
            "(--steps or --epochs), or choose another --workdir."
        )


def run_identity(
    record: Mapping[str, Any], estimator_options: Mapping[str, Any]
) -> dict[str, Any]:
    """What a run computes (of its config record and resolved options): a resumed run must agree on all of it."""
    return {f: record.get(f) for f in IDENTITY_FIELDS} | {
        "estimator_options": jsonable(dict(estimator_options))
    }
