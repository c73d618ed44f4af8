r"""Downloads a tensorflow-datasets data set and stores it as array_record.

guessgrad reads tfds data sets (``guessgrad.data.load``) from array_record
files, which needs neither TensorFlow nor internet. Making those files once
needs both: run this on a machine with internet after

    pip install tensorflow importlib_resources

then, for example,

    python -m experiments.prepare_data --dataset=cifar10 \
        --data_dir=~/tensorflow_datasets

and copy ``--data_dir`` to the training machine if that is another one. The
packaged default data set, mnist10k, needs no preparation.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence

from absl import app, flags

from guessgrad import data

_TFDS_NAMES = tuple(n for n in data.DATASETS if n != "mnist10k")

_DATASET = flags.DEFINE_string(
    "dataset", None, f"tfds data set to prepare: one of {', '.join(_TFDS_NAMES)}."
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    None,
    "tfds data directory to prepare into (default: $TFDS_DATA_DIR, else "
    "~/tensorflow_datasets).",
)

# Module -> pip package needed to prepare. importlib_resources: tfds 4.9.x
# imports it while preparing built-in data sets but declares it only for
# Python < 3.9.
_NEEDED = {
    "tensorflow": "tensorflow",
    "tensorflow_datasets": "tensorflow-datasets",
    "array_record": "array_record",
    "importlib_resources": "importlib_resources",
}


def _fail(message: str) -> int:
    print(f"prepare_data: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str]) -> int:
    """Prepares ``--dataset`` in ``--data_dir``; returns the exit status."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {' '.join(argv[1:])}")
    name = _DATASET.value
    if name == "mnist10k":
        raise app.UsageError(
            "mnist10k ships with guessgrad and needs no preparation; "
            f"--dataset must be one of: {', '.join(_TFDS_NAMES)}."
        )
    if name not in _TFDS_NAMES:
        raise app.UsageError(
            f"--dataset={name} is not supported; choose one of: {', '.join(_TFDS_NAMES)}."
        )
    data_dir = os.path.abspath(
        os.path.expanduser(_DATA_DIR.value or data.default_data_dir())
    )

    missing = [
        pkg for mod, pkg in _NEEDED.items() if importlib.util.find_spec(mod) is None
    ]
    if missing:
        return _fail(
            "preparing a tfds data set needs TensorFlow (once, with internet); "
            f"missing: {', '.join(missing)}. Install with\n"
            f"    pip install {' '.join(missing)}\n"
            "and run this again. Training on the prepared data needs no "
            "TensorFlow."
        )

    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    stored = builder.info.file_format
    if builder.is_prepared() and stored != tfds.core.FileFormat.ARRAY_RECORD:
        return _fail(
            f"{builder.data_dir} already holds {name} as "
            f"{getattr(stored, 'value', stored)}, which guessgrad cannot read without "
            "TensorFlow. Prepare into another --data_dir."
        )
    builder.download_and_prepare(file_format="array_record")

    sizes = {
        split: len(
            tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        )
        for split in ("train", "test")
    }
    print(
        f"{name} is ready as array_record in {builder.data_dir} "
        f"(train: {sizes['train']:,} examples, test: {sizes['test']:,}).\n"
        "Train on it with:\n"
        f"    python -m experiments.mlp --dataset={name} --data_dir={data_dir}"
    )
    return 0


if __name__ == "__main__":
    flags.mark_flag_as_required("dataset")
    app.run(main)
