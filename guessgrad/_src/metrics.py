"""Measurements of gradient estimates: cosines, one-step effectiveness, bias, ranks, subspaces.

The paper's measurements of how good a guessed gradient is, as pure
functions that work on any model: they take an estimator
``(params, batch, key) -> grads`` (:func:`guessgrad.get_estimator`) and, for
the true gradient, a function ``true_grad_fn(params, batch) -> grads``, e.g.
``jax.grad(loss_fn)`` or the backprop estimator with its key fixed::

    backprop = gg.get_estimator("backprop", model)
    true_grad_fn = lambda params, batch: backprop(params, batch, None)

(the backprop estimator gives frozen parameters an exact zero gradient, as the
other estimators do; ``jax.grad`` of a loss does not know which are frozen).
Every function is jit- and vmap-friendly: Python arguments (estimators, step
size grids, lists of ``k``) are static, arrays are traced.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from guessgrad._src.base import Array, Batch, EstimateFn, Grads, Params, PRNGKey

TrueGradFn = Callable[[Params, Batch], Grads]
LossFn = Callable[[Params, Batch], Array]

PAPER_ETAS = tuple(10.0**k for k in range(-5, 0))
"""The paper's step sizes for one-step effectiveness: 1e-5, 1e-4, ..., 1e-1."""

GRADIENT_NORM_ETAS = tuple(10.0 ** (k / 4) for k in range(-20, 13))
"""Step sizes ``10**(k/4)``, k = -20..12 (1e-5 to 1e3, four per decade), for
estimates rescaled to the true gradient's norm."""

SCALES = ("paper", "gradient_norm")


# --- cosines ----------------------------------------------------------------------


def _float(x: Array) -> Array:
    """``x`` in at least float32 (sums of squares of bfloat16 leaves lose too much)."""
    return jnp.asarray(x, jnp.promote_types(jnp.result_type(x), jnp.float32))


def _check_same_structure(a, b) -> None:
    if jax.tree.structure(a) != jax.tree.structure(b):
        raise ValueError(
            f"The two trees must have the same structure; got "
            f"{jax.tree.structure(a)} and {jax.tree.structure(b)}."
        )
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jnp.shape(x) != jnp.shape(y):
            raise ValueError(
                f"The two trees must have leaves of the same shapes; got {jnp.shape(x)} "
                f"and {jnp.shape(y)}."
            )


