"""Image classification data: loading, normalisation and on-device batching.

``load("mnist10k")`` (the default) needs nothing but this package: 10,000
real MNIST digits ship inside it (see ``MNIST10K.md``). The other names are
tensorflow-datasets data sets, read from an array_record copy prepared once
with ``python -m experiments.prepare_data`` (which needs TensorFlow and
internet); reading them needs neither.

``Loader`` keeps a whole split on the accelerator and cuts the batch for any
global step from ``(key, step)`` alone, so a resumed run sees exactly the
batches an uninterrupted one would have.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from guessgrad._src.losses import check_labels

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "TRANSFORMS",
    "DataMissingError",
    "Dataset",
    "Loader",
    "augment",
    "default_data_dir",
    "image_shape",
    "load",
    "normalize",
    "num_classes",
    "num_train_examples",
    "transform",
]

DATASETS: tuple[str, ...] = ("mnist10k", "mnist", "svhn_cropped", "cifar10", "cifar100")
DEFAULT_DATASET = "mnist10k"
# Classes per data set (the tfds "label" feature).
_NUM_CLASSES = {
    "mnist10k": 10,
    "mnist": 10,
    "svhn_cropped": 10,
    "cifar10": 10,
    "cifar100": 100,
}
# Image shape (H, W, C) per data set (the tfds "image" feature).
_IMAGE_SHAPES = {
    "mnist10k": (28, 28, 1),
    "mnist": (28, 28, 1),
    "svhn_cropped": (32, 32, 3),
    "cifar10": (32, 32, 3),
    "cifar100": (32, 32, 3),
}
# Records decoded per array_record read.
_READ_CHUNK = 4096


class Dataset(NamedTuple):
    """A data set's train and test splits as host numpy arrays."""

    name: str
    train_images: np.ndarray  # uint8 [N, H, W, C]
    train_labels: np.ndarray  # int32 [N]
    test_images: np.ndarray  # uint8 [M, H, W, C]
    test_labels: np.ndarray  # int32 [M]
    num_classes: int


class DataMissingError(RuntimeError):
    """A tfds data set is not prepared (as array_record) where it was looked for.

    ``str(error)`` is the whole message for the user, including the command
    that prepares the data.
    """


