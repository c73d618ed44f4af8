"""LocalMixer training steps of every method against backprop, and against Ren et al.'s code.

    python -m benchmarks.localmixer                       # M/1/16 and M/8/16, batch 64 and 128
    python -m benchmarks.localmixer --ren=/path/to/local_forward_gradient
    python -m benchmarks.localmixer --quick               # about two minutes

For each LocalMixer configuration and batch size, every method's jitted
training step (estimate + the same optax update) is compiled, warmed up and
timed round-robin, one step of each in turn, so drift hits all alike.
Reported per step: the median time and its ratio to backprop's with the same
objective (and, with ``--ren``, to Ren et al.'s local-greedy backprop, LG-BP);
XLA's counted floating-point operations (``cost_analysis``, independent of
the machine's load) and their ratio to backprop's; the FLOP floor of the
algorithm (matrix multiply-adds it cannot avoid, :func:`floor_macs`) as a
ratio to backprop's; and XLA's compiled memory: the temporaries of the step
and the step's whole footprint (temporaries + arguments + outputs - aliased).

With ``--ren=DIR`` (a checkout of Ren et al.'s ``local_forward_gradient``;
see :mod:`benchmarks.ren_reference`), their own update functions run in the
same rounds: LG-BP, LG-FG-W (weight perturbation), LG-FG-A (activity
perturbation) and global BP. guessgrad's equivalents, on the
``local_greedy`` objective: ``backprop``, ``directional`` with
``exact_heads=True`` (heads and readout take their exact gradient, as
theirs) and ``activation_perturbation`` with ``mask=True, normalize=False``
(raw noise through the ReLU mask, as theirs), joint mode.
"""

from __future__ import annotations

import os

# XLA:CPU's concurrency-optimised scheduler keeps buffers alive to run
# independent ops in parallel: measure memory under the sequential schedule.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false"
)

import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

import guessgrad as gg
from benchmarks.common import compiled_bytes

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["M/1/16", "M/8/16"], "LocalMixer configurations.")
flags.DEFINE_list("batches", ["64", "128"], "Batch sizes.")
flags.DEFINE_list(
    "objectives",
    ["local_greedy"],
    f"Objectives ({', '.join(gg.models.OBJECTIVES)}).",
)
flags.DEFINE_list(
    "methods",
    ["backprop", "directional", "activation_perturbation", "wt", "mixing"],
    "Estimators (activation_perturbation runs with mask=True, normalize=False, "
    "Ren et al.'s LG-FG-A; directional with exact_heads=True, LG-FG-W).",
)
flags.DEFINE_list("modes", list(gg.MODES), "Modes of the activation-space methods.")
flags.DEFINE_string(
    "ren",
    None,
    "A checkout of Ren et al.'s local_forward_gradient: time their update "
    "functions in the same rounds.",
)
flags.DEFINE_bool(
    "quick", False, "M/8/16 at batch 64 only, joint mode, 5 rounds: about two minutes."
)
flags.DEFINE_integer("repeats", 15, "Timed rounds (each round runs every step once).")
flags.DEFINE_float(
    "max_seconds", 300.0, "Stop adding rounds for a size after this long."
)
flags.DEFINE_string(
    "out", "benchmark_localmixer.json", "Where to write the rows as JSON."
)

IMAGE_SHAPE, NUM_CLASSES = (32, 32, 3), 10
METHOD_OPTIONS = {
    "activation_perturbation": {"mask": True, "normalize": False},
    "directional": {"exact_heads": True},
}
# Ren et al.'s methods and guessgrad's equivalent (method, mode) on local_greedy.
REN_EQUIVALENT = {
    "LG-BP": ("backprop", None),
    "LG-FG-W": ("directional", None),
    "LG-FG-A": ("activation_perturbation", "joint"),
}


