"""Step time and memory of every estimator against backprop, measured side by side.

    python -m benchmarks.step            # the full table (MLP 3x128 ... 24x1024, batch 128 and 1024)
    python -m benchmarks.step --quick    # about a minute

For each size, every method's jitted training step (estimate + AdamW update)
is compiled and warmed up, then timed round-robin, one step of each method in
turn, so drift hits all alike. Reported per method: median step time, its
ratio to backprop's, examples per second, the FLOP floor ratio (matrix
multiply-adds against backprop's, from the layer widths; see
:func:`floor_macs`), and XLA's compiled memory (temporaries + arguments +
outputs - aliased, of the whole step and of the estimator alone) with its
ratio to backprop's. Writes the rows as JSON to ``--out``.
"""

from __future__ import annotations

import os

# XLA:CPU's concurrency-optimised scheduler keeps buffers alive to run
# independent ops in parallel (and deadlocked on batched QR here): measure
# memory under the sequential, memory-minimising schedule.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false"
)

import itertools
import json
import platform
import statistics
import time

import jax
import optax
from absl import app, flags

import guessgrad as gg
from benchmarks.common import compiled_bytes

FLAGS = flags.FLAGS
flags.DEFINE_bool(
    "quick",
    False,
    "One-minute version: every method in the default mode at 3x128, batch 128; "
    "backprop, wt and wperp_ns in joint mode at 6x1024, batch 128; 3 rounds.",
)
flags.DEFINE_list(
    "sizes", None, "Sizes as depth x width x batch, e.g. 6x1024x128 (default: all)."
)
flags.DEFINE_list(
    "methods", None, "Methods (default: all; activation-space ones in both modes)."
)
flags.DEFINE_list(
    "modes",
    [*gg.MODES, "lean"],
    "Modes for activation-space methods (lean = joint, lean=True).",
)
flags.DEFINE_integer("repeats", 15, "Timed rounds (each round runs every method once).")
flags.DEFINE_float(
    "max_seconds", 240.0, "Stop adding rounds for a size after this long."
)
flags.DEFINE_string("out", "benchmark_step.json", "Where to write the rows as JSON.")

FULL_SIZES = (
    "3x128x128",
    "3x128x1024",
    "6x1024x128",
    "6x1024x1024",
    "12x1024x128",
    "12x1024x1024",
    "24x1024x128",
    "24x1024x1024",
)
# --quick: (size, methods or None for all, modes or None for --modes).
QUICK_PLAN = (
    ("3x128x128", None, (gg.DEFAULT_MODE,)),
    ("6x1024x128", ("backprop", "wt", "wperp_ns"), ("joint",)),
)
INPUT_FEATURES, NUM_CLASSES = 784, 10
# Exact W-perp takes one SVD per example and layer: minutes per step at width 1024.
WPERP_MAX_WIDTH = 256
# W-perp-NS costs wperp_ns_products(options) W^T-sized products per site.
WPERP_NS_MAX_UNITS = 6 * 1024 * 128  # depth x width x batch