def default_data_dir() -> str:
    """tensorflow-datasets' default data directory.

    ``$TFDS_DATA_DIR`` if set, else ``~/tensorflow_datasets``.
    """
    return os.environ.get(
        "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    )


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(
            f"Unknown data set {name!r}; valid names are: {', '.join(DATASETS)}."
        )


def image_shape(name: str) -> tuple[int, int, int]:
    """``(H, W, C)`` of data set ``name``'s images, known without loading it."""
    _check_name(name)
    return _IMAGE_SHAPES[name]


def num_classes(name: str) -> int:
    """The number of classes of data set ``name``, known without loading it."""
    _check_name(name)
    return _NUM_CLASSES[name]


# Shifts of a data set's images that keep their labels: a second task for a
# network trained on the first (prompt tuning adapts a frozen backbone to it).
TRANSFORMS: tuple[str, ...] = ("invert", "rotate")


def transform(dataset: Dataset, name: str | None) -> Dataset:
    """``dataset`` with every image shifted by ``name``, labels kept (None: unchanged).

    ``"invert"``: ``255 - pixel`` (light digits on a dark ground become dark on
    light); ``"rotate"``: a quarter turn counter-clockwise (height and width
    swap).
    """
    if name is None:
        return dataset
    if name not in TRANSFORMS:
        raise ValueError(
            f"Unknown transform {name!r}; valid names: {', '.join(TRANSFORMS)}."
        )

    def shift(images: np.ndarray) -> np.ndarray:
        if name == "invert":
            return 255 - images
        return np.ascontiguousarray(np.rot90(images, axes=(1, 2)))

    return dataset._replace(
        train_images=shift(dataset.train_images),
        test_images=shift(dataset.test_images),
    )


def load(name: str = DEFAULT_DATASET, data_dir: str | None = None) -> Dataset:
    """Loads a data set's train and test splits into numpy arrays.

    Args:
      name: one of ``DATASETS``. ``"mnist10k"`` is the MNIST subset packaged
        with guessgrad (8,000 train / 2,000 test); the others are read with
        ``tfds.data_source`` from an array_record copy in ``data_dir``.
      data_dir: tfds data directory; default ``default_data_dir()``. Ignored
        for ``"mnist10k"``.

    Returns:
      A ``Dataset`` with uint8 ``[N, H, W, C]`` images and int32 labels.

    Raises:
      ValueError: ``name`` is not in ``DATASETS``.
      DataMissingError: the tfds data set is not prepared in ``data_dir``.
    """
    if name not in DATASETS:
        raise ValueError(
            f"Unknown data set {name!r}; valid names are: {', '.join(DATASETS)}."
        )
    if name == "mnist10k":
        dataset = _load_mnist10k()
    else:
        data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
        dataset = _load_tfds(name, data_dir)
    for split, labels in (
        ("train", dataset.train_labels),
        ("test", dataset.test_labels),
    ):
        check_labels(labels, _NUM_CLASSES[name], where=f"{name}'s {split} split")
    return dataset


# Training examples per data set (the tfds "train" split), known without loading it.
_NUM_TRAIN = {
    "mnist10k": 8000,
    "mnist": 60000,
    "svhn_cropped": 73257,
    "cifar10": 50000,
    "cifar100": 50000,
}


def num_train_examples(name: str) -> int:
    """The size of data set ``name``'s training split, known without loading it."""
    _check_name(name)
    return _NUM_TRAIN[name]


def _load_mnist10k() -> Dataset:
    resource = importlib.resources.files("guessgrad.data") / "mnist10k.npz"
    with importlib.resources.as_file(resource) as path, np.load(path) as npz:
        return Dataset(
            name="mnist10k",
            train_images=npz["train_images"],
            train_labels=npz["train_labels"].astype(np.int32),
            test_images=npz["test_images"],
            test_labels=npz["test_labels"].astype(np.int32),
            num_classes=_NUM_CLASSES["mnist10k"],
        )


def _missing_message(name: str, data_dir: str, reason: str) -> str:
    return (
        f"Data set {name!r} is not prepared in {data_dir} ({reason}).\n"
        "Prepare it once, on a machine with internet and TensorFlow "
        "(pip install tensorflow):\n"
        f"    python -m experiments.prepare_data --dataset={name} "
        f"--data_dir={data_dir}\n"
        "and copy that directory here if you prepared it elsewhere. Reading it "
        f"needs neither TensorFlow nor internet. '{DEFAULT_DATASET}' needs no "
        "preparation."
    )


def _load_tfds(name: str, data_dir: str) -> Dataset:
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            f"Loading {name!r} needs tensorflow-datasets and array_record: "
            "pip install tensorflow-datasets array_record "
            f"(or use '{DEFAULT_DATASET}', which needs nothing)."
        ) from err
    try:
        train, test = tfds.data_source(
            name, split=["train", "test"], data_dir=data_dir, download=False
        )
    except NotImplementedError as err:
        # What tfds raises when no array_record copy is there: nothing
        # prepared at all, or a TFRecord copy (e.g. made by tfds.load).
        raise DataMissingError(
            _missing_message(
                name,
                data_dir,
                "no array_record copy found; a TFRecord copy, as tfds.load "
                "makes, cannot be read without TensorFlow: prepare into "
                "another directory then",
            )
        ) from err
    if len(train) == 0 or len(test) == 0:
        raise DataMissingError(
            _missing_message(name, data_dir, "its train or test split is empty")
        )
    train_images, train_labels = _read_split(train)
    test_images, test_labels = _read_split(test)
    return Dataset(
        name, train_images, train_labels, test_images, test_labels, _NUM_CLASSES[name]
    )


def _read_split(source: Any) -> tuple[np.ndarray, np.ndarray]:
    """Decodes a tfds data source into (uint8 [N, H, W, C], int32 [N])."""
    n = len(source)
    images: np.ndarray | None = None
    labels = np.empty((n,), np.int32)
    for start in range(0, n, _READ_CHUNK):
        stop = min(start + _READ_CHUNK, n)
        # One batched array_record read per chunk; decoding is per record.
        records = source.__getitems__(list(range(start, stop)))
        chunk = np.stack([np.asarray(r["image"], np.uint8) for r in records])
        if chunk.ndim == 3:  # grayscale without a channel axis
            chunk = chunk[..., None]
        if images is None:
            images = np.empty((n, *chunk.shape[1:]), np.uint8)
        images[start:stop] = chunk
        labels[start:stop] = [int(r["label"]) for r in records]
    assert images is not None
    return images, labels


def normalize(images: np.ndarray | jax.Array, *, flatten: bool) -> jax.Array:
    """Maps uint8 images to float32 in [-1, 1] as ``x / 127.5 - 1``.

    Args:
      images: uint8 ``[N, ...]`` (numpy or jax; works under ``jax.jit``).
      flatten: reshape the result to ``[N, prod(...)]`` (for dense networks).

    Returns:
      float32 array: 0 maps to -1 and 255 to 1 exactly, and the result is
      the same bit for bit eagerly and under ``jax.jit``.
    """
    images = jnp.asarray(images)
    if images.dtype != jnp.uint8:
        raise TypeError(
            f"normalize expects uint8 images, got {images.dtype}; pass the raw "
            "pixels from load(), not already-normalised values."
        )
    # Subtract-then-scale: exact at 0 and 255, and the same bits eagerly and
    # under jit (where XLA would turn "/ 127.5" into a rounded reciprocal).
    x = (images.astype(jnp.float32) - 127.5) * (1.0 / 127.5)
    if flatten:
        x = x.reshape(x.shape[0], -1)
    return x


