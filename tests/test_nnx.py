"""Flax NNX models: every estimator on an nnx.Module, as on its linen twin.

The twins share their weights (the same pure-dict parameters), their sites'
paths and their order, so an estimator given the same key computes the same
estimate on both; an NNX estimate is an ``nnx.State`` of the module's
parameters.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import assert_mean_matches, flat, sample_estimates
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import guessgrad as gg

IN, WIDTH, CLASSES, BATCH = 6, 8, 4, 8  # the width a multiple of the classes, B = width


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = gg.site(self, "h0", nn.Dense(WIDTH, name="l0")(x), act=nn.relu)
        x = gg.site(self, "h1", nn.Dense(WIDTH, name="l1")(x), act=nn.relu)
        return gg.site(self, "out", nn.Dense(CLASSES, name="head")(x))


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.l0 = nnx.Linear(IN, WIDTH, rngs=rngs)
        self.l1 = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
        self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
        x = gg.site(self, "h0", self.l0(x), act=nnx.relu)
        x = gg.site(self, "h1", self.l1(x), act=nnx.relu)
        return gg.site(self, "out", self.head(x))


class LinenBlocks(nn.Module):
    """Local losses: a head per block, a stop_gradient between the blocks, a LayerNorm."""

    @nn.compact
    def __call__(self, x):
        h = gg.site(self, "b0", nn.Dense(WIDTH, name="d0")(x), act=nn.relu)
        first = nn.Dense(CLASSES, name="head0")(h)
        h = jax.lax.stop_gradient(h)
        h = gg.site(
            self,
            "b1",
            nn.LayerNorm(name="norm")(nn.Dense(WIDTH, name="d1")(h)),
            act=nn.relu,
        )
        return {"block0": first, "readout": nn.Dense(CLASSES, name="head1")(h)}


class NNXBlocks(nnx.Module):
    def __init__(self, rngs):
        self.d0 = nnx.Linear(IN, WIDTH, rngs=rngs)
        self.head0 = nnx.Linear(WIDTH, CLASSES, rngs=rngs)
        self.d1 = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
        self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.head1 = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
        h = gg.site(self, "b0", self.d0(x), act=nnx.relu)
        first = self.head0(h)
        h = jax.lax.stop_gradient(h)
        h = gg.site(self, "b1", self.norm(self.d1(h)), act=nnx.relu)
        return {"block0": first, "readout": self.head1(h)}


class LinenResidual(nn.Module):
    """Pre-norm residual blocks (LayerNorm, dense, ReLU site, dense) between two sites."""

    @nn.compact
    def __call__(self, x):
        h = gg.site(self, "embed", nn.Dense(WIDTH, name="embed")(x), act=nn.relu)
        for i in range(2):
            y = nn.LayerNorm(name=f"norm{i}")(h)
            y = gg.site(
                self, f"hidden{i}", nn.Dense(WIDTH, name=f"up{i}")(y), act=nn.relu
            )
            h = h + nn.Dense(WIDTH, name=f"down{i}")(y)
        return gg.site(self, "logits", nn.Dense(CLASSES, name="head")(h))


class NNXResidual(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Linear(IN, WIDTH, rngs=rngs)
        for i in range(2):
            setattr(self, f"norm{i}", nnx.LayerNorm(WIDTH, rngs=rngs))
            setattr(self, f"up{i}", nnx.Linear(WIDTH, WIDTH, rngs=rngs))
            setattr(self, f"down{i}", nnx.Linear(WIDTH, WIDTH, rngs=rngs))
        self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
        h = gg.site(self, "embed", self.embed(x), act=nnx.relu)
        for i in range(2):
            y = getattr(self, f"norm{i}")(h)
            y = gg.site(self, f"hidden{i}", getattr(self, f"up{i}")(y), act=nnx.relu)
            h = h + getattr(self, f"down{i}")(y)
        return gg.site(self, "logits", self.head(h))


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = gg.site(self, "c0", nn.Conv(4, (3, 3), name="c0")(x), act=nn.relu)
        x = gg.site(
            self, "c1", nn.Conv(4, (3, 3), strides=2, name="c1")(x), act=nn.relu
        )
        return gg.site(self, "logits", nn.Dense(CLASSES, name="head")(x.mean((1, 2))))


class NNXCNN(nnx.Module):
    def __init__(self, rngs):
        self.c0 = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        self.c1 = nnx.Conv(4, 4, (3, 3), strides=2, rngs=rngs)
        self.head = nnx.Linear(4, CLASSES, rngs=rngs)

    def __call__(self, x):
        x = gg.site(self, "c0", self.c0(x), act=nnx.relu)
        x = gg.site(self, "c1", self.c1(x), act=nnx.relu)
        return gg.site(self, "logits", self.head(x.mean((1, 2))))


class LinenPatches(nn.Module):
    """Per-patch local losses declared as copies ([B, P]): Ren et al.'s patch-wise losses."""

    @nn.compact
    def __call__(self, x):  # [B, P, F]
        h = gg.site(
            self, "mix", nn.Dense(WIDTH, name="mix")(x), act=nn.relu, copy_axes=1
        )
        return nn.Dense(CLASSES, name="head")(h)


