"""Guess rules: what each method believes ``dl_b/ds_l`` looks like.

A rule sees only what is known at guess time, through a context (site
values, activations, masks, the maps between a site and its target, random
numbers), never the label or the loss, unless it declares ``needs_label``
(only ``self_sharpening``'s terminal sites do). Rules are written per site,
with a key folded from the site's index, so the same guesses can be
regenerated site by site.

Two contexts implement the interface the rules use (``value``, ``target``,
``has_act``, ``output``, ``mask``, ``pull``, ``next_maps``,
``next_jacobian``, ``loss_gradient``, ``is_terminal``): :class:`GuessContext`
on a :class:`~guessgrad.models.Chain` (lean mode), and
:class:`guessgrad._src.engine.GraphContext` on any model with sites. The W^T
family pulls back through the map from a site to its target with the rest of
the graph fixed, so it works for any layers in between (dense, grouped,
attention, a norm, a residual), not only for a dense matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from guessgrad._src.base import Array, Params, PRNGKey
from guessgrad._src.core import normalize_per_example
from guessgrad._src.models import ChainFns
from guessgrad._src.sharding import explicit_spec, like, like_batch


class GuessContext(NamedTuple):
    """What a rule may read on a :class:`~guessgrad.models.Chain` (lean mode, tests).

    The rules only use the context interface below (``value``, ``target``,
    ``pull``, ...), which :class:`guessgrad._src.engine.GraphContext`
    implements for any model with sites. Targets are opaque handles: site
    indices here, site or tap names there. ``labels`` is None unless the rule
    needs them.
    """

    fns: ChainFns
    layer_params: tuple[Params, ...]
    sites: tuple[Array, ...]
    labels: Array | None = None

    @property
    def num_sites(self) -> int:
        return len(self.sites)

    def is_terminal(self, index: int) -> bool:
        """Whether site ``index`` is the last (the logits): it gets the rule's output guess."""
        return index == self.num_sites - 1

    def target(self, index: int, depth: int = 1) -> int:
        """The site ``depth`` links after ``index`` (the logits if past the end)."""
        return min(index + depth, self.num_sites - 1)

    def value(self, target: int) -> Array:
        return self.sites[target]

    def has_act(self, target: int) -> bool:
        """Whether an activation follows ``target`` (every site but the logits)."""
        return target < self.num_sites - 1

    def output(self, index: int) -> Array:
        """``x_{l+1} = sigma(s_l)``, the activation after site ``l``."""
        return self.fns.activation(self.sites[index])

    def mask(self, index: int, tangent: Array) -> Array:
        """``D_l v = sigma'(s_l) * v`` (for ReLU, the 0/1 mask of active units)."""
        return jax.jvp(self.fns.activation, (self.sites[index],), (tangent,))[1]

    def downstream_map(
        self, index: int, target: int, post_activation: bool
    ) -> Callable:
        """``s_l -> s_target`` (then ``sigma`` if ``post_activation``), through the chain's maps."""

        def run(site):
            for later in range(index + 1, target + 1):
                site = self.fns.site_fns[later](
                    self.layer_params[later], self.fns.activation(site)
                )
            return self.fns.activation(site) if post_activation else site

        return run

    def pull(
        self, index: int, target: int, cotangent: Array, post_activation: bool = False
    ) -> Array:
        """VJP of :meth:`downstream_map` at ``s_l``: a cotangent at ``target`` pulled back to ``s_l``."""
        run = self.downstream_map(index, target, post_activation)
        _, vjp = jax.vjp(run, self.sites[index])
        return vjp(cotangent)[0]

    def next_maps(self, index: int) -> tuple[Callable, Callable]:
        """``(push, pull)``: ``v -> J_b v`` and ``u -> J_b^T u`` for the next site, batched.

        Linearisation of the next site map at ``s_l`` and its transpose: one
        forward of the map, then each call is one product the size of ``W^T eps``.
        """
        site = self.sites[index]
        run = self.downstream_map(index, index + 1, post_activation=False)
        _, push = jax.linearize(run, site)
        transpose = jax.linear_transpose(push, site)
        return push, lambda u: transpose(u)[0]

    def next_jacobian(self, index: int) -> Array:
        """Per-example Jacobian ``J_b = d s_{l+1,b} / d s_{l,b}`` (``W_{l+1} D_{l,b}`` for dense): [B, m, n]."""
        run = self.downstream_map(index, index + 1, post_activation=False)

        def one(site):  # [...] -> [m, n], flattened
            jac = jax.jacrev(lambda s: run(s[None])[0])(site)
            return jac.reshape(-1, site.size)

        return jax.vmap(one)(self.sites[index])

    def loss_gradient(self, index: int) -> Array:
        """``softmax(s_L) - onehot(label)``: the exact ``dl_b/ds_L`` (reads the label)."""
        logits = self.sites[index]
        return jax.nn.softmax(logits) - jax.nn.one_hot(
            self.labels, logits.shape[-1], dtype=logits.dtype
        )


