"""guessgrad's experiments, run as ``python -m experiments.<name>``.

Run as a program, this package's import is the first thing that happens, so
it is where Ctrl-C (SIGINT) and SIGTERM are first handled: until a run
installs its own handlers (which stop at a step boundary with a
checkpoint), a signal ends the process at once with the shell's status
(130, 143) and one line, since nothing has been written yet. Without this,
Python's default handler raises KeyboardInterrupt wherever the start-up
happens to be (an import, JAX's initialisation, a garbage-collection
callback that swallows it), and the run may even train on.
"""

import os
import signal
import sys


def _stop_at_start(signum, frame):
    name = signal.Signals(signum).name
    os.write(2, f"\n{name} while starting; nothing was written.\n".encode())
    os._exit(128 + signum)


# While ``python -m`` locates the module, sys.argv[0] is "-m": only programs.
if sys.argv[:1] == ["-m"]:
    for _signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signal, _stop_at_start)