@functools.cache
def _gather_fn(
    size: int,
    flatten: bool,
    image_sharding: Sharding | None,
    label_sharding: Sharding | None,
):
    """Jitted gather + normalise of ``size`` examples starting at ``start``.

    Positions ``start + i`` past the end are clamped to the last example and
    flagged False in ``mask``.
    """

    def gather(images, labels, order, start):
        pos = start + jnp.arange(size)
        mask = pos < order.shape[0]
        idx = order[jnp.minimum(pos, order.shape[0] - 1)]
        return {
            "image": normalize(images[idx], flatten=flatten),
            "label": labels[idx],
            "mask": mask,
        }

    if image_sharding is None:
        return jax.jit(gather)
    shardings = {
        "image": image_sharding,
        "label": label_sharding,
        "mask": label_sharding,
    }
    return jax.jit(gather, out_shardings=shardings)


def _shardings(sharding: Sharding | None, batch_shapes: list[tuple[int, ...]]):
    """(replicated data sharding, image sharding, label sharding)."""
    if sharding is None:
        return None, None, None
    for shape in batch_shapes:
        try:
            sharding.shard_shape(shape)
        except ValueError as err:
            raise ValueError(
                f"sharding {sharding} cannot split a batch of shape {shape}: "
                "every batch size (with drop_remainder=False, also the last, "
                "smaller one) must be divisible by the number of shards."
            ) from err
    if isinstance(sharding, NamedSharding):
        spec = sharding.spec
        batch_axis = spec[0] if len(spec) else None
        replicated = NamedSharding(sharding.mesh, PartitionSpec())
        return (
            replicated,
            sharding,
            NamedSharding(sharding.mesh, PartitionSpec(batch_axis)),
        )
    if len(sharding.device_set) == 1:
        return sharding, sharding, sharding
    raise TypeError(
        f"sharding must be a jax.sharding.NamedSharding that splits the batch "
        f"axis (e.g. NamedSharding(mesh, PartitionSpec('data'))) or a "
        f"single-device sharding; got {type(sharding).__name__}."
    )


