"""The forward-mode engine on any model with sites: one linearisation serves everything.

For a batch, the forward pass ``perturbations -> (losses, site values, taps)``
is linearised once (``jax.linearize``) at zero perturbations. From that one
linear map:

* joint mode: the map applied to every site's guess at once gives the
  per-example (per-copy) loss derivatives, ``d_b = sum_l <dl_b/ds_l, y_{l,b}>``;
* per-layer mode: ``jax.jvp`` of the map with a tangent at site ``l`` only:
  tangents upstream of ``l`` are symbolic zeros, so the work is triangular;
* a rule's pull and push (W^T, downstream, W-perp) are the transpose and the
  restriction of "tangent at site l only -> tangent at its target".

Parameter estimates come from one VJP of the forward run with a
``stop_gradient`` on every site value (the *cut* forward), with cotangent
``g_l / B`` at each site's raw value and the exact mean-loss cotangent at each
loss: every site map gets its own local VJP (nothing flows back across sites)
and parameters after the last site before a loss (local heads, readouts) get
their exact local gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from guessgrad._src import sites as sites_lib
from guessgrad._src.base import Array, Params
from guessgrad._src.rules import scale_examples
from guessgrad._src.sharding import explicit_spec, like
from guessgrad._src.sites import SiteInfo, Structure

MODES = ("joint", "per_layer")


def _scale_copies(d: Array, y: Array) -> Array:
    """[B, c_1..c_k] * [B, c_1..c_{k-1}, S, ...] with S = c_k * m: one derivative per copy."""
    k = d.ndim - 1
    grouped = y.reshape(y.shape[:k] + (d.shape[k], -1))
    return (grouped * d.reshape(d.shape + (1,))).reshape(y.shape)


def site_estimate(
    info: SiteInfo,
    loss_tangents: Mapping[str, Array],
    loss_shapes: Mapping[str, tuple],
    y: Array,
) -> Array:
    """``g_{l,b} = d_b y_{l,b}`` with ``d`` from the losses site ``l`` feeds.

    A loss with copy axes [B, *copies] counts as their mean; with the
    ``"copies"`` layout each copy's derivative scales only the site elements
    of that copy (Ren et al.'s patch- and group-wise losses).
    """
    per_example = None
    out = None
    for name, layout in zip(info.feeds, info.layouts):
        d = loss_tangents[name]
        copies = sites_lib.copies_of(loss_shapes[name])
        if copies != 1:
            d = d / copies
        if layout.startswith("copies"):
            k = sites_lib.copy_axes_of(layout)
            if k is not None:  # the trailing copy axes meet in one site element
                d = jnp.sum(d.reshape(d.shape[: k + 1] + (-1,)), axis=-1)
            term = _scale_copies(d, y)
            out = term if out is None else out + term
            continue
        if layout == "summed":
            d = jnp.sum(d.reshape(d.shape[0], -1), axis=-1)
        per_example = d if per_example is None else per_example + d
    if per_example is not None:
        term = scale_examples(per_example, y)
        out = term if out is None else out + term
    return out


class SiteContext:
    """The :class:`~guessgrad.rules.GuessContext` of a model with sites, from one linearisation.

    Targets are site or tap names. ``lin`` maps a dict of site perturbations
    (the guessed sites) to ``(loss tangents, value tangents)``.
    """

    def __init__(
        self,
        structure: Structure,
        values: Mapping[str, Array],
        lin: Callable,
        zeros: Mapping[str, Array],
        needs_label: bool,
        losses=None,
    ):
        self.structure = structure
        self.values = values
        self.losses = losses
        self.lin = lin
        self.zeros = dict(zeros)
        self.needs_label = needs_label
        self.infos = structure.sites
        self._by_path = {s.path: s for s in structure.sites}

    # -- the interface rules use ---------------------------------------------------

    def is_terminal(self, index: int) -> bool:
        return self.infos[index].target is None

    def target(self, index: int, depth: int = 1) -> str:
        """The site or tap ``depth`` ``next`` links after site ``index`` (stops at the end)."""
        info, target = self.infos[index], None
        for _ in range(depth):
            if info is None or info.target is None:
                break
            target = info.target
            info = self._by_path.get(target)
        return target

    def value(self, target) -> Array:
        if isinstance(target, int):
            target = self.infos[target].path
        return self.values[target]

    def has_act(self, target: str) -> bool:
        info = self._by_path.get(target)
        return info is not None and info.act is not None

    def output(self, index: int) -> Array:
        info = self.infos[index]
        site = self.values[info.path]
        return site if info.act is None else info.act(site)

    def mask(self, index: int, tangent: Array) -> Array:
        info = self.infos[index]
        if info.act is None:
            return tangent
        return jax.jvp(info.act, (self.values[info.path],), (tangent,))[1]

    def push(self, index: int, tangent: Array):
        """``(loss tangents, value tangents)`` with only site ``index`` perturbed."""
        return self.lin({self.infos[index].path: tangent})

    def pull(
        self, index: int, target: str, cotangent: Array, post_activation: bool = False
    ) -> Array:
        """A cotangent at ``target`` pulled back to site ``index`` (the rest of the graph fixed)."""
        if post_activation:
            cotangent = self.mask(self._by_path[target].index, cotangent)
        path = self.infos[index].path
        fn = lambda t: self.lin({path: t})[1][target]
        return jax.linear_transpose(fn, self.zeros[path])(cotangent)[0]

    def next_maps(self, index: int) -> tuple[Callable, Callable]:
        target = self.target(index)
        return (
            lambda v: self.push(index, v)[1][target],
            lambda u: self.pull(index, target, u),
        )

    def next_jacobian(self, index: int) -> Array:
        """Per-example ``J_b = d target_b / d s_{l,b}``: [B, m, n], by ``m`` pulls."""
        target = self.target(index)
        nxt = self.values[target]
        batch, m = nxt.shape[0], math.prod(nxt.shape[1:])

        def row(i):  # J_b^T e_i for every example b
            unit = jax.nn.one_hot(i, m, dtype=nxt.dtype).reshape(nxt.shape[1:])
            return self.pull(
                index, target, like(jnp.broadcast_to(unit, nxt.shape), nxt)
            )

        # [m, B, ...]. On an Explicit mesh, batching rules that fold the row axis
        # into a batch-sharded one (convolutions) are not defined: one row at a time.
        rows = (
            jax.vmap(row)
            if explicit_spec(nxt) is None
            else lambda i: jax.lax.map(row, i)
        )(jnp.arange(m))
        return jnp.swapaxes(rows.reshape(m, batch, -1), 0, 1)

    def loss_gradient(self, index: int) -> Array:
        """The exact per-example gradient, at site ``index``, of the losses it feeds."""
        if not self.needs_label:
            raise ValueError(
                "This rule did not declare needs_label: it may not read the loss."
            )
        info = self.infos[index]
        shapes = self.structure.losses

        def fn(t):
            tangents = self.lin({info.path: t})[0]
            return {n: tangents[n] for n in info.feeds}

        cotangent = {
            n: like(
                jnp.full(
                    shapes[n],
                    1.0 / sites_lib.copies_of(shapes[n]),
                    self.losses[n].dtype,
                ),
                self.losses[n],
            )
            for n in info.feeds
        }
        return jax.linear_transpose(fn, self.zeros[info.path])(cotangent)[0]


def recomputes(mode: str, num_sites: int) -> bool:
    """Whether :func:`linearize` should recompute: the map is applied once.

    Joint mode, or a single site in any mode, applies the map once: a fresh
    forward-mode pass keeps no activations. Per-layer mode over several sites
    applies it once per site, where one stored linearisation is cheaper.
    """
    return mode == "joint" or num_sites == 1


def linearize(
    model,
    variables: Params,
    args: tuple,
    batch,
    loss_fn,
    rngs,
    structure: Structure,
    paths,
    needs_label: bool = False,
    recompute: bool = False,
):
    """The forward's linear map at zero perturbations of the sites ``paths``.

    Returns ``(losses, outputs, ctx)``; ``ctx.lin`` takes tangents at any
    subset of ``paths`` (the others are symbolic zeros, so nothing upstream
    of the perturbed sites is differentiated).

    ``recompute=False``: one ``jax.linearize``, whose residuals (every
    activation the tangents need) live until the last use of the map, as
    backprop's do. ``recompute=True``: every use of the map is a fresh
    ``jax.jvp`` of the forward, primal and tangent computed together, so
    nothing is kept for later (XLA merges the repeated primal passes where
    it can). Joint mode applies the map once, after the guesses are drawn:
    recomputing makes it one forward-mode pass, memory like inference.
    """
    infos = {s.path: s for s in structure.sites}
    zeros = {
        p: jnp.zeros(infos[p].shape, infos[p].dtype, out_sharding=infos[p].sharding)
        for p in paths
    }

    def forward(perturbations):
        outputs, raw, taps = sites_lib.run(
            model, variables, args, perturbations=perturbations, rngs=rngs
        )
        losses = sites_lib.normalize_losses(loss_fn(outputs, batch))
        return (losses, {**raw, **taps}), outputs

    if recompute:
        (losses, values), outputs = forward(zeros)

        def lin(tangents, with_primal=False):
            def restricted(part):
                (losses, values), outputs = forward({**zeros, **part})
                return (losses, values), (losses, outputs)

            part = {p: zeros[p] for p in tangents}
            (_, primal), (tangent, _) = jax.jvp(restricted, (part,), (dict(tangents),))
            return (tangent, primal) if with_primal else tangent

    else:
        (losses, values), full, outputs = jax.linearize(forward, zeros, has_aux=True)

        def lin(tangents, with_primal=False):
            part = {p: zeros[p] for p in tangents}
            tangent = jax.jvp(
                lambda t: full({**zeros, **t}), (part,), (dict(tangents),)
            )[1]
            return (tangent, (losses, outputs)) if with_primal else tangent

    ctx = SiteContext(structure, values, lin, zeros, needs_label, losses)
    return losses, outputs, ctx


def guessed_site_gradients(ctx: SiteContext, guesses: Mapping[str, Array], mode: str):
    """``({site: g_l}, (losses, outputs))``, ``g_{l,b} = d y_{l,b}``, from one set of guesses.

    The losses and model outputs come from the joint pass itself in joint
    mode (so a recomputing context runs the forward once, with the tangents).
    """
    shapes = ctx.structure.losses
    out, primal = {}, None
    if mode == "joint":
        (tangents, _), primal = ctx.lin(dict(guesses), with_primal=True)
    for path, y in guesses.items():
        info = ctx._by_path[path]
        if mode != "joint":
            (tangents, _), pushed = ctx.lin({path: y}, with_primal=True)
            primal = pushed if primal is None else primal
        out[path] = site_estimate(info, tangents, shapes, y)
    if primal is None:  # nothing guessed
        primal = ctx.lin({}, with_primal=True)[1]
    return out, primal


def derivatives(ctx: SiteContext, tangents: Mapping[str, Array], mode: str):
    """Per-example derivatives of the summed (copy-mean) losses along site tangents.

    Joint: [B]; per-layer: ``{site: [B]}``.
    """
    shapes = ctx.structure.losses

    def reduce(loss_tangents, feeds):
        total = 0.0
        for name in feeds:
            d = loss_tangents[name]
            total = total + jnp.sum(
                d.reshape(d.shape[0], -1), -1
            ) / sites_lib.copies_of(shapes[name])
        return total

    if mode == "joint":
        return reduce(ctx.lin(dict(tangents))[0], list(shapes))
    return {
        p: reduce(ctx.push(ctx._by_path[p].index, t)[0], ctx._by_path[p].feeds)
        for p, t in tangents.items()
    }


class Trainable:
    """The trainable part of a parameter tree, and how to put it back."""

    def __init__(self, variables: Params, mask: tuple[bool, ...] | None):
        self.variables = variables
        self.leaves, self.treedef = jax.tree.flatten(variables)
        self.mask = mask

    @property
    def part(self):
        if self.mask is None:
            return self.variables
        return [x for x, m in zip(self.leaves, self.mask) if m]

    def rebuild(self, part) -> Params:
        return self._merge(part, lambda x: x)

    def full(self, grads_part) -> Params:
        """Gradients of the trainable part -> gradients of every leaf (exact zeros when frozen)."""
        return self._merge(grads_part, jnp.zeros_like)

    def _merge(self, part, frozen: Callable) -> Params:
        """``part``'s leaves where trainable, ``frozen(leaf)`` elsewhere."""
        if self.mask is None:
            return part
        part = iter(part)
        return jax.tree.unflatten(
            self.treedef,
            [next(part) if m else frozen(x) for x, m in zip(self.leaves, self.mask)],
        )


def local_parameter_grads(
    model,
    trainable: Trainable,
    args: tuple,
    batch,
    loss_fn,
    rngs,
    structure: Structure,
    site_grads: Mapping[str, Array],
) -> Params:
    """Parameter estimates by one VJP of the cut forward.

    Cotangent ``g_l / B`` at each guessed site's raw value and ``1 / (B n)`` at
    each element of a loss (``n`` copies) that reaches a trainable parameter
    without passing a site: site maps get their local VJPs, heads and
    readouts their exact local gradients.
    """
    exact = structure.exact_losses
    paths = [s.path for s in structure.active]

    def cut_forward(part):
        outputs, raw, _ = sites_lib.run(
            model, trainable.rebuild(part), args, cut=True, rngs=rngs
        )
        losses = sites_lib.normalize_losses(loss_fn(outputs, batch))
        return {n: losses[n] for n in exact}, {p: raw[p] for p in paths}

    (losses, _), vjp = jax.vjp(cut_forward, trainable.part)
    loss_cotangents = {
        n: like(jnp.full(v.shape, 1.0 / v.size, v.dtype), v) for n, v in losses.items()
    }
    site_cotangents = {p: g / g.shape[0] for p, g in site_grads.items()}
    return trainable.full(vjp((loss_cotangents, site_cotangents))[0])


def exact_site_gradients(
    model, variables: Params, args: tuple, batch, loss_fn, rngs, structure: Structure
) -> dict[str, Array]:
    """``{site: dl_b/ds_{l,b}}`` per example, by reverse mode through the perturbations.

    ``l_b`` is the example's objective: the sum over losses of each loss's
    mean over its copies. Examples are independent (a model that mixes them,
    such as BatchNorm on batch statistics, is refused earlier), so the
    gradient of ``sum_b l_b`` at site ``l`` holds every example's own.
    """
    zeros = {
        s.path: jnp.zeros(s.shape, s.dtype, out_sharding=s.sharding)
        for s in structure.sites
    }

    def total(perturbations):
        outputs, _, _ = sites_lib.run(
            model, variables, args, perturbations=perturbations, rngs=rngs
        )
        losses = sites_lib.normalize_losses(loss_fn(outputs, batch))
        return sum(jnp.sum(v) / sites_lib.copies_of(v.shape) for v in losses.values())

    grads = jax.grad(total)(zeros)
    return {s.path: grads[s.path] for s in structure.sites}  # forward order