class NNXPatches(nnx.Module):
    def __init__(self, rngs):
        self.mix = nnx.Linear(IN, WIDTH, rngs=rngs)
        self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
        h = gg.site(self, "mix", self.mix(x), act=nnx.relu, copy_axes=1)
        return self.head(h)


def patch_losses(logits, batch):
    labels = jnp.broadcast_to(batch["label"][:, None], logits.shape[:2])
    return gg.copies(gg.per_example_loss(logits, labels))


def block_losses(outputs, batch):
    return {
        name: gg.per_example_loss(logits, batch["label"])
        for name, logits in outputs.items()
    }


def twins(linen_cls, nnx_cls, shape=(IN,)):
    """A linen model and its NNX twin holding the same weights, with a batch of ``[B, *shape]``."""
    nnx_model = nnx_cls(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (BATCH, *shape))
    batch = {"image": x, "label": jnp.arange(BATCH) % CLASSES}
    linen_model = linen_cls()
    variables = linen_model.init(jax.random.key(2), x)
    pure = nnx.to_pure_dict(nnx.state(nnx_model, nnx.Param))
    variables = {"params": jax.tree.map(jnp.asarray, pure)}
    assert jax.tree.structure(variables["params"]) == jax.tree.structure(
        linen_model.init(jax.random.key(2), x)["params"]
    )
    return linen_model, variables, nnx_model, batch


MODELS = {
    "mlp": ((LinenMLP, NNXMLP), (IN,), {}),
    "local losses": ((LinenBlocks, NNXBlocks), (IN,), {"loss_fn": block_losses}),
    "residual": ((LinenResidual, NNXResidual), (IN,), {}),
    "cnn": ((LinenCNN, NNXCNN), (6, 6, 2), {}),
    "copies": ((LinenPatches, NNXPatches), (3, IN), {"loss_fn": patch_losses}),
}


def as_pure(grads):
    return nnx.to_pure_dict(grads) if isinstance(grads, nnx.State) else grads


# Every estimator on every twin; both modes on the MLP (the bridge is below the modes).
# The other models' cases are in the slow tier.
TWIN_CASES = [
    pytest.param(
        method,
        mode,
        model_name,
        marks=() if model_name == "mlp" else pytest.mark.slow,
    )
    for model_name in MODELS
    for method in gg.ESTIMATORS
    for mode in (
        gg.MODES
        if model_name == "mlp" and "mode" in gg.estimator_options(method)
        else [None]
    )
]