class Loader:
    """Whole data set on device; batch for any global step, deterministic from (key, step).

    Epoch ``e`` visits the examples in the order
    ``jax.random.permutation(jax.random.fold_in(key, e), N)`` (natural order
    when ``shuffle=False``); step ``s`` is batch ``s % steps_per_epoch`` of
    epoch ``s // steps_per_epoch``. Only the current epoch's order is kept,
    so jumping to any step costs at most one permutation.

    Batches are ``{"image": float32 [B, H, W, C] or [B, H*W*C] in [-1, 1],
    "label": int32 [B]}``. With ``drop_remainder=False`` the last batch of an
    epoch has the ``N % B`` leftover examples. ``eval_batches()`` covers every
    example once in natural order with fixed-size, masked batches.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        key: jax.Array | None,
        *,
        flatten: bool,
        shuffle: bool = True,
        drop_remainder: bool = True,
        sharding: Sharding | None = None,
        num_classes: int | None = None,
    ) -> None:
        """Puts the data on device.

        Args:
          images: uint8 ``[N, H, W, C]``.
          labels: integer ``[N]``.
          batch_size: examples per batch (B).
          key: PRNG key for the epoch orders; may be None when
            ``shuffle=False``.
          flatten: batches of images ``[B, H*W*C]`` instead of ``[B, H, W, C]``.
          shuffle: a fresh random order per epoch; False gives natural order.
          drop_remainder: drop the ``N % B`` examples that do not fill a batch
            (else the epoch's last batch is smaller).
          sharding: optional ``jax.sharding.NamedSharding`` for batches (its
            spec's first entry shards the batch axis); the data set itself
            is replicated over the same devices.
          num_classes: if given, every label must be in ``0..num_classes-1``
            (a ValueError names the ones that are not).
        """
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}."
            )
        if labels.shape != images.shape[:1]:
            raise ValueError(
                f"labels must have shape [N] = {images.shape[:1]}, got {labels.shape}."
            )
        if num_classes is not None:
            check_labels(labels, num_classes)
        n = images.shape[0]
        if batch_size < 1 or (drop_remainder and batch_size > n):
            raise ValueError(
                f"batch_size must be in 1..{n} (the number of examples) when "
                f"drop_remainder is True, or >= 1 otherwise; got {batch_size}."
            )
        if shuffle and key is None:
            raise ValueError(
                "shuffle=True needs a PRNG key; pass key= or shuffle=False."
            )
        self.num_examples = n
        self.batch_size = batch_size
        self.flatten = flatten
        self.shuffle = shuffle
        self.drop_remainder = drop_remainder
        self.steps_per_epoch = (
            n // batch_size if drop_remainder else -(-n // batch_size)
        )
        self._key = key
        sizes = [batch_size]
        if not drop_remainder and n % batch_size:
            sizes.append(n % batch_size)
        data_sharding, self._image_sharding, self._label_sharding = _shardings(
            sharding, [(size, *images.shape[1:]) for size in sizes]
        )
        put = functools.partial(jax.device_put, device=data_sharding)
        self._images = put(images)
        self._labels = put(labels.astype(np.int32))
        self._natural = put(np.arange(n, dtype=np.int32))
        self._order_epoch: int | None = None
        self._order: jax.Array = self._natural

    def order(self, epoch: int) -> jax.Array:
        """The example order of ``epoch`` (int32 [N]), cached for the latest epoch."""
        if not self.shuffle:
            return self._natural
        if self._order_epoch != epoch:
            key = jax.random.fold_in(self._key, epoch)
            perm = jax.random.permutation(key, self.num_examples).astype(jnp.int32)
            self._order = jax.device_put(perm, self._natural.sharding)
            self._order_epoch = epoch
        return self._order

    def _take(self, order: jax.Array, start: int, size: int) -> dict[str, jax.Array]:
        fn = _gather_fn(size, self.flatten, self._image_sharding, self._label_sharding)
        return fn(self._images, self._labels, order, np.int32(start))

    def batch(self, step: int) -> dict[str, jax.Array]:
        """The batch of global step ``step`` (any step, in any order)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        epoch, i = divmod(step, self.steps_per_epoch)
        start = i * self.batch_size
        size = min(self.batch_size, self.num_examples - start)
        out = self._take(self.order(epoch), start, size)
        return {"image": out["image"], "label": out["label"]}

    def epoch(self, epoch: int) -> Iterator[dict[str, jax.Array]]:
        """Yields the batches of ``epoch``: steps ``epoch * steps_per_epoch`` onwards."""
        first = epoch * self.steps_per_epoch
        for step in range(first, first + self.steps_per_epoch):
            yield self.batch(step)

    def eval_batches(self) -> Iterator[dict[str, jax.Array]]:
        """Yields every example exactly once, in natural order, for evaluation.

        All batches have ``batch_size`` rows (one compiled shape). Each also has
        ``"mask"`` (bool [B]): the last batch is padded by repeating the last
        example, with ``mask`` False on the padding; weight per-example
        metrics by ``mask`` and divide by ``mask.sum()`` (or ``num_examples``).
        """
        for start in range(0, self.num_examples, self.batch_size):
            yield self._take(self._natural, start, self.batch_size)


def augment(
    images: jax.Array,
    key: jax.Array,
    *,
    padding: int = 4,
    flip: bool = True,
    fill: float | None = -1.0,
) -> jax.Array:
    """Random crops and horizontal flips, one draw per example, on device.

    Each image is padded by ``padding`` pixels on every side and cropped back
    to its size at a random offset (uniform over the ``(2 * padding + 1)**2``
    offsets), then, with ``flip``, mirrored left-right with probability 1/2:
    the standard CIFAR augmentation. Pure ``jax.numpy``: works under
    ``jax.jit`` and ``jax.vmap``, and the same key gives the same images.
    Flips are wrong for digits (a mirrored 2 is no 2): keep them for natural
    images.

    Args:
      images: ``[B, H, W, C]``, e.g. ``normalize``'s output in [-1, 1].
      key: a PRNG key.
      padding: pixels of padding per side; 0 turns cropping off.
      flip: mirror half the images, left-right.
      fill: the padding's value; the default -1.0 is black in ``normalize``'s
        scale (a raw pixel of 0, what torchvision's ``RandomCrop(32,
        padding=4)`` pads with). None repeats the edge pixels instead.

    Returns:
      An array of the shape and dtype of ``images``.
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(
            f"augment expects images [B, H, W, C], got shape {images.shape}."
        )
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative integer; got {padding!r}.")
    b, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)
    if padding:
        pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
        if fill is None:
            padded = jnp.pad(images, pad, mode="edge")
        else:
            padded = jnp.pad(
                images, pad, constant_values=jnp.asarray(fill, images.dtype)
            )
        offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * padding + 1)

        def crop(image, offset):
            return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

        images = jax.vmap(crop)(padded, offsets)
    if flip:
        mirror = jax.random.bernoulli(flip_key, 0.5, (b,))
        images = jnp.where(mirror[:, None, None, None], images[:, :, ::-1], images)
    return images
