"""Losses and batches: the default per-example cross-entropy, label and batch checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from guessgrad._src.base import Array, Batch


def check_labels(labels: Array, num_classes: int, *, where: str | None = None) -> None:
    """Raises a ValueError naming the labels outside ``0..num_classes-1``.

    Checked only when ``labels`` are concrete (outside ``jax.jit``): under a
    trace the values are unknown, and :func:`per_example_loss` makes an
    out-of-range label's loss NaN instead. ``where`` names the labels in the
    message (e.g. a data set split).
    """
    if isinstance(labels, jax.core.Tracer):
        return
    values = np.asarray(labels)
    bad = np.flatnonzero((values < 0) | (values >= num_classes))
    if bad.size:
        shown = ", ".join(f"[{i}] = {values.flat[i]}" for i in bad[:5])
        more = f" and {bad.size - 5} more" if bad.size > 5 else ""
        raise ValueError(
            f"{f'{where}: labels' if where else 'Labels'} must be in 0..{num_classes - 1} "
            f"({num_classes} classes); got {shown}{more}."
        )


def per_example_loss(logits: Array, labels: Array) -> Array:
    """Softmax cross-entropy per example: [B, C], [B] -> [B].

    A label outside ``0..C-1`` raises a ValueError when the labels are
    concrete (:func:`check_labels`); under ``jax.jit`` it makes that
    example's loss and every derivative of it NaN, so the step is
    non-finite (the experiment runner stops there) rather than quietly wrong.
    """
    num_classes = jnp.shape(logits)[-1]
    check_labels(labels, num_classes)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    valid = (labels >= 0) & (labels < num_classes)
    return losses * jnp.where(valid, 1.0, jnp.nan).astype(losses.dtype)


def validate_batch(batch: Batch, need_label: bool = True) -> tuple[Array, Array | None]:
    """Checks a batch and returns ``(image, label)``; raises a ValueError saying what is expected.

    The default ``inputs`` and ``loss_fn`` read ``batch["image"]`` and
    ``batch["label"]``; with ``need_label=False`` only the image is checked.
    """
    needed = ("image", "label") if need_label else ("image",)
    if not hasattr(batch, "keys") or any(k not in batch for k in needed):
        got = sorted(batch.keys()) if hasattr(batch, "keys") else type(batch).__name__
        what = (
            '"image" ([B, ...] float) and "label" ([B] int)'
            if need_label
            else '"image"'
        )
        raise ValueError(
            f"A batch must be a dict with {what}; got {got}. For other batches, pass "
            f"inputs=(batch -> model arguments) and loss_fn=(outputs, batch -> losses)."
        )
    image = batch["image"]
    if jnp.ndim(image) < 2 or not jnp.issubdtype(jnp.result_type(image), jnp.floating):
        raise ValueError(
            f'batch["image"] must be a floating array of shape [B, ...]; got shape '
            f"{jnp.shape(image)} and dtype {jnp.result_type(image)} (normalise uint8 "
            f"images first, e.g. with guessgrad.data.normalize)."
        )
    if not need_label:
        return image, None
    label = batch["label"]
    if jnp.ndim(label) != 1 or not jnp.issubdtype(jnp.result_type(label), jnp.integer):
        raise ValueError(
            f'batch["label"] must be an integer array of shape [B]; got shape '
            f"{jnp.shape(label)} and dtype {jnp.result_type(label)}."
        )
    if jnp.shape(label)[0] != jnp.shape(image)[0]:
        raise ValueError(
            f'batch["image"] has {jnp.shape(image)[0]} examples but batch["label"] has '
            f"{jnp.shape(label)[0]}."
        )
    return image, label


def accuracy(logits: Array, labels: Array) -> Array:
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def default_loss(outputs: Array, batch: Batch) -> Array:
    """Softmax cross-entropy of ``outputs`` against integer ``batch["label"]``: [B]."""
    return per_example_loss(outputs, batch["label"])


def default_inputs(batch: Batch) -> Array:
    """``batch["image"]``."""
    return batch["image"]