def floor_macs(
    method: str, mode: str | None, widths: list[int], batch: int, options: dict
) -> float | None:
    """Matrix multiply-adds of one step's estimate for a dense chain ``widths[0] -> ... -> widths[-1]``.

    ``F_l = B n_{l-1} n_l`` is layer l's forward product. Backprop: forward,
    weight gradients and input gradients (none for the first layer),
    ``3 sum F - F_1``. Activation space: forward + local update ``2 sum F``,
    plus the tangent (joint: ``sum_{l>=2} F_l``; per-layer: site l's tangent
    crosses every later layer, ``sum_l (l-1) F_l``), plus the guess (W^T and
    1-downstream: ``sum_{l>=2} F_l``; mixing: ``B^2 n_l`` per hidden site;
    eps: none). None where a dense floor does not apply (exact SVD).
    """
    f = [batch * a * b for a, b in itertools.pairwise(widths)]
    total, after_first = sum(f), sum(f[1:])
    if method in ("backprop", "oracle_angle"):
        return 3 * total - f[0]
    if method == "directional":  # forward and its tangent (x dW + dx W)
        return total + 2 * total - f[0]
    if mode in ("joint", "lean"):
        tangent = after_first
    else:
        tangent = sum(index * cost for index, cost in enumerate(f))
    hidden = widths[1:-1]
    if method == "activation_perturbation":
        guess = 0
    elif method in ("wt", "self_sharpening") or (
        method == "downstream" and options.get("depth", 1) == 1
    ):
        guess = after_first
    elif method == "downstream":
        k = options["depth"]
        guess = sum(
            sum(f[m] for m in range(l + 1, min(l + 1 + k, len(f))))
            for l in range(len(f) - 1)
        )
    elif method == "mixing":
        guess = sum(batch * batch * n for n in hidden)
    elif method == "wperp_ns":
        o = {**gg.estimator_options(method), **options}
        products = gg.rules.wperp_ns_products(
            o["rank"], o["variant"], o["krylov_steps"], o["block_size"], o["degree"]
        )
        guess = products * after_first
    else:
        return None
    if mode == "lean":  # pass 2 recomputes the forward pass and the guesses
        return 3 * total + tangent + 2 * guess
    return 2 * total + tangent + guess


def variants(methods, modes):
    for name in methods:
        if "mode" in gg.estimator_options(name):
            for mode in modes:
                yield name, mode
        else:
            yield name, None


def skip_reason(name: str, depth: int, width: int, batch: int) -> str | None:
    if name == "wperp" and width > WPERP_MAX_WIDTH:
        return f"exact SVD per example: too slow above width {WPERP_MAX_WIDTH}"
    if name == "wperp_ns" and depth * width * batch > WPERP_NS_MAX_UNITS:
        return "skipped at this size to keep the benchmark short"
    return None


