"""What estimators share, and the chain-side passes of lean mode.

Batch checks, the per-example cross-entropy, per-example scaling and
normalisation of guesses serve every estimator. The rest works on a
:class:`~guessgrad.models.Chain`, whose sites declare their own maps:
:func:`forward` records each site's input ``x_l``, value ``s_l`` and the
linear map between consecutive sites (the reference the rule and benchmark
code reads), :func:`local_parameter_grads` applies each site map's own VJP,
and the lean passes below recompute the forward site by site. The engine
for models with sites marked anywhere is :mod:`guessgrad._src.engine`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from guessgrad._src.base import Array, Batch, Params
from guessgrad._src.models import ChainFns

MODES = ("joint", "per_layer")


def check_labels(labels: Array, num_classes: int, *, where: str | None = None) -> None:
    """Raises a ValueError naming the labels outside ``0..num_classes-1``.

    Checked only when ``labels`` are concrete (outside ``jax.jit``): under a
    trace the values are unknown, and :func:`per_example_loss` makes an
    out-of-range label's loss NaN instead. ``where`` names the labels in the
    message (e.g. a data set split).
    """
    if isinstance(labels, jax.core.Tracer):
        return
    values = np.asarray(labels)
    bad = np.flatnonzero((values < 0) | (values >= num_classes))
    if bad.size:
        shown = ", ".join(f"[{i}] = {values.flat[i]}" for i in bad[:5])
        more = f" and {bad.size - 5} more" if bad.size > 5 else ""
        raise ValueError(
            f"{f'{where}: labels' if where else 'Labels'} must be in 0..{num_classes - 1} "
            f"({num_classes} classes); got {shown}{more}."
        )


def per_example_loss(logits: Array, labels: Array) -> Array:
    """Softmax cross-entropy per example: [B, C], [B] -> [B].

    A label outside ``0..C-1`` raises a ValueError when the labels are
    concrete (:func:`check_labels`); under ``jax.jit`` it makes that
    example's loss and every derivative of it NaN, so the step is
    non-finite (the experiment runner stops there) rather than quietly wrong.
    """
    num_classes = jnp.shape(logits)[-1]
    check_labels(labels, num_classes)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    valid = (labels >= 0) & (labels < num_classes)
    return losses * jnp.where(valid, 1.0, jnp.nan).astype(losses.dtype)


def validate_batch(batch: Batch, need_label: bool = True) -> tuple[Array, Array | None]:
    """Checks a batch and returns ``(image, label)``; raises a ValueError saying what is expected.

    The default ``inputs`` and ``loss_fn`` read ``batch["image"]`` and
    ``batch["label"]``; with ``need_label=False`` only the image is checked.
    """
    needed = ("image", "label") if need_label else ("image",)
    if not hasattr(batch, "keys") or any(k not in batch for k in needed):
        got = sorted(batch.keys()) if hasattr(batch, "keys") else type(batch).__name__
        what = (
            '"image" ([B, ...] float) and "label" ([B] int)'
            if need_label
            else '"image"'
        )
        raise ValueError(
            f"A batch must be a dict with {what}; got {got}. For other batches, pass "
            f"inputs=(batch -> model arguments) and loss_fn=(outputs, batch -> losses)."
        )
    image = batch["image"]
    if jnp.ndim(image) < 2 or not jnp.issubdtype(jnp.result_type(image), jnp.floating):
        raise ValueError(
            f'batch["image"] must be a floating array of shape [B, ...]; got shape '
            f"{jnp.shape(image)} and dtype {jnp.result_type(image)} (normalise uint8 "
            f"images first, e.g. with guessgrad.data.normalize)."
        )
    if not need_label:
        return image, None
    label = batch["label"]
    if jnp.ndim(label) != 1 or not jnp.issubdtype(jnp.result_type(label), jnp.integer):
        raise ValueError(
            f'batch["label"] must be an integer array of shape [B]; got shape '
            f"{jnp.shape(label)} and dtype {jnp.result_type(label)}."
        )
    if jnp.shape(label)[0] != jnp.shape(image)[0]:
        raise ValueError(
            f'batch["image"] has {jnp.shape(image)[0]} examples but batch["label"] has '
            f"{jnp.shape(label)[0]}."
        )
    return image, label


def split_params(fns: ChainFns, params: Params) -> tuple[Params, ...]:
    """``model.init`` output -> one parameter tree per site, checking its structure."""
    if not hasattr(params, "keys") or set(params.keys()) != {"params"}:
        got = (
            sorted(params.keys()) if hasattr(params, "keys") else type(params).__name__
        )
        raise ValueError(
            f'params must be what model.init returns, {{"params": ...}}; got {got}.'
        )
    inner = params["params"]
    if set(inner.keys()) != set(fns.names):
        raise ValueError(
            f"params['params'] has entries {sorted(inner.keys())} but the model's site maps are "
            f"{list(fns.names)}."
        )
    return tuple(inner[name] for name in fns.names)


def join_params(fns: ChainFns, layer_trees: Sequence[Params]) -> Params:
    """Inverse of :func:`split_params`."""
    return {"params": dict(zip(fns.names, layer_trees))}


class Trace(NamedTuple):
    """What one forward pass records.

    Attributes:
      inputs: ``x_l``, the input of site map ``l`` (``x_0`` is the preprocessed image).
      sites: ``s_l``, the output of site map ``l``; ``sites[-1]`` are the logits.
      losses: per-example losses ``l_b``, [B].
      tangent_maps: ``tangent_maps[l - 1]`` maps a tangent at ``s_{l-1}`` to ``s_l``.
      loss_map: maps a tangent at the logits to the per-example loss tangents [B].
    """

    inputs: tuple[Array, ...]
    sites: tuple[Array, ...]
    losses: Array
    tangent_maps: tuple[Callable[[Array], Array], ...]
    loss_map: Callable[[Array], Array]


def forward(
    fns: ChainFns, layer_params: Sequence[Params], x0: Array, labels: Array
) -> Trace:
    """Runs the chain once, linearising each layer and the loss on the way."""
    site = fns.site_fns[0](layer_params[0], x0)
    inputs, sites, tangent_maps = [x0], [site], []
    for index in range(1, fns.num_sites):

        def step(prev_site, index=index):
            return fns.site_fns[index](layer_params[index], fns.activation(prev_site))

        inputs.append(fns.activation(sites[-1]))
        site, tangent_map = jax.linearize(step, sites[-1])
        sites.append(site)
        tangent_maps.append(tangent_map)
    losses, loss_map = jax.linearize(
        lambda logits: per_example_loss(logits, labels), sites[-1]
    )
    return Trace(tuple(inputs), tuple(sites), losses, tuple(tangent_maps), loss_map)


def local_parameter_grads(
    fns: ChainFns,
    layer_params: Sequence[Params],
    inputs: Sequence[Array],
    site_grads: Sequence[Array],
) -> tuple[Params, ...]:
    """Parameter gradients from site gradients through each site map's own VJP.

    ``site_grads[l]`` estimates ``dl_b/ds_l`` per example; the batch loss is the
    mean, hence the ``1/B``.
    """
    return tuple(
        local_grad(site_fn, theta, x, g)
        for site_fn, theta, x, g in zip(fns.site_fns, layer_params, inputs, site_grads)
    )


def local_grad(site_fn: Callable, theta: Params, x: Array, site_grad: Array) -> Params:
    """One site map's VJP w.r.t. its own parameters at cotangent ``site_grad / B``."""
    _, vjp = jax.vjp(lambda p: site_fn(p, x), theta)
    return vjp(site_grad / site_grad.shape[0])[0]


