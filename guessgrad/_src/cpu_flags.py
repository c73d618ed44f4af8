"""XLA:CPU's concurrency-optimised scheduler off, before JAX starts its backend.

With that scheduler, a jitted step holding batched factorisations (the
per-example SVD of ``wperp``, the Rayleigh-Ritz ``eigh`` of ``wperp_ns``)
has hung on this project's CPUs: every thread waiting on a futex, no CPU
used. The flag only changes how XLA:CPU orders the work of one program; it
does nothing on accelerators. A user's own setting of the flag is kept. If
JAX's backend is already running when guessgrad is imported, the flag can no
longer take effect, and guessgrad says so (on a CPU backend only).
"""

from __future__ import annotations

import os
import sys
import warnings

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
_NAME = FLAG.split("=")[0]


def apply() -> bool:
    """Adds :data:`FLAG` to ``$XLA_FLAGS`` if it can still take effect; returns whether it did."""
    current = os.environ.get("XLA_FLAGS", "")
    if _NAME in current:
        return False  # the user chose
    if "jax" in sys.modules:
        import jax
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            if jax.default_backend() != "cpu":
                return False  # the scheduler only matters on a CPU
            warnings.warn(
                f"guessgrad was imported after JAX started its backend, so it could "
                f"not set XLA_FLAGS={FLAG}; on a CPU, jitted steps with per-example "
                f"factorisations (wperp, wperp_ns) can hang without it. Import "
                f"guessgrad first, or set the flag in the environment.",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
    os.environ["XLA_FLAGS"] = f"{current} {FLAG}".strip()
    return True
