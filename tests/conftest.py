"""Shared fixtures: small networks and batches with fixed seeds."""

import os

# Tests run on the CPU with a fixed thread pool; keep XLA's scheduler away
# from the batched-factorisation deadlock seen on this CPU (guessgrad sets the
# scheduler flag itself at import; guessgrad/_src/cpu_flags.py). Most
# of a test's time is XLA compiling programs that then run a few steps:
# compile them without LLVM's expensive optimisations (the suite: 12 minutes
# instead of 16.5 on 2 cores; the computations are the same).
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_cpu_enable_concurrency_optimized_scheduler=false "
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
)

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from helpers import make_batch

import guessgrad as gg


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: long-running (Monte-Carlo, every estimator on every model, "
        "subprocesses); skip with -m 'not slow' for a fast edit-test loop",
    )


class NormedTanhChain(gg.models.Chain):
    """A user-written chain: dense + layer norm inside each hidden site map, tanh between."""

    widths: tuple = (7, 6, 5)

    @nn.nowrap
    def layer_modules(self):
        layers = [
            _DenseNorm(w, name=f"block_{i}") for i, w in enumerate(self.widths[:-1])
        ]
        return tuple(layers) + (gg.models.Linear(self.widths[-1], name="readout"),)

    @nn.nowrap
    def activation(self, site):
        return jnp.tanh(site)


class _DenseNorm(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm()(gg.models.Linear(self.features)(x))


@pytest.fixture
def small_mlp():
    """A 3-layer MLP of width 8 on 6 input features, 5 classes, batch of 4."""
    model = gg.models.MLP(depth=3, width=8, num_classes=5)
    batch = make_batch(jax.random.key(1))
    params = model.init(jax.random.key(0), batch["image"])
    return model, params, batch


@pytest.fixture
def normed_chain():
    model = NormedTanhChain()
    batch = make_batch(jax.random.key(2))
    params = model.init(jax.random.key(3), batch["image"])
    return model, params, batch
