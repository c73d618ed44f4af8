"""A site-marked residual MLP against the chain MLP of the same size: does the engine charge for residuals?

    python -m benchmarks.residual                 # depth 6 and 12, width 512, batch 128
    python -m benchmarks.residual --depths=6 --repeats=5

The residual model is a pre-norm residual MLP written as any client would
write it in Flax: per block ``h + Dense(relu(site(Dense(LayerNorm(h)))))``,
a site at each block's hidden pre-activation and at the logits. The chain is
``guessgrad.models.MLP`` with as many dense layers (``2 depth + 2``) of the
same width: the same products, a site after every layer. Each method's
training step (estimate + Adam) is timed round-robin against its own model's
backprop; reported per model: step time and XLA's FLOPs and temporaries as
ratios to that backprop, and the residual model's ratio over the chain's
(1.00: the engine costs the same on both).
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false"
)

import json
import statistics
import time

import flax.linen as nn
import jax
import optax
from absl import app, flags

import guessgrad as gg

FLAGS = flags.FLAGS
flags.DEFINE_list("depths", ["6", "12"], "Depths (blocks of the residual model).")
flags.DEFINE_integer("width", 512, "Width.")
flags.DEFINE_integer("batch", 128, "Batch size.")
flags.DEFINE_list(
    "methods",
    ["directional", "activation_perturbation", "wt", "mixing"],
    "Estimators besides backprop.",
)
flags.DEFINE_list("modes", list(gg.MODES), "Modes of the activation-space methods.")
flags.DEFINE_integer("repeats", 15, "Timed rounds.")
flags.DEFINE_string(
    "out", "benchmark_residual.json", "Where to write the rows as JSON."
)

INPUT_FEATURES, NUM_CLASSES = 784, 10


class ResidualMLP(nn.Module):
    """Pre-norm residual MLP with a site at every block's hidden pre-activation."""

    depth: int
    width: int

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.width, name="embed")(x)
        for i in range(self.depth):
            y = nn.LayerNorm(name=f"norm_{i}")(h)
            y = gg.site(
                self,
                f"hidden_{i}",
                nn.Dense(self.width, name=f"up_{i}")(y),
                act=nn.relu,
            )
            h = h + nn.Dense(self.width, name=f"down_{i}")(y)
        return gg.site(self, "logits", nn.Dense(NUM_CLASSES, name="readout")(h))


def _entry(model, params, data, name, mode, optimizer):
    options = {"mode": mode} if mode else {}
    estimator = gg.get_estimator(name, model, has_aux=True, **options)
    step = gg.make_train_step(estimator, optimizer)
    state = gg.init_train_state(params, optimizer, jax.random.key(0))
    compiled = step.lower(state, data).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    jax.block_until_ready(compiled(state, data))
    return {
        "method": name,
        "mode": mode or "-",
        "step": compiled,
        "state": state,
        "times": [],
        "gflop": float(cost["flops"]) / 1e9,
        "temp": compiled.memory_analysis().temp_size_in_bytes,
    }


def measure(depth: int) -> list[dict]:
    key = jax.random.key(0)
    data = {
        "image": jax.random.uniform(
            key, (FLAGS.batch, INPUT_FEATURES), minval=-1.0, maxval=1.0
        ),
        "label": jax.random.randint(key, (FLAGS.batch,), 0, NUM_CLASSES),
    }
    optimizer = optax.adam(1e-3)
    models = {
        "chain": gg.models.MLP(2 * depth + 2, FLAGS.width, NUM_CLASSES),
        "residual": ResidualMLP(depth, FLAGS.width),
    }
    entries = []
    for model_name, model in models.items():
        params = model.init(key, data["image"])
        for name in ["backprop", *FLAGS.methods]:
            modes = FLAGS.modes if "mode" in gg.estimator_options(name) else [None]
            for mode in modes:
                entry = _entry(model, params, data, name, mode, optimizer)
                entry["model"] = model_name
                entries.append(entry)
                print(f"  compiled {model_name} {name} {mode or ''}", flush=True)
    for _ in range(FLAGS.repeats):
        for entry in entries:
            t0 = time.perf_counter()
            jax.block_until_ready(entry["step"](entry["state"], data))
            entry["times"].append(time.perf_counter() - t0)
    for entry in entries:
        entry["median"] = statistics.median(entry["times"])
    base = {e["model"]: e for e in entries if e["method"] == "backprop"}
    rows = []
    for entry in entries:
        b = base[entry["model"]]
        rows.append(
            {
                "depth": depth,
                "model": entry["model"],
                "method": entry["method"],
                "mode": entry["mode"],
                "median_ms": 1e3 * entry["median"],
                "ratio": entry["median"] / b["median"],
                "gflop_ratio": entry["gflop"] / b["gflop"],
                "temp_ratio": entry["temp"] / b["temp"],
            }
        )
    chain = {(r["method"], r["mode"]): r for r in rows if r["model"] == "chain"}
    for r in rows:
        c = chain[(r["method"], r["mode"])]
        r["vs_chain"] = r["ratio"] / c["ratio"]
        r["gflop_vs_chain"] = r["gflop_ratio"] / c["gflop_ratio"]
        r["temp_vs_chain"] = r["temp_ratio"] / c["temp_ratio"]
    return rows


def format_table(rows) -> str:
    header = (
        "| depth | model | method | mode | step ms | x backprop | GFLOP x bp | temp x bp "
        "| time / chain's | GFLOP / chain's | temp / chain's |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['depth']} | {r['model']} | {r['method']} | {r['mode']} | {r['median_ms']:.1f} "
            f"| {r['ratio']:.2f} | {r['gflop_ratio']:.2f} | {r['temp_ratio']:.2f} "
            f"| {r['vs_chain']:.2f} | {r['gflop_vs_chain']:.2f} | {r['temp_vs_chain']:.2f} |"
        )
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for name in FLAGS.methods:
        gg.estimator_options(name)
    print(f"devices: {jax.devices()}; jax {jax.__version__}", flush=True)
    rows = []
    for depth in FLAGS.depths:
        print(
            f"measuring depth {depth}, width {FLAGS.width}, batch {FLAGS.batch} ...",
            flush=True,
        )
        rows += measure(int(depth))
        with open(FLAGS.out, "w") as f:
            json.dump(
                {"device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1
            )
    print("\n" + format_table(rows))
    print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
