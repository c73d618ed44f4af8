"""Orbax checkpoints of a run's TrainState: saved synchronously, restored past corrupt ones."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from typing import Any

import jax

import guessgrad as gg
from guessgrad.experiment.records import CHECKPOINT_DIR


class WorkdirError(RuntimeError):
    """The work directory cannot be used as asked; ``str()`` says why and what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the run stopped at that step (``str()`` says why)."""


def checkpoint_manager(directory: str, keep: int):
    import orbax.checkpoint as ocp

    # Orbax removes the temporary folders of saves that never finished.
    # Saves are synchronous: one that fails stops the run at that step rather
    # than surfacing later from a background thread while training goes on.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(directory, options=options)


def _to_saveable(state: gg.TrainState) -> gg.TrainState:
    # Orbax stores arrays, not typed PRNG keys: save the key's raw data.
    return state._replace(key=jax.random.key_data(state.key))


def save_checkpoint(manager, state: gg.TrainState, meta: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    step = int(meta["step"])
    if step in manager.all_steps():
        return
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(_to_saveable(state)), meta=ocp.args.JsonSave(meta)
    )
    try:
        manager.save(step, args=args)
        manager.wait_until_finished()
    except Exception as err:  # any failure to write: stop here
        saved = [s for s in manager.all_steps() if s != step]
        kept = (
            f"the checkpoint of step {max(saved)} is kept"
            if saved
            else "no earlier checkpoint exists"
        )
        raise CheckpointError(
            f"Could not write the checkpoint of step {step} in {manager.directory} "
            f"({first_line(err)}); training stopped there and "
            f"{kept}. Free disk space or restore write access, then resume with --resume."
        ) from err


def close_quietly(manager) -> None:
    """Closes a checkpoint manager whose last save failed (its error is already raised)."""
    with contextlib.suppress(Exception):
        manager.close()


def _restore_one(manager, step: int, template: gg.TrainState):
    import orbax.checkpoint as ocp

    saveable = _to_saveable(template)
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(saveable), meta=ocp.args.JsonRestore()
    )
    restored = manager.restore(step, args=args)
    state = jax.tree.unflatten(
        jax.tree.structure(saveable), jax.tree.leaves(restored.state)
    )
    meta = dict(restored.meta)
    if int(meta["step"]) != step or int(state.step) != step:
        raise ValueError(f"it holds step {int(state.step)}, not {step}")
    return state._replace(key=jax.random.wrap_key_data(state.key)), meta


def first_line(err: BaseException) -> str:
    """``Type: message`` on one line, at most 200 characters (reprs in messages can be long)."""
    text = " ".join(str(err).split())
    if len(text) > 200:
        text = text[:199] + "…"
    return f"{type(err).__name__}: {text}"


def restore_checkpoint(
    manager, template: gg.TrainState, workdir: str, label: str
) -> tuple[gg.TrainState, dict[str, Any]]:
    """The latest checkpoint that restores; an unreadable one is moved aside with a warning.

    A checkpoint that fails to restore (a truncated array file, an empty
    ``_METADATA``) is moved to ``<workdir>/corrupt-checkpoint-<step>`` (kept
    for inspection, out of the way of the step's next save) and the one
    before it is tried. If none restores, a :class:`WorkdirError` says which
    folder to delete.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
        try:
            return _restore_one(manager, step, template)
        except Exception as err:  # noqa: BLE001  (any failure: try the one before)
            failures.append(f"step {step} ({first_line(err)})")
            source = os.path.join(manager.directory, str(step))
            aside = os.path.join(workdir, f"corrupt-checkpoint-{step}")
            if os.path.exists(aside):
                shutil.rmtree(aside)
            shutil.move(str(source), aside)
            manager.reload()
            print(
                f"[{label}] warning: the checkpoint of step {step} could not be read "
                f"({first_line(err)}); moved it to {aside}"
                + (", trying the one before" if step != steps[-1] else ""),
                file=sys.stderr,
            )
    raise WorkdirError(
        f"No checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)} could be restored: "
        f"{'; '.join(failures)}. They were moved to {workdir}/corrupt-checkpoint-*.\n"
        f"Delete {workdir} (or run without --resume in another --workdir) to start over."
    )


def load_params(workdir: str, step: int | None = None) -> tuple[Any, int]:
    """``(params, step)`` of a checkpoint in ``workdir`` (default: the latest)."""
    import orbax.checkpoint as ocp

    steps = checkpoint_steps(workdir)
    if not steps or (step is not None and step not in steps):
        raise FileNotFoundError(
            f"No checkpoint {'' if step is None else f'of step {step} '}in {workdir}; saved steps: {steps or 'none'}."
        )
    step = steps[-1] if step is None else step
    manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    )
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
        )
    finally:
        manager.close()
    return restored.state["params"], step


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the finished checkpoints saved in ``workdir`` (empty if none).

    Orbax's own listing: the temporary folder of a save that never finished
    is not a checkpoint.
    """
    import orbax.checkpoint as ocp

    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        return []
    return sorted(ocp.utils.checkpoint_steps(directory))