def layer_macs(config: str, batch: int) -> list[list[int]]:
    """Per block, the multiply-adds of its linear maps in forward order (heads left out: tiny)."""
    c = gg.models.LOCALMIXER_CONFIGS[config]
    patches, channels, groups = c["patches"] ** 2, c["channels"], c["groups"]
    height, width, depth = IMAGE_SHAPE
    patch_features = (height // c["patches"]) * (width // c["patches"]) * depth
    grouped = patches * channels * channels // groups
    blocks = [[patches * patch_features * channels, grouped]]
    for _ in range(1, c["blocks"]):
        blocks.append(
            [channels * patches * patches, patches * channels * channels, grouped]
        )
    return [[batch * f for f in block] for block in blocks]


def floor_macs(
    method: str,
    mode: str | None,
    objective: str,
    blocks: list[list[int]],
    batch: int,
    sites: list[int],
) -> float | None:
    """Matrix multiply-adds one step's estimate cannot avoid.

    ``F`` a linear map's forward product. Backprop: forward, weight
    gradients, and input gradients of every map but the first of each cut
    block (local objectives) or of the network (global): ``3 sum F - firsts``.
    Weight perturbation: forward and its tangent ``x dW + dx W``: the same
    count. Activation space: forward, the local weight gradients (``2 sum
    F``), plus the tangent (joint: every map after a site, within its block
    when blocks are cut; per-layer: site l's tangent crosses every later map
    it reaches) and the guess (W^T-type: one map per site; mixing: ``B^2 n``
    per site of n units; random noise: none).
    """
    local = objective != "global"
    flat = [f for block in blocks for f in block]
    total = sum(flat)
    firsts = sum(block[0] for block in blocks) if local else blocks[0][0]
    if method in ("backprop", "directional"):
        return 3 * total - firsts
    # Maps after each site (a site follows every map), in its reach.
    if local:
        later = [sum(block[i + 1 :]) for block in blocks for i in range(len(block))]
        nxt = [
            block[i + 1] if i + 1 < len(block) else 0
            for block in blocks
            for i in range(len(block))
        ]
    else:
        later = [sum(flat[i + 1 :]) for i in range(len(flat))]
        nxt = [flat[i + 1] if i + 1 < len(flat) else 0 for i in range(len(flat))]
    tangent = (total - firsts) if mode == "joint" else sum(later)
    if method == "activation_perturbation":
        guess = 0
    elif method in ("wt", "downstream", "self_sharpening"):
        guess = sum(nxt)
    elif method == "mixing":
        guess = sum(batch * batch * n for n in sites)
    else:
        return None
    return 2 * total + tangent + guess


def _site_units(model, params, batch) -> list[int]:
    structure = gg.structure(model, params, batch, **gg.models.local_mixer_args())
    return [int(jnp.prod(jnp.array(s.shape[1:]))) for s in structure.sites]


def _measure(step, state, data) -> dict:
    compiled = step.lower(state, data).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    jax.block_until_ready(compiled(state, data))  # warm-up
    return {
        "step": compiled,
        "args": (state, data),
        "times": [],
        "gflop": float(cost.get("flops", float("nan"))) / 1e9,
        "bytes": compiled_bytes(compiled),
        "temp": compiled.memory_analysis().temp_size_in_bytes,
    }


def guessgrad_entries(
    config: str, batch: int, data, optimizer, methods, modes, objectives
):
    key = jax.random.key(0)
    for objective in objectives:
        model = gg.models.local_mixer(config, NUM_CLASSES, objective=objective)
        params = model.init(key, data["image"], data["label"])
        sites = _site_units(model, params, data)
        for name in methods:
            options = dict(METHOD_OPTIONS.get(name, {}))
            method_modes = modes if "mode" in gg.estimator_options(name) else [None]
            for mode in method_modes:
                if mode is not None:
                    options["mode"] = mode
                estimator = gg.get_estimator(
                    name, model, has_aux=True, **gg.models.local_mixer_args(), **options
                )
                step = gg.make_train_step(estimator, optimizer)
                state = gg.init_train_state(params, optimizer, key)
                entry = _measure(step, state, data)
                entry.update(
                    impl="guessgrad",
                    objective=objective,
                    method=name,
                    mode=mode or "-",
                    floor=floor_macs(
                        name, mode, objective, layer_macs(config, batch), batch, sites
                    ),
                )
                print(f"  compiled {objective} {name} {mode or ''}", flush=True)
                yield entry


def ren_entries(ren, config: str, data, optimizer):
    from benchmarks import ren_reference

    c = gg.models.LOCALMIXER_CONFIGS[config]
    ren_reference.configure(
        ren,
        blocks=c["blocks"],
        channels=c["channels"],
        groups=c["groups"],
        patches=c["patches"],
    )
    params = ren_reference.init_params(ren)
    for method in ren_reference.METHODS:
        update = ren_reference.update_fn(ren, method)

        @jax.jit
        def step(state, batch, update=update):
            params, opt_state, key = state
            key, sub = jax.random.split(key)
            grads = update(params, batch, sub)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, key)

        state = (params, optimizer.init(params), jax.random.key(0))
        entry = _measure(step, state, data)
        entry.update(
            impl="Ren et al.",
            objective="global" if method == "BP" else "local_greedy",
            method=method,
            mode="-",
            floor=None,
        )
        print(f"  compiled Ren et al. {method}", flush=True)
        yield entry


