"""Experiments as config files: their form, the one entry point, the short commands over them."""

import dataclasses
import importlib
import pathlib

import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import REPO, TINY, cli, read_json, untimed

import guessgrad as gg
from guessgrad import experiment, parallel
from guessgrad.experiment import config as config_module

CONFIG_FILES = sorted(
    p.stem
    for p in pathlib.Path(REPO, "experiments", "configs").glob("*.py")
    if p.stem != "__init__"
)
RUN_CONFIGS = ["mlp", "paper_mlp", "localmixer", "localmixer_cifar10", "prompt_tuning"]


def load(name):
    return importlib.import_module(f"experiments.configs.{name}").get_config()


def test_the_run_config_files_are_there():
    assert set(RUN_CONFIGS) <= set(CONFIG_FILES)


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_each_run_config_file_is_a_valid_experiment(name):
    plan = experiment.from_config_dict(load(name))
    experiment.validate(plan.config)  # the data sets' sizes are known without data
    for method in plan.methods or ():
        assert method in gg.ESTIMATORS
    # Every estimator option can be overridden, typed as the estimator takes it.
    options = load(name).options
    assert set(options) == set(experiment.option_types())
    for option, kind in experiment.option_types().items():
        assert options.get_type(option) is kind


def test_the_settings_the_configs_fix():
    paper = experiment.from_config_dict(load("paper_mlp")).config
    assert (paper.dataset, paper.model) == ("cifar10", experiment.MLPSpec(6, 1024))
    ren = experiment.from_config_dict(load("localmixer_cifar10")).config
    assert ren.model.config == "M/8/16" and ren.augment and ren.dataset == "cifar10"
    tuning = experiment.from_config_dict(load("prompt_tuning"))
    assert tuning.pretraining == experiment.Pretraining(epochs=10, learning_rate=1e-3)
    assert tuning.config.transform == "invert" and tuning.config.model.backbone is None


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        dataclasses.replace(
            TINY,
            method="wperp_ns",
            options={"rank": 3, "variant": "vector", "cutoff": 0.5, "normalize": False},
            steps=None,
            transform="invert",
        ),
        dataclasses.replace(
            TINY,
            model=experiment.ViTSpec(num_prompts=2, prompt_depth="deep"),
            method="downstream",
            options={"depth": 2},
        ),
    ],
)
def test_a_config_round_trips_through_its_config_file_form(config):
    methods = [config.method, "directional"]
    form = experiment.config_dict(config, methods=methods)
    plan = experiment.from_config_dict(form)
    assert plan.config == config
    assert plan.methods == tuple(methods)
    assert experiment.config_from_record(experiment.config_record(config)) == config


def test_config_file_form_errors_name_the_valid_choices():
    form = experiment.config_dict(TINY)
    form.options.num_guesses = 3
    form.method = "backprop"
    with pytest.raises(ValueError, match="does not apply to backprop.*applies to"):
        experiment.from_config_dict(form)
    record = experiment.config_record(TINY) | {"epoch": 3}
    with pytest.raises(ValueError, match="epoch.*the fields: method"):
        experiment.config_from_record(record)
    record = experiment.config_record(TINY)
    record["model"] = {"kind": "mlp", "layers": 3}
    with pytest.raises(ValueError, match="no setting.*layers.*depth, width"):
        experiment.config_from_record(record)
    with pytest.raises(ValueError, match="No estimator takes option.*bogus"):
        experiment.config_dict(dataclasses.replace(TINY, options={"bogus": 1}))


def test_validation_and_the_train_step_build_each_estimator_once(monkeypatch):
    built = []
    real = gg.get_estimator

    def counting(method, *args, **kwargs):
        built.append(method)
        return real(method, *args, **kwargs)

    monkeypatch.setattr(gg, "get_estimator", counting)
    # Options no other test uses: nothing cached yet.
    config = dataclasses.replace(TINY, options={"num_guesses": 7, "normalize": False})
    configs = experiment.method_configs(config, ["wt", "mixing", "directional"])
    for method_config in configs:
        experiment.validate(method_config)
        experiment.steps.train_step(method_config, 10, parallel.data_mesh())
    assert sorted(built) == ["directional", "mixing", "wt"]


def test_a_replicated_state_gives_a_parallel_step_that_compiles_once():
    model = gg.models.MLP(depth=2, width=8, num_classes=4)
    x = jnp.ones((4, 12))
    batch = {"image": x, "label": jnp.arange(4) % 4}
    params = model.init(jax.random.key(0), x)
    estimator = gg.get_estimator("wt", model, has_aux=True)
    traces = []

    def counted(params, batch, key):
        traces.append(1)
        return estimator(params, batch, key)

    counted.has_aux = True
    optimizer = optax.sgd(0.1)
    mesh = parallel.data_mesh()
    step = parallel.make_parallel_train_step(counted, optimizer, mesh)
    state = parallel.replicate(
        gg.init_train_state(params, optimizer, jax.random.key(1)), mesh
    )
    assert all(
        leaf.sharding == parallel.replicated(mesh) for leaf in jax.tree.leaves(state)
    )
    for _ in range(3):
        state, _ = step(state, batch)
    assert len(traces) == 1


@pytest.mark.slow
def test_main_with_overrides_equals_the_short_command(tmp_path):
    common = ["--steps=12", "--eval_every=6", "--log_every=3", "--batch_size=32"]
    short = cli(
        "--method=wt", "--width=16", "--num_guesses=2", "--seed=3",
        *common, "--progress=false", f"--workdir={tmp_path / 'short'}",
    )  # fmt: skip
    assert short.returncode == 0, short.stderr
    overrides = [f"--config.{arg[2:]}" for arg in common]
    main = cli(
        "--config=experiments/configs/mlp.py",
        "--config.method=wt",
        "--config.model.width=16",
        "--config.options.num_guesses=2",
        "--config.seed=3",
        *overrides,
        "--config.progress=false",
        f"--workdir={tmp_path / 'main'}",
        module="experiments.main",
    )
    assert main.returncode == 0, main.stderr
    saved = read_json(tmp_path / "main" / "config.json")
    # config.json records the resolved configuration, overrides included.
    assert saved["config"]["model"] == {"kind": "mlp", "depth": 3, "width": 16}
    assert saved["config"]["options"] == {"num_guesses": 2}
    assert (saved["config"]["steps"], saved["config"]["seed"]) == (12, 3)
    assert saved["estimator_options"]["num_guesses"] == 2
    recorded = experiment.config_from_record(
        {k: v for k, v in saved["config"].items() if k != "workdir"}
    )
    assert recorded.model == experiment.MLPSpec(3, 16)
    metrics = [
        experiment.read_metrics(str(tmp_path / d / "metrics.jsonl"))
        for d in ("short", "main")
    ]
    assert untimed(metrics[0]) == untimed(metrics[1])


@pytest.mark.slow
def test_main_errors_are_one_line(tmp_path):
    result = cli(
        "--config=experiments/configs/mlp.py",
        "--config.method=nope",
        f"--workdir={tmp_path}",
        module="experiments.main",
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith(
        "main: Unknown estimator 'nope'; valid names:"
    )
    result = cli(
        "--config=experiments/configs/mlp.py",
        "--config.options.bogus=1",
        module="experiments.main",
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "main: the config has no field bogus; see the file's get_config()."
    )
    assert config_module.Config is experiment.Config
