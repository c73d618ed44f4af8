"""What the benchmarks share."""

import jax
import numpy as np
import optax
import scipy.linalg

import guessgrad as gg
from guessgrad import data as gdata
from guessgrad import rules


def compiled_bytes(compiled) -> int:
    """Temporaries + arguments + outputs - aliased: what the computation holds at once, at most."""
    m = compiled.memory_analysis()
    return (
        m.temp_size_in_bytes
        + m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    )


def train(model, params, loader: gdata.Loader, steps: int):
    optimizer = optax.adamw(1e-3)
    step = gg.make_train_step(
        gg.get_estimator("backprop", model, has_aux=True), optimizer
    )
    state = gg.init_train_state(params, optimizer, jax.random.key(1))
    metrics = {}
    for index in range(steps):
        state, metrics = step(state, loader.batch(index))
    return state.params, {k: float(v) for k, v in metrics.items()}


def exact_bases(ctx: rules.GuessContext, sites: list[int], rank: int):
    """Per site: the exact top-``rank`` right singular vectors of each example's J_b.

    Returns ``({site: (vk [E, k, n], values [E, k], jac [E, m, n])}, gap)``,
    from the top eigenvectors of ``J_b^T J_b`` in float64 (LAPACK's subset
    eigensolver: a full SVD of many 1024 x 1024 Jacobians takes minutes),
    and the mean gap ratio ``sigma_{k+1}^2 / sigma_k^2``: the closer to 1,
    the harder any polynomial in ``J^T J`` finds the top-k subspace.
    """
    out, gaps = {}, []
    for index in sites:
        jac = np.asarray(ctx.next_jacobian(index), np.float64)  # [E, m, n]
        n = jac.shape[-1]
        vecs, values = [], []
        for j in jac:
            w, v = scipy.linalg.eigh(j.T @ j, subset_by_index=[n - rank - 1, n - 1])
            vecs.append(v[:, :0:-1].T)
            values.append(w[:0:-1])
            gaps.append(w[0] / w[1])
        out[index] = (np.stack(vecs), np.stack(values), jac.astype(np.float32))
    return out, float(np.mean(gaps))


def site_gradients(model, params, batch, examples: int, sites: list[int]):
    """The true ``dl_b/ds_l`` of the first ``examples`` examples (by backprop)."""
    sub = {"image": batch["image"][:examples], "label": batch["label"][:examples]}
    grads = list(gg.site_gradients(model, params, sub).values())  # forward order
    return {i: np.asarray(grads[i], np.float64).reshape(examples, -1) for i in sites}


def sub_context(model, params, batch, examples: int) -> rules.GuessContext:
    sub = {"image": batch["image"][:examples], "label": batch["label"][:examples]}
    return gg.guess_context(model, params, sub)


def subspace_scores(ritz, keep, vk, g, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Per example: the found subspace's projector error ``|P - P_k| / |P_k|`` and the
    cosine of ``P g`` with exact W-perp's ``P_k g`` (``ritz`` [E, k, n] with ``keep``
    [E, k] against the exact ``vk`` [E, k, n]; ``g`` the true site gradients)."""
    v = np.asarray(ritz, np.float64) * np.asarray(keep, np.float64)[..., None]
    overlap = np.sum(np.einsum("ekn,ejn->ekj", v, vk) ** 2, (1, 2))
    size = np.sum(v**2, (1, 2))  # the found rank (k, or fewer live directions)
    proj = np.sqrt(np.maximum(size + rank - 2 * overlap, 0) / rank)
    exact = np.einsum("ekn,ek->en", vk, np.einsum("ekn,en->ek", vk, g))
    found = np.einsum("ekn,ek->en", v, np.einsum("ekn,en->ek", v, g))
    norms = np.linalg.norm(exact, axis=-1) * np.linalg.norm(found, axis=-1)
    return proj, np.sum(exact * found, -1) / np.maximum(norms, 1e-300)
