"""LocalMixer: parameter counts, the replicated loss, block isolation, and its estimators' math.

Ren et al.'s activity-perturbation update is written out here from their
formulas (derivative x noise x ReLU mask, layer norm through its local VJP,
weight gradients of each linear map, exact heads and readout), with a forward
pass written by hand, and compared with the estimator.
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_mean_matches, flat, wt_expectation

import guessgrad as gg
from guessgrad._src.localmixer import layer_norm, patchify

NUM_CLASSES = 3
SMALL = {"patches": 2, "blocks": 2, "channels": 8, "groups": 2}


def small(objective="local_greedy", dtype=jnp.float32, batch_size=4, **fields):
    model = gg.models.LocalMixer(
        num_classes=NUM_CLASSES, objective=objective, **(SMALL | fields)
    )
    image_key, label_key, init_key = jax.random.split(jax.random.key(0), 3)
    batch = {
        "image": jax.random.normal(image_key, (batch_size, 4, 4, 1), dtype),
        "label": jax.random.randint(label_key, (batch_size,), 0, NUM_CLASSES),
    }
    params = model.init(init_key, batch["image"])
    # Non-zero readout (it starts at zero) and biases, so every term is exercised.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [
        (x + 0.3 * jax.random.normal(k, x.shape)).astype(dtype)
        for k, x in zip(keys, leaves)
    ]
    return model, jax.tree.unflatten(tree, leaves), batch


def estimate(name, model, params, batch, key=None, **options):
    fn = gg.get_estimator(name, model, **gg.models.local_mixer_args(), **options)
    return fn(params, batch, jax.random.key(0) if key is None else key)


@pytest.mark.parametrize(
    "config, shape, count",
    [
        ("S/1/1", (28, 28, 1), 271_892),
        ("M/1/16", (28, 28, 1), 429_076),
        ("M/8/16", (32, 32, 3), 918_770),
    ],
)
def test_named_configs_have_the_reference_parameter_counts(config, shape, count):
    model = gg.models.local_mixer(config, 10)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + shape))
    assert sum(x.size for x in jax.tree.leaves(params)) == count


def test_patchify_cuts_row_major_patches():
    images = jnp.arange(2 * 4 * 6 * 3).reshape(2, 4, 6, 3)
    patches = patchify(images, 2)  # 2x3-pixel patches, 4 of them
    assert patches.shape == (2, 4, 18)
    np.testing.assert_array_equal(patches[1, 1], images[1, :2, 3:].reshape(-1))
    np.testing.assert_array_equal(patches[0, 2], images[0, 2:, :3].reshape(-1))


@pytest.mark.slow
def test_replicated_loss_is_the_cross_entropy_and_each_copy_sees_only_its_patch_and_group():
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(2), 5)
        b, p, g, c, k = 3, 4, 2, 5, 6
        x = jax.random.normal(keys[0], (b, p, g, c), jnp.float64)
        w = jax.random.normal(keys[1], (g * c, k), jnp.float64)
        bias = jax.random.normal(keys[2], (k,), jnp.float64)
        labels = jnp.array([0, 5, 2])
        dx = jax.random.normal(keys[3], x.shape, jnp.float64)
        dw = jax.random.normal(keys[4], w.shape, jnp.float64)

        def ce(x, w, bias):
            logits = x.mean(1).reshape(b, -1) @ w + bias
            return -jax.nn.log_softmax(logits)[jnp.arange(b), labels]

        value = gg.models.replicated_cross_entropy(x, w, bias, labels)
        assert value.shape == (b, p, g)
        np.testing.assert_allclose(
            value, jnp.broadcast_to(ce(x, w, bias)[:, None, None], value.shape)
        )
        # The mean over the copies has the cross-entropy's gradient (reverse mode
        # transposes the copies' forward rule).
        mean = lambda *a: gg.models.replicated_cross_entropy(*a, labels).mean((1, 2))
        for argnum in range(3):
            np.testing.assert_allclose(
                jax.jacrev(lambda *a: mean(*a).sum(), argnum)(x, w, bias),
                jax.jacrev(lambda *a: ce(*a).sum(), argnum)(x, w, bias),
                rtol=1e-12,
            )

        # Copy (p, g), as Ren et al. define it: the head sees patch p's group g,
        # the rest of the average is a constant.
        def copy_loss(x, w, pi, gi):
            mine = jnp.zeros_like(x).at[:, pi, gi].set(x[:, pi, gi])
            rest = jax.lax.stop_gradient(x - mine)
            logits = (mine + rest).mean(1).reshape(b, -1) @ w + bias
            return -jax.nn.log_softmax(logits)[jnp.arange(b), labels]

        tangent = jax.jvp(
            lambda x, w: gg.models.replicated_cross_entropy(x, w, bias, labels),
            (x, w),
            (dx, dw),
        )[1]
        for pi in range(p):
            for gi in range(g):
                ren = jax.jvp(
                    lambda x, pi=pi, gi=gi: copy_loss(x, w, pi, gi), (x,), (dx,)
                )[1]
                head = jax.jvp(lambda w: ce(x, w, bias), (w,), (dw,))[1]
                # Scaled by the number of copies: their mean is the loss's derivative.
                np.testing.assert_allclose(
                    tangent[:, pi, gi], p * g * ren + head, rtol=1e-10
                )


def _block_alone(model, params, batch, k):
    """Block k's head cross-entropy from block k's parameters alone (its input a constant)."""
    x = patchify(batch["image"], model.patches)
    for j in range(k):
        block = _block(model, j)
        x = block.apply({"params": params["params"][f"block_{j}"]}, x)
        x = x.reshape(x.shape[0], x.shape[1], -1)
    x = jax.lax.stop_gradient(x)

    def loss(block_params, head_params):
        out = _block(model, k).apply({"params": block_params}, x)
        pooled = layer_norm(out).mean(1).reshape(out.shape[0], -1)
        logits = pooled @ head_params["kernel"] + head_params["bias"]
        labels = batch["label"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels])

    return jax.grad(loss, argnums=(0, 1))(
        params["params"][f"block_{k}"], params["params"][f"head_{k}"]
    )


def _block(model, k):
    return gg.models.MixerBlock(model.channels, model.groups, first=k == 0)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["local", "local_greedy"])
def test_local_backprop_of_each_block_is_backprop_of_that_block_alone(objective):
    model, params, batch = small(objective)
    grads = estimate("backprop", model, params, batch)["params"]
    for k in range(model.blocks):
        block_grads, head_grads = _block_alone(model, params, batch, k)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7),
            (grads[f"block_{k}"], grads[f"head_{k}"]),
            (block_grads, head_grads),
        )
    # Under backprop the copies change nothing: LG-BP's gradient is L-BP's.
    if objective == "local_greedy":
        plain = estimate("backprop", small("local")[0], params, batch)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7),
            estimate("backprop", model, params, batch),
            plain,
        )


@pytest.mark.slow
def test_no_tangent_crosses_a_block_boundary():
    model, params, batch = small()
    found = gg.structure(model, params, batch, **gg.models.local_mixer_args())
    for s in found.sites:
        block = s.path.split("/")[0]
        assert s.feeds == (f"head_{block.split('_')[1]}",), s
    layouts = {s.path: s.layouts[0] for s in found.sites}
    assert (
        layouts["block_1/token_mixing"] == "copies[:1]"
    )  # mixes the groups of a patch
    assert layouts["block_1/channel"] == layouts["block_1/grouped"] == "copies"

    # Perturbing block 0's parameters moves block 0's loss and nothing after it.
    tangent = jax.tree.map(jnp.ones_like, params)
    tangent["params"] = {
        k: v if k == "block_0" else jax.tree.map(jnp.zeros_like, v)
        for k, v in tangent["params"].items()
    }
    losses = lambda p: model.apply(p, batch["image"], batch["label"])
    moved = jax.jvp(losses, (params,), (tangent,))[1]
    assert np.abs(moved["head_0"]).max() > 0
    np.testing.assert_array_equal(moved["head_1"], 0.0)
    np.testing.assert_array_equal(moved["readout"], 0.0)


@pytest.mark.slow
def test_global_objective_is_ordinary_backprop_of_the_readout():
    model, params, batch = small("global")
    grads = estimate("backprop", model, params, batch)

    def readout_loss(p):
        logits = model.apply(p, batch["image"])
        labels = batch["label"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels])

    expected = jax.grad(readout_loss)(params)
    for k in range(model.blocks):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7),
            grads["params"][f"block_{k}"],
            expected["params"][f"block_{k}"],
        )
    found = gg.structure(model, params, batch, **gg.models.local_mixer_args())
    assert all(s.feeds == ("readout",) for s in found.sites)
    assert found.site("block_1/grouped").target == "readout"


@pytest.mark.slow
@pytest.mark.parametrize("mask", [False, True])
def test_activity_perturbation_is_unbiased_for_local_backprop(mask):
    model, params, batch = small()
    fn = gg.get_estimator(
        "activation_perturbation", model, mask=mask, **gg.models.local_mixer_args()
    )
    keys = jax.random.split(jax.random.key(3), 20_000)
    samples = jax.jit(jax.vmap(lambda k: flat(fn(params, batch, k))))(keys)
    assert_mean_matches(samples, flat(estimate("backprop", model, params, batch)))


@pytest.mark.slow
def test_wt_matches_its_closed_form_expectation():
    """E[g_l] = J_l^T J_l dl/ds_l per example, J_l the Jacobian from site l to its target;
    heads and the readout get their exact local gradients."""
    model, params, batch = small("local", batch_size=2)
    expected = wt_expectation(model, params, batch, **gg.models.local_mixer_args())
    fn = gg.get_estimator(
        "wt", model, normalize=False, mode="per_layer", **gg.models.local_mixer_args()
    )
    keys = jax.random.split(jax.random.key(5), 20_000)
    samples = jax.jit(jax.vmap(lambda k: flat(fn(params, batch, k))))(keys)
    assert_mean_matches(samples, flat(expected))


@pytest.mark.slow
def test_ren_activity_perturbation_update_from_the_formulas():
    with jax.enable_x64(True):
        model, params, batch = small(dtype=jnp.float64)
        key = jax.random.key(9)
        got = estimate(
            "activation_perturbation",
            model,
            params,
            batch,
            key,
            mask=True,
            normalize=False,
            mode="joint",
        )
        expected = _ren_update(params["params"], batch, key, model)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12),
            got["params"],
            expected,
        )


def _ren_update(p, batch, key, model):
    """Ren et al.'s LG-FG-A update, from their formulas, for a LocalMixer with every layer norm."""
    B, G, C = batch["image"].shape[0], model.groups, model.channels
    labels = batch["label"]
    relu = jax.nn.relu

    def dense(q, x):
        return x @ q["kernel"] + q["bias"]

    # Site maps (linear map, then layer norm): input -> pre-activation z.
    maps = {
        "token_mixing": lambda q, x: jnp.swapaxes(
            layer_norm(dense(q["token_mixing"], jnp.swapaxes(x, 1, 2)), axis=1), 1, 2
        ),
        "channel": lambda q, x: layer_norm(dense(q["channel"], x)),
        "grouped": lambda q, x: layer_norm(
            jnp.einsum("bpgc,gcd->bpgd", x, q["grouped_kernel"]) + q["grouped_bias"]
        ),
    }

    def forward(noise):
        """Per block: (inputs of each site map, z + noise + residual, copies' losses)."""
        x = patchify(batch["image"], model.patches)
        record, losses, index = [], {}, 0
        for k in range(model.blocks):
            q = p[f"block_{k}"]
            inputs, pres = {}, {}
            h = layer_norm(x)
            names = (
                ["channel", "grouped"]
                if k == 0
                else ["token_mixing", "channel", "grouped"]
            )
            for name in names:
                if name == "grouped":
                    h = layer_norm(h.reshape(B, h.shape[1], G, -1))
                elif name == "channel" and k > 0:
                    h = layer_norm(h)
                inputs[name] = h
                z = maps[name](q, h) + noise[index]
                if name == "grouped" and k > 0:
                    z = z + x.reshape(z.shape)
                pres[name] = z
                h = relu(z)
                index += 1
            record.append((inputs, pres))
            features = layer_norm(h)  # [B, P, G, C/G]
            # Copy (p, g): the head sees only patch p's group g (Ren's custom JVP).
            head = p[f"head_{k}"]
            w = head["kernel"].reshape(G, C // G, -1)
            pooled = features.mean(1).reshape(B, -1)
            logits = pooled @ head["kernel"] + head["bias"]
            own = jnp.einsum("bpgc,gck->bpgk", features, w) / features.shape[1]
            copy_logits = own + jax.lax.stop_gradient(logits[:, None, None] - own)
            log_probs = jax.nn.log_softmax(copy_logits)
            losses[k] = (
                -jnp.take_along_axis(log_probs, labels[:, None, None, None], axis=-1)[
                    ..., 0
                ]
                / B
            )  # Ren divides by the batch size only
            x = jax.lax.stop_gradient(h.reshape(B, h.shape[1], -1))
        return losses, record, x

    shapes = []
    x = patchify(batch["image"], model.patches)
    P = x.shape[1]
    for k in range(model.blocks):
        shapes += ([(B, P, C)] if k > 0 else []) + [(B, P, C), (B, P, G, C // G)]
    # The estimator's noise: N(0, I) at site i from fold_in(key, i).
    noise = [
        jax.random.normal(jax.random.fold_in(key, i), s, jnp.float64)
        for i, s in enumerate(shapes)
    ]
    zeros = [jnp.zeros_like(n) for n in noise]
    (_, record, last), (g, _, _) = jax.jvp(forward, (zeros,), (noise,))

    update, index = {}, 0
    for k in range(model.blocks):
        inputs, pres = record[k]
        q = p[f"block_{k}"]
        grads = jax.tree.map(jnp.zeros_like, q)
        names = (
            ["channel", "grouped"] if k == 0 else ["token_mixing", "channel", "grouped"]
        )
        for name in names:  # forward order (the pytree came back with sorted keys)
            dz, z = noise[index], pres[name]
            mask = (z > 0).astype(z.dtype)
            if name == "token_mixing":
                g_ = jnp.sum(g[k], axis=-1)[:, :, None]  # summed over groups: [B, P, 1]
                grad_z = g_ * dz * mask
            elif name == "channel":
                grad_z = (g[k][..., None] * (dz * mask).reshape(B, P, G, -1)).reshape(
                    dz.shape
                )
            else:
                grad_z = g[k][..., None] * dz * mask
            # Layer norm and the linear map by their local VJP (input fixed).
            _, vjp = jax.vjp(lambda q, f=maps[name], x=inputs[name]: f(q, x), q)
            grads = jax.tree.map(jnp.add, grads, vjp(grad_z)[0])
            index += 1
        update[f"block_{k}"] = grads

    def head_loss(head, k):
        out = record[k][1]["grouped"]
        pooled = layer_norm(relu(out)).mean(1).reshape(B, -1)
        logits = pooled @ head["kernel"] + head["bias"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(B), labels])

    for k in range(model.blocks):
        update[f"head_{k}"] = jax.grad(head_loss)(p[f"head_{k}"], k)

    def readout_loss(readout):
        logits = layer_norm(last.mean(1)) @ readout["kernel"] + readout["bias"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(B), labels])

    update["readout"] = jax.grad(readout_loss)(p["readout"])
    return update


@pytest.mark.slow
def test_every_estimator_runs_jitted_on_the_mixer():
    model, params, batch = small()
    for name in gg.ESTIMATORS:
        options = {"wperp": {"rank": 2}, "wperp_ns": {"krylov_steps": 1}}.get(name, {})
        fn = jax.jit(
            gg.get_estimator(
                name, model, **gg.models.local_mixer_args(), **options, has_aux=True
            )
        )
        grads, metrics = fn(params, batch, jax.random.key(1))
        assert jax.tree.structure(grads) == jax.tree.structure(params), name
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(grads)), name
        assert np.isfinite(metrics["loss"]), name
        for k in range(model.blocks):
            assert (
                np.abs(grads["params"][f"block_{k}"]["channel"]["kernel"]).max() > 0
            ), name


