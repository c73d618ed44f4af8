"""Tests for guessgrad.data: the packaged mnist10k, normalize, Loader, tfds."""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import io
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guessgrad import data
from guessgrad.data import make_mnist10k

# --- the packaged mnist10k ---------------------------------------------------


@pytest.fixture(scope="module")
def mnist10k() -> data.Dataset:
    return data.load("mnist10k")


def test_default_dataset_is_packaged_mnist10k():
    assert data.DEFAULT_DATASET == "mnist10k"
    assert data.DEFAULT_DATASET in data.DATASETS
    ref = importlib.resources.files("guessgrad.data") / "mnist10k.npz"
    assert ref.is_file()
    assert (importlib.resources.files("guessgrad.data") / "MNIST10K.md").is_file()


def test_mnist10k_shapes_dtypes_and_classes(mnist10k):
    ds = mnist10k
    assert ds.name == "mnist10k" and ds.num_classes == 10
    assert ds.train_images.shape == (8000, 28, 28, 1)
    assert ds.test_images.shape == (2000, 28, 28, 1)
    assert ds.train_images.dtype == ds.test_images.dtype == np.uint8
    assert ds.train_labels.shape == (8000,) and ds.test_labels.shape == (2000,)
    assert ds.train_labels.dtype == ds.test_labels.dtype == np.int32
    # Every class 0..9 in both splits, nothing else.
    np.testing.assert_array_equal(np.unique(ds.train_labels), np.arange(10))
    np.testing.assert_array_equal(np.unique(ds.test_labels), np.arange(10))
    # Stratified: test holds 20% (+-1) of each class.
    train_counts = np.bincount(ds.train_labels, minlength=10)
    test_counts = np.bincount(ds.test_labels, minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * (train_counts + test_counts)) <= 1)
    # Real digits, not blank: a full 0..255 range, mostly background.
    assert ds.train_images.min() == 0 and ds.train_images.max() == 255
    assert 0.7 < np.mean(ds.train_images == 0) < 0.9


def test_mnist10k_is_deterministic_and_matches_recorded_digest(mnist10k):
    again = data.load("mnist10k")
    for a, b in zip(mnist10k[1:5], again[1:5]):
        np.testing.assert_array_equal(a, b)
    # The digest recorded in MNIST10K.md: any change to the split shows here.
    digest = make_mnist10k.content_digest(mnist10k._asdict())
    doc = (importlib.resources.files("guessgrad.data") / "MNIST10K.md").read_text()
    assert digest in doc


def test_mnist10k_train_and_test_share_no_image(mnist10k):
    def hashes(images):
        return {hashlib.sha256(x.tobytes()).hexdigest() for x in images}

    train, test = hashes(mnist10k.train_images), hashes(mnist10k.test_images)
    # The source has no exact duplicates, so hashes identify examples.
    assert len(train) == 8000 and len(test) == 2000
    assert not train & test


# --- normalize ---------------------------------------------------------------


def test_normalize_endpoints_shape_and_flatten():
    x = np.array([0, 255, 51, 204], np.uint8).reshape(1, 2, 2, 1)
    y = data.normalize(x, flatten=False)
    assert y.dtype == jnp.float32 and y.shape == (1, 2, 2, 1)
    np.testing.assert_array_equal(
        np.asarray(y).ravel(), np.array([-1.0, 1.0, -0.6, 0.6], np.float32)
    )
    images = np.arange(3 * 4 * 5 * 2, dtype=np.uint8).reshape(3, 4, 5, 2)
    flat = data.normalize(images, flatten=True)
    assert flat.shape == (3, 40)
    np.testing.assert_array_equal(
        flat, np.asarray(data.normalize(images, flatten=False)).reshape(3, 40)
    )


def test_normalize_all_pixel_values_eager_and_jit():
    pixels = np.arange(256, dtype=np.uint8).reshape(256, 1, 1, 1)
    eager = np.asarray(data.normalize(pixels, flatten=True)).ravel()
    jitted = jax.jit(lambda x: data.normalize(x, flatten=True))(jnp.asarray(pixels))
    # Same bits under jit, exact endpoints, never outside [-1, 1].
    np.testing.assert_array_equal(np.asarray(jitted).ravel(), eager)
    assert eager[0] == -1.0 and eager[255] == 1.0
    assert np.all(np.abs(eager) <= 1.0)
    np.testing.assert_allclose(eager, np.arange(256) / 127.5 - 1, rtol=0, atol=1e-7)


