"""What a run writes: its file names, the metrics file, strict JSON, curves and tables."""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CURVES_FILE = "curves.png"
CHECKPOINT_DIR = "checkpoints"
COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"


def device_info() -> dict[str, Any]:
    """The JAX backend and devices this process computes on."""
    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind,
        "jax_version": jax.__version__,
        "num_devices": len(devices),
        "num_processes": jax.process_count(),
        "host": platform.node(),
    }


# --- metrics file, checkpoints, plots ----------------------------------------------


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (empty if it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: str, last_step: int) -> None:
    """Drops records after ``last_step``: a resumed run writes them again."""
    records = [r for r in read_metrics(path) if r["step"] <= last_step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json_line(r) for r in records)


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (strict JSON has neither)."""
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_line(record: Mapping[str, Any]) -> str:
    return json.dumps(json_safe(record), allow_nan=False) + "\n"


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as strict JSON (non-finite numbers as null), atomically."""
    text = json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n"
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(partial, path)


def plot_curves(
    records: Sequence[Mapping[str, Any]], path: str, title: str = ""
) -> None:
    """Writes loss and accuracy against the step (from metrics.jsonl records) as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, acc_ax = figure.subplots(1, 2)
    if train:
        loss_ax.plot(
            [r["step"] for r in train],
            [r["loss"] for r in train],
            lw=1,
            alpha=0.6,
            label="batch loss",
        )
    steps = [r["step"] for r in evals]
    for split, style in (("train", "-o"), ("test", "-s")):
        loss_ax.plot(
            steps,
            [r[f"{split}_loss"] for r in evals],
            style,
            ms=3,
            label=f"{split} loss",
        )
        acc_ax.plot(
            steps,
            [100 * r[f"{split}_accuracy"] for r in evals],
            style,
            ms=3,
            label=f"{split} accuracy",
        )
    loss_ax.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="loss")
    acc_ax.set(xlabel="step", ylabel="accuracy (%)", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=100)


# --- tables ----------------------------------------------------------------------

COLUMNS = (
    ("method", "method", "{}"),
    ("train acc", "train_accuracy", "{:.2%}"),
    ("test acc", "test_accuracy", "{:.2%}"),
    ("train loss", "train_loss", "{:.4g}"),
    ("test loss", "test_loss", "{:.4g}"),
    ("steps", "steps", "{}"),
    ("wall time", "wall_time_s", "{:.1f} s"),
    ("examples/s", "examples_per_s", "{:,.0f}"),
)


def _cells(rows: Iterable[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = [title for title, _, _ in COLUMNS]
    body = [
        [
            "-" if row.get(key) is None else fmt.format(row[key])
            for _, key, fmt in COLUMNS
        ]
        for row in rows
    ]
    return header, body


def format_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """Plain-text table of results (method, accuracies, losses, steps, wall time)."""
    header, body = _cells(rows)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])


def markdown_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """The same table in Markdown."""
    header, body = _cells(rows)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def load_json(path: str) -> dict[str, Any]:
    """The JSON object in ``path`` (empty if there is no such file)."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def jsonable(obj: Any) -> Any:
    """``obj`` as JSON reads it back (tuples as lists, keys as strings)."""
    return json.loads(json.dumps(obj))