def normalize_per_example(y: Array) -> Array:
    """Rescales each example's guess to norm ``sqrt(n)`` (n = its size); zero stays zero."""
    flat = y.reshape(y.shape[0], -1)
    norm = jnp.linalg.norm(flat, axis=-1)
    scale = jnp.where(
        norm > 0, jnp.sqrt(flat.shape[-1]) / jnp.where(norm > 0, norm, 1.0), 0.0
    )
    return scale_examples(scale.astype(y.dtype), y)


def scale_examples(scale: Array, y: Array) -> Array:
    """[B] * [B, ...] -> [B, ...]."""
    return scale.reshape(scale.shape + (1,) * (y.ndim - 1)) * y


def accuracy(logits: Array, labels: Array) -> Array:
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


# --- memory-lean joint mode ------------------------------------------------------
#
# The passes above keep every layer's linearisation (masks, inputs) alive until
# the tangents are pushed: as much memory as backprop's stored activations. The
# lean passes below keep none. Pass 1 runs primal and tangent together, layer
# by layer, drawing each site's guess as the site is reached; pass 2 recomputes
# the forward pass layer by layer, regenerates the same guesses from the same
# keys and applies each site's local VJP at once. The order is pinned by data
# dependences (:func:`_after`): a guess is drawn only once its site exists,
# layer l+1 runs only after layer l's update is formed, and pass 2 starts from
# pass 1's result, so XLA cannot merge the two passes, which would bring the
# stored activations back.


