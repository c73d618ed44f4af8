"""Data parallelism: 8 simulated CPU devices match 1 device; mesh, placement and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO
from jax.sharding import AbstractMesh

from guessgrad import parallel
from guessgrad._src import parallel as parallel_src

_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
_METHODS = ("backprop", "wt", "mixing")
# Measured max |8 devices - 1 device| over all parameters after 5 steps
# (parameters up to ~0.2 in size): backprop 3e-8, wt 1.3e-6, mixing 3.0e-6. The
# difference is float32 reduction order (the per-device gradient sums are
# all-reduced); the guessed estimates are larger than the true gradient, so
# their rounding is too.
_ATOL, _RTOL = 1e-5, 1e-4

# Runs in a fresh interpreter with 8 simulated devices. Prints one JSON line.
_EIGHT_DEVICES = r"""
import json
import jax
import numpy as np
import optax

import guessgrad as gg
from guessgrad import data, parallel

assert len(jax.devices()) == 8, jax.devices()
mesh8 = parallel.data_mesh()
mesh1 = parallel.data_mesh(jax.devices()[:1])
batch_size, steps = 64, 5
parallel.check_batch_size(batch_size, mesh8)

ds = data.load()
images, labels = ds.train_images[:512], ds.train_labels[:512]
model = gg.models.MLP(depth=3, width=32, num_classes=ds.num_classes)
params = model.init(jax.random.key(0), np.zeros((1, 784), np.float32))
# SGD with momentum: Adam's 1/sqrt(v) would magnify float rounding in
# gradient entries near zero; the estimators are what this test compares.
optimizer = optax.sgd(0.1, momentum=0.9)


def loader(mesh):
    sharding = parallel.batch_sharding(mesh)
    key = jax.random.key(2)
    return data.Loader(images, labels, batch_size, key, flatten=True, sharding=sharding)


loader8, loader1 = loader(mesh8), loader(mesh1)
out = {"describe": parallel.describe(mesh8), "methods": {}}
for name in %(methods)r:
    estimator = gg.get_estimator(name, model, has_aux=True)
    state = gg.init_train_state(params, optimizer, jax.random.key(1))
    step8 = parallel.make_parallel_train_step(estimator, optimizer, mesh8)
    step1 = parallel.make_parallel_train_step(estimator, optimizer, mesh1)
    plain = gg.make_train_step(estimator, optimizer)  # sharding propagation alone
    s8 = s1 = state
    sp = parallel.replicate(state, mesh8)
    for t in range(steps):
        s8, metrics = step8(s8, loader8.batch(t))
        s1, _ = step1(s1, loader1.batch(t))
        sp, plain_metrics = plain(sp, loader8.batch(t))
    batch = loader8.batch(0)
    hlo = step8.lower(s8, batch).compile().as_text()
    p8, p1, pp = (jax.tree.leaves(s.params) for s in (s8, s1, sp))
    out["methods"][name] = {
        "max_diff": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(p8, p1)),
        "max_diff_plain_jit": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(pp, p1)),
        "close": all(np.allclose(a, b, rtol=%(rtol)r, atol=%(atol)r) for a, b in zip(p8, p1)),
        "close_plain_jit": all(np.allclose(a, b, rtol=%(rtol)r, atol=%(atol)r) for a, b in zip(pp, p1)),
        "param_devices": sorted({len(p.sharding.device_set) for p in p8 + pp}),
        "params_replicated": all(p.sharding.is_fully_replicated for p in p8 + pp),
        "loss_replicated": bool(metrics["loss"].sharding.is_fully_replicated),
        "batch_shards": sorted({s.data.shape for s in batch["image"].addressable_shards}),
        "num_batch_shards": len(batch["image"].addressable_shards),
        "all_reduce": "all-reduce" in hlo,
        "per_device_input": "f32[8,784]" in hlo,
        "finite": bool(np.isfinite(float(metrics["loss"]))),
    }
