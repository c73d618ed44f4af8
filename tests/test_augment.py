"""guessgrad.data.augment: random crops and flips on device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guessgrad import data


def _images(batch=16, height=6, width=5, channels=2):
    # Distinct values everywhere, none equal to the padding's -1.
    x = np.arange(batch * height * width * channels, dtype=np.float32)
    return jnp.asarray(x.reshape(batch, height, width, channels) / x.size)


def test_shape_dtype_jit_and_vmap():
    images = _images()
    key = jax.random.key(0)
    out = data.augment(images, key)
    assert out.shape == images.shape and out.dtype == images.dtype
    np.testing.assert_array_equal(jax.jit(data.augment)(images, key), out)
    keys = jax.random.split(key, 3)
    stacked = jax.vmap(lambda k: data.augment(images, k))(keys)
    assert stacked.shape == (3, *images.shape)
    np.testing.assert_array_equal(stacked[1], data.augment(images, keys[1]))
    halves = data.augment(images.astype(jnp.bfloat16), key)
    assert halves.dtype == jnp.bfloat16


def test_same_key_same_images_other_key_other_images():
    images = _images()
    a = data.augment(images, jax.random.key(1))
    np.testing.assert_array_equal(a, data.augment(images, jax.random.key(1)))
    assert not np.array_equal(a, data.augment(images, jax.random.key(2)))


@pytest.mark.parametrize("fill", [-1.0, None])
def test_each_crop_is_a_shifted_copy_of_the_padded_image(fill):
    images, padding = _images(batch=32), 2
    out = np.asarray(
        data.augment(images, jax.random.key(3), padding=padding, flip=False, fill=fill)
    )
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    if fill is None:
        padded = np.pad(np.asarray(images), pad, mode="edge")
    else:
        padded = np.pad(np.asarray(images), pad, constant_values=fill)
    _, height, width, _ = images.shape
    offsets = []
    for b in range(len(out)):
        matches = [
            (dy, dx)
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
            if np.array_equal(out[b], padded[b, dy : dy + height, dx : dx + width])
        ]
        assert len(matches) == 1, b  # exactly one offset explains the crop
        offsets.append(matches[0])
    # Per-example offsets, spread over the range (32 draws of 25 offsets).
    assert len(set(offsets)) > 8
    assert {dy for dy, _ in offsets} == set(range(2 * padding + 1))


def test_flip_mirrors_left_right_about_half_the_images():
    images = _images(batch=64)
    out = np.asarray(data.augment(images, jax.random.key(4), padding=0, flip=True))
    flipped = [np.array_equal(o, x[:, ::-1]) for o, x in zip(out, np.asarray(images))]
    kept = [np.array_equal(o, x) for o, x in zip(out, np.asarray(images))]
    assert all(f != k for f, k in zip(flipped, kept))  # each one or the other
    assert 16 < sum(flipped) < 48
    # Neither crop nor flip: the identity.
    same = data.augment(images, jax.random.key(4), padding=0, flip=False)
    np.testing.assert_array_equal(same, images)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        data.augment(jnp.zeros((4, 784)), jax.random.key(0))
    with pytest.raises(ValueError, match="padding"):
        data.augment(_images(), jax.random.key(0), padding=-1)
