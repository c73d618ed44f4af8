"""What several test files share: Monte-Carlo checks, expectations through the engine, the CLI.

Test files import from here (and from ``zoo``), never from each other.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import guessgrad as gg
from guessgrad import experiment
from guessgrad._src import engine
from guessgrad._src import sites as sites_lib
from guessgrad._src.problem import Problem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def flat(tree):
    return jax.flatten_util.ravel_pytree(tree)[0]


def cosine(a, b):
    a, b = flat(a), flat(b)
    return float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def make_batch(key, batch_size=4, shape=(2, 3), num_classes=5):
    image_key, label_key = jax.random.split(key)
    return {
        "image": jax.random.normal(image_key, (batch_size,) + shape),
        "label": jax.random.randint(label_key, (batch_size,), 0, num_classes),
    }


# Estimators that guess in activation space (they take a `mode`), and those of
# them whose guesses never read the label.
ACTIVATION_SPACE = [n for n in gg.ESTIMATORS if "mode" in gg.estimator_options(n)]
LABEL_FREE = [n for n in ACTIVATION_SPACE if n != "self_sharpening"]


# --- Monte-Carlo means ------------------------------------------------------------------

NUM_SAMPLES = 20_000
MAX_Z = 5.0  # largest |z| allowed over a few hundred coordinates (fixed seeds: deterministic)


def sample_estimates(estimate, params, batch, num_samples=NUM_SAMPLES, seed=123):
    """[num_samples, P] independent estimates of ``estimate``, by vmap over keys."""
    keys = jax.random.split(jax.random.key(seed), num_samples)
    return jax.jit(jax.vmap(lambda k: flat(estimate(params, batch, k))))(keys)


def assert_mean_matches(samples, expected):
    """Monte-Carlo mean within MAX_Z standard errors of ``expected``, coordinate by coordinate."""
    samples, expected = (
        np.asarray(samples, np.float64),
        np.asarray(expected, np.float64),
    )
    mean = samples.mean(0)
    stderr = samples.std(0) / np.sqrt(samples.shape[0])
    # Coordinates the method never moves (dead units) vary only by float32 round-off.
    degenerate = stderr < 1e-6 * stderr.max()
    np.testing.assert_allclose(mean[degenerate], expected[degenerate], atol=1e-6)
    z = np.abs(mean - expected)[~degenerate] / stderr[~degenerate]
    assert z.max() < MAX_Z, f"max z-score {z.max():.2f} (mean {np.mean(z):.2f})"


# --- expectations through the engine ----------------------------------------------------


def local_updates(
    model,
    params,
    batch,
    site_grads,
    *,
    loss_fn=None,
    inputs=None,
    trainable=None,
    key=None,
):
    """The estimators' last step, fed the given per-site gradients ``{site: [B, ...]}``:
    each site's local VJP, plus exact gradients for parameters after the last site
    before a loss (heads). ``key``: run the model with an estimator's rngs (dropout)."""
    problem = Problem(model, loss_fn, inputs, trainable)
    _, args, rngs, found, train = problem.prepare(params, batch, key)
    active = {s.path for s in found.active}
    return engine.local_parameter_grads(
        model,
        train,
        args,
        batch,
        problem.loss_fn,
        rngs,
        found,
        {p: g for p, g in site_grads.items() if p in active},
    )


def wt_expectation(model, params, batch, **problem):
    """E[wt's estimate] (unnormalised, per-layer): ``J_l^T J_l dl/ds_l`` at every site, mapped
    to the parameters by the local VJPs; ``J_l`` the map from site ``l`` to its target,
    written with ``jax.jvp``/``jax.vjp`` through the perturbed forward; terminal sites
    get ``eps`` (``Cov = I``)."""
    found = gg.structure(model, params, batch, **problem)
    grads = gg.site_gradients(
        model,
        params,
        batch,
        loss_fn=problem.get("loss_fn"),
        inputs=problem.get("inputs"),
    )
    inputs = problem.get("inputs") or (lambda b: b["image"])
    args = sites_lib.as_args(inputs(batch))
    variables = sites_lib.split_variables(params)
    zeros = {s.path: jnp.zeros(s.shape, s.dtype) for s in found.sites}
    expected = {}
    for s in found.active:
        if s.target is None:
            expected[s.path] = grads[s.path]
            continue

        def to_target(t, s=s):
            _, raw, taps = sites_lib.run(
                model, variables, args, perturbations={**zeros, s.path: t}
            )
            return {**raw, **taps}[s.target]

        pushed = jax.jvp(to_target, (zeros[s.path],), (grads[s.path],))[1]
        expected[s.path] = jax.vjp(to_target, zeros[s.path])[1](pushed)[0]
    return local_updates(model, params, batch, expected, **problem)


# --- the command line and the runner's files ------------------------------------------------

_TIMING_FIELDS = ("wall_time_s", "examples_per_s")

TINY = experiment.Config(
    model=experiment.MLPSpec(width=16),
    batch_size=32,
    steps=10,
    eval_every=10,
    log_every=5,
    train_eval_examples=200,
    eval_batch_size=500,
    progress=False,
)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def untimed(records):
    return [{k: v for k, v in r.items() if k not in _TIMING_FIELDS} for r in records]


def cli(*args, module="experiments.mlp", timeout=120):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