HiddenRule = Callable[[GuessContext, int, PRNGKey], Array]
LastRule = Callable[[GuessContext, int, PRNGKey], Array]


class GuessRule(NamedTuple):
    """A method's guess: ``hidden(ctx, l, key)`` for sites with a target, ``last(ctx, l, key)`` for terminal ones.

    ``lookahead``: how many sites after ``l`` the hidden rule reads (W^T reads
    ``s_{l+1}``, k-downstream ``s_{l+k}``), so a pass that keeps no activations
    knows how far ahead to recompute.
    """

    hidden: HiddenRule
    last: LastRule
    needs_label: bool = False
    lookahead: int = 1
    # Pass every guess through the site's activation derivative D_l after any
    # normalisation (Ren et al.'s ReLU mask on activity perturbation).
    mask_after: bool = False


# --- the rules ----------------------------------------------------------------


def normal_like(key: PRNGKey, ref: Array) -> Array:
    """N(0, I) noise with ``ref``'s shape, dtype (and sharding, on an Explicit mesh)."""
    return like(jax.random.normal(key, ref.shape, ref.dtype), ref)


def gaussian_hidden(ctx: GuessContext, index: int, key: PRNGKey) -> Array:
    """Activity perturbation: eps ~ N(0, I) at the site."""
    return normal_like(key, ctx.value(index))


gaussian_last = gaussian_hidden  # eps ~ N(0, I) at a terminal site (the logits)


def true_error_last(ctx: GuessContext, index: int, key: PRNGKey) -> Array:
    """The exact per-example loss gradient at a terminal site (``softmax - onehot`` at logits)."""
    del key
    return ctx.loss_gradient(index)


def wt_hidden(ctx: GuessContext, index: int, key: PRNGKey) -> Array:
    """``D_l W_{l+1}^T eps`` with eps ~ N(0, I) at the next site: the VJP of the map to it."""
    target = ctx.target(index)
    return ctx.pull(index, target, normal_like(key, ctx.value(target)))


def downstream_hidden(depth: int, noise: str = "normal") -> HiddenRule:
    """eps at ``x_{l+1+depth}`` (the logits if past the end), pulled back to ``s_l``.

    ``depth=1``: ``D_l W_{l+1}^T D_{l+1} eps``. ``noise`` is ``"normal"`` (N(0, I))
    or ``"uniform"`` (U(-1, 1)).
    """

    def rule(ctx: GuessContext, index: int, key: PRNGKey) -> Array:
        target = ctx.target(index, depth)
        ref = ctx.value(target)
        if noise == "uniform":
            eps = like(jax.random.uniform(key, ref.shape, ref.dtype, -1.0, 1.0), ref)
        else:
            eps = normal_like(key, ref)
        return ctx.pull(index, target, eps, post_activation=ctx.has_act(target))

    return rule


def mixing_hidden(ctx: GuessContext, index: int, key: PRNGKey) -> Array:
    """``D_{l,b} sum_j alpha_{bj} x_{l+1,j}`` with alpha ~ N(0, 1)^{B x B}, fresh per site."""
    outputs = ctx.output(index)  # [B, ...]
    batch = outputs.shape[0]
    alpha = jax.random.normal(key, (batch, batch), outputs.dtype)
    # On an Explicit mesh the batch axis is sharded: say the result is sharded like it.
    mixed = jnp.einsum(
        "bj,j...->b...", alpha, outputs, out_sharding=explicit_spec(outputs)
    )
    return ctx.mask(index, mixed)


def _singular_tolerance(singular_values: Array) -> Array:
    """Singular values below this (relative to the largest) count as zero."""
    eps = jnp.finfo(singular_values.dtype).eps
    return singular_values[..., :1] * eps * max(singular_values.shape[-1], 1) * 10