def test_bad_configurations_name_the_valid_choices():
    with pytest.raises(ValueError, match="global, local, local_greedy"):
        gg.models.LocalMixer(num_classes=3, objective="greedy").init(
            jax.random.key(0), jnp.zeros((1, 4, 4, 1))
        )
    with pytest.raises(ValueError, match="must divide channels"):
        gg.models.local_mixer("tiny", 10, groups=5)
    with pytest.raises(ValueError, match="tiny, S/1/1, M/1/16, M/8/16"):
        gg.models.local_mixer("L/32/64", 10)
    with pytest.raises(ValueError, match="divisible by 4"):
        gg.models.local_mixer("tiny", 10).init(
            jax.random.key(0), jnp.zeros((1, 30, 30, 1))
        )


@pytest.mark.slow
def test_directional_takes_only_the_losses_each_parameter_reaches():
    """LG-FG-W block-wise: (grad L_k . v) v for block k, with one v over every parameter."""
    model, params, batch = small()
    key = jax.random.key(4)
    got = estimate("directional", model, params, batch, key)
    flat_params, unravel = jax.flatten_util.ravel_pytree(params)
    tangent = unravel(jax.random.normal(key, flat_params.shape))

    def mean_losses(p):
        losses = model.apply(p, batch["image"], batch["label"])
        return {name: jnp.mean(v) for name, v in losses.items()}

    derivative = jax.jvp(mean_losses, (params,), (tangent,))[1]
    for name, leaves in tangent["params"].items():
        loss = name.replace(
            "block_", "head_"
        )  # a block and its head feed its head's loss
        jax.tree.map(
            lambda a, b, d=derivative[loss]: np.testing.assert_allclose(
                a, d * b, rtol=1e-5, atol=1e-7
            ),
            got["params"][name],
            leaves,
        )