def measure_size(
    size: str, methods, modes, repeats: int, max_seconds: float
) -> list[dict]:
    depth, width, batch = (int(v) for v in size.split("x"))
    model = gg.models.MLP(depth, width, NUM_CLASSES)
    key = jax.random.key(0)
    images = jax.random.uniform(key, (batch, INPUT_FEATURES), minval=-1.0, maxval=1.0)
    data = {"image": images, "label": jax.random.randint(key, (batch,), 0, NUM_CLASSES)}
    params = model.init(key, images)
    widths = [INPUT_FEATURES] + [width] * (depth - 1) + [NUM_CLASSES]
    optimizer = optax.adamw(1e-4)
    entries, rows = [], []
    for name, mode in variants(methods, modes):
        reason = skip_reason(name, depth, width, batch)
        if reason:
            rows.append(
                {"size": size, "method": name, "mode": mode or "-", "skipped": reason}
            )
            continue
        options = (
            {"mode": "joint", "lean": True}
            if mode == "lean"
            else {"mode": mode}
            if mode
            else {}
        )
        estimator = gg.get_estimator(name, model, has_aux=True, **options)
        step = gg.make_train_step(estimator, optimizer)
        state = gg.init_train_state(params, optimizer, key)
        step_compiled = step.lower(state, data).compile()
        estimate_compiled = jax.jit(estimator).lower(params, data, key).compile()
        jax.block_until_ready(step_compiled(state, data))  # warm-up
        entries.append(
            {
                "name": name,
                "mode": mode,
                "step": step_compiled,
                "state": state,
                "options": options,
                "times": [],
                "step_bytes": compiled_bytes(step_compiled),
                "estimate_bytes": compiled_bytes(estimate_compiled),
                "estimate_temp": estimate_compiled.memory_analysis().temp_size_in_bytes,
            }
        )
    start = time.perf_counter()
    for round_index in range(repeats):
        for entry in entries:
            t0 = time.perf_counter()
            jax.block_until_ready(entry["step"](entry["state"], data))
            entry["times"].append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds and round_index >= 2:
            break
    base = next(e for e in entries if e["name"] == "backprop")
    base_time = statistics.median(base["times"])
    base_floor = floor_macs("backprop", None, widths, batch, {})
    for entry in entries:
        median = statistics.median(entry["times"])
        floor = floor_macs(
            entry["name"], entry["mode"], widths, batch, entry["options"]
        )
        rows.append(
            {
                "size": size,
                "method": entry["name"],
                "mode": entry["mode"] or "-",
                "median_ms": 1e3 * median,
                "ratio": median / base_time,
                "floor_ratio": None if floor is None else floor / base_floor,
                "examples_per_s": batch / median,
                "rounds": len(entry["times"]),
                "step_mb": entry["step_bytes"] / 2**20,
                "step_mem_ratio": entry["step_bytes"] / base["step_bytes"],
                "estimate_mb": entry["estimate_bytes"] / 2**20,
                "estimate_mem_ratio": entry["estimate_bytes"] / base["estimate_bytes"],
                "estimate_temp_mb": entry["estimate_temp"] / 2**20,
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    header = (
        "| size | method | mode | step ms | x backprop | floor | x/floor | examples/s "
        "| step MB | mem x bp | estimator MB | est. mem x bp | est. temp MB |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        if "skipped" in r:
            lines.append(
                f"| {r['size']} | {r['method']} | {r['mode']} | skipped: {r['skipped']} |"
            )
            continue
        floor = "-" if r["floor_ratio"] is None else f"{r['floor_ratio']:.2f}"
        over = (
            "-" if r["floor_ratio"] is None else f"{r['ratio'] / r['floor_ratio']:.2f}"
        )
        lines.append(
            f"| {r['size']} | {r['method']} | {r['mode']} | {r['median_ms']:.1f} | {r['ratio']:.2f} | {floor} "
            f"| {over} | {r['examples_per_s']:.0f} | {r['step_mb']:.1f} | {r['step_mem_ratio']:.2f} "
            f"| {r['estimate_mb']:.1f} | {r['estimate_mem_ratio']:.2f} | {r['estimate_temp_mb']:.1f} |"
        )
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    methods = FLAGS.methods or list(gg.ESTIMATORS)
    if FLAGS.quick and not FLAGS.methods:
        # Exact W-perp takes seconds per step even at width 128 on a CPU.
        methods = [name for name in methods if name != "wperp"]
    for name in methods:
        gg.estimator_options(name)  # unknown names: the registry's error
    if "backprop" not in methods:
        methods = ["backprop"] + methods
    if FLAGS.quick and not FLAGS.sizes:
        plan = [
            (size, [m for m in methods if m in keep] if keep else methods, modes)
            for size, keep, modes in QUICK_PLAN
        ]
    else:
        plan = [(size, methods, None) for size in FLAGS.sizes or FULL_SIZES]
    repeats = min(FLAGS.repeats, 3) if FLAGS.quick else FLAGS.repeats
    device = jax.devices()[0]
    print(
        f"devices: {jax.devices()} ({device.device_kind}); jax {jax.__version__}; {platform.processor() or platform.machine()}",
        flush=True,
    )
    rows = []
    for size, size_methods, modes in plan:
        print(f"measuring {size} (depth x width x batch) ...", flush=True)
        size_rows = measure_size(
            size, size_methods, modes or FLAGS.modes, repeats, FLAGS.max_seconds
        )
        rows.extend(size_rows)
        print(format_table(size_rows), flush=True)
        with open(FLAGS.out, "w") as f:
            json.dump(
                {
                    "device": str(device.device_kind),
                    "platform": device.platform,
                    "jax": jax.__version__,
                    "rows": rows,
                },
                f,
                indent=1,
            )
    print("\n" + format_table(rows))
    print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
