"""W-perp's guesses: the top-k right singular subspace of the next map's Jacobian.

Exact W-perp (:func:`wperp`) takes a per-example SVD of ``J_b = W_{l+1}
D_{l,b}``; :func:`wperp_ns` finds the subspace with products by ``J_b`` and
``J_b^T`` only (JVPs and VJPs of the next site map): a block Krylov space
and Rayleigh-Ritz (faithful, the default), or a one-vector polynomial filter
(cheaper, a different covariance).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from guessgrad._src.base import Array, PRNGKey
from guessgrad._src.rules import GuessContext, GuessFn, GuessRule, normal_like
from guessgrad._src.sharding import like_batch

WPERP_NS_VARIANTS = ("krylov", "vector", "warm")
KRYLOV_BLOCK = 2  # Gaussian start vectors of the Krylov space, by default
FILTER_DEGREE = 6  # the vector variant's filter degree, by default


def _singular_tolerance(singular_values: Array) -> Array:
    """Singular values below this (relative to the largest) count as zero."""
    eps = jnp.finfo(singular_values.dtype).eps
    return singular_values[..., :1] * eps * max(singular_values.shape[-1], 1) * 10


def _site_and_jacobian(
    ctx, index: int, who: str, why: str, advice: str = ""
) -> tuple[Array, Array]:
    """The site's value and ``J_b`` [B, m, n], for rules that factorise ``J_b``
    (float32 or float64 sites only: a clear error otherwise)."""
    site = ctx.value(index)
    if site.dtype not in (jnp.float32, jnp.float64):
        raise ValueError(
            f"{who} needs float32 or float64 ({why}); site {index} is "
            f"{site.dtype}.{advice}"
        )
    return site, ctx.next_jacobian(index)


def wperp(rank: int) -> GuessFn:
    """``V_k z``, z ~ N(0, I_k), V_k the top-``rank`` right singular vectors of J_b (exact SVD).

    Directions with zero singular value (fewer than ``rank`` live units) get no
    weight, so Cov(y) is the projector on J_b's top-k row space.
    """

    def guess(ctx: GuessContext, index: int, key: PRNGKey) -> Array:
        site, jac = _site_and_jacobian(
            ctx,
            index,
            "Exact wperp",
            "a per-example SVD",
            " Use wperp_ns, which needs only matrix products.",
        )
        _, singular_values, vh = jnp.linalg.svd(jac, full_matrices=False)
        k = min(rank, vh.shape[1])
        keep = singular_values[:, :k] > _singular_tolerance(singular_values)
        z = (
            like_batch(jax.random.normal(key, (site.shape[0], k), site.dtype), site)
            * keep
        )
        return jnp.einsum("bk,bkn->bn", z, vh[:, :k]).reshape(site.shape)

    return guess


def debiased_wt(sigma: float = 1e-6) -> GuessFn:
    """``y = (J_b^T J_b + sigma I)^(-1/2) J_b^T eps``: W^T's guess, whitened (exact).

    ``J_b = W_{l+1} D_{l,b}`` per example (``ctx.next_jacobian``), eps ~ N(0,
    I) at the target. With ``J_b^T J_b = V Lambda V^T``, ``Cov(y) = V
    Lambda (Lambda + sigma I)^(-1) V^T``: the projector on ``J_b``'s row
    space as ``sigma -> 0``, so the estimate is unbiased for a site gradient
    in that row space (``D W^T delta``, every gradient a ReLU site can
    have), at the cost of spreading the guess over every live direction
    (W-perp's open question: the bias of ``wt`` removed, the variance of
    activity perturbation on the live units back). ``sigma`` (absolute,
    in the units of ``J^T J``'s eigenvalues) keeps small directions from
    blowing up. One ``n x n`` eigendecomposition per example, site and
    step, as exact :func:`wperp`.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive; got {sigma!r}.")

    def guess(ctx: GuessContext, index: int, key: PRNGKey) -> Array:
        site, jac = _site_and_jacobian(
            ctx, index, "debiased_wt", "a per-example eigendecomposition"
        )
        eps = like_batch(
            jax.random.normal(key, jac.shape[:2], site.dtype), site
        )  # [B, m]
        pulled = _dot("bmn,bm->bn", jac, eps)  # J^T eps
        values, vectors = jnp.linalg.eigh(_dot("bmi,bmj->bij", jac, jac))
        scale = jax.lax.rsqrt(jnp.maximum(values, 0.0) + sigma)
        coefficients = _dot("bnk,bn->bk", vectors, pulled) * scale
        guess = _dot("bnk,bk->bn", vectors, coefficients)
        return guess.reshape(site.shape)

    return guess


def default_krylov_steps(rank: int, block_size: int = KRYLOV_BLOCK) -> int:
    """The Krylov variant's default steps: a space of ``max(3 rank, 16)`` dimensions.

    ``block_size * (steps + 1)`` dimensions, at ``block_size * (2 steps + 2)``
    products: with the default block of 2, ranks 1 to 5 take 7 steps (16
    dimensions, 32 products), rank 10 takes 14 (30 dimensions, 60 products).
    That depth gives W-perp's mean direction (the cosine of ``E[P_hat] g``
    with ``P_k g``) above 0.999 at k = 1, 3 and 10 on a trained 3x128 MLP,
    where ``max(2 rank, 10)`` dimensions gave 0.936 at k = 3 and 0.986 at
    k = 10. At equal cost, a narrow deep space beats a
    wide shallow one (at 6x1024, trained: mean cosine of the projected
    gradient with exact W-perp's 0.996 for 2 vectors x 9 steps, 0.992 for 4
    x 4, 0.97 for 10 x 1).
    """
    return max(1, -(-max(3 * rank, 16) // block_size) - 1)


def _example_norms(x: Array) -> Array:
    """Per-example norms of [B, ...], shaped to broadcast against ``x``."""
    norms = jnp.sqrt(jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=-1))
    return norms.reshape((-1,) + (1,) * (x.ndim - 1))


def _safe_inverse(x: Array) -> Array:
    """``1 / x`` where ``x > 0``, else 0 (zero vectors stay zero)."""
    return jnp.where(x > 0, 1.0 / jnp.where(x > 0, x, 1.0), 0.0)


def chebyshev_filter(
    gram: Callable[[Array], Array], start: Array, degree: int, cutoff: float
) -> Array:
    """``p(A) start`` per example, ``p`` a degree-``degree`` filter that favours A's top.

    ``A = gram`` (symmetric PSD, applied to [B, ...]). ``cutoff > 0``: the
    Chebyshev recurrence ``T_{j+1} = 2 (2 A / a_j - 1) T_j - T_{j-1}`` (``T_0
    = start``, ``T_1 = (2 A / a_0 - 1) start``), which stays bounded on ``[0,
    a]`` and grows fastest above it. The bound adapts per example from the
    products already made: ``a_j = cutoff * rho_j``, ``rho_j`` the largest of
    ``|A T_i| / |T_i|``, i <= j, a lower bound on ``||A||`` that rises towards
    it as the iterate turns to the top. With ``cutoff <= 1``, ``a_j`` never
    exceeds ``||A||``, so the filter always amplifies the top of the spectrum
    (a bound above ``||A||`` would leave every eigenvalue inside the bounded
    band: no filtering at all). ``cutoff = 0``: the power filter ``A^d``. The
    iterate is rescaled per example after each product (the result's norm is
    arbitrary); the result is a degree-``degree`` polynomial in ``A`` applied
    to ``start``.
    """
    if degree == 0:
        return start
    image = gram(start)
    if cutoff == 0:
        current = image
        for _ in range(degree - 1):
            current = gram(current * _safe_inverse(_example_norms(current)))
        return current

    def growth(image, vector):  # |A v| / |v| per example: at most ||A||
        return _example_norms(image) * _safe_inverse(_example_norms(vector))

    rho = growth(image, start)
    previous, current = start, 2.0 * _safe_inverse(cutoff * rho) * image - start
    for _ in range(degree - 1):
        image = gram(current)
        rho = jnp.maximum(rho, growth(image, current))
        following = 2.0 * (2.0 * _safe_inverse(cutoff * rho) * image - current)
        following = following - previous
        scale = _safe_inverse(_example_norms(following))
        previous, current = current * scale, following * scale
    return current


def _dot(subscripts: str, *operands: Array) -> Array:
    """``einsum`` at full float32 precision: the subspace's Gram matrices and
    projections must not drop to TF32 or bfloat16 passes on accelerators."""
    return jnp.einsum(subscripts, *operands, precision=jax.lax.Precision.HIGHEST)


def _subspace_dtype(dtype) -> jnp.dtype:
    """Orthogonalisation and Rayleigh-Ritz run in at least float32 (bfloat16 sites too)."""
    return jnp.promote_types(dtype, jnp.float32)


def orthonormal_rows(block: Array, basis: Array | None = None) -> Array:
    """Rows of each [p, n] block made orthonormal, and orthogonal to ``basis``'s [P, n] rows.

    Gram-Schmidt, row by row, each projection done twice ("twice is
    enough"): against ``basis``, then against the rows already accepted. A
    row whose residual is below ``sqrt(eps) * 10`` of the block's largest
    row is dependent on the rest (or numerical noise) and becomes a zero
    row, so a rank-deficient block (fewer live units than vectors) gives
    zero rows, never noise outside the row space. Vector operations only (no
    factorisation): cost ``O(B p (P + p) n)``, small next to the products
    with the site map that made the block.
    """
    dtype = _subspace_dtype(block.dtype)
    x = block.astype(dtype)
    rtol = 10.0 * float(jnp.finfo(dtype).eps) ** 0.5
    scale = jnp.max(jnp.sum(x * x, axis=-1), axis=-1, keepdims=True)  # [B, 1]
    rows: list[Array] = []
    for index in range(x.shape[1]):
        row = x[:, index]  # [B, n]
        for _ in range(2):
            if basis is not None:
                row = row - _dot("bq,bqn->bn", _dot("bn,bqn->bq", row, basis), basis)
            for done in rows:
                row = row - jnp.sum(row * done, axis=-1, keepdims=True) * done
        norm2 = jnp.sum(row * row, axis=-1, keepdims=True)
        keep = norm2 > (rtol**2) * scale
        rows.append(
            jnp.where(keep, row * jax.lax.rsqrt(jnp.where(keep, norm2, 1.0)), 0.0)
        )
    return jnp.stack(rows, axis=1)


def _block_maps(ctx, index: int):
    """``(push, pull)`` of the next map on blocks: [B, p, n...] <-> [B, p, m...]."""
    push, pull = ctx.next_maps(index)
    return (
        jax.vmap(push, in_axes=1, out_axes=1),
        jax.vmap(pull, in_axes=1, out_axes=1),
    )


def _flat(x: Array) -> Array:
    return x.reshape(x.shape[:2] + (-1,))


def orthonormal_rows_loop(block: Array, basis: Array | None = None) -> Array:
    """:func:`orthonormal_rows` as a loop: the same space, compiled once for any size.

    Row ``i`` is projected (twice) against ``basis`` and against all rows
    accepted so far at once (rows not yet reached are zero and project to
    nothing), in a ``fori_loop`` over rows: ``p`` steps of a few small
    kernels, where the unrolled version compiles ``p^2`` row operations (two
    minutes at ``p = 12`` in a warm start's ``init``). No factorisation:
    small batched eigendecompositions are slow kernels on a GPU. The same
    tolerance as :func:`orthonormal_rows`: a dependent row becomes zero.
    """
    dtype = _subspace_dtype(block.dtype)
    x = block.astype(dtype)
    rtol = 10.0 * float(jnp.finfo(dtype).eps) ** 0.5
    scale = jnp.max(jnp.sum(x * x, axis=-1), axis=-1, keepdims=True)  # [B, 1]

    def accept(index, rows):
        row = jax.lax.dynamic_index_in_dim(x, index, axis=1, keepdims=False)
        for _ in range(2):
            if basis is not None:
                row = row - _dot("bq,bqn->bn", _dot("bn,bqn->bq", row, basis), basis)
            row = row - _dot("bq,bqn->bn", _dot("bn,bqn->bq", row, rows), rows)
        norm2 = jnp.sum(row * row, axis=-1, keepdims=True)
        keep = norm2 > (rtol**2) * scale
        row = jnp.where(keep, row * jax.lax.rsqrt(jnp.where(keep, norm2, 1.0)), 0.0)
        return jax.lax.dynamic_update_index_in_dim(rows, row, index, axis=1)

    return jax.lax.fori_loop(0, x.shape[1], accept, jnp.zeros_like(x))


UNROLLED_ROWS = 8  # warm blocks up to this many rows: unrolled Gram-Schmidt


def _orthonormalize_warm(block: Array, basis: Array | None = None) -> Array:
    """The warm variant's orthonormalisation: :func:`orthonormal_rows` unrolled for
    blocks of up to :data:`UNROLLED_ROWS` rows (no loop: a loop's steps cost a
    round trip each on a GPU), :func:`orthonormal_rows_loop` above (compiled
    once, where the unrolled version grows as rows squared)."""
    if block.shape[1] <= UNROLLED_ROWS:
        return orthonormal_rows(block, basis)
    return orthonormal_rows_loop(block, basis)


def krylov_subspace(
    ctx,
    index: int,
    key: PRNGKey | None,
    rank: int,
    block_size: int,
    depth: int,
    start: Array | None = None,
    orthonormalize: Callable[..., Array] = orthonormal_rows,
) -> tuple[Array, Array]:
    """Approximate top-``rank`` right singular vectors of each example's ``J_b``.

    Block Krylov space ``[Y, A Y, ..., A^depth Y]`` of ``A = J_b^T J_b``,
    ``Y = J_b^T Omega`` with ``block_size`` Gaussian columns (or ``start``,
    a given [B, p, n] block in ``J_b``'s row space; ``key`` is then
    unused), orthonormalised as it grows (``orthonormalize``:
    :func:`orthonormal_rows`, or :func:`orthonormal_rows_loop` for wide
    blocks); then Rayleigh-Ritz. Returns ``(ritz, keep)``: [B, k, n]
    orthonormal rows (flattened site), best first, and [B, k] whether each
    has a Ritz value above zero (directions of a row space smaller than
    ``k`` get no weight, as in exact W-perp).
    """
    site, nxt = ctx.value(index), ctx.value(ctx.target(index))
    push_block, pull_block = _block_maps(ctx, index)
    batch = site.shape[0]
    flat = _flat
    if start is None:
        omega = like_batch(
            jax.random.normal(key, (batch, block_size) + nxt.shape[1:], nxt.dtype), nxt
        )
        start = flat(pull_block(omega))  # J^T Omega: in the row space

    basis, images = [], []
    current = orthonormalize(start)
    for step in range(depth + 1):
        basis.append(current)
        image = push_block(
            current.astype(site.dtype).reshape(current.shape[:2] + site.shape[1:])
        )
        images.append(flat(image).astype(current.dtype))
        if step < depth:
            grown = flat(pull_block(image)).astype(current.dtype)  # J^T J q
            current = orthonormalize(grown, jnp.concatenate(basis, axis=1))
    q = jnp.concatenate(basis, axis=1)  # [B, P, n], orthonormal (or zero) rows
    z = jnp.concatenate(images, axis=1)  # [B, P, m] = J q
    # Rayleigh-Ritz: q J^T J q^T = z z^T, no further product with the map.
    values, vectors = jnp.linalg.eigh(_dot("bpm,bqm->bpq", z, z))
    k = min(rank, q.shape[1])
    values, vectors = values[:, -k:], vectors[:, :, -k:]
    keep = values > values[:, -1:] * jnp.finfo(q.dtype).eps * 10 * q.shape[1]
    ritz = _dot("bpk,bpn->bkn", vectors[:, :, ::-1], q)  # best first
    return ritz, keep[:, ::-1]


def _isotropic_guess(ritz: Array, keep: Array, site: Array, key: PRNGKey) -> Array:
    """``y = V_k z``, ``z ~ N(0, I_k)`` on the kept directions: [B, k, n] -> the site's shape."""
    coefficients = jax.random.normal(key, keep.shape, ritz.dtype) * keep
    coefficients = like_batch(coefficients, site)
    guess = jnp.einsum("bk,bkn->bn", coefficients, ritz)
    return guess.astype(site.dtype).reshape(site.shape)


def _wperp_krylov(ctx, index, key, rank, block_size, depth):
    """``y = V_k z`` with ``V_k`` from :func:`krylov_subspace` and ``z ~ N(0, I_k)``."""
    space_key, z_key = jax.random.split(key)
    ritz, keep = krylov_subspace(ctx, index, space_key, rank, block_size, depth)
    return _isotropic_guess(ritz, keep, ctx.value(index), z_key)


WARM_MARGIN = 3  # the warm variant's shared subspace is rank + WARM_MARGIN, by default
WARM_STEPS = 0  # its per-example Krylov steps from the warm start, by default
WARMUP_ITERATIONS = 4  # subspace iterations of init on its batch


def _mean_gram_step(ctx, index: int, basis: Array) -> tuple[Array, Array]:
    """``(A_b S, S')``: the shared basis S [P, n] through every example's ``A_b =
    J_b^T J_b`` ([B, P, n], in each row space), and ``S'``, the orthonormalised
    batch sum ``sum_b A_b S``: one step of subspace iteration with the batch's
    mean Gram operator, no product beyond the ``A_b S`` themselves."""
    site = ctx.value(index)
    push_block, pull_block = _block_maps(ctx, index)
    tiled = jnp.broadcast_to(basis, (site.shape[0],) + basis.shape)
    tiled = like_batch(tiled.astype(site.dtype), site).reshape(
        (site.shape[0], basis.shape[0]) + site.shape[1:]
    )
    images = _flat(pull_block(push_block(tiled))).astype(basis.dtype)
    return images, _orthonormalize_warm(jnp.sum(images, axis=0)[None])[0]


def _refill(basis: Array, key: PRNGKey) -> Array:
    """Zero rows of an orthonormal [P, n] basis (a collapsed direction) replaced by
    fresh Gaussian ones, orthonormal to the rest, so the subspace keeps its size.

    Fresh rows nearly dependent on the rest are dropped again by the
    orthonormalisation: a second draw covers that (rare) case.
    """
    for attempt in range(2):
        dead = jnp.all(basis == 0, axis=-1, keepdims=True)
        fresh = jax.random.normal(
            jax.random.fold_in(key, attempt), basis.shape, basis.dtype
        )
        basis = _orthonormalize_warm(jnp.where(dead, fresh, basis)[None])[0]
    return basis


def _warm_init(ctx, index: int, key: PRNGKey, block_size: int, warmup: int) -> Array:
    site = ctx.value(index)
    size = math.prod(site.shape[1:])
    dtype = _subspace_dtype(site.dtype)
    gaussian = jax.random.normal(key, (1, block_size, size), dtype)
    basis = _orthonormalize_warm(gaussian)[0]
    for step in range(warmup):
        basis = _refill(
            _mean_gram_step(ctx, index, basis)[1], jax.random.fold_in(key, step)
        )
    return basis


def warm_subspace(
    ctx, index: int, rank: int, depth: int, basis: Array
) -> tuple[Array, Array, Array]:
    """The warm variant's subspace: ``(ritz, keep, following)``.

    ``ritz`` [B, k, n] and ``keep`` [B, k] as :func:`krylov_subspace` gives
    them for the Krylov space of depth ``depth`` grown from ``A_b S`` (``S =
    basis``, [P, n]); ``following``, the orthonormalised ``sum_b A_b S``:
    the next basis before zero rows are refilled.
    """
    start, following = _mean_gram_step(ctx, index, basis)
    ritz, keep = krylov_subspace(
        ctx,
        index,
        None,
        rank,
        basis.shape[0],
        depth,
        start=start,
        orthonormalize=_orthonormalize_warm,
    )
    return ritz, keep, following


def _wperp_warm(ctx, index, key, rank, depth, basis):
    """``y = V_k z`` from the Krylov space grown from ``A_b S`` (S the warm basis);
    the next state is one subspace-iteration step of S with the batch's mean
    Gram operator."""
    z_key, refill_key = jax.random.split(key)
    ritz, keep, following = warm_subspace(ctx, index, rank, depth, basis)
    guess = _isotropic_guess(ritz, keep, ctx.value(index), z_key)
    return guess, _refill(following, refill_key)


def wperp_ns_products(
    rank: int,
    variant: str = "krylov",
    krylov_steps: int | None = None,
    block_size: int = KRYLOV_BLOCK,
    degree: int = FILTER_DEGREE,
    subspace: int | None = None,
) -> int:
    """The ``W^T``-sized products (JVPs and VJPs of the next map) per site of :func:`wperp_ns`.

    Krylov: ``block_size * (2 krylov_steps + 2)`` (``krylov_steps`` by
    default :func:`default_krylov_steps`); the filter: ``1 + 2 degree``;
    warm: ``subspace * (2 krylov_steps + 3)`` (``krylov_steps`` by default
    :data:`WARM_STEPS`, ``subspace`` by default ``rank + 3``).
    """
    _check_variant(variant)
    if variant == "vector":
        return 1 + 2 * degree
    if variant == "warm":
        steps = WARM_STEPS if krylov_steps is None else krylov_steps
        if subspace is None:
            subspace = rank + WARM_MARGIN
        return subspace * (2 * steps + 3)
    if krylov_steps is None:
        krylov_steps = default_krylov_steps(rank, block_size)
    return block_size * (2 * krylov_steps + 2)


def _check_variant(variant: str) -> None:
    if variant not in WPERP_NS_VARIANTS:
        raise ValueError(
            f"variant must be one of {WPERP_NS_VARIANTS}; got {variant!r}."
        )


def wperp_ns(
    rank: int,
    *,
    variant: str = "krylov",
    krylov_steps: int | None = None,
    block_size: int = KRYLOV_BLOCK,
    degree: int = FILTER_DEGREE,
    cutoff: float = 1.0,
    subspace: int | None = None,
    warmup: int = WARMUP_ITERATIONS,
) -> GuessFn | GuessRule:
    """W-perp without an SVD: a guess in J_b's (approximate) top right singular subspace.

    ``variant="krylov"`` (default, faithful): per example, the block Krylov
    space ``[Y, A Y, ..., A^d Y]`` of ``A = J_b^T J_b`` from ``Y = J_b^T
    Omega`` (``block_size`` Gaussian columns; ``d = krylov_steps``, by
    default enough for ``max(3 rank, 16)`` dimensions,
    :func:`default_krylov_steps`), orthonormalised as it grows, then
    Rayleigh-Ritz: the top-``rank`` eigenvectors of the small projected
    matrix ``Q A Q^T`` (computed from the last pushes, no extra product)
    give ``V_k``, and ``y = V_k z`` with ``z ~ N(0, I_k)``: isotropic over
    the found subspace, covariance a rank-k projector, as exact W-perp's.
    Cost ``block_size * (2 d + 2)`` products the size of ``W^T eps``.

    ``variant="vector"`` (cheaper, not W-perp): one guess vector, ``y =
    p(J_b^T J_b) J_b^T eps`` with eps ~ N(0, I) at the target and ``p`` the
    degree-``degree`` filter of :func:`chebyshev_filter` (``cutoff``; 0
    gives the power filter). In J_b's singular basis the component along
    ``v_i`` is ``sigma_i p(sigma_i^2) z_i``: the top directions dominate,
    the rest are damped. Cost ``1 + 2 degree`` products. ``rank`` is
    unused: the filter fixes no rank, and within the top subspace the guess
    is weighted by the filter rather than isotropic as in exact W-perp.

    ``variant="warm"`` (stateful: returns a :class:`GuessRule` with
    ``init``): each site keeps a shared orthonormal basis ``S`` of
    ``subspace`` directions (default ``rank + 3``) across steps (weights
    move slowly). Per
    example, the Krylov space of ``A = J_b^T J_b`` grows ``krylov_steps``
    steps (default :data:`WARM_STEPS`) from ``A S`` instead of from
    Gaussian vectors, then Rayleigh-Ritz and ``y = V_k z`` as above; the
    next state is one step of subspace iteration with the batch's mean
    ``A``, ``S' = orth(sum_b A_b S)``, from the products already made.
    ``init`` starts from a Gaussian basis refined by ``warmup`` such steps
    on its batch. Cost ``subspace * (2 d + 3)`` products.

    Every product is a JVP or VJP of the next site map, so every variant
    works for any site map; guesses lie in J_b's row space (zero on dead
    units).
    """
    _check_variant(variant)
    if variant == "warm" and krylov_steps is None:
        krylov_steps = WARM_STEPS
    if subspace is None:
        subspace = rank + WARM_MARGIN
    for name, value, least in (
        ("krylov_steps", krylov_steps, 0 if variant == "warm" else 1),
        ("block_size", block_size, 1),
        ("degree", degree, 1),
        ("subspace", subspace, 1),
        ("warmup", warmup, 0),
    ):
        if value is None and name == "krylov_steps":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}; got {value!r}.")
    if not 0 <= cutoff <= 1:
        raise ValueError(
            f"cutoff must be in [0, 1] (above 1 the filter's band can pass the "
            f"top of the spectrum and stop filtering); got {cutoff!r}."
        )
    if krylov_steps is None:
        krylov_steps = default_krylov_steps(rank, block_size)
    if variant == "warm":
        if subspace < rank:
            raise ValueError(
                f"subspace must be at least rank ({rank}): the guesses' subspace "
                f"is found inside it; got {subspace}."
            )

        def warm_guess(ctx: GuessContext, index: int, key: PRNGKey, basis):
            return _wperp_warm(ctx, index, key, rank, krylov_steps, basis)

        def warm_init(ctx: GuessContext, index: int, key: PRNGKey):
            return _warm_init(ctx, index, key, subspace, warmup)

        return GuessRule(guess=warm_guess, init=warm_init)

    def guess(ctx: GuessContext, index: int, key: PRNGKey) -> Array:
        if variant == "krylov":
            return _wperp_krylov(ctx, index, key, rank, block_size, krylov_steps)
        nxt = ctx.value(ctx.target(index))
        push, pull = ctx.next_maps(index)
        start = pull(normal_like(key, nxt))
        return chebyshev_filter(lambda v: pull(push(v)), start, degree, cutoff)

    return guess