def _dot(a, b) -> Array:
    """``sum over leaves of <a_i, b_i>``, in at least float32."""
    products = [
        jnp.vdot(_float(x), _float(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    ]
    return sum(products, jnp.zeros((), jnp.float32))


def _norm(tree) -> Array:
    """Euclidean norm of all leaves together (its gradient at zero is 0, not NaN)."""
    squared = _dot(tree, tree)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def _safe_divide(numerator: Array, denominator: Array) -> Array:
    """``numerator / denominator``, and 0 where the denominator is 0 (no NaN, also in gradients)."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def cosine(a, b) -> Array:
    """Cosine similarity of two pytrees, all leaves flattened into one vector.

    .. math::
        \\cos(a, b) = \\frac{\\sum_i \\langle a_i, b_i \\rangle}{\\|a\\| \\, \\|b\\|},
        \\qquad \\|a\\|^2 = \\sum_i \\langle a_i, a_i \\rangle

    over the leaves ``i``, computed in at least float32 and clipped to [-1, 1];
    0 when either tree is zero (no NaN). The trees must have the same structure
    and leaf shapes.

    >>> float(cosine({"w": jnp.ones(3)}, {"w": -2 * jnp.ones(3)}))
    -1.0
    """
    _check_same_structure(a, b)
    value = _safe_divide(_safe_divide(_dot(a, b), _norm(a)), _norm(b))
    return jnp.clip(value, -1.0, 1.0)


def _path_name(path) -> str:
    """``"params/dense_0/kernel"`` from a key path (dict keys, attributes, indices)."""

    def name(entry) -> str:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                return str(getattr(entry, attribute))
        return str(entry)

    return "/".join(name(entry) for entry in path)


def _named_leaves(tree) -> list[tuple[str, Array]]:
    return [
        (_path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _grouped_cosines(a, b, group: Callable[[str], str]) -> dict[str, Array]:
    """Cosine of the leaves of ``a`` and ``b`` grouped by ``group(leaf path)``, in tree order."""
    _check_same_structure(a, b)
    groups: dict[str, tuple[list, list]] = {}
    for (path, x), y in zip(_named_leaves(a), jax.tree.leaves(b)):
        xs, ys = groups.setdefault(group(path), ([], []))
        xs.append(x)
        ys.append(y)
    return {name: cosine(xs, ys) for name, (xs, ys) in groups.items()}


def _module_path(leaf_path: str) -> str:
    """The leaf path without its last key (a top-level leaf is its own module)."""
    head, _, _ = leaf_path.rpartition("/")
    return head or leaf_path


def layer_cosines(a, b) -> dict[str, Array]:
    """Per-leaf cosines: ``{leaf path: cosine(a_i, b_i)}``, e.g. ``"params/dense_0/kernel"``.

    The path joins the leaf's dict keys (attribute names, sequence indices)
    with ``/``. Each value is :func:`cosine` of that leaf alone (0 when either
    is zero).
    """
    return _grouped_cosines(a, b, lambda path: path)


def module_cosines(a, b) -> dict[str, Array]:
    """Per-module cosines: ``{module path: cosine}``, the leaves of a module taken together.

    A module's path is its leaves' path without the last key (kernel and bias
    of ``"params/dense_0"`` form one vector); a leaf at the top of the tree is
    its own module. Each value is :func:`cosine` of the module's leaves.
    """
    return _grouped_cosines(a, b, _module_path)


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")


def _cosine_report(estimate, true_grads) -> dict:
    return {
        "cosine": cosine(estimate, true_grads),
        "leaf_cosines": layer_cosines(estimate, true_grads),
        "module_cosines": module_cosines(estimate, true_grads),
    }


def estimate_cosines(
    estimator: EstimateFn,
    true_grad_fn: TrueGradFn,
    params: Params,
    batch: Batch,
    key: PRNGKey,
    num_keys: int = 1,
) -> dict:
    """Cosines of an estimate with the true gradient on the same batch, averaged over keys.

    With ``g = true_grad_fn(params, batch)`` and ``g_hat_j = estimator(params,
    batch, key_j)`` for ``num_keys`` independent keys (``key`` itself when
    ``num_keys == 1``, else ``jax.random.split(key, num_keys)``; vmapped):

    .. math::
        \\overline{\\cos} = \\frac{1}{J} \\sum_{j=1}^{J} \\cos(\\hat g_j, g)

    (the mean of the cosines, not the cosine of the mean estimate; for that see
    :func:`bias_curve`). Returns ``{"cosine": [], "leaf_cosines": {leaf path:
    []}, "module_cosines": {module path: []}}``, each averaged the same way
    (:func:`layer_cosines`, :func:`module_cosines`).
    """
    _check_positive_int("num_keys", num_keys)
    true_grads = true_grad_fn(params, batch)
    keys = key[None] if num_keys == 1 else jax.random.split(key, num_keys)
    reports = jax.vmap(
        lambda k: _cosine_report(estimator(params, batch, k), true_grads)
    )(keys)
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), reports)


def _batch_size(batch: Batch) -> int:
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"Every array of the batch needs the same leading (batch) dimension; got shapes "
            f"{jax.tree.map(jnp.shape, batch)}."
        )
    return sizes.pop()


def per_example_cosines(
    estimator: EstimateFn,
    true_grad_fn: TrueGradFn,
    params: Params,
    batch: Batch,
    key: PRNGKey,
) -> Array:
    """Cosine for each example, estimate and true gradient both from that example alone: [B].

    With ``batch_b`` the batch of one holding example ``b`` and ``key_b =
    jax.random.split(key, B)[b]``:

    .. math::
        c_b = \\cos\\big(\\mathrm{estimator}(\\theta, \\mathrm{batch}_b, \\mathrm{key}_b),
        \\; \\mathrm{true\\_grad\\_fn}(\\theta, \\mathrm{batch}_b)\\big)

    vmapped over the examples. Methods whose guess depends on the other
    examples of the batch see none here: ``mixing`` is degenerate at batch size
    one (its guess is +-x itself).
    """
    keys = jax.random.split(key, _batch_size(batch))

    def one(example, example_key):
        example = jax.tree.map(lambda x: x[None], example)
        return cosine(
            estimator(params, example, example_key), true_grad_fn(params, example)
        )

    return jax.vmap(one)(batch, keys)


# --- one-step effectiveness -----------------------------------------------------------


def _step_losses(loss_fn: LossFn, params, batch, directions, etas: Array) -> Array:
    """``loss_fn(params - eta * d, batch)`` for every stacked direction d and eta: [D, E]."""

    def loss_after(direction, eta):
        stepped = jax.tree.map(
            lambda p, d: p - (eta * d).astype(jnp.result_type(p)), params, direction
        )
        return loss_fn(stepped, batch)

    over_etas = jax.vmap(loss_after, in_axes=(None, 0))
    return jax.vmap(over_etas, in_axes=(0, None))(directions, etas)


def _rescaled(tree, norm: Array):
    """``tree`` rescaled to Euclidean norm ``norm`` (a zero tree stays zero)."""
    factor = _safe_divide(norm, _norm(tree))
    return jax.tree.map(lambda x: (x * factor).astype(jnp.result_type(x)), tree)


def one_step_effectiveness(
    estimator: EstimateFn,
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    key: PRNGKey,
    *,
    scale: str = "paper",
    true_grad_fn: TrueGradFn | None = None,
    etas: Sequence[float] | None = None,
) -> dict[str, Array]:
    """Loss decrease of one step along the estimate, relative to backprop's (our definition).

    For a direction ``d`` and step size ``eta``, the decrease on the same batch is

    .. math::
        \\Delta(d, \\eta) = L(\\theta) - L(\\theta - \\eta d),

    and the effectiveness of the estimate ``g_hat = estimator(params, batch,
    key)`` against the true gradient ``g = true_grad_fn(params, batch)``
    (default ``jax.grad(loss_fn)``) is

    .. math::
        r = \\frac{\\max_{\\eta \\in H} \\Delta(s(\\hat g), \\eta)}
                  {\\max_{\\eta \\in H} \\Delta(s(g), \\eta)}

    over a grid ``H`` of step sizes, with one of two conventions:

    - ``scale="paper"``: ``s(d) = d``, the raw estimate (its norm counts), and
      ``H = {1e-5, 1e-4, ..., 1e-1}`` (:data:`PAPER_ETAS`). With a grid this
      coarse ``r`` can exceed 1 when backprop's best step falls between grid
      points or beyond the grid.
    - ``scale="gradient_norm"`` (scale-free): ``s(d) = d \\|g\\| / \\|d\\|``,
      every direction rescaled to the true gradient's norm (a zero direction
      stays zero), and ``H = {10^{k/4}: k = -20..12}``
      (:data:`GRADIENT_NORM_ETAS`), meant to hold backprop's best step inside.

    ``etas`` replaces the grid ``H``. All ``2 |H|`` losses are evaluated
    vmapped. ``r`` is NaN when backprop's best decrease is not positive (at a
    stationary point), and negative when every step along the estimate raises
    the loss. Backprop against itself gives exactly 1.

    Args:
      estimator: ``(params, batch, key) -> grads``.
      loss_fn: ``(params, batch) -> scalar``, the loss the steps are measured on.
      params, batch, key: where, on what and with which key to estimate.
      scale: ``"paper"`` or ``"gradient_norm"``.
      true_grad_fn: ``(params, batch) -> grads``; default ``jax.grad(loss_fn)``.
      etas: the step sizes, replacing the convention's default grid.

    Returns:
      ``ratio``: r; ``eta`` and ``backprop_eta``: the best step sizes;
      ``decrease`` and ``backprop_decrease``: the best decreases;
      ``decreases`` and ``backprop_decreases``: every decrease, ``[|H|]``;
      ``etas``: H; ``backprop_at_edge``: whether backprop's best step is the
      smallest or largest of H (then widen the grid).
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}; got {scale!r}.")
    if etas is None:
        etas = PAPER_ETAS if scale == "paper" else GRADIENT_NORM_ETAS
    etas = jnp.asarray(etas, jnp.float32)
    if etas.ndim != 1 or etas.size == 0:
        raise ValueError(f"etas must be a non-empty list of step sizes; got {etas}.")
    true_grads = (true_grad_fn or jax.grad(loss_fn))(params, batch)
    directions = [estimator(params, batch, key), true_grads]
    if scale == "gradient_norm":
        directions = [_rescaled(d, _norm(true_grads)) for d in directions]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *directions)
    decreases = loss_fn(params, batch) - _step_losses(
        loss_fn, params, batch, stacked, etas
    )  # [2, E]: the estimate's, backprop's
    best = jnp.argmax(decreases, axis=1)
    best_decrease = jnp.max(decreases, axis=1)
    ratio = jnp.where(
        best_decrease[1] > 0, best_decrease[0] / best_decrease[1], jnp.nan
    )
    return {
        "ratio": ratio,
        "eta": etas[best[0]],
        "backprop_eta": etas[best[1]],
        "decrease": best_decrease[0],
        "backprop_decrease": best_decrease[1],
        "decreases": decreases[0],
        "backprop_decreases": decreases[1],
        "etas": etas,
        "backprop_at_edge": (best[1] == 0) | (best[1] == etas.size - 1),
    }