@pytest.mark.parametrize("method, mode, model_name", TWIN_CASES)
def test_nnx_and_linen_twins_give_the_same_estimate(method, mode, model_name):
    (linen_cls, nnx_cls), shape, problem = MODELS[model_name]
    options = {} if mode is None else {"mode": mode}
    if method in ("wperp", "wperp_ns"):
        options["rank"] = 2
    linen_model, variables, nnx_model, batch = twins(linen_cls, nnx_cls, shape)
    key = jax.random.key(7)
    on_linen = gg.get_estimator(method, linen_model, **problem, **options)
    on_nnx = gg.get_estimator(method, nnx_model, **problem, **options)
    params = nnx.state(nnx_model, nnx.Param)
    estimate = on_nnx(params, batch, key)
    assert isinstance(estimate, nnx.State)
    assert jax.tree.structure(estimate) == jax.tree.structure(params)
    np.testing.assert_allclose(
        flat(as_pure(estimate)),
        flat(on_linen(variables, batch, key)["params"]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_a_stateful_estimator_on_nnx_carries_the_linen_twins_state():
    """W-perp's warm start on an NNX module: the same state from init, the same
    estimate and next state as on its linen twin; make_train_step threads it."""
    linen_model, variables, nnx_model, batch = twins(LinenMLP, NNXMLP)
    options = {"rank": 2, "variant": "warm", "subspace": 4}
    on_linen = gg.get_estimator("wperp_ns", linen_model, **options)
    on_nnx = gg.get_estimator("wperp_ns", nnx_model, **options)
    assert gg.is_stateful(on_nnx)
    params = nnx.state(nnx_model, nnx.Param)
    state = on_nnx.init(params, batch)
    linen_state = on_linen.init(variables, batch)
    assert sorted(state) == sorted(linen_state)
    np.testing.assert_allclose(flat(state), flat(linen_state), atol=1e-6)
    key = jax.random.key(3)
    grads, following = on_nnx(params, batch, key, state)
    linen_grads, linen_following = on_linen(variables, batch, key, linen_state)
    assert isinstance(grads, nnx.State)
    np.testing.assert_allclose(
        flat(as_pure(grads)), flat(linen_grads["params"]), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(flat(following), flat(linen_following), atol=1e-5)
    optimizer = optax.sgd(0.1)
    train = gg.init_train_state(
        params, optimizer, jax.random.key(0), estimator=on_nnx, batch=batch
    )
    train, metrics = gg.make_train_step(on_nnx, optimizer)(train, batch)
    assert bool(metrics["finite"])
    assert jax.tree.structure(train.estimator_state) == jax.tree.structure(state)


def test_backprop_on_nnx_is_jax_grad_through_nnx_merge():
    _, _, model, batch = twins(LinenBlocks, NNXBlocks)
    params = nnx.state(model, nnx.Param)
    graphdef = nnx.graphdef(model)

    def loss(p):
        losses = block_losses(nnx.merge(graphdef, p)(batch["image"]), batch)
        return sum(jnp.mean(value) for value in losses.values())

    estimate = gg.get_estimator("backprop", model, loss_fn=block_losses)
    expected = jax.grad(loss)(params)
    for a, b in zip(
        jax.tree.leaves(estimate(params, batch, None)), jax.tree.leaves(expected)
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


class DropoutNet(nnx.Module):
    def __init__(self, rngs):
        self.l0 = nnx.Linear(IN, WIDTH, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
        x = self.drop(gg.site(self, "h0", self.l0(x), act=nnx.relu))
        return gg.site(self, "out", self.head(x))


def test_nnx_dropout_draws_from_the_estimators_key():
    model = DropoutNet(nnx.Rngs(0, dropout=1))
    _, _, _, batch = twins(LinenMLP, NNXMLP)
    params = nnx.state(model, nnx.Param)
    estimate = gg.get_estimator("backprop", model)
    key = jax.random.key(3)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        copy = nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest))
        nnx.reseed(copy, dropout=gg.model_rngs(key)["dropout"])
        return jnp.mean(gg.per_example_loss(copy(batch["image"]), batch["label"]))

    expected = jax.grad(loss)(params)
    got = estimate(params, batch, key)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    other = estimate(params, batch, jax.random.key(4))
    assert not np.allclose(flat(as_pure(got)), flat(as_pure(other)))  # other masks


@pytest.mark.slow
@pytest.mark.parametrize("method", ["directional", "activation_perturbation"])
def test_unbiased_methods_are_unbiased_on_nnx(method):
    _, _, model, batch = twins(LinenMLP, NNXMLP)
    params = nnx.state(model, nnx.Param)
    options = {"normalize": False} if method == "activation_perturbation" else {}
    estimate = gg.get_estimator(method, model, **options)
    exact = gg.get_estimator("backprop", model)(params, batch, None)
    samples = sample_estimates(
        lambda p, b, k: as_pure(estimate(p, b, k)), params, batch
    )
    assert_mean_matches(samples, flat(as_pure(exact)))


class Prompt(nnx.Param):
    """Prompt tokens: the only parameters that learn in prompt tuning."""


class Prompted(nnx.Module):
    def __init__(self, rngs):
        self.prompt = Prompt(jax.random.normal(rngs.params(), (WIDTH,)) * 0.1)
        self.l0 = nnx.Linear(IN, WIDTH, rngs=rngs)
        self.l1 = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
        self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
        h = self.l0(x) + self.prompt[...]
        h = gg.site(self, "h1", self.l1(nnx.relu(h)), act=nnx.relu)
        return gg.site(self, "out", self.head(h))


@pytest.mark.parametrize(
    "trainable, learning",
    [
        (Prompt, {"prompt"}),
        (nnx.PathContains("head"), {"head/bias", "head/kernel"}),
        (nnx.Any(Prompt, nnx.PathContains("l1")), {"prompt", "l1/bias", "l1/kernel"}),
        (
            nnx.Not(nnx.PathContains("l0")),
            {"prompt", "l1/bias", "l1/kernel", "head/bias", "head/kernel"},
        ),
    ],
)
@pytest.mark.parametrize("method", ["wt", "directional", "backprop"])
def test_trainable_takes_nnx_filters(method, trainable, learning):
    model = Prompted(nnx.Rngs(0))
    _, _, _, batch = twins(LinenMLP, NNXMLP)
    params = nnx.state(model, nnx.Param)
    estimate = gg.get_estimator(method, model, trainable=trainable)(
        params, batch, jax.random.key(5)
    )
    for path, value in nnx.to_flat_state(estimate):
        name = "/".join(str(p) for p in path)
        if name in learning:
            assert np.any(np.asarray(value[...]) != 0), name
        else:
            assert np.all(np.asarray(value[...]) == 0), name  # exact zeros


def test_an_nnx_model_trains_with_nnx_optimizer():
    _, _, model, batch = twins(LinenMLP, NNXMLP)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    estimate = jax.jit(gg.get_estimator("wt", model))

    def loss():
        return float(
            jnp.mean(gg.per_example_loss(model(batch["image"]), batch["label"]))
        )

    before = loss()
    for step in range(60):
        grads = estimate(nnx.state(model, nnx.Param), batch, jax.random.key(step))
        optimizer.update(model, grads)
    assert loss() < 0.5 * before


def test_print_structure_and_site_values_take_nnx_modules(capsys):
    _, _, model, batch = twins(LinenBlocks, NNXBlocks)
    params = nnx.state(model, nnx.Param)
    found = gg.print_structure(model, params, batch, loss_fn=block_losses)
    shown = capsys.readouterr().out
    assert [s.path for s in found.sites] == ["b0", "b1"]
    assert "params/norm/scale" in shown
    values = gg.site_values(model, params, batch)
    assert set(values) == {"b0", "b1"} and values["b0"].shape == (BATCH, WIDTH)


class Normed(nnx.Module):
    def __init__(self, rngs):
        self.l0 = nnx.Linear(IN, WIDTH, rngs=rngs)
        self.bn = nnx.BatchNorm(WIDTH, rngs=rngs)

    def __call__(self, x):
        return gg.site(self, "h0", self.bn(self.l0(x)))


class Wrapped(nnx.Module):
    """Residual blocks as a submodule, each call rematerialised when ``remat``."""

    def __init__(self, rngs, remat):
        self.block = NNXResidual(rngs)
        self.head = nnx.Linear(CLASSES, CLASSES, rngs=rngs)
        self.remat = remat

    def __call__(self, x):
        call = lambda block, x: block(x)
        h = (nnx.remat(call) if self.remat else call)(self.block, x)
        return gg.site(self, "logits", self.head(nnx.relu(h)))


# Remat changes what is stored, never a value: each estimator on a rematerialised
# block equals the same estimator on the plain block (itself equal to its linen twin).
REMAT_CASES = [
    pytest.param(
        method,
        marks=() if method in ("wt", "activation_perturbation") else pytest.mark.slow,
    )
    for method in gg.ESTIMATORS
]


@pytest.mark.parametrize("method", REMAT_CASES)
def test_sites_inside_nnx_remat_give_the_plain_models_estimate(method):
    options = {"rank": 2} if method in ("wperp", "wperp_ns") else {}
    plain, rematted = Wrapped(nnx.Rngs(0), False), Wrapped(nnx.Rngs(0), True)
    params = nnx.state(plain, nnx.Param)
    assert jax.tree.all(
        jax.tree.map(jnp.array_equal, params, nnx.state(rematted, nnx.Param))
    )
    _, _, _, batch = twins(LinenMLP, NNXMLP)
    sites = [s.path for s in gg.structure(rematted, params, batch).sites]
    assert sites == [
        "block/embed",
        "block/hidden0",
        "block/hidden1",
        "block/logits",
        "logits",
    ]
    key = jax.random.key(3)
    expected = jax.jit(gg.get_estimator(method, plain, **options))(params, batch, key)
    estimate = gg.get_estimator(method, rematted, **options)
    assert "remat" in str(
        jax.make_jaxpr(estimate)(params, batch, key)
    )  # jax.checkpoint
    got = jax.jit(estimate)(params, batch, key)
    assert jax.tree.structure(got) == jax.tree.structure(params)
    assert np.any(flat(as_pure(expected)) != 0)
    np.testing.assert_allclose(
        flat(as_pure(got)), flat(as_pure(expected)), rtol=1e-5, atol=1e-6
    )


class Layer(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

    def __call__(self, x):
        return gg.site(self, "h", self.lin(x), act=nnx.relu)


class Scanned(nnx.Module):
    """Three layers stacked by nnx.vmap at init and run by nnx.scan."""

    def __init__(self, rngs):
        make = nnx.split_rngs(splits=3)(nnx.vmap(Layer, in_axes=0, out_axes=0))
        self.layers = make(rngs)
        self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
        run = nnx.scan(
            lambda x, layer: layer(x), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry
        )
        return gg.site(self, "out", self.head(run(x, self.layers)))


class Vmapped(nnx.Module):
    """One layer run by nnx.vmap over two copies of the batch."""

    def __init__(self, rngs):
        self.layer = Layer(rngs)
        self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
        ys = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(
            self.layer, jnp.stack([x, x])
        )
        return gg.site(self, "out", self.head(ys.mean(0)))


def test_what_nnx_models_cannot_do_is_one_clear_error():
    _, _, _, batch = twins(LinenMLP, NNXMLP)
    with pytest.raises(ValueError, match="batch statistics.*bn/mean.*bn/var"):
        gg.get_estimator("wt", Normed(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(0), (BATCH, WIDTH))
    wide = {"image": x, "label": batch["label"]}
    for cls, where in ((Scanned, "'layers/h'"), (Vmapped, "A site or tap")):
        model = cls(nnx.Rngs(0))
        assert model(x).shape == (BATCH, CLASSES)  # outside an estimator: act(value)
        with pytest.raises(ValueError, match=f"{where} ran inside an NNX transform"):
            gg.get_estimator("wt", model)(
                nnx.state(model, nnx.Param), wide, jax.random.key(0)
            )
    model = NNXMLP(nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"nnx.state\(model, nnx.Param\)"):
        gg.get_estimator("wt", model)(model, batch, jax.random.key(0))
    # Outside an estimator a site is just act(value).
    x = batch["image"]
    np.testing.assert_allclose(
        model(x), model.head(nnx.relu(model.l1(nnx.relu(model.l0(x))))), rtol=1e-6
    )


def test_nnx_estimates_take_arrays_on_a_mesh():
    mesh = jax.make_mesh((1,), ("data",))
    _, _, model, batch = twins(LinenBlocks, NNXBlocks)
    params = nnx.state(model, nnx.Param)
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    replicated = jax.device_put(params, NamedSharding(mesh, P()))
    for method in ("backprop", "wt", "mixing"):
        estimate = gg.get_estimator(method, model, loss_fn=block_losses)
        expected = estimate(params, batch, jax.random.key(0))
        got = jax.jit(estimate)(replicated, sharded, jax.random.key(0))
        np.testing.assert_allclose(
            flat(as_pure(got)), flat(as_pure(expected)), rtol=1e-6, atol=1e-7
        )


def test_the_readme_nnx_example_runs():
    """The NNX example of the marking-sites guide, run as written."""
    import os
    import re

    path = os.path.join(
        os.path.dirname(__file__), "..", "docs", "guides", "marking_sites.md"
    )
    with open(path) as f:
        section = f.read().split("## Flax NNX models", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)[:1]
    namespace = {}
    exec(block, namespace)  # noqa: S102
    grads, model = namespace["grads"], namespace["model"]
    params = nnx.state(model, nnx.Param)
    assert isinstance(grads, nnx.State)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert np.any(flat(as_pure(grads)) != 0)