print(json.dumps(out))
"""


def _run(
    script: str, device_count: int, timeout: float = 300
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={device_count} {_FLAGS}",
    }
    return subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=REPO,
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_eight_devices_match_one_device():
    script = _EIGHT_DEVICES % {"methods": _METHODS, "rtol": _RTOL, "atol": _ATOL}
    proc = _run(script, device_count=8)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(out, indent=1))
    assert out["describe"] == "data-parallel over 8 devices (cpu) on 1 host"
    for name in _METHODS:
        result = out["methods"][name]
        assert result["finite"], name
        # The same seed gives the same parameters on 8 devices as on 1.
        assert result["close"], (name, result["max_diff"])
        assert result["close_plain_jit"], (name, result["max_diff_plain_jit"])
        # ... and the 8-device run really ran on 8 devices: the batch in 8
        # shards of 64 / 8 examples, the compiled step working on [8, 784]
        # per device and all-reducing, the state replicated on all 8.
        assert result["num_batch_shards"] == 8, name
        assert result["batch_shards"] == [[8, 784]], name
        assert result["per_device_input"] and result["all_reduce"], name
        assert result["param_devices"] == [8], name
        assert result["params_replicated"] and result["loss_replicated"], name


# --- in-process: one device ---------------------------------------------------


def test_check_batch_size():
    mesh = AbstractMesh((8,), (parallel.DATA_AXIS,))
    assert parallel.check_batch_size(64, mesh) == 8
    with pytest.raises(
        ValueError, match=r"60 does not split evenly over the 8 devices.*56 or 64"
    ):
        parallel.check_batch_size(60, mesh)
    with pytest.raises(ValueError, match=r"multiple of 8 \(e.g. 8\)"):
        parallel.check_batch_size(3, mesh)
    with pytest.raises(TypeError, match="positive integer"):
        parallel.check_batch_size(64.0, mesh)
    with pytest.raises(ValueError, match="axis named 'data'"):
        parallel.check_batch_size(64, AbstractMesh((8,), ("batch",)))
    assert parallel.check_batch_size(5, parallel.data_mesh()) == 5


def test_mesh_and_describe_on_one_device():
    mesh = parallel.data_mesh()
    assert mesh.axis_names == (parallel.DATA_AXIS,) and mesh.size == len(jax.devices())
    assert parallel.describe(parallel.data_mesh(jax.devices()[:1])) == "1 device (cpu)"
    assert parallel.batch_sharding(mesh).spec == jax.sharding.PartitionSpec("data")
    assert parallel.replicated(mesh).spec == jax.sharding.PartitionSpec()
    with pytest.raises(ValueError, match="at least one device"):
        parallel.data_mesh([])


def test_replicate_and_shard_batch_round_trip(small_mlp):
    import optax

    import guessgrad as gg

    model, params, batch = small_mlp
    mesh = parallel.data_mesh(jax.devices()[:1])
    optimizer = optax.adam(1e-3)
    state = gg.init_train_state(params, optimizer, jax.random.key(0))
    placed = parallel.replicate(state, mesh)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(placed)):
        assert b.sharding.is_equivalent_to(parallel.replicated(mesh), b.ndim)
    assert jax.random.key_impl(placed.key) == jax.random.key_impl(state.key)
    assert np.array_equal(
        jax.random.key_data(placed.key), jax.random.key_data(state.key)
    )
    leaves = zip(jax.tree.leaves(state.params), jax.tree.leaves(placed.params))
    assert all(np.array_equal(a, b) for a, b in leaves)
    again = parallel.replicate(placed, mesh)  # already placed: the same arrays
    assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(placed)))

    host = jax.tree.map(np.asarray, batch)
    sharded = parallel.shard_batch(host, mesh)
    assert all(np.array_equal(host[k], sharded[k]) for k in host)
    assert sharded["image"].sharding.is_equivalent_to(parallel.batch_sharding(mesh), 3)
    with pytest.raises(ValueError, match="needs a batch axis"):
        parallel.shard_batch({"image": np.float32(1.0)}, mesh)

    # The parallel step on one device is the plain step.
    estimator = gg.get_estimator("wt", model, has_aux=True)
    step = parallel.make_parallel_train_step(estimator, optimizer, mesh)
    new, metrics = step(state, host)
    ref, _ = gg.make_train_step(estimator, optimizer)(state, batch)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert int(new.step) == 1 and jnp.isfinite(metrics["loss"])


_LAUNCHER_ENV = (
    "JAX_COORDINATOR_ADDRESS",
    "COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "PROCESS_ID",
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_PROCESS_ADDRESSES",
    "TPU_WORKER_HOSTNAMES",
    "GUESSGRAD_DISTRIBUTED",
)


@pytest.fixture
def clean_env(monkeypatch):
    for name in _LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_host_does_not_initialize(clean_env):
    assert parallel_src._multihost_launcher() is None
    clean_env.setenv("SLURM_JOB_ID", "7")  # a one-task SLURM job is a single host
    for name in ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"):
        clean_env.setenv(name, "0")
    clean_env.setenv("SLURM_NTASKS", "1")
    clean_env.setenv("JAX_NUM_PROCESSES", "1")
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    assert parallel_src._multihost_launcher() is None
    assert parallel.maybe_initialize_distributed() is False
    assert parallel.maybe_initialize_distributed() is False  # safe twice
    assert not jax.distributed.is_initialized()


def test_multihost_detection(clean_env):
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    clean_env.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        parallel_src._multihost_launcher()
    clean_env.setenv("JAX_PROCESS_ID", "1")
    _, kwargs = parallel_src._multihost_launcher()
    assert kwargs == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 2,
        "process_id": 1,
    }
    # JAX's backend already runs in this process, so it cannot join: a clear error.
    jax.devices()
    with pytest.raises(
        RuntimeError, match="call guessgrad.parallel.maybe_initialize_distributed"
    ):
        parallel.maybe_initialize_distributed()
    clean_env.setenv("GUESSGRAD_DISTRIBUTED", "0")
    assert parallel.maybe_initialize_distributed() is False


# Two processes of 4 CPU devices each, joined by jax.distributed: about 80 s on
# 2 cores, so opt-in (GUESSGRAD_MULTIPROCESS_TEST=1).
_TWO_PROCESSES = r"""
import jax
import numpy as np
import optax