# --- bias -------------------------------------------------------------------------


def _positive_ints(name: str, values, upper: int | None = None) -> tuple[int, ...]:
    """``values`` (an int or a non-empty sequence of them) as a tuple, each in 1..upper."""
    values = (values,) if np.ndim(values) == 0 else tuple(values)
    if not values:
        raise ValueError(f"{name} must not be empty.")
    for value in values:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{name} must hold integers; got {value!r}.")
        if value < 1 or (upper is not None and value > upper):
            bound = "" if upper is None else f" and at most the dimension {upper}"
            raise ValueError(
                f"Every value of {name} must be at least 1{bound}; got {value}."
            )
    return tuple(int(v) for v in values)


def bias_curve(
    estimator: EstimateFn,
    true_grad_fn: TrueGradFn,
    params: Params,
    example_batch: Batch,
    key: PRNGKey,
    ks: Sequence[int] = (1, 10, 100, 1000),
    *,
    chunk_size: int = 100,
) -> Array:
    """Cosine of the mean of K guesses with the true gradient, for one example: [len(ks)].

    With ``g = true_grad_fn(params, example_batch)`` and ``g_hat_j =
    estimator(params, example_batch, key_j)`` for ``max(ks)`` independent keys
    ``key_j`` (from ``jax.random.split(key, ...)``):

    .. math::
        c_K = \\cos\\Big(\\frac{1}{K} \\sum_{j=1}^{K} \\hat g_j, \\; g\\Big)
        \\qquad \\text{for each } K \\in ks.

    As K grows the mean tends to ``E[g_hat]``: ``c_K -> 1`` for an unbiased
    method, and ``c_K`` saturates at ``cos(E[g_hat], g) < 1`` for a biased one.
    The ``max(ks)`` estimates are computed once, ``chunk_size`` at a time
    (vmapped within a chunk, scanned over chunks, so memory holds about
    ``2 * chunk_size`` estimates), and summed cumulatively in at least float32.

    ``example_batch`` must be a batch of one example.
    """
    ks = _positive_ints("ks", ks)
    _check_positive_int("chunk_size", chunk_size)
    if _batch_size(example_batch) != 1:
        raise ValueError(
            f"bias_curve measures one example: example_batch must be a batch of one; got "
            f"batch size {_batch_size(example_batch)}."
        )
    true_grads = true_grad_fn(params, example_batch)
    chunk = min(chunk_size, max(ks))
    keys = jax.random.split(key, (math.ceil(max(ks) / chunk), chunk))

    def step(total, chunk_keys):
        estimates = jax.vmap(lambda k: estimator(params, example_batch, k))(chunk_keys)
        sums = jax.tree.map(
            lambda t, e: t + jnp.cumsum(_float(e), axis=0), total, estimates
        )  # the sums of the first K estimates, for K in this chunk: [chunk, ...]
        # The cosine of a sum is that of the mean.
        cosines = jax.vmap(lambda s: cosine(s, true_grads))(sums)
        return jax.tree.map(lambda s: s[-1], sums), cosines

    zeros = jax.tree.map(lambda g: jnp.zeros_like(_float(g)), true_grads)
    _, cosines = jax.lax.scan(step, zeros, keys)  # [chunks, chunk]
    return cosines.reshape(-1)[jnp.asarray(ks) - 1]


