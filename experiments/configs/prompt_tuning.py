r"""Visual prompt tuning of a frozen ViT (``python -m experiments.prompt_tuning``).

    python -m experiments.main --config=experiments/configs/prompt_tuning.py
    python -m experiments.main --config=experiments/configs/prompt_tuning.py \
        --config.model.num_prompts=16 --config.model.prompt_depth=deep

On the embedded digits: pretrains a small ViT by backprop on the digits
(``pretrain``; cached in ``<workdir>/backbone.npz``, resumable), then freezes
it and trains only prompt tokens on a second task, the same digits shifted
(``transform``: inverted by default, or rotated), with each method of
``compare``. ``--config.model.backbone=ViT-B_16.npz`` (a public ViT
checkpoint, with ``--config.model.config=B/16``) skips the pretraining.
Downstream is not compared: the prompt site's target (block 0's query
projection) has no activation, so its guess is wt's exactly.
"""

from guessgrad import experiment


def get_config():
    config = experiment.config_dict(
        experiment.Config(
            model=experiment.ViTSpec(
                config="tiny", num_prompts=8, prompt_depth="shallow"
            )
        ),
        methods=["backprop", "directional", "activation_perturbation", "wt"],
        pretraining=experiment.Pretraining(epochs=10, learning_rate=1e-3),
        name="prompt_tuning",
    )
    config.method = "wt"
    config.dataset = "mnist10k"
    config.transform = "invert"
    config.optimizer = "adamw"
    config.learning_rate = 1e-2
    config.batch_size = 128
    config.epochs = 5
    config.eval_every = 1000
    return config