import guessgrad as gg
from guessgrad import data, parallel

assert parallel.maybe_initialize_distributed() and parallel.maybe_initialize_distributed()
pid = jax.process_index()
mesh = parallel.data_mesh()
assert parallel.describe(mesh) == "data-parallel over 8 devices (cpu) on 2 hosts"
ds = data.load()
x = np.asarray(data.normalize(ds.train_images[:64], flatten=True))
y = ds.train_labels[:64]
model = gg.models.MLP(depth=3, width=32, num_classes=10)
params = model.init(jax.random.key(0), x[:1])
optimizer = optax.sgd(0.1, momentum=0.9)
estimator = gg.get_estimator("wt", model, has_aux=True)
state = gg.init_train_state(params, optimizer, jax.random.key(1))
mesh1 = parallel.data_mesh(jax.local_devices()[:1])
step8 = parallel.make_parallel_train_step(estimator, optimizer, mesh)
step1 = parallel.make_parallel_train_step(estimator, optimizer, mesh1)
local = {"image": x[32 * pid : 32 * (pid + 1)], "label": y[32 * pid : 32 * (pid + 1)]}
s8, s1 = state, state
for _ in range(3):
    s8, _ = step8(s8, parallel.shard_batch(local, mesh))
    s1, _ = step1(s1, {"image": x, "label": y})
for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(np.asarray(a.addressable_data(0)), b, rtol=1e-4, atol=1e-5)
loader = data.Loader(ds.train_images[:256], ds.train_labels[:256], 64, jax.random.key(2),
                     flatten=True, sharding=parallel.batch_sharding(mesh))
s8, metrics = step8(s8, loader.batch(0))
print("ok", pid)
"""


@pytest.mark.skipif(
    os.environ.get("GUESSGRAD_MULTIPROCESS_TEST") != "1",
    reason="slow (about 80 s); set GUESSGRAD_MULTIPROCESS_TEST=1",
)
def test_two_processes_match_one_device():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for pid in range(2):
        env = {
            **os.environ,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {_FLAGS}",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(pid),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _TWO_PROCESSES],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        for pid, proc in enumerate(procs):
            stdout, stderr = proc.communicate(timeout=400)
            assert proc.returncode == 0, stderr[-4000:]
            assert f"ok {pid}" in stdout
    finally:
        for proc in procs:  # a failed process leaves its peer waiting
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