def test_normalize_rejects_non_uint8():
    with pytest.raises(TypeError, match="uint8"):
        data.normalize(np.zeros((1, 2, 2, 1), np.float32), flatten=False)


# --- Loader ------------------------------------------------------------------


def _toy(n=50, h=3, w=2, c=1):
    images = np.arange(n * h * w * c).reshape(n, h, w, c).astype(np.uint8)
    images[:, 0, 0, 0] = np.arange(n)  # pixel [0,0,0] identifies the example
    return images, np.arange(n, dtype=np.int32) % 7


def _ids(batch) -> np.ndarray:
    """Example index of each row (pixel [0,0,0], undone from [-1, 1])."""
    first = np.asarray(batch["image"]).reshape(batch["image"].shape[0], -1)[:, 0]
    return np.rint((first + 1.0) * 127.5).astype(int)


def test_loader_batch_dtype_shape_and_content():
    images, labels = _toy()
    loader = data.Loader(images, labels, 8, jax.random.key(0), flatten=False)
    assert loader.steps_per_epoch == 6
    b = loader.batch(3)
    assert set(b) == {"image", "label"}
    assert b["image"].dtype == jnp.float32 and b["image"].shape == (8, 3, 2, 1)
    assert b["label"].dtype == jnp.int32 and b["label"].shape == (8,)
    ids = _ids(b)
    np.testing.assert_array_equal(
        b["image"], data.normalize(images[ids], flatten=False)
    )
    np.testing.assert_array_equal(b["label"], labels[ids])
    flat = data.Loader(images, labels, 8, jax.random.key(0), flatten=True).batch(3)
    assert flat["image"].shape == (8, 6)
    np.testing.assert_array_equal(flat["image"], np.asarray(b["image"]).reshape(8, 6))


def test_loader_batch_for_any_step_is_reproducible_without_replay():
    images, labels = _toy()
    key = jax.random.key(42)
    a = data.Loader(images, labels, 8, key, flatten=True)
    seen = {s: a.batch(s) for s in range(20)}  # epochs 0..3, in order
    b = data.Loader(images, labels, 8, key, flatten=True)
    for step in (17, 3, 12, 0, 17):  # fresh loader, jumping around
        np.testing.assert_array_equal(b.batch(step)["image"], seen[step]["image"])
        np.testing.assert_array_equal(b.batch(step)["label"], seen[step]["label"])
    # The documented order: epoch e is permutation(fold_in(key, e), N).
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 2), 50))
    np.testing.assert_array_equal(_ids(a.batch(2 * 6 + 1)), perm[8:16])
    # Another key gives another order.
    other = data.Loader(images, labels, 8, jax.random.key(43), flatten=True)
    assert not np.array_equal(_ids(other.batch(0)), _ids(a.batch(0)))


def test_loader_epoch_visits_every_example_once_and_orders_differ():
    images, labels = _toy()
    loader = data.Loader(
        images, labels, 8, jax.random.key(1), flatten=False, drop_remainder=False
    )
    assert loader.steps_per_epoch == 7
    orders = []
    for e in range(3):
        batches = list(loader.epoch(e))
        assert [len(b["label"]) for b in batches] == [8] * 6 + [2]
        ids = np.concatenate([_ids(b) for b in batches])
        np.testing.assert_array_equal(np.sort(ids), np.arange(50))
        np.testing.assert_array_equal(
            np.concatenate([b["label"] for b in batches]), labels[ids]
        )
        orders.append(ids)
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[1], orders[2])
    # drop_remainder=True: 6 full batches, 48 distinct examples per epoch.
    dropping = data.Loader(images, labels, 8, jax.random.key(1), flatten=False)
    ids = np.concatenate([_ids(b) for b in dropping.epoch(0)])
    assert len(ids) == 48 and len(set(ids.tolist())) == 48


def test_loader_without_shuffle_is_natural_order():
    images, labels = _toy()
    loader = data.Loader(images, labels, 10, None, flatten=True, shuffle=False)
    for e in (0, 1):
        ids = np.concatenate([_ids(b) for b in loader.epoch(e)])
        np.testing.assert_array_equal(ids, np.arange(50))


