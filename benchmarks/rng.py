"""Cost of drawing the guesses' normal numbers, per key implementation and method.

    python -m benchmarks.rng

Every activation-space step draws ``B x n`` normals per site (directional
descent: one per parameter), so on a CPU the random-number generator is a
visible share of the step. This times, side by side, 1M standard normals
(a 1024 x 1024 guess at batch 1024) drawn by JAX's inverse-CDF ``normal``
with the threefry and rbg key implementations, a Box-Muller transform of the
same bits, and the raw bits, next to one 1024^3 matrix product for scale. All
candidates give exactly N(0, 1) numbers; guessgrad uses the fastest.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("size", 1024, "Draw size x size numbers.")
flags.DEFINE_integer("repeats", 21, "Timed rounds.")


def box_muller(key, shape):
    """N(0, 1) by Box-Muller from 24-bit uniforms."""
    n = int(np.prod(shape))
    half = (n + 1) // 2
    bits = jax.random.bits(key, (2, half), jnp.uint32)
    scale = 1.0 / (1 << 24)
    u1 = (bits[0] >> 8).astype(jnp.float32) * scale + 0.5 * scale  # in (0, 1)
    u2 = (bits[1] >> 8).astype(jnp.float32) * scale
    radius, angle = jnp.sqrt(-2.0 * jnp.log(u1)), 2 * jnp.pi * u2
    return jnp.concatenate([radius * jnp.cos(angle), radius * jnp.sin(angle)])[
        :n
    ].reshape(shape)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    shape = (FLAGS.size, FLAGS.size)
    ones = jnp.ones(shape)
    candidates = {
        "normal, threefry (default)": (
            jax.random.key(0),
            lambda k: jax.random.normal(k, shape),
        ),
        "normal, rbg": (
            jax.random.key(0, impl="rbg"),
            lambda k: jax.random.normal(k, shape),
        ),
        "Box-Muller, threefry": (jax.random.key(0), lambda k: box_muller(k, shape)),
        "bits only, threefry": (
            jax.random.key(0),
            lambda k: jax.random.bits(k, shape, jnp.uint32),
        ),
        "matmul size^3 (for scale)": (ones, lambda x: x @ x),
    }
    compiled = {name: (arg, jax.jit(fn)) for name, (arg, fn) in candidates.items()}
    for arg, fn in compiled.values():
        fn(arg).block_until_ready()
    times = {name: [] for name in compiled}
    for _ in range(FLAGS.repeats):
        for name, (arg, fn) in compiled.items():
            start = time.perf_counter()
            fn(arg).block_until_ready()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["normal, threefry (default)"])
    print(
        f"device: {jax.devices()[0].device_kind}; {FLAGS.size}x{FLAGS.size} numbers\n"
    )
    print("| generator | median ms | x default |\n|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {1e3 * median:.2f} | {median / base:.2f} |")


if __name__ == "__main__":
    app.run(main)