def wperp_hidden(rank: int) -> HiddenRule:
    """``V_k z``, z ~ N(0, I_k), V_k the top-``rank`` right singular vectors of J_b (exact SVD).

    Directions with zero singular value (fewer than ``rank`` live units) get no
    weight, so Cov(y) is the projector on J_b's top-k row space.
    """

    def rule(ctx: GuessContext, index: int, key: PRNGKey) -> Array:
        site = ctx.value(index)
        if site.dtype not in (jnp.float32, jnp.float64):
            raise ValueError(
                f"Exact wperp needs float32 or float64 (a per-example SVD); site {index} is "
                f"{site.dtype}. Use wperp_ns, which needs only matrix products."
            )
        jac = ctx.next_jacobian(index)  # [B, m, n]
        _, singular_values, vh = jnp.linalg.svd(jac, full_matrices=False)
        k = min(rank, vh.shape[1])
        keep = singular_values[:, :k] > _singular_tolerance(singular_values)
        z = (
            like_batch(jax.random.normal(key, (site.shape[0], k), site.dtype), site)
            * keep
        )
        return jnp.einsum("bk,bkn->bn", z, vh[:, :k]).reshape(site.shape)

    return rule


def newton_schulz_rows(block: Array, steps: int) -> Array:
    """Approximately orthonormalises the rows of each [p, n] block by Newton-Schulz.

    Scales each block by its Frobenius norm (singular values <= 1), then applies
    the quintic iteration ``X <- a X + b (X X^T) X + c (X X^T)^2 X``, which lifts
    small singular values fast and settles them near 1 (within about 0.7-1.2).
    Matrix products only: no QR or SVD.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    norm = jnp.sqrt(jnp.sum(block**2, axis=(-2, -1), keepdims=True))
    x = block / jnp.maximum(norm, jnp.finfo(block.dtype).tiny)
    for _ in range(steps):
        gram = x @ jnp.swapaxes(x, -1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


WPERP_NS_VARIANTS = ("krylov", "vector", "block")
# power_iters when not given, for the filter (degree) and the block variant.
WPERP_NS_DEFAULT_ITERS = {"vector": 6, "block": 2}
KRYLOV_BLOCK = 2


def krylov_steps(rank: int, block_size: int = KRYLOV_BLOCK) -> int:
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


def wperp_ns_settings(
    rank: int, variant: str, power_iters: int | None, block_size: int | None
) -> tuple[int, int, int]:
    """``(power_iters, block_size, products)`` with the defaults filled in.

    ``products``: the ``W^T``-sized products per site: Krylov ``block_size *
    (2 power_iters + 2)``, the filter ``1 + 2 power_iters``, the block
    variant ``rank * (1 + 2 power_iters)``.
    """
    if variant not in WPERP_NS_VARIANTS:
        raise ValueError(
            f"variant must be one of {WPERP_NS_VARIANTS}; got {variant!r}."
        )
    if block_size is None:
        block_size = KRYLOV_BLOCK
    if power_iters is None:
        if variant == "krylov":
            power_iters = krylov_steps(rank, block_size)
        else:
            power_iters = WPERP_NS_DEFAULT_ITERS[variant]
    if variant == "krylov":
        products = block_size * (2 * power_iters + 2)
    else:
        products = (rank if variant == "block" else 1) * (1 + 2 * power_iters)
    return power_iters, block_size, products


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


def _wperp_ns_block(ctx, index, key, rank, power_iters, ns_steps):
    """Block subspace iteration on ``J_b^T J_b`` with Newton-Schulz orthonormalisation."""
    site, nxt = ctx.value(index), ctx.value(ctx.target(index))
    push, pull = ctx.next_maps(index)
    pull_block = jax.vmap(pull, in_axes=1, out_axes=1)  # [B,p,m] -> [B,p,n]
    push_block = jax.vmap(push, in_axes=1, out_axes=1)  # [B,p,n] -> [B,p,m]
    omega_key, z_key = jax.random.split(key)
    omega = like_batch(
        jax.random.normal(omega_key, (nxt.shape[0], rank) + nxt.shape[1:], nxt.dtype),
        nxt,
    )

    def orthonormalise(block):
        flat = block.reshape(block.shape[:2] + (-1,))
        return newton_schulz_rows(flat, ns_steps).reshape(block.shape)

    block = orthonormalise(pull_block(omega))
    for _ in range(power_iters):
        block = orthonormalise(pull_block(push_block(block)))
    z = like_batch(jax.random.normal(z_key, (site.shape[0], rank), site.dtype), site)
    return jnp.einsum("bk,bk...->b...", z, block)


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


def krylov_subspace(
    ctx, index: int, key: PRNGKey, rank: int, block_size: int, depth: int
) -> tuple[Array, Array]:
    """Approximate top-``rank`` right singular vectors of each example's ``J_b``.

    Block Krylov space ``[Y, A Y, ..., A^depth Y]`` of ``A = J_b^T J_b``,
    ``Y = J_b^T Omega`` with ``block_size`` Gaussian columns, orthonormalised
    as it grows; then Rayleigh-Ritz. Returns ``(ritz, keep)``: [B, k, n]
    orthonormal rows (flattened site), best first, and [B, k] whether each
    has a Ritz value above zero (directions of a row space smaller than
    ``k`` get no weight, as in exact W-perp).
    """
    site, nxt = ctx.value(index), ctx.value(ctx.target(index))
    push, pull = ctx.next_maps(index)
    pull_block = jax.vmap(pull, in_axes=1, out_axes=1)  # [B,p,m...] -> [B,p,n...]
    push_block = jax.vmap(push, in_axes=1, out_axes=1)  # [B,p,n...] -> [B,p,m...]
    batch = site.shape[0]
    omega = like_batch(
        jax.random.normal(key, (batch, block_size) + nxt.shape[1:], nxt.dtype), nxt
    )

    def flat(x):
        return x.reshape(x.shape[:2] + (-1,))

    basis, images = [], []
    current = orthonormal_rows(flat(pull_block(omega)))  # J^T Omega: in the row space
    for step in range(depth + 1):
        basis.append(current)
        image = push_block(
            current.astype(site.dtype).reshape(current.shape[:2] + site.shape[1:])
        )
        images.append(flat(image).astype(current.dtype))
        if step < depth:
            grown = flat(pull_block(image)).astype(current.dtype)  # J^T J q
            current = orthonormal_rows(grown, jnp.concatenate(basis, axis=1))
    q = jnp.concatenate(basis, axis=1)  # [B, P, n], orthonormal (or zero) rows
    z = jnp.concatenate(images, axis=1)  # [B, P, m] = J q
    # Rayleigh-Ritz: q J^T J q^T = z z^T, no further product with the map.
    values, vectors = jnp.linalg.eigh(_dot("bpm,bqm->bpq", z, z))
    k = min(rank, q.shape[1])
    values, vectors = values[:, -k:], vectors[:, :, -k:]
    keep = values > values[:, -1:] * jnp.finfo(q.dtype).eps * 10 * q.shape[1]
    ritz = _dot("bpk,bpn->bkn", vectors[:, :, ::-1], q)  # best first
    return ritz, keep[:, ::-1]


def _wperp_krylov(ctx, index, key, rank, block_size, depth):
    """``y = V_k z`` with ``V_k`` from :func:`krylov_subspace` and ``z ~ N(0, I_k)``."""
    site = ctx.value(index)
    space_key, z_key = jax.random.split(key)
    ritz, keep = krylov_subspace(ctx, index, space_key, rank, block_size, depth)
    coefficients = jax.random.normal(z_key, keep.shape, ritz.dtype) * keep
    coefficients = like_batch(coefficients, site)
    guess = jnp.einsum("bk,bkn->bn", coefficients, ritz)
    return guess.astype(site.dtype).reshape(site.shape)


def wperp_ns_hidden(
    rank: int,
    power_iters: int | None = None,
    ns_steps: int = 5,
    *,
    variant: str = "krylov",
    cutoff: float = 1.0,
    block_size: int | None = None,
) -> HiddenRule:
    """W-perp without an SVD: a guess in J_b's (approximate) top right singular subspace.

    ``variant="krylov"`` (default, faithful): per example, the block Krylov
    space ``[Y, A Y, ..., A^d Y]`` of ``A = J_b^T J_b`` from ``Y = J_b^T
    Omega`` (``block_size`` columns, default 2; ``d = power_iters``, by
    default enough for ``max(3 rank, 16)`` dimensions, :func:`krylov_steps`),
    orthonormalised as it grows, then
    Rayleigh-Ritz: the top-``rank`` eigenvectors of the small projected
    matrix ``Q A Q^T`` (computed from the last pushes, no extra product)
    give ``V_k``, and ``y = V_k z`` with ``z ~ N(0, I_k)``: isotropic over
    the found subspace, covariance a rank-k projector, as exact W-perp's.
    Cost ``block_size * (2 d + 2)`` products the size of ``W^T eps`` (rank
    10: 40).

    ``variant="vector"`` (cheaper, not W-perp): one guess vector, ``y = p(J_b^T J_b) J_b^T
    eps`` with eps ~ N(0, I) at ``s_{l+1}`` and ``p`` the degree-``power_iters``
    filter of :func:`chebyshev_filter` (``cutoff``; 0 gives the power filter).
    In J_b's singular basis the component along ``v_i`` is ``sigma_i
    p(sigma_i^2) z_i``: the top directions dominate, the rest are damped. Cost
    ``1 + 2 * power_iters`` products the size of ``W^T eps`` (``wt``: 1).
    ``rank`` and ``ns_steps`` are unused: the filter does not fix a rank, and
    within the top subspace the guess is weighted by the filter rather than
    isotropic as in exact W-perp.

    ``variant="block"``: subspace iteration on ``rank`` vectors per example
    (``J_b^T Omega``, then ``power_iters`` times ``J_b^T J_b``), each time
    re-orthonormalised with ``ns_steps`` Newton-Schulz steps; the guess is a
    standard normal combination of the rows (isotropic within the found
    subspace, like W-perp). Cost ``rank * (1 + 2 * power_iters)`` products.

    Every product is a JVP or VJP of the next site map, so both variants work
    for any site map; guesses lie in J_b's row space (zero on dead units).
    """
    if not 0 <= cutoff <= 1:
        raise ValueError(
            f"cutoff must be in [0, 1] (above 1 the filter's band can pass the "
            f"top of the spectrum and stop filtering); got {cutoff!r}."
        )
    power_iters, block_size, _ = wperp_ns_settings(
        rank, variant, power_iters, block_size
    )

    def rule(ctx: GuessContext, index: int, key: PRNGKey) -> Array:
        if variant == "krylov":
            return _wperp_krylov(ctx, index, key, rank, block_size, power_iters)
        if variant == "block":
            return _wperp_ns_block(ctx, index, key, rank, power_iters, ns_steps)
        nxt = ctx.value(ctx.target(index))
        push, pull = ctx.next_maps(index)
        start = pull(normal_like(key, nxt))
        return chebyshev_filter(lambda v: pull(push(v)), start, power_iters, cutoff)

    return rule


def rule_from(
    hidden: HiddenRule,
    last: LastRule = gaussian_last,
    needs_label: bool = False,
    lookahead: int = 1,
    mask_after: bool = False,
) -> GuessRule:
    return GuessRule(
        hidden=hidden,
        last=last,
        needs_label=needs_label,
        lookahead=lookahead,
        mask_after=mask_after,
    )


def site_guess(
    rule: GuessRule,
    ctx: GuessContext,
    index: int,
    key: PRNGKey,
    normalize: bool = False,
) -> Array:
    """The guess at site ``index`` from the per-guess ``key``: ``fold_in(key, index)`` seeds it.

    ``normalize`` rescales each example's guess to norm ``sqrt(size)``
    (:func:`guessgrad._src.core.normalize_per_example`); a ``mask_after`` rule's
    guess then goes through ``D_l``, so masking keeps an isotropic guess
    unbiased: ``E[D eps eps^T D] = D D``.
    """
    site_key = jax.random.fold_in(key, index)
    if ctx.is_terminal(index):
        guess = rule.last(ctx, index, site_key)
    else:
        guess = rule.hidden(ctx, index, site_key)
    if normalize:
        guess = normalize_per_example(guess)
    if rule.mask_after:
        guess = ctx.mask(index, guess)
    return guess


def context(
    fns: ChainFns,
    layer_params: Sequence[Params],
    sites: Sequence[Array],
    labels: Array,
    rule: GuessRule,
) -> GuessContext:
    """The context a rule may read: labels only for rules that declare they need them."""
    return GuessContext(
        fns, tuple(layer_params), tuple(sites), labels if rule.needs_label else None
    )