def analytic_bias(cov: Array, grad: Array) -> tuple[Array, Array]:
    """Bias of a guess with known covariance, and its norm relative to the gradient's.

    A guess ``y`` with ``E[y y^T] = C`` gives ``E[g_hat] = E[y y^T] g = C g``, so

    .. math::
        b = (C - I)\\, g, \\qquad \\rho = \\frac{\\|b\\|}{\\|g\\|}

    (``rho = 0`` when ``g = 0``). ``cov`` is [n, n] and ``grad`` [n]; returns
    ``(b, rho)``.
    """
    cov, grad = jnp.asarray(cov), jnp.asarray(grad)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1] or grad.shape != cov.shape[:1]:
        raise ValueError(
            f"analytic_bias needs a square cov [n, n] and grad [n]; got cov {cov.shape} "
            f"and grad {grad.shape}."
        )
    bias = cov @ grad - grad
    return bias, _safe_divide(jnp.linalg.norm(bias), jnp.linalg.norm(grad))


# --- weights: effective rank, singular value powers --------------------------------


def _check_matrix(name: str, x: Array) -> Array:
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(
            f"{name} needs a matrix [..., m, n]; got an array of shape {x.shape}."
        )
    return x


def effective_rank(matrix: Array) -> Array:
    """Effective rank (Roy & Vetterli, 2007): exp of the entropy of the normalised singular values.

    With singular values ``sigma_i`` of ``matrix`` and ``p_i = sigma_i / sum_j sigma_j``:

    .. math::
        \\mathrm{erank} = \\exp\\Big(-\\sum_i p_i \\log p_i\\Big)

    (``0 log 0 = 0``). It lies in [1, min(m, n)]: ``n`` for the n x n identity,
    1 for a rank-one matrix; 0 for the zero matrix. Batched over leading axes.

    >>> round(float(effective_rank(jnp.eye(4))), 4)
    4.0
    """
    sigma = _float(
        jnp.linalg.svd(_check_matrix("effective_rank", matrix), compute_uv=False)
    )
    p = _safe_divide(sigma, jnp.sum(sigma, axis=-1, keepdims=True))
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)
    return jnp.where(jnp.sum(sigma, axis=-1) > 0, jnp.exp(entropy), 0.0)


