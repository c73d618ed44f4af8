"""Prompt-only training on an attention model: what a trainable subset saves.

    python -m benchmarks.prompts            # 4 blocks of width 256, 64 tokens + 8 prompts, batch 64
    python -m benchmarks.prompts --quick    # 2 blocks of width 128

A stack of pre-norm transformer blocks with learnable prompt tokens (sites
at the q, k, v projections and the MLP pre-activations; the logits). Each
row is one jitted training step (estimate + AdamW), compiled, warmed up and
timed round-robin so drift hits all rows alike: ``wt`` (per-layer and
joint mode) and backprop with every parameter trainable and with only the
prompts trainable, and the other methods on the prompts alone. Reported:
median step time and its ratio to full backprop's, and XLA's compiled
memory of the estimator alone (temporaries + arguments + outputs - aliased)
with its ratio to full backprop's.
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false"
)

import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import app, flags

import guessgrad as gg
from benchmarks.common import compiled_bytes

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "2 blocks of width 128, batch 32, 5 rounds.")
flags.DEFINE_integer("repeats", 15, "Timed rounds.")

NUM_CLASSES = 10


class PromptedTransformer(nn.Module):
    """Embedded tokens with prompt tokens prepended, ``depth`` pre-norm blocks, mean-pool readout."""

    depth: int = 4
    dim: int = 256
    heads: int = 4
    num_prompts: int = 8

    @nn.compact
    def __call__(self, x):  # [B, T, F]
        tokens = nn.Dense(self.dim, name="embed")(x)
        prompts = self.param(
            "prompts", nn.initializers.normal(0.02), (self.num_prompts, self.dim)
        )
        prompts = jnp.broadcast_to(prompts, (x.shape[0],) + prompts.shape)
        tokens = jnp.concatenate([prompts, tokens], axis=1)
        for i in range(self.depth):
            tokens = Block(self.dim, self.heads, name=f"block_{i}")(tokens)
        return gg.site(self, "logits", nn.Dense(NUM_CLASSES)(tokens.mean(1)))


class Block(nn.Module):
    dim: int
    heads: int

    @nn.compact
    def __call__(self, tokens):
        y = nn.LayerNorm()(tokens)
        q, k, v = (gg.site(self, n, nn.Dense(self.dim, name=n)(y)) for n in "qkv")
        split = lambda t: t.reshape(t.shape[:2] + (self.heads, -1))
        scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k))
        weights = jax.nn.softmax(scores / jnp.sqrt(self.dim // self.heads))
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, split(v)).reshape(
            tokens.shape
        )
        tokens = tokens + nn.Dense(self.dim, name="out")(attended)
        h = gg.site(
            self, "mlp", nn.Dense(4 * self.dim)(nn.LayerNorm()(tokens)), act=nn.gelu
        )
        return tokens + nn.Dense(self.dim)(h)


def only_prompts(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path[-1].key == "prompts", params
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    depth, dim, tokens, batch, repeats = (
        (2, 128, 32, 32, 5) if FLAGS.quick else (4, 256, 64, 64, FLAGS.repeats)
    )
    model = PromptedTransformer(depth=depth, dim=dim)
    key = jax.random.key(0)
    data = {
        "image": jax.random.normal(key, (batch, tokens, 48)),
        "label": jax.random.randint(key, (batch,), 0, NUM_CLASSES),
    }
    params = model.init(key, data["image"])
    per_layer, joint = {"mode": "per_layer"}, {"mode": "joint"}
    cases = [
        ("backprop", None, {}),
        ("backprop", only_prompts, {}),
        ("wt", None, per_layer),
        ("wt", only_prompts, per_layer),
        ("wt", None, joint),
        ("wt", only_prompts, joint),
        ("activation_perturbation", only_prompts, joint),
        ("directional", only_prompts, {}),
    ]
    entries = []
    for name, trainable, options in cases:
        estimator = gg.build_estimator(name, model, trainable=trainable, **options)
        optimizer = (
            optax.adamw(1e-3)
            if trainable is None
            else optax.masked(optax.adamw(1e-3), trainable)
        )
        step = gg.make_train_step(estimator, optimizer)
        state = gg.init_train_state(params, optimizer, key)
        memory = compiled_bytes(jax.jit(estimator).lower(params, data, key).compile())
        jax.block_until_ready(step(state, data))
        label = name + (f" ({options['mode']})" if options else "")
        entries.append((label, trainable, step, state, memory, []))
    for _ in range(repeats):
        for *_, step, state, _, times in entries:
            start = time.perf_counter()
            jax.block_until_ready(step(state, data))
            times.append(time.perf_counter() - start)
    base_time = statistics.median(entries[0][5])
    base_memory = entries[0][4]
    print(
        f"{depth} blocks of width {dim}, {tokens} tokens + 8 prompts, batch {batch}, "
        f"{jax.devices()[0].device_kind}"
    )
    print(
        "| method | trainable | step (ms) | x full backprop | estimator memory (MB) "
        "| x full backprop |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for name, trainable, _, _, memory, times in entries:
        median = statistics.median(times)
        print(
            f"| {name} | {'prompts' if trainable else 'all'} | {median * 1e3:.1f} | "
            f"{median / base_time:.2f} | {memory / 2**20:.1f} | {memory / base_memory:.2f} |"
        )


if __name__ == "__main__":
    app.run(main)
