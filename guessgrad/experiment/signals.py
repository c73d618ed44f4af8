"""Ctrl-C and SIGTERM during a run: noted by a handler, acted on at a step boundary."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Self


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped the run at a step boundary.

    ``step`` is the step whose checkpoint was saved in ``workdir``, or None
    when the signal came before training started (nothing was saved; a
    resumed run's earlier checkpoints are untouched). ``exit_code`` is the
    shell's convention, 128 + the signal number: 130 for Ctrl-C, 143 for
    SIGTERM.
    """

    def __init__(
        self,
        step: int | None,
        total_steps: int | None,
        workdir: str,
        signum: int = signal.SIGINT,
    ):
        super().__init__(step, total_steps, workdir, signum)
        self.step = step
        self.total_steps = total_steps
        self.workdir = workdir
        self.signum = int(signum)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Signals:
    """SIGINT and SIGTERM while a run is in progress: noted, acted on at the next boundary.

    The handler only records the first signal (and says so on stderr), so no
    exception lands inside Orbax, JAX or a half-written file; later signals
    are ignored until the run has saved and stopped. Outside the main thread
    (where Python allows no handlers) Ctrl-C stays a KeyboardInterrupt.
    """

    def __init__(self, label: str):
        self.label = label
        self.signum: int | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        # os.write, not print: a handler may run while the main thread is printing.
        os.write(
            2,
            f"\n[{self.label}] {signal.Signals(signum).name}: stopping at the end of "
            "this step (a checkpoint follows; further signals are ignored)\n".encode(),
        )

    def check_before_training(self, workdir: str) -> None:
        if self.signum is not None:
            raise Interrupted(None, None, workdir, self.signum)
