"""Critical sections that SIGINT/SIGTERM may not interrupt.

Blocking a signal with pthread_sigmask protects only the calling thread: a process-directed signal is then
delivered to another thread (e.g. one running PBKDF2), and CPython still runs the Python handler in the main
thread at its next bytecode. So, in the main thread, we swap in handlers that only record the signal, and
re-deliver it with the original handlers once the section is done.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

DEFERRED = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Run the block without SIGINT/SIGTERM handlers firing; deliver any that arrived afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers only ever run in the main thread
        return
    caught: list[int] = []

    def record(signum: int, _frame: object) -> None:
        caught.append(signum)

    previous = {signum: signal.signal(signum, record) for signum in DEFERRED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            signal.raise_signal(caught[0])