def effective_ranks(params: Params) -> dict[str, Array]:
    """:func:`effective_rank` of every 2-D leaf (the dense kernels): ``{leaf path: []}``."""
    return {
        path: effective_rank(x) for path, x in _named_leaves(params) if jnp.ndim(x) == 2
    }


def power_singular_values(w: Array, p: float) -> Array:
    """``W`` with its singular values raised to the power ``p``: ``U S^p V^T``.

    With the thin SVD ``W = U S V^T``, returns ``U S^p V^T`` (batched over
    leading axes): ``p = 1`` gives W, ``p = 0`` its orthogonal (polar) factor
    ``U V^T``, ``p > 1`` sharpens the spectrum and ``p < 1`` flattens it (the
    self-sharpening experiment's W^T guesses, p in [0.1, 4]).
    """
    u, s, vt = jnp.linalg.svd(
        _check_matrix("power_singular_values", w), full_matrices=False
    )
    return (u * s[..., None, :] ** p) @ vt


# --- gradient-activation subspaces ---------------------------------------------------


def _captured_cosines(rows: Array, basis: Array, ks: tuple[int, ...]) -> Array:
    """``|G V_k|_F / |G|_F`` for the first k orthonormal columns of ``basis``, each k: [len(ks)]."""
    energy = jnp.cumsum(jnp.sum((rows @ basis) ** 2, axis=0))  # [k_max]
    captured = energy[jnp.asarray(ks) - 1]
    return jnp.minimum(jnp.sqrt(_safe_divide(captured, jnp.sum(rows**2))), 1.0)