def test_eval_batches_cover_every_example_once_with_mask():
    images, labels = _toy()
    loader = data.Loader(images, labels, 16, jax.random.key(0), flatten=True)
    batches = list(loader.eval_batches())
    assert len(batches) == 4
    assert all(b["image"].shape == (16, 6) for b in batches)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.dtype == bool and mask.sum() == 50 and mask[:50].all()
    ids = np.concatenate([_ids(b) for b in batches])[mask]
    np.testing.assert_array_equal(ids, np.arange(50))
    np.testing.assert_array_equal(
        np.concatenate([b["label"] for b in batches])[mask], labels
    )


def test_loader_with_single_device_sharding():
    images, labels = _toy()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    b = data.Loader(
        images, labels, 8, jax.random.key(0), flatten=True, sharding=sharding
    )
    ref = data.Loader(images, labels, 8, jax.random.key(0), flatten=True)
    batch = b.batch(5)
    assert batch["image"].sharding == sharding
    np.testing.assert_array_equal(batch["image"], ref.batch(5)["image"])


def test_loader_rejects_bad_arguments():
    images, labels = _toy()
    with pytest.raises(ValueError, match="batch_size"):
        data.Loader(images, labels, 51, jax.random.key(0), flatten=True)
    with pytest.raises(ValueError, match="key"):
        data.Loader(images, labels, 8, None, flatten=True)
    with pytest.raises(ValueError, match="uint8"):
        data.Loader(
            images.astype(np.float32), labels, 8, jax.random.key(0), flatten=True
        )
    with pytest.raises(ValueError, match="labels"):
        data.Loader(images, labels[:-1], 8, jax.random.key(0), flatten=True)


# --- tfds data sets ----------------------------------------------------------


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        data.load("imagenet")
    for name in data.DATASETS:
        assert name in str(err.value)


def test_missing_tfds_data_says_how_to_prepare(tmp_path):
    with pytest.raises(data.DataMissingError) as err:
        data.load("cifar10", data_dir=str(tmp_path))
    message = str(err.value)
    assert "'cifar10'" in message
    assert str(tmp_path) in message
    assert (
        f"python -m experiments.prepare_data --dataset=cifar10 --data_dir={tmp_path}"
        in message
    )
    assert "pip install tensorflow" in message


def _fixed_getitems(*args, generator, serialized=False):
    """A working ``__getitems__`` for tfds's data_source mock.

    In tensorflow-datasets 4.9.10, ``mock_data`` assigns its ``_getitems``
    as a plain attribute of a MagicMock, so it is called without ``self`` and
    fails; the record keys are always the last positional argument.
    """
    del serialized
    return [generator[k] for k in args[-1]]


@pytest.mark.parametrize(
    "name, shape, num_classes",
    [
        ("mnist", (28, 28, 1), 10),
        ("cifar10", (32, 32, 3), 10),
        ("cifar100", (32, 32, 3), 100),
        ("svhn_cropped", (32, 32, 3), 10),
    ],
)
def test_tfds_mock_data_source(monkeypatch, tmp_path, name, shape, num_classes):
    tfds = pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.testing import mocking

    monkeypatch.setattr(mocking, "_getitems", _fixed_getitems)
    with tfds.testing.mock_data(num_examples=13):
        ds = data.load(name, data_dir=str(tmp_path))
    assert ds.name == name and ds.num_classes == num_classes
    assert ds.train_images.shape == ds.test_images.shape == (13, *shape)
    assert ds.train_images.dtype == ds.test_images.dtype == np.uint8
    assert ds.train_labels.dtype == ds.test_labels.dtype == np.int32
    assert 0 <= ds.train_labels.min() and ds.train_labels.max() < num_classes


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
        buf, "PNG"
    )
    return buf.getvalue()


