"""One training loop for every experiment: the logic behind ``python -m experiments.*``.

An experiment is a model (a :class:`ModelSpec`: :class:`MLPSpec`,
:class:`LocalMixerSpec`, :class:`ViTSpec`) trained with a gradient estimator
on an image classification data set, as a :class:`Config` says (in a config
file, a :func:`config_dict`). :func:`run` trains one method and writes
everything it measured to a work directory:

* ``config.json``: the resolved configuration (the model spec with its
  ``kind``), with the estimator's resolved options;
* ``metrics.jsonl``: one JSON object per line, ``{"kind": "train", ...}`` with
  the mean batch loss every ``log_every`` steps and ``{"kind": "eval", ...}``
  with train and test loss and accuracy at each evaluation;
* ``results.json``: final accuracies and losses, steps, wall time, devices;
* ``curves.png``: loss and accuracy against the step;
* ``checkpoints/``: Orbax checkpoints of the :class:`guessgrad.TrainState`,
  saved at each evaluation (the last ``keep_checkpoints`` kept) and on Ctrl-C.

A run is a pure function of its configuration: the batch of step ``t`` is cut
from ``(data key, t)``, the estimator's key is ``fold_in(key, t)`` and the
augmentation's (``augment=True``) is split from it, so resuming from a
checkpoint gives exactly the parameters an uninterrupted run would have.
:func:`compare` runs several methods on the same data and seed and tabulates
them; :func:`launch` runs what a config file asks for (pretraining a
backbone first where it says so, :func:`pretrained_backbone`). Nothing here
needs absl.

The modules: ``specs`` (architectures), ``config`` (the configuration, its
checks and its config-file form), ``train`` (the loop), ``steps`` (the
jitted step and evaluation), ``checkpoints``, ``workdir`` (locking, resuming),
``signals``, ``records`` (files, tables, curves), ``results`` (results.json,
divergence), ``launch`` (comparisons) and ``pretrain``.
"""

from guessgrad.experiment.checkpoints import (
    CheckpointError,
    WorkdirError,
    checkpoint_steps,
    load_params,
)
from guessgrad.experiment.config import (
    DEFAULT_EPOCHS,
    DEFAULT_LEARNING_RATE,
    DEFAULT_METHOD,
    OPTIMIZERS,
    Config,
    Experiment,
    Pretraining,
    check_options,
    config_dict,
    config_from_record,
    config_record,
    default_workdir,
    from_config_dict,
    make_optimizer,
    option_types,
    options_for,
    parse_methods,
    resolved_options,
    total_steps,
    validate,
)
from guessgrad.experiment.launch import compare, launch, method_configs
from guessgrad.experiment.pretrain import (
    BACKBONE_FILE,
    frozen_accuracy,
    pretrained_backbone,
)
from guessgrad.experiment.records import (
    CHECKPOINT_DIR,
    COMPARE_JSON,
    COMPARE_MD,
    CONFIG_FILE,
    CURVES_FILE,
    METRICS_FILE,
    RESULTS_FILE,
    device_info,
    format_table,
    json_safe,
    markdown_table,
    plot_curves,
    read_metrics,
)
from guessgrad.experiment.results import BLOWUP_EVALS, BLOWUP_FACTOR
from guessgrad.experiment.signals import Interrupted
from guessgrad.experiment.specs import (
    LOCALMIXER_OBJECTIVES,
    MODEL_SPECS,
    LocalMixerSpec,
    MLPSpec,
    ModelSpec,
    ViTSpec,
    model_spec_from_json,
)
from guessgrad.experiment.steps import evaluate, make_eval_fn
from guessgrad.experiment.train import run
from guessgrad.experiment.workdir import LOCK_FILE, check_workdir

__all__ = [
    "BACKBONE_FILE",
    "BLOWUP_EVALS",
    "BLOWUP_FACTOR",
    "CHECKPOINT_DIR",
    "COMPARE_JSON",
    "COMPARE_MD",
    "CONFIG_FILE",
    "CURVES_FILE",
    "DEFAULT_EPOCHS",
    "DEFAULT_LEARNING_RATE",
    "DEFAULT_METHOD",
    "LOCALMIXER_OBJECTIVES",
    "LOCK_FILE",
    "METRICS_FILE",
    "MODEL_SPECS",
    "OPTIMIZERS",
    "RESULTS_FILE",
    "CheckpointError",
    "Config",
    "Experiment",
    "Interrupted",
    "LocalMixerSpec",
    "MLPSpec",
    "ModelSpec",
    "Pretraining",
    "ViTSpec",
    "WorkdirError",
    "check_options",
    "check_workdir",
    "checkpoint_steps",
    "compare",
    "config_dict",
    "config_from_record",
    "config_record",
    "default_workdir",
    "device_info",
    "evaluate",
    "format_table",
    "from_config_dict",
    "frozen_accuracy",
    "json_safe",
    "launch",
    "load_params",
    "make_eval_fn",
    "make_optimizer",
    "markdown_table",
    "method_configs",
    "model_spec_from_json",
    "option_types",
    "options_for",
    "parse_methods",
    "plot_curves",
    "pretrained_backbone",
    "read_metrics",
    "resolved_options",
    "run",
    "total_steps",
    "validate",
]
