"""The forward-mode engine on any model with sites: one linearisation serves everything.

For a batch, the forward pass is run once with a ``stop_gradient`` on every
site value and a zero perturbation added after it (the *cut* forward), and
linearised in the trainable parameters and the perturbations
(:func:`fused_linearize`). From that one linear map:

* joint mode: every site's guess at once gives the per-example (per-copy)
  loss derivatives, ``d_b = sum_l <dl_b/ds_l, y_{l,b}>``; the uncut
  forward's tangent is rebuilt in one ordered pass over the map;
* per-layer mode: a tangent at site ``l`` only; nothing upstream of ``l``
  is touched, so the work is triangular;
* a rule's pull and push (W^T, downstream, W-perp) are the transpose and
  the restriction of "tangent at site l only -> tangent at its target";
* parameter estimates: the map's transpose in the parameters, with
  cotangent ``g_l / B`` at each site's raw value and the exact mean-loss
  cotangent at each loss: every site map gets its own local VJP (nothing
  flows back across sites) and parameters after the last site before a
  loss (local heads, readouts) get their exact local gradient.

With frozen parameters and the map applied once (:func:`step_context`), the
tangent pass recomputes the uncut forward (:func:`linearize`) and the update
is a VJP of the cut forward in the trainable part alone
(:func:`local_parameter_grads`): memory like inference for prompt tuning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jax.extend.core import Literal

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


class _Hops:
    """A linear map of site tangents as a jaxpr, applied to some of its inputs at a time.

    Traced once (``jax.make_jaxpr``); applying it binds only the equations
    that depend on the given inputs (other inputs are zero), so one site's
    hop costs, in tracing and in compiled work, what it reaches and no more.
    Outputs the given inputs do not reach come back as None.
    """

    def __init__(self, fn: Callable, example: Mapping[str, Array]):
        closed, shapes = jax.make_jaxpr(fn, return_shape=True)(example)
        self.jaxpr = jaxpr = closed.jaxpr
        self.out_tree = jax.tree.structure(shapes)
        self.in_names = list(jax.tree.structure(example).node_data()[1])
        # {value name: its position in the flat outputs (loss tangents, value tangents)}
        positions = jax.tree.unflatten(self.out_tree, range(self.out_tree.num_leaves))
        self.value_positions = positions[1]
        tangent = set(jaxpr.invars)
        for eqn in jaxpr.eqns:
            if any(_is_var(v) and v in tangent for v in eqn.invars):
                tangent.update(eqn.outvars)
        self.tangent = tangent
        # Values the tangent equations read that do not depend on any input
        # (residuals and what is computed from them): evaluated here, once.
        needed = {
            v
            for eqn in jaxpr.eqns
            if any(_is_var(v) and v in tangent for v in eqn.invars)
            for v in eqn.invars
            if _is_var(v) and v not in tangent
        }
        constant_eqns = [e for e in jaxpr.eqns if not set(e.outvars) & tangent]
        for eqn in reversed(constant_eqns):
            if set(eqn.outvars) & needed:
                needed.update(v for v in eqn.invars if _is_var(v))
        self.env = dict(zip(jaxpr.constvars, closed.consts))
        for eqn in constant_eqns:
            if set(eqn.outvars) & needed:
                _bind(eqn, [_read(self.env, v) for v in eqn.invars], self.env)
        self.sweeps = self._sweep_order()

    def _sweep_order(self) -> dict | None:
        """``{input var: its site's value-tangent output}``, if one ordered pass can feed it.

        :meth:`sweep` binds input ``q_m`` when an equation first reads it, to
        site m's own tangent plus the value tangent arriving at site m. That
        needs the value tangent complete by then: its equation must come
        before the first reader of ``q_m`` (not so when one nested equation,
        a ``remat`` block, both reads ``q_m`` and computes site m's value).
        None when some input fails this.
        """
        producer = {v: i for i, e in enumerate(self.jaxpr.eqns) for v in e.outvars}
        first_reader = {}
        for i, eqn in enumerate(self.jaxpr.eqns):
            for v in eqn.invars:
                if _is_var(v):
                    first_reader.setdefault(v, i)
        inputs = set(self.jaxpr.invars)
        incoming = {}
        for name, var in zip(self.in_names, self.jaxpr.invars):
            out = self.jaxpr.outvars[self.value_positions[name]]
            if not _is_var(out) or out not in self.tangent:
                continue  # nothing arrives at this site
            if out in inputs or producer[out] >= first_reader.get(var, len(producer)):
                return None
            incoming[var] = out
        return incoming

    def sweep(self, own: Mapping[str, Array]):
        """The uncut forward's tangents in one ordered pass over the map (see :meth:`_sweep_order`).

        Site m's input is its own tangent ``own[m]`` (if given) plus the
        value tangent the pass has carried to it, so a tangent entering at
        site l crosses every later site as the uncut forward's would. Each
        equation runs at most once: a residual stream costs one tangent pass,
        where hop-by-hop it costs one per site. Outputs nothing reaches are None.
        """
        env, live = dict(self.env), set()
        names = dict(zip(self.jaxpr.invars, self.in_names))
        pending = set(self.jaxpr.invars)

        def bind_input(var):
            pending.discard(var)
            tangent = own.get(names[var])
            arriving = self.sweeps.get(var)
            if arriving is not None and arriving in live:
                arriving = env[arriving]
                tangent = arriving if tangent is None else arriving + tangent
            if tangent is not None:
                env[var] = tangent
                live.add(var)

        for eqn in self.jaxpr.eqns:
            for v in eqn.invars:
                if _is_var(v) and v in pending:
                    bind_input(v)
            self._run(eqn, env, live)
        for v in list(pending):
            bind_input(v)
        outs = [
            env[v] if _is_var(v) and v in live else None for v in self.jaxpr.outvars
        ]
        return jax.tree.unflatten(self.out_tree, outs)

    def _run(self, eqn, env, live) -> None:
        """Bind ``eqn`` if a live tangent reaches it (other inputs' tangents: zero)."""
        if not any(_is_var(v) and v in live for v in eqn.invars):
            return
        args = [
            jnp.zeros(v.aval.shape, v.aval.dtype)
            if _is_var(v) and v in self.tangent and v not in live
            else _read(env, v)
            for v in eqn.invars
        ]
        _bind(eqn, args, env)
        live.update(eqn.outvars)

    def one_pass_is_cheaper(self, sources, per_layer: bool) -> bool:
        """Whether hops from ``sources`` cost no more than a separate forward and uncut tangent pass.

        A hop from site l passes every equation its tangent reaches before
        the next sites. Along a chain these slices are disjoint and the hops
        together cost one tangent pass. A residual stream that bypasses the
        sites carries every site's hop through every later block, so the
        hops cost a tangent pass per site; then a forward-mode pass of the
        uncut forward plus a second (cut) forward for the update is cheaper.
        Costs are multiply-adds of matrix products and elements elsewhere,
        counted on the map's jaxpr; the forward is counted as its tangent.
        """
        if self.sweeps is not None:
            return True  # one ordered pass: the uncut tangent's cost
        value_positions = self.value_positions
        costs = [_eqn_cost(e) for e in self.jaxpr.eqns]
        slices, reaches = {}, {}
        for name, var in zip(self.in_names, self.jaxpr.invars):
            dependent, ids = {var}, set()
            for i, eqn in enumerate(self.jaxpr.eqns):
                if any(_is_var(v) and v in dependent for v in eqn.invars):
                    dependent.update(eqn.outvars)
                    ids.add(i)
            slices[name] = ids
            reaches[name] = {
                n
                for n, p in value_positions.items()
                if n != name
                and n in value_positions
                and _is_var(self.jaxpr.outvars[p])
                and self.jaxpr.outvars[p] in dependent
                and n in slices.keys() | set(self.in_names)
            }

        def closure(site):
            seen, stack = set(), [site]
            while stack:
                s = stack.pop()
                if s not in seen:
                    seen.add(s)
                    stack.extend(reaches[s])
            return seen

        cost = lambda ids: sum(costs[i] for i in ids)
        reached = [closure(s) for s in sources]
        groups = reached if per_layer else [set().union(*reached)]
        hops = sum(cost(slices[m]) for g in groups for m in g)
        uncut = sum(cost(set().union(*(slices[m] for m in g))) for g in groups)
        forward = cost(set().union(*slices.values()))
        return hops <= uncut + forward

    def __call__(self, inputs: Mapping[str, Array]):
        env, live = dict(self.env), set()
        for name, var in zip(self.in_names, self.jaxpr.invars):
            if name in inputs:
                env[var] = inputs[name]
                live.add(var)
        for eqn in self.jaxpr.eqns:
            self._run(eqn, env, live)
        outs = [
            env[v] if _is_var(v) and v in live else None for v in self.jaxpr.outvars
        ]
        return jax.tree.unflatten(self.out_tree, outs)


def _eqn_cost(eqn) -> float:
    """Multiply-adds of a matrix product or convolution, elements written otherwise (nested jaxprs summed)."""
    nested = [
        p.jaxpr if hasattr(p, "jaxpr") else p
        for p in eqn.params.values()
        if hasattr(p, "eqns") or hasattr(getattr(p, "jaxpr", None), "eqns")
    ]
    if nested:
        return float(sum(_eqn_cost(e) for j in nested for e in j.eqns))
    size = float(sum(math.prod(getattr(v.aval, "shape", ())) for v in eqn.outvars))
    name = eqn.primitive.name
    if name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return size * math.prod(lhs[d] for d in contract)
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
        return size * math.prod(rhs) / out_features
    return size


def _is_var(v) -> bool:
    return not isinstance(v, Literal)


def _read(env, v):
    return v.val if isinstance(v, Literal) else env[v]


def _bind(eqn, args, env) -> None:
    params = eqn.primitive.get_bind_params(eqn.params)
    # Older JAX returns (subfuns, params).
    subfuns, params = params if isinstance(params, tuple) else ((), params)
    with eqn.ctx.manager:
        outs = eqn.primitive.bind(*subfuns, *args, **params)
    if not eqn.primitive.multiple_results:
        outs = [outs]
    env.update(zip(eqn.outvars, outs))


def fused_linearize(
    model,
    trainable: Trainable,
    args: tuple,
    batch,
    loss_fn,
    rngs,
    structure: Structure,
    needs_label: bool = False,
):
    """One linearisation of the *cut* forward serves the guesses, the tangents and the update.

    The forward runs once with a ``stop_gradient`` on every site value and a
    zero perturbation ``q_l`` added after it, linearised in the trainable
    parameters and every ``q_l``. Its linear map ``L(d theta, dq)`` gives:

    * tangents (``ctx.lin``): with the sites cut, a tangent ``dq_l`` reaches
      only the sites and losses directly downstream of site ``l`` (one hop).
      The uncut forward's tangent is rebuilt in one ordered pass over the
      map (:meth:`_Hops.sweep`): site ``m``'s input ``dq_m`` is its own
      perturbation plus the value tangent arriving at it, so the work is
      one tangent pass, residual streams included. Where a nested equation
      (a ``remat`` block) holds both, hop by hop in forward order: site
      ``m``'s value tangent is the sum of the hops reaching it.
    * parameter estimates (``param_grads``): the transpose in ``d theta``
      of the same map, with cotangents ``g_l / B`` at the guessed sites' raw
      values and the exact mean-loss cotangent at each loss reached without
      a site: every site map's local VJP (the cut stops the rest), heads and
      readouts their exact local gradients.

    So one forward pass serves everything, with its activations kept (as
    backprop keeps them), where a separate cut forward for the update would
    run the forward a second time.

    Returns ``(ctx, param_grads, one_pass_is_cheaper)``, the last
    :meth:`_Hops.one_pass_is_cheaper` (for :func:`step_context`).
    """
    infos = structure.sites
    zeros = {
        s.path: jnp.zeros(s.shape, s.dtype, out_sharding=s.sharding) for s in infos
    }
    part = trainable.part

    def forward(part, perturbations):
        outputs, raw, taps = sites_lib.run(
            model,
            trainable.rebuild(part),
            args,
            perturbations=perturbations,
            cut=True,
            rngs=rngs,
        )
        losses = sites_lib.normalize_losses(loss_fn(outputs, batch))
        return (losses, {**raw, **taps}), outputs

    (losses, values), full, outputs = jax.linearize(forward, part, zeros, has_aux=True)
    zero_part = jax.tree.map(jnp.zeros_like, part)
    # L(0, dq): symbolic zeros in d theta (jvp of the linear map).
    hops = _Hops(
        lambda dq: jax.jvp(lambda q: full(zero_part, q), (zeros,), (dq,))[1], zeros
    )

    def reached(outputs):
        """``({loss: t}, {value: t})`` without the outputs no tangent reached (None)."""
        loss_t, value_t = outputs
        return (
            {n: t for n, t in loss_t.items() if t is not None},
            {n: t for n, t in value_t.items() if t is not None},
        )

    def hop_by_hop(tangents):
        """Site by site in forward order, each sending on what reached it plus its own tangent."""
        loss_t: dict[str, Array] = {}
        value_t: dict[str, Array] = {}
        for info in infos:
            path = info.path
            incoming, own = value_t.get(path), tangents.get(path)
            if incoming is None and own is None:
                continue
            sent = (
                own if incoming is None else incoming if own is None else incoming + own
            )
            hop_loss, hop_value = reached(hops({path: sent}))
            for name, t in hop_loss.items():
                loss_t[name] = t if name not in loss_t else loss_t[name] + t
            for name, t in hop_value.items():
                value_t[name] = t if name not in value_t else value_t[name] + t
        return loss_t, value_t

    def lin(tangents, with_primal=False):
        """The uncut forward's ``(loss tangents, value tangents)`` for site tangents ``tangents``."""
        if hops.sweeps is not None:
            loss_t, value_t = reached(hops.sweep(tangents))
        else:
            loss_t, value_t = hop_by_hop(tangents)
        loss_t = {
            n: loss_t[n] if n in loss_t else jnp.zeros_like(v)
            for n, v in losses.items()
        }
        value_t = {
            n: value_t[n] if n in value_t else jnp.zeros_like(v)
            for n, v in values.items()
        }
        return (
            ((loss_t, value_t), (losses, outputs)) if with_primal else (loss_t, value_t)
        )

    exact = structure.exact_losses
    active = [s.path for s in structure.active]

    def param_grads(site_grads: Mapping[str, Array]) -> Params:
        """Parameter estimates from site gradients: the transpose of ``L`` in ``d theta``."""

        def restricted(d_part):
            loss_t, value_t = jax.jvp(
                lambda a: full(a, zeros), (zero_part,), (d_part,)
            )[1]
            return {n: loss_t[n] for n in exact}, {p: value_t[p] for p in active}

        loss_cotangents = {
            n: like(
                jnp.full(losses[n].shape, 1.0 / losses[n].size, losses[n].dtype),
                losses[n],
            )
            for n in exact
        }
        site_cotangents = {p: g / g.shape[0] for p, g in site_grads.items()}
        grads = jax.linear_transpose(restricted, zero_part)(
            (loss_cotangents, site_cotangents)
        )[0]
        return trainable.full(grads)

    ctx = SiteContext(structure, values, lin, zeros, needs_label, losses)
    return ctx, param_grads, hops.one_pass_is_cheaper


def step_context(
    model,
    trainable: Trainable,
    args: tuple,
    batch,
    loss_fn,
    rngs,
    structure: Structure,
    mode: str,
    needs_label: bool = False,
):
    """``(ctx, param_grads)`` for one estimate: the engine every guessed estimator runs on.

    :func:`fused_linearize` (one forward, its activations kept), unless

    * some parameters are frozen and the map is applied once (joint mode,
      or one guessed site): then the tangent pass recomputes the forward
      (:func:`linearize` with ``recompute``, memory like inference) and the
      update is a VJP of the cut forward in the trainable part only, whose
      residuals are few (a prompt's): what keeps a guessed prompt-tuning
      step at a fraction of backprop's memory;
    * no ordered pass feeds every site (a site inside a ``remat`` block)
      and its hops would cost more than a second forward (a residual stream
      that bypasses the sites, :meth:`_Hops.one_pass_is_cheaper`): then
      :func:`linearize` of the uncut forward and the cut VJP.

    The estimates are the same either way (to float rounding).
    """
    active = [s.path for s in structure.active]
    recompute = recomputes(mode, len(active))
    if trainable.mask is None or not recompute:
        ctx, param_grads, cheaper = fused_linearize(
            model, trainable, args, batch, loss_fn, rngs, structure, needs_label
        )
        if cheaper(active, per_layer=mode != "joint"):
            return ctx, param_grads
    _, _, ctx = linearize(
        model,
        trainable.variables,
        args,
        batch,
        loss_fn,
        rngs,
        structure,
        active,
        needs_label,
        recompute=recompute,
    )

    def param_grads(site_grads):
        return local_parameter_grads(
            model, trainable, args, batch, loss_fn, rngs, structure, site_grads
        )

    return ctx, param_grads


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
