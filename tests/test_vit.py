"""ViT with prompt tokens: the original release's layout, its .npz checkpoints, prompt-only estimators."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_mean_matches, flat

import guessgrad as gg
from guessgrad._src import engine
from guessgrad._src import rules as rules_lib
from guessgrad._src.problem import Problem
from guessgrad.models import (
    VIT_CONFIGS,
    ViT,
    load_vit_npz,
    prompt_mask,
    save_vit_npz,
    vit,
)

NUM_CLASSES = 3
MICRO = {
    "patch_size": 4,
    "hidden_size": 8,
    "num_layers": 2,
    "num_heads": 2,
    "mlp_dim": 16,
}


@functools.cache
def micro(num_prompts=2, prompt_depth="shallow", seed=0):
    """A two-block ViT on 8x8x3 images (a 2x2 patch grid), its params and a batch of 3."""
    model = ViT(
        NUM_CLASSES, num_prompts=num_prompts, prompt_depth=prompt_depth, **MICRO
    )
    image_key, label_key, init_key = jax.random.split(jax.random.key(seed), 3)
    batch = {
        "image": jax.random.normal(image_key, (3, 8, 8, 3)),
        "label": jax.random.randint(label_key, (3,), 0, NUM_CLASSES),
    }
    # Initialised on one image, as load_vit_npz does: the same shapes, compiled once.
    return model, model.init(init_key, batch["image"][:1]), batch


def flat_names(params):
    return {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params["params"])
    }


# --- the model ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, count",
    [
        ("Ti/16", 5_717_416),
        ("S/16", 22_050_664),
        ("B/16", 86_567_656),
        ("B/32", 88_224_232),
    ],
)
def test_named_sizes_have_the_reference_parameter_counts(config, count):
    params = jax.eval_shape(
        vit(config, 1000).init, jax.random.key(0), jnp.zeros((1, 224, 224, 3))
    )
    assert sum(x.size for x in jax.tree.leaves(params)) == count


def test_parameter_names_and_shapes_follow_the_original_layout():
    model = vit("B/16", 10, num_prompts=5)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    names = {k: v.shape for k, v in flat_names(shapes).items()}
    block = "Transformer/encoderblock_11"
    attention = f"{block}/MultiHeadDotProductAttention_1"
    expected = {
        "embedding/kernel": (16, 16, 3, 768),
        "embedding/bias": (768,),
        "cls": (1, 1, 768),
        "prompts": (5, 768),
        "Transformer/posembed_input/pos_embedding": (1, 197, 768),
        f"{block}/LayerNorm_0/scale": (768,),
        f"{attention}/query/kernel": (768, 12, 64),
        f"{attention}/key/bias": (12, 64),
        f"{attention}/value/kernel": (768, 12, 64),
        f"{attention}/out/kernel": (12, 64, 768),
        f"{attention}/out/bias": (768,),
        f"{block}/LayerNorm_2/bias": (768,),
        f"{block}/MlpBlock_3/Dense_0/kernel": (768, 3072),
        f"{block}/MlpBlock_3/Dense_1/kernel": (3072, 768),
        "Transformer/encoder_norm/scale": (768,),
        "head/kernel": (768, 10),
        "head/bias": (10,),
    }
    assert {k: names[k] for k in expected} == expected
    assert not any("encoderblock_12" in k for k in names)
    deep = vit("tiny", 10, num_prompts=3, prompt_depth="deep")
    shapes = jax.eval_shape(deep.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert shapes["params"]["prompts"].shape == (2, 3, 32)
    assert set(VIT_CONFIGS) >= {"tiny", "S/16", "B/16"}


class ReferenceViT(nn.Module):
    """The original release's forward written with flax's own attention (no prompts, no dropout)."""

    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        x = nn.Conv(self.hidden_size, (p, p), (p, p), "VALID", name="embedding")(x)
        x = x.reshape(x.shape[0], -1, self.hidden_size)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden_size))
        x = jnp.concatenate([jnp.tile(cls, (x.shape[0], 1, 1)), x], 1)
        return _ReferenceEncoder(
            self.num_layers, self.num_heads, self.mlp_dim, name="Transformer"
        )(x)


class _ReferenceEncoder(nn.Module):
    num_layers: int
    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        x = x + _ReferencePos(name="posembed_input")(x)
        for i in range(self.num_layers):
            x = _ReferenceBlock(self.num_heads, self.mlp_dim, name=f"encoderblock_{i}")(
                x
            )
        return nn.LayerNorm(name="encoder_norm")(x)


class _ReferencePos(nn.Module):
    @nn.compact
    def __call__(self, x):
        return self.param(
            "pos_embedding", nn.initializers.normal(0.02), (1,) + x.shape[1:]
        )


class _ReferenceBlock(nn.Module):
    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(name="LayerNorm_0")(x)
        x = x + nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, name="MultiHeadDotProductAttention_1"
        )(y)
        y = nn.LayerNorm(name="LayerNorm_2")(x)
        y = nn.Dense(self.mlp_dim, name="Dense_0")(y)
        y = nn.Dense(x.shape[-1], name="Dense_1")(nn.gelu(y))
        return x + y


@pytest.mark.slow
def test_without_prompts_it_is_the_plain_vit_of_the_original_release():
    model, params, batch = micro(num_prompts=0)
    assert "prompts" not in params["params"]
    reference = ReferenceViT(**MICRO)
    ref_params = dict(params["params"])
    transformer = {
        k: (
            {
                **v,
                "Dense_0": v["MlpBlock_3"]["Dense_0"],
                "Dense_1": v["MlpBlock_3"]["Dense_1"],
            }
            if k.startswith("encoderblock")
            else v
        )
        for k, v in ref_params["Transformer"].items()
    }
    for block in transformer.values():
        block.pop("MlpBlock_3", None)
    ref_params["Transformer"] = transformer
    head = ref_params.pop("head")
    encoded = reference.apply({"params": ref_params}, batch["image"])
    expected = encoded[:, 0] @ head["kernel"] + head["bias"]
    np.testing.assert_allclose(
        model.apply(params, batch["image"]), expected, rtol=1e-5, atol=1e-6
    )


@pytest.mark.slow
@pytest.mark.parametrize("depth", ["shallow", "deep"])
def test_prompts_change_the_output(depth):
    model, params, batch = micro(prompt_depth=depth)
    out = model.apply(params, batch["image"])
    prompts = params["params"]["prompts"]
    # Deep: only the last block's prompts moved; shallow: the last prompt. (Not
    # by a constant across the features: the layer norms would remove it.)
    moved = prompts.at[-1].add(jax.random.normal(jax.random.key(9), prompts.shape[1:]))
    other = {**params, "params": {**params["params"], "prompts": moved}}
    assert float(jnp.max(jnp.abs(model.apply(other, batch["image"]) - out))) > 1e-4
    # Prompts are extra tokens: without them the same backbone gives another output.
    plain = ViT(NUM_CLASSES, num_prompts=0, **MICRO)
    backbone = {"params": {k: v for k, v in params["params"].items() if k != "prompts"}}
    assert float(jnp.max(jnp.abs(plain.apply(backbone, batch["image"]) - out))) > 1e-4


@pytest.mark.slow
def test_deep_prompts_replace_the_previous_blocks_prompt_outputs():
    """Deep: block i reads prompts[i], so the sequence keeps its length and no prompt output leaks on."""
    model, params, batch = micro(prompt_depth="deep")
    found = gg.structure(model, params, batch, trainable=prompt_mask)
    shapes = {s.path: s.shape for s in found.sites}
    query = "Transformer/encoderblock_{}/MultiHeadDotProductAttention_1/query"
    # 1 class token + 2 prompts + a 2x2 grid, in both blocks.
    assert shapes[query.format(0)][1] == shapes[query.format(1)][1] == 7
    names = {s.path for s in found.sites}
    assert names >= {
        query.format(1),
        "Transformer/encoderblock_0/MlpBlock_3/hidden",
        "logits",
    }


def test_print_structure_lists_the_sites(capsys):
    model, params, batch = micro()
    gg.print_structure(model, params, batch, trainable=prompt_mask)
    printed = capsys.readouterr().out
    # The prompt tokens; q, k, v and the MLP in each of 2 blocks; logits.
    assert "10 sites" in printed
    assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/value" in printed
    assert "Transformer/encoderblock_0/MlpBlock_3/hidden" in printed
    assert "gelu" in printed
    assert "params/prompts" in printed


def test_prompt_mask_marks_only_the_prompts_or_also_the_head():
    _, params, _ = micro()
    names = flat_names({"params": prompt_mask(params)["params"]})
    assert [k for k, v in names.items() if v] == ["prompts"]
    names = flat_names({"params": prompt_mask(params, head=True)["params"]})
    assert sorted(k for k, v in names.items() if v) == [
        "head/bias",
        "head/kernel",
        "prompts",
    ]


def test_bad_fields_are_refused():
    with pytest.raises(ValueError, match="prompt_depth"):
        vit("tiny", 10, num_prompts=2, prompt_depth="middle")
    with pytest.raises(ValueError, match="Unknown ViT configuration"):
        vit("Z/16", 10)
    with pytest.raises(ValueError, match="divisible by 4"):
        ViT(10, **MICRO).init(jax.random.key(0), jnp.zeros((1, 10, 10, 3)))


# --- estimators with only the prompts trainable --------------------------------------


def assert_only_the_prompts_move(grads, params):
    """Every frozen leaf's estimate exactly zero; the prompts' finite and non-zero."""
    mask = jax.tree.leaves(prompt_mask(params))
    frozen = [x for x, m in zip(jax.tree.leaves(grads), mask) if not m]
    prompts = grads["params"]["prompts"]
    assert all(bool(jnp.all(x == 0)) for x in frozen)
    assert float(jnp.linalg.norm(prompts)) > 0
    assert bool(jnp.all(jnp.isfinite(prompts)))


@pytest.mark.slow
@pytest.mark.parametrize("depth", ["shallow", "deep"])
@pytest.mark.parametrize(
    "method", ["backprop", "wt", "activation_perturbation", "directional"]
)
def test_frozen_leaves_are_exactly_zero_and_the_prompts_move(method, depth):
    model, params, batch = micro(prompt_depth=depth)
    estimate = gg.get_estimator(method, model, trainable=prompt_mask)
    assert_only_the_prompts_move(estimate(params, batch, jax.random.key(1)), params)


@pytest.mark.parametrize(
    "depth, head, guessed",
    [
        ("shallow", False, ["Transformer/prompts"]),
        ("deep", False, ["Transformer/prompts_0", "Transformer/prompts_1"]),
        ("shallow", True, ["Transformer/prompts", "logits"]),
    ],
)
@pytest.mark.slow
def test_prompt_tuning_guesses_only_at_the_prompt_tokens(depth, head, guessed):
    """The prompts are sites: the cut forward stops there, so no backbone site is guessed."""
    model, params, batch = micro(prompt_depth=depth)
    mask = functools.partial(prompt_mask, head=head)
    found = gg.structure(model, params, batch, trainable=mask)
    assert [s.path for s in found.active] == guessed


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["wt", "activation_perturbation"])
def test_recomputed_forward_passes_give_the_linearised_estimate(rule):
    """engine.linearize(recompute=True) (a jvp per use) equals one stored jax.linearize."""
    model, params, batch = micro()
    problem = Problem(model)
    variables, args, rngs, found, _ = problem.prepare(params, batch, None)
    paths = [s.path for s in found.active]
    hidden = {"wt": gg.rules.wt, "activation_perturbation": gg.rules.gaussian}
    guess_rule = gg.rules.GuessRule(hidden[rule])

    def site_grads(recompute, mode):
        _, _, ctx = engine.linearize(
            model,
            variables,
            args,
            batch,
            problem.loss_fn,
            rngs,
            found,
            paths,
            recompute=recompute,
        )
        guesses = {
            s.path: rules_lib.site_guess(
                guess_rule, ctx, s.index, jax.random.key(5), True
            )
            for s in found.active
        }
        return engine.guessed_site_gradients(ctx, guesses, mode)

    for mode in ("joint", "per_layer"):
        stored, recomputed = site_grads(False, mode), site_grads(True, mode)
        chex.assert_trees_all_close(stored, recomputed, rtol=1e-5, atol=1e-6)
        assert float(jnp.linalg.norm(stored[0]["logits"])) > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", list(gg.ESTIMATORS))
def test_every_estimator_runs_with_only_the_prompts_trainable(method):
    model, params, batch = micro()
    options = {"wperp": {"rank": 2}, "wperp_ns": {"krylov_steps": 1}}.get(method, {})
    estimate = gg.get_estimator(method, model, trainable=prompt_mask, **options)
    assert_only_the_prompts_move(estimate(params, batch, jax.random.key(1)), params)


@pytest.mark.slow
def test_activation_perturbation_is_unbiased_for_the_prompt_gradient():
    """Deep prompts: each block's set reaches its own block's sites and, by the residual, later ones."""
    model, params, batch = micro(prompt_depth="deep")
    fn = gg.get_estimator("activation_perturbation", model, trainable=prompt_mask)
    keys = jax.random.split(jax.random.key(3), 20_000)
    samples = jax.jit(
        jax.vmap(lambda k: fn(params, batch, k)["params"]["prompts"].reshape(-1))
    )(keys)
    exact = gg.get_estimator("backprop", model, trainable=prompt_mask)(
        params, batch, jax.random.key(0)
    )["params"]["prompts"]
    exact_all = jax.grad(
        lambda p: jnp.mean(
            gg.per_example_loss(model.apply(p, batch["image"]), batch["label"])
        )
    )(params)["params"]["prompts"]
    np.testing.assert_allclose(exact, exact_all, rtol=1e-5, atol=1e-7)
    assert_mean_matches(samples, flat(exact))


# --- checkpoints in the public .npz format --------------------------------------------


def test_a_saved_checkpoint_has_the_public_keys_and_loads_back(tmp_path):
    model, params, _ = micro()
    path = tmp_path / "micro.npz"
    save_vit_npz(path, params)
    with np.load(path) as npz:
        keys = set(npz.files)
    assert {
        "embedding/kernel",
        "embedding/bias",
        "cls",
        "Transformer/posembed_input/pos_embedding",
        "Transformer/encoderblock_0/LayerNorm_0/scale",
        "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel",
        "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/bias",
        "Transformer/encoderblock_1/LayerNorm_2/bias",
        "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel",
        "Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias",
        "Transformer/encoder_norm/scale",
        "head/kernel",
        "prompts",
    } <= keys
    assert len(keys) == len(jax.tree.leaves(params))

    fresh = micro(seed=1)[1]  # the same model, other initial values
    loaded = load_vit_npz(path, model, fresh)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    got, want, new = flat_names(loaded), flat_names(params), flat_names(fresh)
    assert not np.array_equal(want["cls"], new["cls"]) or not np.array_equal(
        want["embedding/kernel"], new["embedding/kernel"]
    )
    for name in want:
        if name == "prompts":  # the model's own, by default
            np.testing.assert_array_equal(got[name], new[name])
        else:
            np.testing.assert_array_equal(got[name], want[name])
    with_prompts = load_vit_npz(path, model, fresh, with_prompts=True)
    np.testing.assert_array_equal(
        with_prompts["params"]["prompts"], params["params"]["prompts"]
    )
    # Only the "params" collection works too, and so does no params at all
    # (initialised at the checkpoint's resolution, then loaded).
    inner = load_vit_npz(path, model, fresh["params"])
    np.testing.assert_array_equal(inner["cls"], params["params"]["cls"])
    again = load_vit_npz(path, model)
    np.testing.assert_array_equal(
        again["params"]["embedding"]["kernel"], params["params"]["embedding"]["kernel"]
    )


@pytest.mark.slow
def test_a_new_head_and_a_new_grid(tmp_path):
    """Another number of classes keeps the fresh head; another image size resizes the grid."""
    _, params, _ = micro(num_prompts=0)  # 3 classes, a 2x2 grid
    names = {k: np.asarray(v) for k, v in flat_names(params).items()}
    names["pre_logits/kernel"] = np.ones((8, 8), np.float32)  # as ImageNet-21k's
    names["pre_logits/bias"] = np.zeros((8,), np.float32)
    path = tmp_path / "ckpt.npz"
    np.savez(path, **names)

    target = ViT(5, num_prompts=1, **MICRO)
    fresh = target.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))  # a 4x4 grid
    loaded = load_vit_npz(path, target, fresh)
    for leaf in ("kernel", "bias"):
        np.testing.assert_array_equal(
            loaded["params"]["head"][leaf], fresh["params"]["head"][leaf]
        )
    np.testing.assert_array_equal(
        loaded["params"]["prompts"], fresh["params"]["prompts"]
    )
    pos = loaded["params"]["Transformer"]["posembed_input"]["pos_embedding"]
    old = names["Transformer/posembed_input/pos_embedding"]
    assert pos.shape == (1, 17, 8)
    np.testing.assert_array_equal(pos[0, 0], old[0, 0])  # the class token's row
    expected = jax.image.resize(old[0, 1:].reshape(2, 2, 8), (4, 4, 8), "bilinear")
    np.testing.assert_allclose(pos[0, 1:], expected.reshape(16, 8), rtol=1e-6)

    # A head on pre_logits is not the model's even with as many classes.
    same = load_vit_npz(path, ViT(NUM_CLASSES, **MICRO), params)
    np.testing.assert_array_equal(same["params"]["cls"], params["params"]["cls"])


def test_a_missing_file_names_the_public_checkpoint(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"ViT-B_16\.npz.*gs://vit_models/imagenet21k/ViT-B_16\.npz",
    ):
        load_vit_npz(tmp_path / "ViT-B_16.npz", vit("B/16", 10, num_prompts=5))


def test_a_mismatched_checkpoint_names_the_parameter_and_both_shapes(tmp_path):
    model, params, _ = micro()
    names = {k: np.asarray(v) for k, v in flat_names(params).items()}
    names["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] = np.zeros((8, 32))
    np.savez(tmp_path / "wider.npz", **names)
    with pytest.raises(
        ValueError,
        match=r"'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel' has shape "
        r"\(8, 32\); the model expects \(8, 16\)",
    ):
        load_vit_npz(tmp_path / "wider.npz", model, params)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    model, params, _ = micro()
    names = {k: np.asarray(v) for k, v in flat_names(params).items()}
    lacking = {k: v for k, v in names.items() if "encoderblock_1/LayerNorm_2" not in k}
    np.savez(tmp_path / "lacking.npz", **lacking)
    with pytest.raises(
        ValueError,
        match=r"lacks 2 .*encoderblock_1/LayerNorm_2/bias, "
        r".*encoderblock_1/LayerNorm_2/scale",
    ):
        load_vit_npz(tmp_path / "lacking.npz", model, params)
    deeper = dict(names)  # a third block the model does not have
    for k, v in names.items():
        if "encoderblock_1/" in k:
            deeper[k.replace("encoderblock_1/", "encoderblock_2/")] = v
    np.savez(tmp_path / "deeper.npz", **deeper)
    with pytest.raises(ValueError, match=r"no place for.*encoderblock_2/"):
        load_vit_npz(tmp_path / "deeper.npz", model, params)