def _principal_directions(x: Array) -> Array:
    """Right singular vectors of ``x`` [N, n], by decreasing singular value: [n, n] columns.

    All n, completed to an orthonormal basis when N < n (thin SVD otherwise:
    no [N, N] factor for large N).
    """
    num_rows, dim = x.shape
    _, _, vt = jnp.linalg.svd(x, full_matrices=num_rows < dim)
    return vt.T


def subspace_overlap(
    grad_rows: Array,
    activations: Array,
    k: int | Sequence[int],
    key: PRNGKey,
    *,
    center: bool = False,
) -> dict[str, Array]:
    """How much of a layer's gradient lies in its input activations' top principal subspace.

    ``grad_rows`` [..., n]: a gradient whose rows live in the layer's input
    space, e.g. the gradient of ``s = W x`` with respect to W, [out, n] (for a
    Flax kernel, [n, out], pass its transpose), or per-example ones [N, out, n];
    all leading axes are flattened into rows, giving G [M, n] (vmap for one
    cosine per example). ``activations`` [N, n]: the layer's inputs ``x``.
    With ``V_k`` [n, k] the top-k right singular vectors of the activations
    (their principal directions, of the uncentred second moment ``X^T X``;
    ``center=True`` subtracts the mean activation first, as PCA does), the
    overlap is the cosine between G and its projection on the input side:

    .. math::
        \\cos\\big(G, \\; G V_k V_k^\\top\\big)
        = \\frac{\\|G V_k\\|_F}{\\|G\\|_F}

    (0 for G = 0). The same with ``V_k`` replaced by the first k columns of
    ``Q`` from the QR decomposition of an [n, max(k)] standard normal matrix
    drawn with ``key`` is the random baseline: a uniformly random k-dimensional
    subspace, for which ``E[cos^2] = k / n``. The subspaces for different k
    are nested, and every k is computed from one factorisation.

    The uncentred basis is the default because a dense layer's gradient on a
    batch, ``sum_b delta_b x_b^T``, lies in the span of the batch's ``x_b``:
    with k at least their rank the overlap is 1.

    Args:
      grad_rows: [..., n].
      activations: [N, n].
      k: an int or a non-empty sequence of ints, each in 1..n.
      key: draws the random subspace.
      center: subtract the mean activation before the SVD.

    Returns:
      ``{"pca": ..., "random": ...}``, each of shape [] for an int ``k`` or
      [len(k)] for a sequence.
    """
    grad_rows, activations = jnp.asarray(grad_rows), jnp.asarray(activations)
    if activations.ndim != 2:
        raise ValueError(f"activations must be [N, n]; got shape {activations.shape}.")
    dim = activations.shape[1]
    if grad_rows.ndim < 1 or grad_rows.shape[-1] != dim:
        raise ValueError(
            f"grad_rows must be [..., n] with n = {dim}, the activations' features; got "
            f"shape {grad_rows.shape} (for a Flax kernel's gradient [n, out], pass its "
            f"transpose)."
        )
    ks = _positive_ints("k", k, upper=dim)
    rows = _float(grad_rows.reshape(-1, dim))
    x = _float(activations)
    if center:
        x = x - jnp.mean(x, axis=0)
    pca = _principal_directions(x)[:, : max(ks)]
    random, _ = jnp.linalg.qr(jax.random.normal(key, (dim, max(ks)), rows.dtype))
    overlaps = {
        "pca": _captured_cosines(rows, pca, ks),
        "random": _captured_cosines(rows, random, ks),
    }
    if np.ndim(k) == 0:
        return {name: value[0] for name, value in overlaps.items()}
    return overlaps
