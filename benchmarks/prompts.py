"""Prompt-only training of a ViT (visual prompt tuning): what a trainable subset saves.

    python -m benchmarks.prompts                   # ViT 4x256, 32x32 images (64 patches) + 8 prompts, batch 64
    python -m benchmarks.prompts --quick           # 2x128, batch 32, 5 rounds
    python -m benchmarks.prompts --config=B/16 --image_size=224 --memory_only   # the paper's ViT-B/16

``gg.models.vit`` with 8 shallow prompt tokens (sites at the q, k, v
projections, the MLP pre-activations and the logits). Each row is one jitted
training step (estimate + AdamW, masked to the trainable leaves), compiled,
warmed up and timed round-robin so drift hits all rows alike: backprop with
every parameter trainable and with only the prompts trainable, ``wt``
(per-layer and joint mode) on both, and the other methods on the prompts
alone. Reported: median step time and its ratio to full backprop's, and XLA's
compiled memory of the estimator alone (temporaries + arguments + outputs -
aliased) with its ratio to full backprop's. ``--memory_only`` compiles
without running (the memory column for sizes too slow to time here).

XLA's own scheduler is kept (the experiments and tests turn off the CPU's
concurrency-optimised scheduler, against a deadlock in W-perp's batched
factorisations, which this benchmark does not run). The memory of a
forward-mode pass depends on it: the sequential CPU scheduler puts the
primal work first and holds ViT-B/16's activations (4.7 GB of temporaries
at batch 32, against 0.9 GB with the default one).
"""

from __future__ import annotations

import statistics
import time

import jax
import optax
from absl import app, flags

import guessgrad as gg
from benchmarks.common import compiled_bytes

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "2 blocks of width 128, batch 32, 5 rounds.")
flags.DEFINE_integer("repeats", 15, "Timed rounds.")
flags.DEFINE_string(
    "config",
    None,
    f"A named ViT size ({', '.join(gg.models.VIT_CONFIGS)}); default 4 blocks of width 256, patch 4.",
)
flags.DEFINE_integer("image_size", 32, "Image side (3 channels).")
flags.DEFINE_integer(
    "batch_size", None, "Examples per step (default 64; 32 with --quick)."
)
flags.DEFINE_bool("memory_only", False, "Compile and report memory; time nothing.")

NUM_CLASSES = 10
NUM_PROMPTS = 8
_BENCH = {
    "patch_size": 4,
    "hidden_size": 256,
    "num_layers": 4,
    "num_heads": 4,
    "mlp_dim": 1024,
}
_QUICK = {
    "patch_size": 4,
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 2,
    "mlp_dim": 512,
}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.config is not None:
        model = gg.models.vit(FLAGS.config, NUM_CLASSES, num_prompts=NUM_PROMPTS)
    else:
        fields = _QUICK if FLAGS.quick else _BENCH
        model = gg.models.ViT(
            num_classes=NUM_CLASSES, num_prompts=NUM_PROMPTS, **fields
        )
    batch = FLAGS.batch_size or (32 if FLAGS.quick else 64)
    repeats = 5 if FLAGS.quick else FLAGS.repeats
    size = FLAGS.image_size
    key = jax.random.key(0)
    data = {
        "image": jax.random.normal(key, (batch, size, size, 3)),
        "label": jax.random.randint(key, (batch,), 0, NUM_CLASSES),
    }
    params = jax.jit(model.init)(key, data["image"][:1])
    only_prompts = gg.models.prompt_mask
    per_layer, joint = {"mode": "per_layer"}, {"mode": "joint"}
    cases = [
        ("backprop", None, {}),
        ("backprop", only_prompts, {}),
        ("wt", None, per_layer),
        ("wt", only_prompts, per_layer),
        ("wt", None, joint),
        ("wt", only_prompts, joint),
        ("activation_perturbation", only_prompts, joint),
        ("downstream", only_prompts, joint),
        ("directional", only_prompts, {}),
    ]
    entries = []
    for name, trainable, options in cases:
        estimator = gg.get_estimator(
            name, model, trainable=trainable, has_aux=True, **options
        )
        optimizer = (
            optax.adamw(1e-3)
            if trainable is None
            else optax.masked(optax.adamw(1e-3), trainable)
        )
        memory = compiled_bytes(jax.jit(estimator).lower(params, data, key).compile())
        label = name + (f" ({options['mode']})" if options else "")
        if FLAGS.memory_only:
            entries.append((label, trainable, None, None, memory, [1.0]))
            continue
        step = gg.make_train_step(estimator, optimizer)
        state = gg.init_train_state(params, optimizer, key)
        jax.block_until_ready(step(state, data))
        entries.append((label, trainable, step, state, memory, []))
    for _ in range(0 if FLAGS.memory_only else repeats):
        for *_, step, state, _, times in entries:
            start = time.perf_counter()
            jax.block_until_ready(step(state, data))
            times.append(time.perf_counter() - start)
    base_time = statistics.median(entries[0][5])
    base_memory = entries[0][4]
    tokens = (size // model.patch_size) ** 2
    print(
        f"ViT {FLAGS.config or 'bench'}: {model.num_layers} blocks of width {model.hidden_size}, "
        f"{tokens} patches + class token + {NUM_PROMPTS} prompts, batch {batch}, "
        f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters, {jax.devices()[0].device_kind}"
    )
    print(
        "| method | trainable | step (ms) | x full backprop | estimator memory (MB) "
        "| x full backprop |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for name, trainable, _, _, memory, times in entries:
        median = statistics.median(times)
        timing = (
            "- | -"
            if FLAGS.memory_only
            else f"{median * 1e3:.1f} | {median / base_time:.2f}"
        )
        print(
            f"| {name} | {'prompts' if trainable else 'all'} | {timing} | "
            f"{memory / 2**20:.1f} | {memory / base_memory:.2f} |"
        )


if __name__ == "__main__":
    app.run(main)
