"""A run's results.json: a finished run's, and a diverged one's with its cause.

A run whose loss or update turns non-finite stops at once; one whose
training loss blows up while staying finite (above :data:`BLOWUP_FACTOR`
times its step-0 value at :data:`BLOWUP_EVALS` evaluations in a row, or at
the last one) stops too. Either way results.json says ``"diverged"``, the
step, the last good checkpoint and the likely cause.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from guessgrad.experiment.records import (
    RESULTS_FILE,
    device_info,
    json_safe,
    write_json,
)

if TYPE_CHECKING:
    from guessgrad.experiment.config import Config

# A run whose training loss (on the evaluated train subset) exceeds
# BLOWUP_FACTOR times its step-0 value at BLOWUP_EVALS evaluations in a row,
# or at the last one, stops as diverged even though every number is finite.
BLOWUP_FACTOR = 3.0
BLOWUP_EVALS = 2


def run_fields(config: Config, options: Mapping[str, Any]) -> dict[str, Any]:
    """What results.json repeats of the configuration."""
    return {
        "method": config.method,
        "dataset": config.dataset,
        "model": config.model.label,
        "model_spec": config.model.to_json(),
        "augment": config.augment,
        "transform": config.transform,
        "optimizer": config.optimizer,
        "learning_rate": config.learning_rate,
        "estimator_options": options,
    }


def diverged(
    config: Config,
    workdir: str,
    step: int,
    loss: float | None,
    last_saved: int | None,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """Writes results.json for a run that stopped at a non-finite step; returns it."""
    kept = (
        f"the last good checkpoint is step {last_saved}"
        if last_saved is not None
        else "no checkpoint was saved before it"
    )
    message = (
        f"the loss or the update became non-finite at step {step} (batch loss "
        f"{loss}); nothing after it was saved, and {kept}. Likely cause: a learning "
        f"rate too large for {config.optimizer} ({config.learning_rate:g}; try a "
        "smaller --learning_rate), or labels outside the model's classes."
    )
    return _writediverged(config, workdir, step, loss, last_saved, message, options)


def blew_up(
    config: Config,
    workdir: str,
    step: int,
    loss: float,
    start: float,
    num_steps: int,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """Writes results.json for a run whose loss blew up but stayed finite; returns it."""
    rule = (
        "at the last evaluation"
        if step == num_steps
        else f"at {BLOWUP_EVALS} evaluations in a row"
    )
    message = (
        f"the training loss rose to {loss:.4g} at step {step}, above "
        f"{BLOWUP_FACTOR:g}x its start ({start:.4g}) {rule}; its checkpoint is kept. "
        f"Likely cause: a learning rate too large for {config.optimizer} "
        f"({config.learning_rate:g}; try a smaller --learning_rate)."
    )
    return _writediverged(config, workdir, step, loss, step, message, options)


def _writediverged(
    config: Config,
    workdir: str,
    step: int,
    loss: float | None,
    last_saved: int | None,
    message: str,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """results.json of a diverged run (``"status": "diverged"``), one line on stderr."""
    results = {
        "status": "diverged",
        **run_fields(config, options),
        "step": step,
        "loss": loss,
        "last_checkpoint_step": last_saved,
        "message": message,
        "workdir": workdir,
        **device_info(),
    }
    write_json(os.path.join(workdir, RESULTS_FILE), results)
    print(f"[{config.method}] diverged: {message}", file=sys.stderr)
    return json_safe(results)


SHIFTED = {"invert": "inverted", "rotate": "rotated"}


def model_title(config: Config) -> str:
    shifted = f", images {SHIFTED[config.transform]}" if config.transform else ""
    return config.model.label + shifted + (", augmented" if config.augment else "")


def mean_rate(train_records: Sequence[Mapping[str, Any]]) -> float | None:
    # Median over logged windows: robust to the first window's compilation.
    rates = [r["examples_per_s"] for r in train_records if "examples_per_s" in r]
    return float(np.median(rates)) if rates else None


def blowup_history(records: Sequence[Mapping[str, Any]]) -> tuple[float | None, int]:
    """``(step-0 train loss, evaluations in a row above BLOWUP_FACTOR times it)`` so far."""
    evals = [r for r in records if r.get("kind") == "eval"]
    if not evals or evals[0].get("step") != 0:
        return None, 0
    start = evals[0].get("train_loss")
    above = 0
    for record in evals[1:]:
        above = above + 1 if is_above(record, start) else 0
    return start, above


def is_above(record: Mapping[str, Any], start: float | None) -> bool:
    """Whether an evaluation's train loss exceeds BLOWUP_FACTOR times ``start`` (a finite, positive one)."""
    loss = record.get("train_loss")
    return (
        start is not None
        and loss is not None
        and math.isfinite(start)
        and start > 0
        and loss > BLOWUP_FACTOR * start
    )