def _barrier(*values):
    return jax.lax.optimization_barrier(values)


def _after(value, dep):
    """``value`` (an array or typed PRNG keys), made to depend on every leaf of ``dep`` by data.

    XLA:CPU expands optimisation barriers before it merges common
    subexpressions and schedules, so a barrier alone neither keeps pass 2
    apart from pass 1 nor stops the scheduler running a pass's forward ahead
    of its updates (which keeps every layer's activations alive). A select on
    "the first element of each leaf of ``dep`` is finite" is a dependence XLA
    must honour. It changes ``value`` (to NaN, or 0 for integers) only where
    that element is not finite, and then every update is NaN or inf anyway.
    """
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(value)
        data = _after(jax.random.key_data(value), dep)
        return jax.random.wrap_key_data(data, impl=impl)
    finite = jnp.all(
        jnp.stack([jnp.isfinite(leaf.ravel()[0]) for leaf in jax.tree.leaves(dep)])
    )
    fill = jnp.nan if jnp.issubdtype(value.dtype, jnp.floating) else 0
    return jnp.where(finite, value, jnp.asarray(fill, value.dtype))


def _window_context(fns: ChainFns, rule, layer_params, labels, index: int, site: Array):
    """A guess context holding site ``index`` and the ``rule.lookahead`` sites after it (recomputed)."""
    from guessgrad._src import guesses

    sites = [None] * fns.num_sites
    sites[index] = site
    for later in range(index + 1, min(index + rule.lookahead, fns.num_sites - 1) + 1):
        site = fns.site_fns[later](layer_params[later], fns.activation(site))
        sites[later] = site
    return guesses.context(fns, layer_params, sites, labels, rule)


def _lean_guess(fns, rule, layer_params, labels, index, site, key, normalize):
    from guessgrad._src import guesses

    key = _after(key, site)  # the noise is drawn once the site exists
    ctx = _window_context(fns, rule, layer_params, labels, index, site)
    return guesses.site_guess(rule, ctx, index, key, normalize)


def _loss(labels, loss_of):
    """Per-example losses of the logits: cross-entropy against ``labels``, or ``loss_of``."""
    if loss_of is not None:
        return loss_of
    return lambda logits: per_example_loss(logits, labels)


def lean_joint_derivative(
    fns, rule, layer_params, x0, labels, key, normalize: bool, loss_of=None
):
    """Pass 1: ``(d [B], losses [B], logits)`` with no per-layer state kept."""
    site = fns.site_fns[0](layer_params[0], x0)
    tangent = _lean_guess(fns, rule, layer_params, labels, 0, site, key, normalize)
    for index in range(1, fns.num_sites):
        site, tangent = _barrier(site, tangent)

        def step(prev_site, index=index):
            return fns.site_fns[index](layer_params[index], fns.activation(prev_site))

        site, tangent = jax.jvp(step, (site,), (tangent,))
        tangent = tangent + _lean_guess(
            fns, rule, layer_params, labels, index, site, key, normalize
        )
    losses, derivative = jax.jvp(_loss(labels, loss_of), (site,), (tangent,))
    return derivative, losses, site


def lean_parameter_grads(
    fns,
    rule,
    layer_params,
    x0,
    labels,
    keys,
    derivatives,
    normalize: bool,
    loss_of=None,
):
    """Pass 2: recompute layer by layer, regenerate the guesses of ``keys`` [K] and form
    ``sum_b (mean_k d_{k,b} y_{k,l,b}) dS_l/dtheta_l / B`` for each site at once."""
    # Pass 2 starts from pass 1's result (no merging of the two passes).
    x, keys = _after(x0, derivatives), _after(keys, derivatives)
    grads = []
    for index in range(fns.num_sites):
        site = fns.site_fns[index](layer_params[index], x)
        guesses_k = jax.vmap(
            lambda key, index=index, site=site: _lean_guess(
                fns, rule, layer_params, labels, index, site, key, normalize
            )
        )(keys)
        site_grad = jnp.mean(jax.vmap(scale_examples)(derivatives, guesses_k), axis=0)
        grad = local_grad(fns.site_fns[index], layer_params[index], x, site_grad)
        if index + 1 < fns.num_sites:
            # Layer l+1 starts only once layer l's update exists, so x_l dies here.
            x = fns.activation(_after(site, grad))
        grads.append(grad)
    return tuple(grads)
