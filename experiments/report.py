r"""One Markdown page of every measurement's results, beside the paper's.

    python -m experiments.report                     # reads runs/, writes runs/report.md
    python -m experiments.report --runs=/tmp/runs --output=/tmp/report.md

Finds the results of ``experiments.cosine``, ``bias``, ``bias_training``,
``self_sharpening`` and ``subspace`` (their ``<name>.json`` files) under ``--runs`` and
writes one page: per result, its settings, its table (the cosine table has
the paper's Figure 1 numbers and ratios in its last columns), its figure,
and what the paper reports for it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("runs", "runs", "Directory searched for measurement results.")
flags.DEFINE_string("output", None, "The report's path (default <runs>/report.md).")

EXPERIMENTS = {
    "cosine": "Cosine with the true gradient and one-step effectiveness (Figure 1)",
    "bias": "Bias: the cosine of the mean of K guesses (Figure 3, left)",
    "bias_training": "A low cosine without bias: the oracle against the method (Figure 3, "
    "middle and right)",
    "self_sharpening": "Self-sharpening: effective rank and cosine over training (Figure 4)",
    "subspace": "Gradients and the activations' subspace (Figures 6 and 7)",
}
PAPER = {
    "cosine": "6x1024 MLP on CIFAR-10, along a backprop trajectory, one directional "
    "derivative per example across all layers (joint mode): cosine directional "
    "0.0003, activation perturbation 0.016, mixing 0.025, W^T 0.030; one-step "
    "effectiveness 1e-6, 6.9e-4, 3.4e-3, 1.7e-3 (the paper's grid 1e-5..1e-1).",
    "bias": "Averaging guesses for one example: unbiased methods keep rising towards 1, "
    "biased ones (W^T, mixing) saturate.",
    "bias_training": "oracle_angle at the cosine a guessing method reaches trains well; "
    "the method's bias is what hurts, and more with momentum than without.",
    "self_sharpening": "Trained with W^T through U S^p V^T (StableAdamW, 6x128 on CIFAR-10, "
    "50,000 steps), larger p makes the guesses dominated by a few singular values, the "
    "weights' effective rank falls over training and the cosine rises; self_sharpening's "
    "accuracy falls behind W^T's.",
    "subspace": "The gradient with respect to a layer's input activations, dL/dx, lies "
    "close to the top-k principal directions of those activations, far closer than to a "
    "random k-dimensional subspace.",
}


def find(runs: str) -> list[tuple[str, dict]]:
    """``(directory, record)`` of every measurement result under ``runs``, sorted."""
    found = []
    for root, _, files in os.walk(runs):
        for name in EXPERIMENTS:
            if f"{name}.json" in files:
                with open(os.path.join(root, f"{name}.json"), encoding="utf-8") as f:
                    record = json.load(f)
                if record.get("experiment") == name:
                    found.append((root, record))
    return sorted(
        found, key=lambda x: (list(EXPERIMENTS).index(x[1]["experiment"]), x[0])
    )


def section(directory: str, record: dict, output_dir: str) -> str:
    name = record["experiment"]
    settings = record["settings"]
    with open(os.path.join(directory, f"{name}.md"), encoding="utf-8") as f:
        table = f.read().strip()
    figure = os.path.relpath(os.path.join(directory, f"{name}.png"), output_dir)
    # Most measurements read a backprop trajectory; these two train each method.
    training = (
        f"{settings['steps']} training steps of each method"
        if name in ("bias_training", "self_sharpening")
        else f"{settings['steps']} backprop steps (AdamW {settings['learning_rate']:g})"
    )
    described = (
        f"{settings['model_label']} on {settings['dataset']}, batch "
        f"{settings['batch_size']}, {training}, seed {settings['seed']}, "
        f"{settings['device']['device_kind']}"
    )
    return "\n\n".join(
        [
            f"## {EXPERIMENTS[name]}",
            f"Ours: {described} (`{directory}`).",
            table,
            f"![{name}]({figure})",
            f"The paper: {PAPER[name]}",
        ]
    )


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not os.path.isdir(FLAGS.runs):
        print(f"report: no directory {FLAGS.runs}", file=sys.stderr)
        return 2
    output = os.path.abspath(FLAGS.output or os.path.join(FLAGS.runs, "report.md"))
    found = find(FLAGS.runs)
    if not found:
        print(
            f"report: no results of {', '.join(EXPERIMENTS)} under {FLAGS.runs}; run "
            "python -m experiments.cosine (and bias, subspace) first",
            file=sys.stderr,
        )
        return 2
    parts = ["# guessgrad: the paper's measurements, reproduced"]
    parts += [section(d, r, os.path.dirname(output)) for d, r in found]
    missing = [n for n in EXPERIMENTS if n not in {r["experiment"] for _, r in found}]
    if missing:
        parts.append("Not run yet: " + ", ".join(f"`experiments.{n}`" for n in missing))
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        f.write("\n\n".join(parts) + "\n")
    print(f"report: {len(found)} results in {output}")
    return 0


if __name__ == "__main__":
    app.run(main)
