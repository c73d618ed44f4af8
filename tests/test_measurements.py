"""The measurement experiments: a smoke run of each with tiny settings, and the report over them."""

import json
import os
import subprocess
import sys

import pytest
from helpers import PNG_SIGNATURE, REPO

TINY = ("--depth=2", "--width=16", "--steps=6", "--batch_size=32")


def _run(module, *args):
    result = subprocess.run(
        [sys.executable, "-m", f"experiments.{module}", *args],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result


def _outputs(workdir, name):
    with open(os.path.join(workdir, f"{name}.json"), encoding="utf-8") as f:
        record = json.load(f, parse_constant=lambda t: pytest.fail(t))
    with open(os.path.join(workdir, f"{name}.png"), "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with open(os.path.join(workdir, f"{name}.md"), encoding="utf-8") as f:
        assert f.read().startswith("| ")
    return record


def _run_all(root):
    """Every measurement, tiny, in one runs directory."""
    _run(
        "cosine",
        *TINY,
        "--points=2",
        "--num_keys=2",
        "--examples=4",
        "--methods=directional,wt",
        f"--workdir={root / 'cosine'}",
    )
    _run(
        "bias",
        *TINY,
        "--max_guesses=20",
        "--examples=2",
        "--methods=activation_perturbation,mixing",
        f"--workdir={root / 'bias'}",
    )
    _run("subspace", *TINY, f"--workdir={root / 'subspace'}")
    _run(
        "bias_training",
        *TINY,
        "--cosine_batches=1",
        f"--workdir={root / 'bias_training'}",
    )
    _run(
        "self_sharpening",
        *TINY,
        "--steps=100",
        "--points=1",
        "--powers=1,4",
        "--methods=wt",
        f"--workdir={root / 'self_sharpening'}",
    )
    return root


def _check_cosine_writes_the_figure_1_table(runs):
    record = _outputs(runs / "cosine", "cosine")
    assert [p["step"] for p in record["points"]] == [0, 6]
    # Activation-space methods in both modes (joint: the paper's estimator), labelled.
    assert record["variants"] == {
        "directional": {"method": "directional"},
        "wt (joint)": {"method": "wt", "mode": "joint"},
        "wt (per_layer)": {"method": "wt", "mode": "per_layer"},
    }
    for label in record["variants"]:
        summary = record["summary"][label]
        assert -1 <= summary["cosine"] <= 1
        assert set(summary["layer_cosines"]) == {"params/dense_0", "params/dense_1"}
    # Activation-space guesses beat a random parameter direction by far (Figure 1's order).
    assert record["summary"]["wt (joint)"]["cosine"] > 10 * abs(
        record["summary"]["directional"]["cosine"]
    )
    # The paper's numbers stand beside its own estimator only.
    rows = {
        tuple(c.strip() for c in line.split("|")[1:3]): line
        for line in (runs / "cosine" / "cosine.md").read_text().splitlines()[2:]
    }
    assert "| 0.03 |" in rows[("wt", "joint")]
    assert "| 0.03 |" not in rows[("wt", "per_layer")]


def _check_bias_writes_one_curve_per_method(runs):
    record = _outputs(runs / "bias", "bias")
    assert record["ks"] == [1, 2, 5, 10, 20]
    # Activation perturbation is unbiased: its mean of 20 guesses is closer than one guess.
    curve = record["curves"]["activation_perturbation"]
    assert curve[-1] > curve[0]
    # The analytic W^T bias: one hidden layer (depth 2), for each of the 2 examples.
    assert [len(a) for a in record["analytic_wt"]] == [1, 1]
    for layer in record["analytic_wt"]:
        assert layer[0]["relative_bias"] >= 0
        assert -1 <= layer[0]["expected_cosine"] <= 1


def _check_subspace_measures_dl_dx_and_labels_the_weight_gradient(runs):
    record = _outputs(runs / "subspace", "subspace")
    for layer in record["layers"].values():
        assert layer["ks"][-1] == layer["n"]
        assert layer["pca"][-1] == pytest.approx(1.0, abs=1e-4)
        # The weight gradient's rows lie in the span of the batch's 32 inputs by
        # construction; dL/dx need not (the paper's claim is about dL/dx).
        at_batch = layer["ks"].index(min(32, layer["n"]))
        assert layer["weight_gradient"]["pca"][at_batch] == pytest.approx(1.0, abs=1e-4)
    first = record["layers"]["layer 0"]  # 784 inputs
    assert first["pca"][first["ks"].index(32)] < 0.999


def _check_bias_training_trains_the_method_and_its_oracle_with_three_optimizers(runs):
    record = _outputs(runs / "bias_training", "bias_training")
    cosine = record["settings"]["cosine"]
    assert 0 < cosine <= 1
    assert set(record["runs"]) == {
        f"{opt}/{m}"
        for opt in ("sgd", "momentum", "adamw")
        for m in ("wt", "oracle_angle")
    }
    with open(runs / "bias_training" / "adamw" / "oracle_angle" / "config.json") as f:
        options = json.load(f)["estimator_options"]
    # The paper's oracle step (g.u)u at the method's cosine; the method in joint mode.
    assert options == {"cosine": pytest.approx(cosine), "scale": "directional"}
    with open(runs / "bias_training" / "adamw" / "wt" / "config.json") as f:
        assert json.load(f)["estimator_options"]["mode"] == "joint"


def _check_self_sharpening_trains_with_powered_guesses_and_loses_rank(runs):
    record = _outputs(runs / "self_sharpening", "self_sharpening")
    for run in record["runs"].values():
        assert [p["step"] for p in run["points"]] == [100]
        for point in run["points"]:
            # dense_0 is 784x16 (rank <= 16), dense_1 16x10 (rank <= 10).
            ranks = point["effective_ranks"]
            assert 1 <= ranks["params/dense_0/kernel"] <= 16
            assert 1 <= ranks["params/dense_1/kernel"] <= 10
    # Trained with the sharpest guess (p = 4), the guesses concentrate on fewer
    # directions, the weights do not gain rank, and the cosine rises (Figure 4;
    # measured: guess rank 5.7 -> 3.2, weights 12.5 -> 12.3, cosine 0.45 -> 0.68).
    first, last = record["powered_training"]["4"]
    assert [first["step"], last["step"]] == [0, 100]
    assert last["guess_rank"] < 0.8 * first["guess_rank"]
    assert last["weight_rank"] <= first["weight_rank"] + 1e-3
    assert last["cosine"] > first["cosine"]
    # Raising the singular values to a higher power concentrates the spectrum.
    sweep = record["power_sweep"]
    assert [r["p"] for r in sweep] == [1, 4]
    assert sweep[1]["effective_rank"] < sweep[0]["effective_rank"]


def _check_the_report_gathers_every_result(runs):
    _run("report", f"--runs={runs}")
    text = (runs / "report.md").read_text()
    for title in ("Figure 1", "Figure 3", "Figure 4", "Figures 6 and 7"):
        assert title in text
    assert "![cosine](cosine/cosine.png)" in text
    assert "0.0003" in text  # the paper's numbers beside ours


@pytest.mark.slow
def test_every_measurement_writes_its_table_json_and_figure_and_the_report_gathers_them(
    tmp_path,
):
    """One run of each experiment (a separate process each), then every check on it."""
    _run_all(tmp_path)
    _check_cosine_writes_the_figure_1_table(tmp_path)
    _check_bias_writes_one_curve_per_method(tmp_path)
    _check_subspace_measures_dl_dx_and_labels_the_weight_gradient(tmp_path)
    _check_bias_training_trains_the_method_and_its_oracle_with_three_optimizers(
        tmp_path
    )
    _check_self_sharpening_trains_with_powered_guesses_and_loses_rank(tmp_path)
    _check_the_report_gathers_every_result(tmp_path)


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "experiments.cosine", *TINY, f"--workdir={path}"],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "is a file" in result.stderr


_POWER_ONE_IS_WT = """
import jax, jax.numpy as jnp, numpy as np
import guessgrad as gg
from experiments.self_sharpening import powered_wt
model = gg.models.MLP(depth=3, width=8, num_classes=4)
batch = {"image": jax.random.normal(jax.random.key(0), (5, 6)),
         "label": jnp.array([0, 1, 2, 3, 0])}
params = model.init(jax.random.key(1), batch["image"])
key = jax.random.key(2)
# p = 1: U S V^T is W up to the SVD's float32 round-off.
check = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
same = jax.tree.map(check,
                    powered_wt(model, 1.0)(params, batch, key),
                    gg.get_estimator("wt", model)(params, batch, key))
sharper = powered_wt(model, 4.0)(params, batch, key)
assert not np.allclose(sharper["params"]["dense_0"]["kernel"],
                       gg.get_estimator("wt", model)(params, batch, key)["params"]["dense_0"]["kernel"])
print("ok")
"""


def _run_snippet(code):
    """Runs ``code`` in a fresh interpreter (the experiments define absl flags); it prints ok."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.strip().endswith("ok"), result.stderr


@pytest.mark.slow
def test_the_guess_through_singular_values_to_the_power_one_is_wt():
    _run_snippet(_POWER_ONE_IS_WT)


_INPUT_GRADIENTS = """
import jax, jax.numpy as jnp, numpy as np
import guessgrad as gg
from experiments.subspace import input_gradients
model = gg.models.MLP(depth=3, width=8, num_classes=4)
batch = {"image": jax.random.normal(jax.random.key(0), (5, 6)),
         "label": jnp.array([0, 1, 2, 3, 0])}
params = model.init(jax.random.key(1), batch["image"])
grads = input_gradients(model, params, batch)
assert [g.shape for g in grads] == [(5, 6), (5, 8), (5, 8)]
# Layer 0's input is the image: dL/dx_0 is the gradient of each example's loss
# with respect to its own image.
loss = lambda images: jnp.sum(gg.per_example_loss(model.apply(params, images), batch["label"]))
np.testing.assert_allclose(grads[0], jax.grad(loss)(batch["image"]), rtol=1e-5, atol=1e-7)
# Layer 2's input is layer 1's output after the ReLU: perturb it through the site.
def with_hidden(h):
    out = h @ params["params"]["dense_2"]["kernel"] + params["params"]["dense_2"]["bias"]
    return jnp.sum(gg.per_example_loss(out, batch["label"]))
x = jax.nn.relu(jax.nn.relu(batch["image"] @ params["params"]["dense_0"]["kernel"]
                            + params["params"]["dense_0"]["bias"])
                @ params["params"]["dense_1"]["kernel"] + params["params"]["dense_1"]["bias"])
np.testing.assert_allclose(grads[2], jax.grad(with_hidden)(x), rtol=1e-5, atol=1e-7)
print("ok")
"""


@pytest.mark.slow
def test_subspace_takes_the_gradient_with_respect_to_each_layers_input():
    _run_snippet(_INPUT_GRADIENTS)