@pytest.mark.parametrize(
    "name, shape", [("cifar10", (32, 32, 3)), ("mnist", (28, 28, 1))]
)
def test_tfds_reads_real_array_record_files(monkeypatch, tmp_path, name, shape):
    """A genuine array_record copy (tiny, random) read through the real path.

    The data set's own tfds builder writes the files; only its download step
    is replaced by in-memory PNGs, so no TensorFlow or internet is needed.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("PIL")
    # tfds 4.9.x imports importlib_resources while preparing but does not
    # declare it on Python >= 3.9; the stdlib module serves the same purpose.
    if importlib.util.find_spec("importlib_resources") is None:
        monkeypatch.setitem(sys.modules, "importlib_resources", importlib.resources)
    cls = tfds.builder_cls(name)

    rng = np.random.default_rng(0)
    sizes = {"train": 11, "test": 5}
    images = {
        s: rng.integers(0, 256, (n, *shape), dtype=np.uint8) for s, n in sizes.items()
    }
    labels = {s: rng.integers(0, 10, n).astype(np.int32) for s, n in sizes.items()}

    def examples(split):
        for i in range(sizes[split]):
            ex = {"image": _png(images[split][i]), "label": int(labels[split][i])}
            if name == "cifar10":
                ex["id"] = f"{split}_{i:05d}"
            yield i, ex

    monkeypatch.setattr(
        cls, "_split_generators", lambda self, dl: {s: examples(s) for s in sizes}
    )
    builder = tfds.builder(name, data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP
        )
    )
    monkeypatch.undo()

    ds = data.load(name, data_dir=str(tmp_path))
    for split, size in sizes.items():
        got_images = getattr(ds, f"{split}_images")
        got_labels = getattr(ds, f"{split}_labels")
        assert got_images.shape == (size, *shape) and got_images.dtype == np.uint8
        assert got_labels.dtype == np.int32
        # tfds shuffles records on write: compare as sets of (image, label).
        want = sorted(
            (x.tobytes(), int(y)) for x, y in zip(images[split], labels[split])
        )
        got = sorted((x.tobytes(), int(y)) for x, y in zip(got_images, got_labels))
        assert got == want


# --- in a fresh process: imports, and sharding over two CPU devices ----------

_SUBPROCESS = r"""
import json, sys
import guessgrad.data as data
imported_tf = sorted(m for m in ("tensorflow", "tensorflow_datasets") if m in sys.modules)
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
mesh = Mesh(np.array(jax.devices()[::-1]), ("data",))
sharding = NamedSharding(mesh, PartitionSpec("data"))
images = np.random.default_rng(0).integers(0, 256, (40, 4, 4, 1), np.uint8)
labels = np.arange(40, dtype=np.int32)
key = jax.random.key(3)
sharded = data.Loader(images, labels, 8, key, flatten=True, sharding=sharding)
plain = data.Loader(images, labels, 8, key, flatten=True)
a, b = sharded.batch(7), plain.batch(7)
ev = list(sharded.eval_batches())
try:
    data.Loader(images, labels, 7, key, flatten=True, sharding=sharding)
    odd_rejected = False
except ValueError:
    odd_rejected = True
# prepare_data without TensorFlow (hidden from import if installed).
import contextlib, io
sys.modules["tensorflow"] = None
from absl import app, flags
from experiments import prepare_data
flags.FLAGS(["prepare_data", "--dataset=cifar10", "--data_dir=/nonexistent"])
stderr = io.StringIO()
with contextlib.redirect_stderr(stderr):
    prepare_rc = prepare_data.main(["prepare_data"])
try:
    prepare_data.main(["prepare_data", "stray"])
    stray_rejected = False
except app.UsageError:
    stray_rejected = True
print(json.dumps({
    "prepare_rc": prepare_rc,
    "prepare_stderr": stderr.getvalue(),
    "stray_rejected": stray_rejected,
    "imported_tf": imported_tf,
    "devices": len(jax.devices()),
    "image_sharding": a["image"].sharding == sharding,
    "shard_rows": [s.data.shape[0] for s in a["image"].addressable_shards],
    "same_batch": bool(np.array_equal(a["image"], b["image"])
                       and np.array_equal(a["label"], b["label"])),
    "eval_count": int(sum(int(e["mask"].sum()) for e in ev)),
    "odd_rejected": odd_rejected,
}))
"""


@pytest.fixture(scope="module")
def fresh_process() -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env["JAX_PLATFORMS"] = "cpu"
    root = pathlib.Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_does_not_load_tensorflow(fresh_process):
    assert fresh_process["imported_tf"] == []


def test_loader_shards_batches_over_two_devices(fresh_process):
    assert fresh_process["devices"] == 2
    assert fresh_process["image_sharding"]
    assert fresh_process["shard_rows"] == [4, 4]
    assert fresh_process["same_batch"]  # sharding changes placement, not data
    assert fresh_process["eval_count"] == 40
    assert fresh_process["odd_rejected"]  # batch 7 cannot split over 2 devices


def test_prepare_data_without_tensorflow_says_what_to_install(fresh_process):
    assert fresh_process["prepare_rc"] == 1
    assert "pip install tensorflow" in fresh_process["prepare_stderr"]
    assert "Traceback" not in fresh_process["prepare_stderr"]
    assert fresh_process["stray_rejected"]
