"""Experiments as config files: each module's ``get_config()`` returns an ``ml_collections.ConfigDict``.

Training runs (``mlp``, ``paper_mlp``, ``localmixer``, ``localmixer_cifar10``,
``prompt_tuning``) run with ``python -m experiments.main
--config=experiments/configs/<name>.py``, any field overridden with
``--config.<field>=<value>`` (estimator options under ``options``, the
model's settings under ``model``). Their fields are
:class:`guessgrad.experiment.Config`'s; ``compare`` lists methods to compare
and ``pretrain`` (prompt tuning) pretrains a backbone first.

The measurements' settings (``cosine``, ``bias``, ``bias_training``,
``self_sharpening``, ``subspace``) are the flags of ``python -m
experiments.<name>``, built from these files the same way as the short
training commands' flags.
"""
