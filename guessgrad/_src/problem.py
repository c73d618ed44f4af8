"""The problem an estimator is built for: a model, its loss, inputs and trainable subset.

:class:`Problem` checks each call's arguments (the batch, an input the
parameters do not fit, a model that mutates its state) and analyses the
model's site structure once per input signature (abstractly, cached and
shared by every estimator of the same model).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp

from guessgrad._src import engine
from guessgrad._src import losses as losses_lib
from guessgrad._src import sites as sites_lib
from guessgrad._src.base import Array, Batch, Params, PRNGKey
from guessgrad._src.sharding import abstract_sharding, explicit_spec


def check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")


def guess_keys(key: PRNGKey, num_guesses: int) -> PRNGKey:
    """Keys of the individual guesses: ``key`` itself for one guess, else ``split(key, K)``.

    So an estimate with K guesses is the mean of the K one-guess estimates at these keys.
    """
    return key[None] if num_guesses == 1 else jax.random.split(key, num_guesses)


def map_guesses(one_estimate: Callable, key: PRNGKey, num_guesses: int):
    """``one_estimate`` at every key of :func:`guess_keys`, stacked on a leading axis.

    One guess calls it once, unbatched: a unit batch axis from ``vmap`` would
    reach every array of the step, and XLA:CPU runs reductions over arrays
    with a leading unit axis several times slower.
    """
    if num_guesses == 1:
        return jax.tree.map(lambda x: x[None], one_estimate(key))
    return jax.vmap(one_estimate)(guess_keys(key, num_guesses))


DROPOUT_SALT = 0x64726F70  # the model's "dropout" rng: fold_in(key, this)


def model_rngs(key: PRNGKey) -> dict[str, PRNGKey]:
    """The rngs an estimator called with ``key`` runs the model with: ``{"dropout": ...}``.

    Every forward pass of one estimate uses them, so ``model.apply(params, x,
    rngs=guessgrad.model_rngs(key))`` reproduces its dropout masks (for
    ``jax.grad`` of the same objective, or to inspect them). The guesses draw
    from ``key`` itself, independently of these.
    """
    return {"dropout": jax.random.fold_in(key, DROPOUT_SALT)}


class Problem:
    """A model with its loss, inputs and trainable subset, as every estimator reads them.

    ``prepare`` checks a call's arguments and returns what the estimators
    need; the model's site structure is analysed once per input signature
    (abstractly) and cached.
    """

    def __init__(
        self, model, loss_fn=None, inputs=None, trainable=None, need_sites=True
    ):
        if not hasattr(model, "apply"):
            raise TypeError(
                f"Estimators need a Flax linen or NNX module with sites marked inside "
                f"(guessgrad.site) or a guessgrad.mark_outputs(...) model; got "
                f"{type(model).__name__}."
            )
        for name, fn in (("loss_fn", loss_fn), ("inputs", inputs)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable; got {fn!r}.")
        if trainable is not None and not (
            callable(trainable) or jax.tree.leaves(trainable)
        ):
            raise ValueError(
                f"trainable must be a pytree of bools or a callable; got {trainable!r}."
            )
        self.model = model
        self.default_loss = loss_fn is None
        self.default_inputs = inputs is None
        self.loss_fn = losses_lib.default_loss if loss_fn is None else loss_fn
        self.inputs = losses_lib.default_inputs if inputs is None else inputs
        self.trainable = trainable
        self.need_sites = need_sites  # False: weight-space methods take any model

    def check_batch(self, batch: Batch) -> None:
        if self.default_loss:
            losses_lib.validate_batch(batch)
        elif self.default_inputs:
            losses_lib.validate_batch(batch, need_label=False)

    def losses(self, outputs, batch) -> dict[str, Array]:
        return sites_lib.normalize_losses(self.loss_fn(outputs, batch))

    def prepare(self, params: Params, batch: Batch, key, *, analyse: bool = True):
        """``(variables, args, rngs, structure or None, Trainable)`` for one call."""
        self.check_batch(batch)
        variables = sites_lib.split_variables(params)
        args = sites_lib.as_args(self.inputs(batch))
        rngs = None if key is None else model_rngs(key)
        mask = sites_lib.leaf_mask(self.trainable, variables)
        self.check_input(variables, args, rngs)
        structure = (
            self.structure(variables, args, batch, rngs, mask) if analyse else None
        )
        return variables, args, rngs, structure, engine.Trainable(variables, mask)

    def check_input(self, variables, args, rngs) -> None:
        """Applies the model abstractly to ``args`` (cached per signature); raises what went wrong.

        An input shape the parameters do not fit, or a variable collection the
        model would update, is a ValueError saying so; any other error is
        re-raised as it is, with a note naming the call.
        """
        signature = (
            self.model,
            _signature((variables, args)),
            rngs is None,
        )
        if _CHECKED_INPUTS.get(signature):
            return
        shapes = jax.tree.map(jnp.shape, args)
        where = (
            f'batch["image"] of shape {shapes[0]}'
            if self.default_inputs
            else f"inputs(batch) of shapes {shapes}"
        )
        try:
            jax.eval_shape(
                lambda v, a: self.model.apply(v, *a, rngs=_abstract_rngs(rngs)),
                _abstract(variables),
                _abstract(args),
            )
        except flax.errors.ScopeParamShapeError as err:
            raise ValueError(
                f"The model with these params does not accept {where}: "
                f"{self._mismatch(variables, args, err)}"
            ) from err
        except flax.errors.ModifyScopeVariableError as err:
            found = re.search(r'collection "([^"]+)"', str(err))
            collection = repr(found.group(1)) if found else "a variable collection"
            raise ValueError(
                f"The model updates {collection} while it runs ({_first_line(err)}). "
                f"Estimators run it with its variables fixed: "
                f"collections other than 'params' are read-only constants (BatchNorm with "
                f"use_running_average=True, any lookup table). A layer that mutates its "
                f"state during training, such as BatchNorm(use_running_average=False), "
                f"mixes the examples of a batch, which per-example derivatives cannot "
                f"account for: use a per-example normalisation (nn.LayerNorm, "
                f"nn.GroupNorm, nn.RMSNorm) or the running averages."
            ) from err
        except Exception as err:
            err.add_note(
                f"guessgrad: raised while applying {type(_unwrap(self.model)).__name__} "
                f"to {where} with the given params (collections {sorted(variables)})."
            )
            raise
        _CHECKED_INPUTS.put(signature, True)

    def _mismatch(self, variables, args, err) -> str:
        """Which parameters differ from what the model makes of this input, and the two readings."""
        try:
            made = jax.eval_shape(
                lambda a: self.model.init(jax.random.key(0), *a), _abstract(args)
            )
        except Exception:  # noqa: BLE001  (the input itself does not fit: flax's message)
            return _first_line(err)
        given = dict(_shapes(variables.get("params", {})))
        wanted = dict(_shapes(made.get("params", {})))
        differ = [
            f"{k} is {given.get(k)}, this input makes {wanted.get(k)}"
            for k in sorted(set(given) | set(wanted))
            if given.get(k) != wanted.get(k)
        ]
        if not differ:
            return _first_line(err)
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        return (
            f"{'; '.join(differ[:3])}{more}. The params come from another model or "
            f"configuration (init them with this one), or the input has the wrong shape."
        )

    def structure(self, variables, args, batch, rngs, mask) -> sites_lib.Structure:
        """The model's :class:`~guessgrad.Structure`, analysed once per model, loss, inputs and signature.

        The cache is shared by every estimator of the same model (equal linen
        modules, the same ``loss_fn`` and ``inputs`` functions), so building
        several estimators traces the model's structure once.
        """
        signature = (
            self.model,
            self.loss_fn,
            self.inputs,
            self.need_sites,
            _signature((variables, args, batch)),
            mask,
            rngs is None,
        )
        found = _STRUCTURES.get(signature)
        if found is None:
            found = sites_lib.analyse(
                self.model,
                _abstract(variables),
                _abstract(args),
                self.loss_fn,
                _abstract(batch),
                _abstract_rngs(rngs),
                mask,
                self.need_sites,
            )
            _STRUCTURES.put(signature, found)
        return found

    def metrics(self, outputs, batch, losses: dict[str, Array]) -> dict[str, Array]:
        out = {"loss": sum(jnp.mean(v) for v in losses.values())}
        if len(losses) > 1:
            out.update({f"loss/{k}": jnp.mean(v) for k, v in losses.items()})
        if self.default_loss:
            out["accuracy"] = losses_lib.accuracy(outputs, batch["label"])
        return out


class _Cache:
    """A small least-recently-used map (analyses hold no arrays, only shapes and names).

    Keys hold the model itself: equal linen modules (same class and fields)
    share an entry, other models count by identity, and a key that cannot
    be hashed is simply not cached.
    """

    def __init__(self, size: int):
        self.size = size
        self.entries: collections.OrderedDict = collections.OrderedDict()

    def get(self, key):
        try:
            hash(key)
        except TypeError:
            return None
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        return None

    def put(self, key, value) -> None:
        try:
            hash(key)
        except TypeError:
            return
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


_STRUCTURES = _Cache(128)
_CHECKED_INPUTS = _Cache(512)


def _shapes(tree) -> list[tuple[str, tuple]]:
    """``("a/b/kernel", shape)`` per leaf."""
    return [
        ("/".join(str(getattr(k, "key", k)) for k in path), tuple(jnp.shape(x)))
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _unwrap(model):
    return getattr(model, "model", model)  # a MarkedModel's wrapped module


def _abstract(tree):
    def one(x):
        if _is_key(x):
            return x
        return jax.ShapeDtypeStruct(
            jnp.shape(x),
            jnp.result_type(x),
            sharding=abstract_sharding(explicit_spec(x)),
        )

    return jax.tree.map(one, tree)


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _abstract_rngs(rngs):
    # Random draws do not change shapes or dependencies: any fixed key serves the analysis.
    return None if rngs is None else {k: jax.random.key(0) for k in rngs}


def _signature(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(
        (jnp.shape(x), str(jnp.result_type(x)), str(explicit_spec(x))) for x in leaves
    )


def exact_loss(problem: Problem, *, analyse: bool = False):
    """``(params, batch, key) -> (loss_fn of the trainable part, Trainable[, Structure])``."""

    def setup(params, batch, key):
        _, args, rngs, structure, train = problem.prepare(
            params, batch, key, analyse=analyse
        )

        def loss_fn(part):
            outputs = problem.model.apply(train.rebuild(part), *args, rngs=rngs)
            metrics = problem.metrics(outputs, batch, problem.losses(outputs, batch))
            return metrics["loss"], metrics

        return (loss_fn, train, structure) if analyse else (loss_fn, train)

    return setup


def losses_reached(structure: sites_lib.Structure) -> tuple[tuple[str, ...], ...]:
    """Per parameter leaf, the losses it reaches: its sites' ``feeds``, or the loss it meets first."""
    feeds = {s.path: s.feeds for s in structure.sites}
    reached = []
    for owners in structure.owners:
        names: set[str] = set()
        for owner in owners:
            kind, name = owner.split(":", 1)
            names.update(feeds[name] if kind == "site" else (name,))
        reached.append(tuple(sorted(names)))
    return tuple(reached)


def trainable_losses_reached(structure: sites_lib.Structure) -> list[tuple[str, ...]]:
    """:func:`losses_reached` for the trainable leaves only, in their order."""
    return [r for r, m in zip(losses_reached(structure), structure.trainable) if m]