def measure(
    config: str,
    batch: int,
    ren,
    methods,
    modes,
    objectives,
    repeats: int,
    max_seconds: float,
) -> list[dict]:
    key = jax.random.key(1)
    data = {
        "image": jax.random.uniform(key, (batch, *IMAGE_SHAPE)),
        "label": jax.random.randint(key, (batch,), 0, NUM_CLASSES),
    }
    optimizer = optax.adam(1e-3)
    entries = list(
        guessgrad_entries(config, batch, data, optimizer, methods, modes, objectives)
    )
    if ren is not None:
        entries += list(ren_entries(ren, config, data, optimizer))
    start = time.perf_counter()
    for round_index in range(repeats):
        for entry in entries:
            t0 = time.perf_counter()
            jax.block_until_ready(entry["step"](*entry["args"]))
            entry["times"].append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds and round_index >= 2:
            break
    for entry in entries:
        entry["median"] = statistics.median(entry["times"])

    def own_backprop(entry):
        if entry["impl"] == "guessgrad":
            return next(
                e
                for e in entries
                if e["impl"] == "guessgrad"
                and e["method"] == "backprop"
                and e["objective"] == entry["objective"]
            )
        name = "BP" if entry["method"] == "BP" else "LG-BP"
        return next(
            e for e in entries if e["impl"] != "guessgrad" and e["method"] == name
        )

    ren_bp = next((e for e in entries if e["method"] == "LG-BP"), None)
    rows = []
    for entry in entries:
        base = own_backprop(entry)
        base_floor = next(
            (
                e["floor"]
                for e in entries
                if e["impl"] == "guessgrad"
                and e["method"] == "backprop"
                and e["objective"] == entry["objective"]
            ),
            None,
        )
        floor = entry["floor"]
        rows.append(
            {
                "config": config,
                "batch": batch,
                "impl": entry["impl"],
                "objective": entry["objective"],
                "method": entry["method"],
                "mode": entry["mode"],
                "median_ms": 1e3 * entry["median"],
                "spread": (max(entry["times"]) - min(entry["times"])) / entry["median"],
                "rounds": len(entry["times"]),
                "ratio": entry["median"] / base["median"],
                "ratio_ren_lgbp": None
                if ren_bp is None
                else entry["median"] / ren_bp["median"],
                "floor_ratio": None
                if floor is None or not base_floor
                else floor / base_floor,
                "gflop": entry["gflop"],
                "gflop_ratio": entry["gflop"] / base["gflop"],
                "temp_mb": entry["temp"] / 2**20,
                "temp_ratio": entry["temp"] / max(base["temp"], 1),
                "step_mb": entry["bytes"] / 2**20,
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    header = (
        "| config | batch | impl | objective | method | mode | step ms | x own BP | x Ren LG-BP "
        "| floor | GFLOP | GFLOP x BP | temp MB | temp x BP | step MB |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['impl']} | {r['objective']} | {r['method']} | {r['mode']} "
            f"| {r['median_ms']:.1f} | {r['ratio']:.2f} | {fmt(r['ratio_ren_lgbp'])} | {fmt(r['floor_ratio'])} "
            f"| {r['gflop']:.1f} | {r['gflop_ratio']:.2f} | {r['temp_mb']:.0f} | {r['temp_ratio']:.2f} | {r['step_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for name in FLAGS.configs:
        if name not in gg.models.LOCALMIXER_CONFIGS:
            raise app.UsageError(
                f"Unknown configuration {name!r}; valid: {', '.join(gg.models.LOCALMIXER_CONFIGS)}."
            )
    for name in FLAGS.objectives:
        if name not in gg.models.OBJECTIVES:
            raise app.UsageError(
                f"Unknown objective {name!r}; valid: {', '.join(gg.models.OBJECTIVES)}."
            )
    for mode in FLAGS.modes:
        if mode not in gg.MODES:
            raise app.UsageError(
                f"Unknown mode {mode!r}; valid: {', '.join(gg.MODES)}."
            )
    methods = list(FLAGS.methods)
    for name in methods:
        gg.estimator_options(name)  # unknown names: the registry's error
    if "backprop" not in methods:
        methods = ["backprop"] + methods
    plan = [(c, int(b)) for c in FLAGS.configs for b in FLAGS.batches]
    modes, repeats = list(FLAGS.modes), FLAGS.repeats
    if FLAGS.quick:
        plan, modes, repeats = [("M/8/16", 64)], ["joint"], min(repeats, 5)
    ren = None
    if FLAGS.ren:
        from benchmarks import ren_reference

        ren = ren_reference.load(FLAGS.ren)
    device = jax.devices()[0]
    print(
        f"devices: {jax.devices()} ({device.device_kind}); jax {jax.__version__}; "
        f"{platform.processor() or platform.machine()}",
        flush=True,
    )
    rows = []
    for config, batch in plan:
        print(f"measuring {config}, batch {batch} ...", flush=True)
        size_rows = measure(
            config,
            batch,
            ren,
            methods,
            modes,
            FLAGS.objectives,
            repeats,
            FLAGS.max_seconds,
        )
        rows.extend(size_rows)
        print(format_table(size_rows), flush=True)
        with open(FLAGS.out, "w") as f:
            json.dump(
                {
                    "device": str(device.device_kind),
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