def test_directional_with_exact_heads_perturbs_only_the_blocks():
    """exact_heads=True (Ren et al.'s LG-FG-W): the heads and the readout take
    backprop's gradient; block k takes (grad L_k . v) v, v drawn over the blocks only."""
    model, params, batch = small()
    key = jax.random.key(4)
    got = estimate("directional", model, params, batch, key, exact_heads=True)
    exact = estimate("backprop", model, params, batch)
    blocks = {n: p for n, p in params["params"].items() if n.startswith("block_")}
    assert blocks and len(blocks) < len(params["params"])
    flat_blocks, unravel = jax.flatten_util.ravel_pytree(blocks)
    tangent = unravel(jax.random.normal(key, flat_blocks.shape))

    def mean_losses(b):
        p = {"params": {**params["params"], **b}}
        losses = model.apply(p, batch["image"], batch["label"])
        return {name: jnp.mean(v) for name, v in losses.items()}

    derivative = jax.jvp(mean_losses, (blocks,), (tangent,))[1]
    for name, leaves in got["params"].items():
        if name in blocks:
            d = derivative[name.replace("block_", "head_")]
            want = jax.tree.map(lambda v, d=d: d * v, tangent[name])
        else:
            want = exact["params"][name]
        np.testing.assert_allclose(flat(leaves), flat(want), rtol=1e-5, atol=1e-7)
