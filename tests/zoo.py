"""Small models with sites, one of each kind the estimators must handle.

Each entry of ``ZOO`` builds ``(model, params, batch, problem)`` where
``problem`` holds the ``loss_fn``/``inputs``/``trainable`` keyword arguments
of the estimators for that model.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import guessgrad as gg

NUM_CLASSES = 5


def ce(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


class DropoutMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = gg.site(self, "h", nn.Dense(16)(x), act=nn.relu)
        h = nn.Dropout(0.5, deterministic=False)(h)
        return gg.site(self, "logits", nn.Dense(NUM_CLASSES)(h))


class ResidualMLP(nn.Module):
    """Dense in, pre-norm residual blocks (LayerNorm, dense, ReLU, dense), dense out."""

    width: int = 8
    depth: int = 2

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        h = gg.site(self, "embed", nn.Dense(self.width)(x), act=nn.relu)
        for i in range(self.depth):
            y = nn.LayerNorm()(h)
            y = gg.site(self, f"hidden_{i}", nn.Dense(self.width)(y), act=nn.relu)
            h = h + nn.Dense(self.width)(y)
        return gg.site(self, "logits", nn.Dense(NUM_CLASSES)(h))


class SmallCNN(nn.Module):
    """Two 3x3 convolutions with ReLU, global average pool, dense readout."""

    @nn.compact
    def __call__(self, x):
        x = x[..., None] if x.ndim == 3 else x
        x = gg.site(self, "conv_0", nn.Conv(4, (3, 3))(x), act=nn.relu)
        x = gg.site(self, "conv_1", nn.Conv(4, (3, 3), strides=2)(x), act=nn.relu)
        return gg.site(self, "logits", nn.Dense(NUM_CLASSES)(x.mean((1, 2))))


class PromptAttention(nn.Module):
    """One pre-norm transformer block over embedded tokens with learnable prompt tokens.

    Sites: the q, k, v projections and the MLP's pre-activation; the logits.
    """

    dim: int = 8
    heads: int = 2
    num_prompts: int = 2

    @nn.compact
    def __call__(self, x):  # [B, T, F]
        batch = x.shape[0]
        tokens = nn.Dense(self.dim, name="embed")(x)
        prompts = self.param(
            "prompts", nn.initializers.normal(0.5), (self.num_prompts, self.dim)
        )
        prompts = jnp.broadcast_to(prompts, (batch,) + prompts.shape)
        tokens = jnp.concatenate([prompts, tokens], axis=1)
        y = nn.LayerNorm()(tokens)
        q, k, v = (
            gg.site(self, n, nn.Dense(self.dim, name=f"{n}_proj")(y)) for n in "qkv"
        )
        split = lambda t: t.reshape(t.shape[:2] + (self.heads, -1))
        scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / jnp.sqrt(
            self.dim / self.heads
        )
        attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores), split(v))
        tokens = tokens + nn.Dense(self.dim, name="out_proj")(
            attended.reshape(tokens.shape)
        )
        y = nn.LayerNorm()(tokens)
        h = gg.site(self, "mlp", nn.Dense(2 * self.dim)(y), act=nn.gelu)
        tokens = tokens + nn.Dense(self.dim)(h)
        return gg.site(self, "logits", nn.Dense(NUM_CLASSES)(tokens.mean(1)))


class TwoBlockLocal(nn.Module):
    """Two blocks with a linear head each and a stop_gradient between them (local losses).

    Block 0's last site pulls its W^T guess back from its head's logits (a tap).
    """

    width: int = 8

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        h = gg.site(self, "b0_hidden", nn.Dense(self.width)(x), act=nn.relu)
        h = gg.site(self, "b0_out", nn.Dense(self.width)(h), act=nn.relu, next="head_0")
        head = gg.tap(self, "head_0", nn.Dense(NUM_CLASSES, name="head_0")(h))
        h = jax.lax.stop_gradient(h)
        h = gg.site(self, "b1_hidden", nn.Dense(self.width)(h), act=nn.relu)
        return {"head_0": head, "readout": nn.Dense(NUM_CLASSES, name="readout")(h)}


def local_losses(outputs, batch):
    return {name: ce(logits, batch["label"]) for name, logits in outputs.items()}


class PatchLocal(nn.Module):
    """Per-patch features with Ren et al.'s patch-wise replicated loss.

    The head sees the patch average, but copy p's gradient reaches only patch
    p (the other patches' share is a stop_gradient), so the loss is [B, P].
    """

    width: int = 6

    @nn.compact
    def __call__(self, x):  # [B, P, F]
        h = gg.site(self, "patch", nn.Dense(self.width)(x), act=nn.relu, copy_axes=1)
        mine = h / h.shape[1]
        pooled = mine + jax.lax.stop_gradient(
            h.mean(1, keepdims=True) - mine
        )  # [B, P, C]
        return nn.Dense(NUM_CLASSES, name="head")(pooled)  # [B, P, classes]


def patch_loss(outputs, batch):
    labels = jnp.broadcast_to(batch["label"][:, None], outputs.shape[:2])
    return gg.copies(ce(outputs, labels))  # [B, P] copies


def mse(outputs, batch):
    return jnp.sum((outputs - batch["target"]) ** 2, axis=-1)


def _batch(key, shape, batch_size=4):
    image_key, label_key = jax.random.split(key)
    return {
        "image": jax.random.normal(image_key, (batch_size,) + shape),
        "label": jax.random.randint(label_key, (batch_size,), 0, NUM_CLASSES),
    }


def _init(model, batch, key=0):
    return model.init(jax.random.key(key), batch["image"])


def mlp():
    model = gg.models.MLP(depth=3, width=8, num_classes=NUM_CLASSES)
    batch = _batch(jax.random.key(1), (6,))
    return model, _init(model, batch), batch, {}


def residual():
    model = ResidualMLP()
    batch = _batch(jax.random.key(2), (6,))
    return model, _init(model, batch), batch, {}


def cnn():
    model = SmallCNN()
    batch = _batch(jax.random.key(3), (6, 6), batch_size=3)
    return model, _init(model, batch), batch, {}


def prompts_only():
    model = PromptAttention()
    batch = _batch(jax.random.key(4), (3, 5), batch_size=3)
    params = _init(model, batch)
    trainable = jax.tree_util.tree_map_with_path(
        lambda path, _: path[-1].key == "prompts", params
    )
    return model, params, batch, {"trainable": trainable}


def two_block_local():
    model = TwoBlockLocal()
    batch = _batch(jax.random.key(5), (6,))
    return model, _init(model, batch), batch, {"loss_fn": local_losses}


def patch_copies():
    model = PatchLocal()
    batch = _batch(jax.random.key(6), (3, 4))
    return model, _init(model, batch), batch, {"loss_fn": patch_loss}


def regression():
    model = ResidualMLP()
    batch = _batch(jax.random.key(7), (6,))
    batch["target"] = jax.random.normal(jax.random.key(8), (4, NUM_CLASSES))
    del batch["label"]
    return model, _init(model, batch), batch, {"loss_fn": mse}


ZOO = {
    "mlp": mlp,
    "residual": residual,
    "cnn": cnn,
    "prompts_only": prompts_only,
    "two_block_local": two_block_local,
    "patch_copies": patch_copies,
    "regression": regression,
}
