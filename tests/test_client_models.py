"""Models as another project brings them: loss shapes, meshes, constant state, shared modules.

Each test states what a client's model must get: an unbiased estimate of
its own objective, whatever the shapes, with errors that name the real cause.
Widths are multiples of the output size and batch sizes equal widths or
output sizes, where shape-driven bugs hide.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_mean_matches, cosine, flat
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from zoo import NUM_CLASSES, ZOO, DropoutMLP, PatchLocal, ResidualMLP

import guessgrad as gg
from guessgrad._src import engine
from guessgrad._src.problem import losses_reached

KEYS = 20_000


def mc_samples(estimate, params, batch, num=KEYS, seed=123):
    keys = jax.random.split(jax.random.key(seed), num)
    return jax.jit(jax.vmap(lambda k: flat(estimate(params, batch, k))))(keys)


# --- per-output losses: summed per example, never read as copies ---------------------


def _per_output_problem(kind):
    """An MLP whose width (8) is a multiple of the outputs (4), batch 4, and a [B, D] loss."""
    outputs = 4
    model = gg.models.MLP(depth=2, width=8, num_classes=outputs)
    images = jax.random.normal(jax.random.key(0), (4, 6))
    if kind == "mse":
        batch = {
            "image": images,
            "target": jax.random.normal(jax.random.key(1), (4, 4)),
        }
        loss_fn = lambda out, b: jnp.square(out - b["target"])  # [B, D]
        objective = lambda out, b: jnp.mean(jnp.sum(jnp.square(out - b["target"]), -1))
    else:
        labels = jax.random.bernoulli(jax.random.key(1), 0.5, (4, outputs))
        batch = {"image": images, "labels": labels.astype(jnp.float32)}
        loss_fn = lambda out, b: optax.sigmoid_binary_cross_entropy(out, b["labels"])
        objective = lambda out, b: jnp.mean(jnp.sum(loss_fn(out, b), -1))
    params = model.init(jax.random.key(2), images)
    return model, params, batch, loss_fn, objective


@pytest.mark.parametrize("kind", ["mse", "bce"])
def test_a_per_output_loss_is_summed_per_example_and_its_estimates_are_unbiased(kind):
    model, params, batch, loss_fn, objective = _per_output_problem(kind)
    found = gg.structure(model, params, batch, loss_fn=loss_fn)
    assert found.losses == {"loss": (4,)}
    assert all(s.layouts == ("example",) for s in found.sites)
    exact = gg.get_estimator("backprop", model, loss_fn=loss_fn)(params, batch, None)
    expected = jax.grad(lambda p: objective(model.apply(p, batch["image"]), batch))(
        params
    )
    np.testing.assert_allclose(flat(exact), flat(expected), rtol=1e-5, atol=1e-7)
    for mode in ("joint", "per_layer"):
        estimate = gg.get_estimator(
            "activation_perturbation", model, loss_fn=loss_fn, mode=mode
        )
        assert_mean_matches(mc_samples(estimate, params, batch), flat(exact))


def test_copies_are_declared_by_the_loss_and_split_only_at_sites_that_declare_them():
    model, params, batch, problem = ZOO["patch_copies"]()  # gg.copies, copy_axes=1
    found = gg.structure(model, params, batch, **problem)
    assert found.losses == {"loss": (4, 3)}
    assert found.site("patch").layouts == ("copies",)
    # The objective of copies is their mean.
    exact = gg.get_estimator("backprop", model, **problem)(params, batch, None)
    mean = lambda p: jnp.mean(
        problem["loss_fn"](model.apply(p, batch["image"]), batch).value
    )
    np.testing.assert_allclose(flat(exact), flat(jax.grad(mean)(params)), rtol=1e-5)

    # The same site without copy_axes uses the derivative of the mean.
    class Undeclared(PatchLocal):
        @nn.compact
        def __call__(self, x):
            h = gg.site(self, "patch", nn.Dense(self.width)(x), act=nn.relu)
            mine = h / h.shape[1]
            pooled = mine + jax.lax.stop_gradient(h.mean(1, keepdims=True) - mine)
            return nn.Dense(NUM_CLASSES, name="head")(pooled)

    found = gg.structure(Undeclared(), params, batch, **problem)
    assert found.site("patch").layouts == ("summed",)
    # Undeclared extra axes are a sum, not copies: [B, P] becomes [B].
    summed = lambda out, b: problem["loss_fn"](out, b).value
    found = gg.structure(model, params, batch, loss_fn=summed)
    assert found.losses == {"loss": (4,)} and found.site("patch").layouts == (
        "example",
    )
    with pytest.raises(ValueError, match="at least one copy axis"):
        gg.copies(jnp.zeros(4))


def test_a_scalar_loss_says_it_must_be_per_example():
    model, params, batch, _ = ZOO["mlp"]()
    scalar = lambda out, b: jnp.mean(gg.per_example_loss(out, b["label"]))
    with pytest.raises(ValueError, match="is a scalar.*before their mean"):
        gg.get_estimator("wt", model, loss_fn=scalar)(params, batch, jax.random.key(0))


# --- arrays on a mesh, with or without a mesh context ----------------------------------


@pytest.mark.slow
def test_estimators_take_arrays_on_a_default_mesh_without_a_mesh_context():
    mesh = jax.make_mesh((1,), ("data",))
    assert "Explicit" in str(mesh.axis_types)
    model, params, batch, problem = ZOO["two_block_local"]()
    sharded_batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    replicated = jax.device_put(params, NamedSharding(mesh, P()))
    for method in ("backprop", "wt", "mixing"):
        estimate = gg.get_estimator(method, model, **problem)
        expected = estimate(params, batch, jax.random.key(0))
        for fn in [jax.jit(estimate)] + ([estimate] if method == "wt" else []):
            got = fn(replicated, sharded_batch, jax.random.key(0))
            np.testing.assert_allclose(flat(got), flat(expected), rtol=1e-6, atol=1e-7)
    found = gg.structure(model, replicated, sharded_batch, **problem)
    assert [s.path for s in found.sites] == ["b0_hidden", "b0_out", "b1_hidden"]


# --- constant collections (BatchNorm with running averages) -------------------------


class EvalBatchNorm(nn.Module):
    """Dense, BatchNorm on its running averages, ReLU site; a dense readout site."""

    train: bool = False

    @nn.compact
    def __call__(self, x):
        h = nn.BatchNorm(use_running_average=not self.train)(nn.Dense(8)(x))
        h = gg.site(self, "hidden", h, act=nn.relu)
        return gg.site(self, "logits", nn.Dense(NUM_CLASSES)(h))


def _batchnorm_problem():
    batch = {
        "image": jax.random.normal(jax.random.key(0), (8, 6)),
        "label": jnp.arange(8) % NUM_CLASSES,
    }
    variables = EvalBatchNorm().init(jax.random.key(1), batch["image"])
    stats = variables["batch_stats"]["BatchNorm_0"]
    variables["batch_stats"]["BatchNorm_0"] = {  # statistics that change the output
        "mean": jax.random.normal(jax.random.key(2), stats["mean"].shape),
        "var": jnp.exp(jax.random.normal(jax.random.key(3), stats["var"].shape)),
    }
    return EvalBatchNorm(), variables, batch


@pytest.mark.slow
def test_constant_collections_pass_through_and_get_no_estimate():
    model, variables, batch = _batchnorm_problem()

    def objective(p):
        out = model.apply({**variables, "params": p}, batch["image"])
        return jnp.mean(gg.per_example_loss(out, batch["label"]))

    exact = gg.get_estimator("backprop", model)(variables, batch, None)
    assert jax.tree.structure(exact) == jax.tree.structure(variables)
    np.testing.assert_allclose(
        flat(exact["params"]), flat(jax.grad(objective)(variables["params"]))
    )
    for method in ("backprop", "directional", "wt", "activation_perturbation"):
        grads = gg.get_estimator(method, model)(variables, batch, jax.random.key(0))
        assert not np.any(flat(grads["batch_stats"]))
    estimate = gg.get_estimator("activation_perturbation", model)
    assert_mean_matches(mc_samples(estimate, variables, batch), flat(exact))
    # A trainable mask shaped like {"params": ...} leaves the statistics frozen too.
    only_dense = {
        "params": jax.tree_util.tree_map_with_path(
            lambda path, _: path[0].key == "Dense_0", variables["params"]
        )
    }
    grads = gg.get_estimator("wt", model, trainable=only_dense)(
        variables, batch, jax.random.key(0)
    )
    assert np.any(flat(grads["params"]["Dense_0"]))
    assert not np.any(flat(grads["params"]["Dense_1"]))
    assert not np.any(flat(grads["batch_stats"]))


def test_a_layer_that_updates_its_state_is_refused_naming_the_collection():
    _, variables, batch = _batchnorm_problem()
    with pytest.raises(ValueError, match=r"updates 'batch_stats'.*running averages"):
        gg.get_estimator("wt", EvalBatchNorm(train=True))(
            variables, batch, jax.random.key(0)
        )


# --- input errors name their real cause ------------------------------------------------


def test_input_errors_keep_their_cause_and_only_shape_errors_blame_the_batch():
    model, variables, batch = _batchnorm_problem()
    # A missing collection: flax's own error, with a note naming the call.
    with pytest.raises(Exception, match="batch_stats") as caught:
        gg.get_estimator("wt", model)(
            {"params": variables["params"]}, batch, jax.random.key(0)
        )
    assert "does not accept" not in str(caught.value)
    assert any("collections ['params']" in n for n in caught.value.__notes__)
    # Params of another model: flax's error about the missing parameter.
    other = gg.models.MLP(depth=2, width=8, num_classes=NUM_CLASSES)
    with pytest.raises(Exception, match="Could not find parameter") as caught:
        gg.get_estimator("wt", model)(
            other.init(jax.random.key(0), batch["image"]), batch, jax.random.key(0)
        )
    assert "does not accept" not in str(caught.value)
    # A batch whose features do not fit the first layer is a shape error.
    narrow = {**batch, "image": batch["image"][:, :5]}
    with pytest.raises(
        ValueError, match=r"does not accept batch\[\"image\"\] of shape"
    ):
        gg.get_estimator("wt", model)(variables, narrow, jax.random.key(0))


# --- a submodule called twice ----------------------------------------------------------


class SharedDense(nn.Module):
    """One dense layer applied twice (shared weights), then a readout."""

    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(8, name="shared")
        h = nn.relu(nn.Dense(8, name="embed")(x))
        h = nn.relu(shared(h))
        h = nn.relu(shared(h))
        return nn.Dense(NUM_CLASSES, name="readout")(h)


class SharedDenseMarked(nn.Module):
    """The same network with each call of the shared layer marked explicitly."""

    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(8, name="shared")
        h = gg.site(self, "embed", nn.Dense(8, name="embed")(x), act=nn.relu)
        h = gg.site(self, "first", shared(h), act=nn.relu)
        h = gg.site(self, "second", shared(h), act=nn.relu)
        return gg.site(self, "readout", nn.Dense(NUM_CLASSES, name="readout")(h))


def test_marking_a_shared_submodule_marks_every_call():
    batch = {
        "image": jax.random.normal(jax.random.key(0), (8, 8)),
        "label": jnp.arange(8) % NUM_CLASSES,
    }
    marked = gg.mark_outputs(
        SharedDense(), {"embed": nn.relu, "shared": nn.relu, "readout": None}
    )
    params = marked.init(jax.random.key(1), batch["image"])
    found = gg.structure(marked, params, batch)
    assert [s.path for s in found.sites] == [
        "embed/out",
        "shared/out",
        "shared/out_1",
        "readout/out",
    ]
    for method in ("wt", "activation_perturbation", "mixing"):
        a = gg.get_estimator(method, marked)(params, batch, jax.random.key(2))
        b = gg.get_estimator(method, SharedDenseMarked())(
            params, batch, jax.random.key(2)
        )
        np.testing.assert_allclose(flat(a), flat(b), rtol=1e-6, atol=1e-7)


# --- weight-space methods on any model -----------------------------------------------


@pytest.mark.slow
def test_weight_space_methods_need_no_sites():
    model = nn.Dense(3)
    batch = {
        "image": jax.random.normal(jax.random.key(0), (3, 4)),
        "label": jnp.array([0, 1, 2]),
    }
    params = model.init(jax.random.key(1), batch["image"])
    exact = gg.get_estimator("backprop", model)(params, batch, None)
    estimate = gg.get_estimator("directional", model)
    assert_mean_matches(mc_samples(estimate, params, batch), flat(exact))
    oracle = gg.get_estimator("oracle_angle", model, cosine=0.25)
    assert cosine(oracle(params, batch, jax.random.key(3)), exact) == pytest.approx(
        0.25, abs=1e-5
    )


def test_oracle_angle_sets_the_angle_per_stage_under_local_losses():
    model, params, batch, problem = ZOO["two_block_local"]()
    exact = gg.get_estimator("backprop", model, **problem)(params, batch, None)
    guess = gg.get_estimator("oracle_angle", model, cosine=0.1, **problem)(
        params, batch, jax.random.key(0)
    )
    # Block 0 and its head reach head_0 only; block 1 and the readout, the readout.
    found = gg.structure(model, params, batch, **problem)
    reached = losses_reached(found)
    leaves_e, leaves_g = jax.tree.leaves(exact), jax.tree.leaves(guess)
    for stage in sorted(set(reached)):
        pick = [i for i, r in enumerate(reached) if r == stage]
        e = jnp.concatenate([leaves_e[i].ravel() for i in pick])
        g = jnp.concatenate([leaves_g[i].ravel() for i in pick])
        assert float(
            e @ g / (jnp.linalg.norm(e) * jnp.linalg.norm(g))
        ) == pytest.approx(0.1, abs=1e-5)
    assert sorted(set(reached)) == [("head_0",), ("readout",)]
    assert cosine(guess, exact) == pytest.approx(0.1, abs=1e-5)


# --- small ones ---------------------------------------------------------------------------


def test_an_activation_given_by_name_is_refused_when_marked():
    class Named(nn.Module):
        @nn.compact
        def __call__(self, x):
            return gg.site(self, "h", nn.Dense(3)(x), act="relu")

    with pytest.raises(TypeError, match=r"act must be .*nn\.relu.*got 'relu'"):
        Named().init(jax.random.key(0), jnp.ones((2, 4)))
    with pytest.raises(TypeError, match="act must be"):
        gg.mark_outputs(nn.Dense(3), {"": "relu"})


def test_model_rngs_reproduce_the_dropout_masks_of_an_estimate():
    batch = {
        "image": jax.random.normal(jax.random.key(0), (4, 6)),
        "label": jnp.array([0, 1, 2, 3]),
    }
    model = DropoutMLP()
    params = model.init(
        {"params": jax.random.key(1), "dropout": jax.random.key(2)}, batch["image"]
    )
    key = jax.random.key(3)

    def objective(p):
        out = model.apply(p, batch["image"], rngs=gg.model_rngs(key))
        return jnp.mean(gg.per_example_loss(out, batch["label"]))

    exact = gg.get_estimator("backprop", model)(params, batch, key)
    np.testing.assert_allclose(
        flat(exact), flat(jax.grad(objective)(params)), rtol=1e-6
    )
    other = gg.get_estimator("backprop", model)(params, batch, jax.random.key(4))
    assert not np.allclose(flat(exact), flat(other))  # the mask follows the key


# --- the engine: one forward pass against a tangent pass plus a cut VJP -------------


def _tiny_mixer():
    model = gg.models.local_mixer("tiny", NUM_CLASSES)
    batch = {
        "image": jax.random.normal(jax.random.key(9), (3, 8, 8, 3)),
        "label": jnp.arange(3) % NUM_CLASSES,
    }
    params = model.init(jax.random.key(0), batch["image"], batch["label"])
    return model, params, batch, gg.models.local_mixer_args()


@pytest.mark.parametrize(
    "name", ["mlp", "residual", "cnn", "two_block_local", "patch_copies", "mixer"]
)
def test_one_forward_engine_equals_tangent_pass_plus_cut_vjp(name):
    """One linearisation of the cut forward, its tangents rebuilt hop by hop
    and the update from its transpose, gives the estimates of a separate
    forward-mode pass plus a VJP of the cut forward, for the same guesses.

    With every parameter marked trainable explicitly, joint mode takes the
    two-pass path (a recomputed tangent pass and a cut VJP); without
    ``trainable``, the one-forward path. Residual streams (several sites feed
    one), convolutions, local losses and per-copy losses (the LocalMixer's
    custom-JVP replicated loss) each route tangents differently between
    sites.
    """
    model, params, batch, problem = _tiny_mixer() if name == "mixer" else ZOO[name]()
    everything = lambda variables: jax.tree.map(lambda _: True, variables)
    key = jax.random.key(5)
    for method, options in (
        ("activation_perturbation", {"mask": True}),
        ("wt", {}),
        ("downstream", {"depth": 2}),
    ):
        one = gg.get_estimator(method, model, mode="joint", **options, **problem)
        two = gg.get_estimator(
            method, model, mode="joint", trainable=everything, **options, **problem
        )
        a, b = jax.jit(one)(params, batch, key), jax.jit(two)(params, batch, key)
        flat_a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)])
        flat_b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)])
        assert np.abs(flat_b).max() > 0, method
        np.testing.assert_allclose(
            flat_a, flat_b, rtol=1e-5, atol=1e-6 * np.abs(flat_b).max(), err_msg=method
        )


# --- residual streams: one ordered pass over the cut forward's linear map ------------


def _no_sweep(monkeypatch):
    """Make the engine rebuild tangents hop by hop (or fall back to two passes)."""
    monkeypatch.setattr(engine._Hops, "_sweep_order", lambda self: None)


@pytest.mark.parametrize("mode", gg.MODES)
def test_one_ordered_pass_equals_hop_by_hop_on_a_residual_stream(mode, monkeypatch):
    """A residual stream carries every site's tangent past all later sites:
    the single pass that feeds each site the tangent arriving at it gives the
    estimates of the hop-by-hop rebuild (and of the two-pass fallback)."""
    model = ResidualMLP(width=NUM_CLASSES * 2, depth=3)
    batch = {
        "image": jax.random.normal(jax.random.key(0), (NUM_CLASSES * 2, 6)),
        "label": jnp.arange(NUM_CLASSES * 2) % NUM_CLASSES,
    }
    params = model.init(jax.random.key(1), batch["image"])
    key = jax.random.key(2)
    methods = (("activation_perturbation", {}), ("wt", {}), ("mixing", {}))
    swept = [
        flat(jax.jit(gg.get_estimator(m, model, mode=mode, **o))(params, batch, key))
        for m, o in methods
    ]
    _no_sweep(monkeypatch)
    for (method, options), a in zip(methods, swept):
        b = flat(
            jax.jit(gg.get_estimator(method, model, mode=mode, **options))(
                params, batch, key
            )
        )
        assert np.abs(b).max() > 0, method
        assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(b), method


def _flops(estimator, *args):
    cost = jax.jit(estimator).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.slow
def test_joint_guesses_on_a_residual_stream_cost_one_tangent_pass(monkeypatch):
    """Joint activation perturbation needs a forward, one tangent pass, the
    sites' local weight gradients and, on a pre-norm residual stream, one
    input gradient per block (the dense map after the norm): about 3.5
    forwards' products against backprop's 3. XLA's counted FLOPs (not
    timings) stay under 1.3x backprop's; tangents rebuilt hop by hop cross
    every later block once per site, and the two-pass fallback runs a second
    forward: both land above 1.5x."""
    width = 128
    model = ResidualMLP(width=width, depth=8)
    batch = {
        "image": jax.random.normal(jax.random.key(0), (width, width)),
        "label": jnp.arange(width) % NUM_CLASSES,
    }
    params = model.init(jax.random.key(1), batch["image"])
    args = (params, batch, jax.random.key(2))
    backprop = _flops(gg.get_estimator("backprop", model), *args)
    joint = lambda: gg.get_estimator("activation_perturbation", model, mode="joint")
    assert _flops(joint(), *args) <= 1.3 * backprop
    _no_sweep(monkeypatch)
    assert _flops(joint(), *args) > 1.5 * backprop
