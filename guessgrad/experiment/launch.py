"""Several methods on the same data, seed and budget: :func:`compare`; a config file's experiment: :func:`launch`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import guessgrad as gg
from guessgrad.experiment.config import (
    Config,
    Experiment,
    config_record,
    default_workdir,
    options_for,
    validate,
)
from guessgrad.experiment.pretrain import frozen_accuracy, pretrained_backbone
from guessgrad.experiment.records import (
    COLUMNS,
    COMPARE_JSON,
    COMPARE_MD,
    format_table,
    markdown_table,
    write_json,
)
from guessgrad.experiment.results import model_title
from guessgrad.experiment.train import run


def method_configs(config: Config, methods: Sequence[str]) -> list[Config]:
    """One validated configuration per method, each with the options of ``config`` it takes.

    Raises a ValueError for an unknown method or option value, or an option
    that none of ``methods`` takes.
    """
    if not methods:
        raise ValueError(
            f"Give at least one method; valid names: {', '.join(gg.ESTIMATORS)}."
        )
    for method in methods:
        gg.estimator_options(method)  # raises a ValueError listing the valid names
    unused = [
        o
        for o in config.options
        if not any(o in gg.estimator_options(m) for m in methods)
    ]
    if unused:
        raise ValueError(f"No method in {list(methods)} takes option(s) {unused}.")
    configs = [
        dataclasses.replace(config, method=m, options=options_for(m, config.options))
        for m in methods
    ]
    for method_config in configs:
        validate(method_config)
    return configs


def compare(config: Config, methods: Sequence[str]) -> list[dict[str, Any]]:
    """Runs each of ``methods`` with ``config`` (same data, seed, budget); returns one row per method.

    Each method runs in ``<workdir>/<method>`` and is passed only the options of
    ``config.options`` it takes (an option no listed method takes is an
    error). Writes compare.json and compare.md (a Markdown table) to the
    workdir and prints the table.
    """
    methods = list(methods)
    configs = method_configs(config, methods)
    workdir = os.path.abspath(config.workdir or default_workdir(config, "compare"))
    print(f"comparing {', '.join(methods)} in {workdir}")
    rows = []
    for method_config in configs:
        results = run(
            dataclasses.replace(
                method_config, workdir=os.path.join(workdir, method_config.method)
            )
        )
        if results["status"] == "stopped":
            print(
                f"compare: {method_config.method} stopped at step {results['step']}; not tabulated"
            )
            return rows
        if results["status"] == "diverged":
            print(
                f"compare: {method_config.method} diverged at step {results['step']}; "
                "tabulated without results"
            )
            rows.append(
                {
                    "method": f"{method_config.method} (diverged)",
                    "steps": results["step"],
                    "status": "diverged",
                    "workdir": results["workdir"],
                }
            )
            continue
        rows.append(
            {key: results[key] for _, key, _ in COLUMNS}
            | {"status": "done", "workdir": results["workdir"]}
        )
    record = config_record(config) | {"workdir": workdir}
    write_json(
        os.path.join(workdir, COMPARE_JSON),
        {"config": record, "methods": methods, "rows": rows},
    )
    title = f"{config.dataset}, {model_title(config)}, {config.optimizer} lr={config.learning_rate:g}, seed {config.seed}"
    with open(os.path.join(workdir, COMPARE_MD), "w", encoding="utf-8") as f:
        f.write(f"# {title}\n\n{markdown_table(rows)}\n")
    print(f"\n{title}\n{format_table(rows)}")
    print(f"comparison in {workdir}: {COMPARE_JSON}, {COMPARE_MD}")
    return rows


def launch(experiment: Experiment) -> list[dict[str, Any]]:
    """What a config file asks for: pretraining (if any), then one run or a comparison.

    With ``experiment.pretraining`` and a model without a backbone, the
    backbone is pretrained first (:func:`pretrained_backbone`, cached in the
    workdir) and every run tunes it in ``<workdir>/<method>``. Returns one
    row per method (a single run's results.json as its row).
    """
    config, methods = experiment.config, experiment.methods
    tuned = experiment.pretraining is not None or getattr(
        config.model, "backbone", None
    )
    name = experiment.name or ("compare" if methods else None)
    workdir = config.workdir
    if methods or tuned:
        workdir = os.path.abspath(workdir or default_workdir(config, name))
    if experiment.pretraining is not None and config.model.backbone is None:
        backbone = pretrained_backbone(config, workdir, experiment.pretraining)
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, backbone=backbone)
        )
    if methods:
        rows = compare(dataclasses.replace(config, workdir=workdir), methods)
    else:
        if tuned:  # one method: its own folder, as a comparison's
            workdir = os.path.join(workdir, config.method)
        rows = [run(dataclasses.replace(config, workdir=workdir))]
    if tuned:
        accuracy = frozen_accuracy(workdir if methods else os.path.dirname(workdir))
        if accuracy is not None:
            print(
                "before tuning (the frozen backbone, its prompts at initialisation): "
                f"test accuracy {accuracy:.2%}"
            )
    return rows
