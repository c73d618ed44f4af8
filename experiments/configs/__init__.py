"""Experiments as config files: each module's ``get_config()`` returns an ``ml_collections.ConfigDict``.

Run one with ``python -m experiments.main --config=experiments/configs/<name>.py``
and override any field with ``--config.<field>=<value>`` (estimator options
under ``options``, the model's settings under ``model``). The fields are
:class:`guessgrad.experiment.Config`'s; ``compare`` lists methods to compare
and ``pretrain`` (prompt tuning) pretrains a backbone first.
"""
