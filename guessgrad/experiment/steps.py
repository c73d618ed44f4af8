"""What a run computes: its jitted, data-parallel train step and its evaluation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import guessgrad as gg
from guessgrad import data, parallel
from guessgrad.experiment.config import Config, make_optimizer
from guessgrad.experiment.config import estimator as config_estimator


def train_step(config: Config, num_classes: int, mesh):
    """``(optimizer, data-parallel train step)`` of ``config``, shared by runs that compute the same step.

    Runs in one process with the same method, options, model, optimiser and
    augmentation (a resumed run, a test's reruns) reuse one compiled step.
    """
    key = (
        config.method,
        tuple(sorted(dict(config.options).items())),
        config.model,
        num_classes,
        config.optimizer,
        config.learning_rate,
        config.augment,
        mesh,
    )
    try:
        hash(key)
    except TypeError:  # an unhashable option value: build it afresh
        return _build_train_step(*key)
    return _cached_train_step(*key)


def _build_train_step(
    method, options, spec, num_classes, optimizer_name, learning_rate, augment, mesh
):
    optimizer = make_optimizer(optimizer_name, learning_rate)
    trainable = spec.trainable()
    if trainable is not None:  # frozen leaves never move, weight decay included
        optimizer = optax.masked(optimizer, trainable)
    config = Config(method=method, model=spec, options=dict(options))
    estimator = config_estimator(config, num_classes)  # the one validation built
    if augment:
        estimator = _augmented(estimator, flatten=spec.flatten)
    return optimizer, parallel.make_parallel_train_step(estimator, optimizer, mesh)


_cached_train_step = functools.lru_cache(maxsize=8)(_build_train_step)


def _augmented(estimator, *, flatten: bool):
    """``estimator`` on randomly cropped and flipped images (``data.augment``), inside the step.

    The step's key is split: one half draws the augmentation, the other goes
    to the estimator. Images are flattened after augmenting when the model
    takes them flat.
    """

    def flat(images):
        return images.reshape(images.shape[0], -1) if flatten else images

    def estimate(params, batch, key, *state):
        aug_key, estimator_key = jax.random.split(key)
        images = flat(data.augment(batch["image"], aug_key))
        return estimator(params, {**batch, "image": images}, estimator_key, *state)

    if gg.is_stateful(estimator):  # its state is built on the images it will see

        def init(params, batch, key=None):
            return estimator.init(params, {**batch, "image": flat(batch["image"])}, key)

        estimate.init = init
    estimate.has_aux = getattr(estimator, "has_aux", False)
    return estimate


def eval_loader(
    images: np.ndarray, labels: np.ndarray, config: Config, mesh
) -> data.Loader:
    # Fixed-size padded batches, a multiple of the device count.
    devices = mesh.devices.size
    batch_size = max(
        devices, min(config.eval_batch_size, len(labels)) // devices * devices
    )
    return data.Loader(
        images,
        labels,
        batch_size,
        None,
        flatten=config.model.flatten,
        shuffle=False,
        drop_remainder=False,
        sharding=parallel.batch_sharding(mesh),
    )


@functools.cache
def make_eval_fn(model):
    """Jitted ``(params, batch) -> [loss sum, correct count, example count]`` over the batch's mask.

    Cached per model (Flax modules compare by their fields), so runs of the same
    architecture share one compiled evaluation.
    """

    @jax.jit
    def eval_sums(params, batch):
        logits = model.apply(params, batch["image"])
        mask = batch["mask"].astype(jnp.float32)
        losses = gg.per_example_loss(logits, batch["label"])
        correct = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
        return jnp.stack(
            [jnp.sum(losses * mask), jnp.sum(correct * mask), jnp.sum(mask)]
        )

    return eval_sums


def evaluate(eval_fn, params, loader: data.Loader) -> dict[str, float]:
    """Mean loss and accuracy over every example of ``loader`` (one host sync)."""
    sums = sum(eval_fn(params, batch) for batch in loader.eval_batches())
    loss, correct, count = (float(x) for x in jax.device_get(sums))
    return {"loss": loss / count, "accuracy": correct / count}
