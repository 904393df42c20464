"""Use both cores for chunked work. cryptography's AES calls hold the GIL, so threads do not scale: we fork
worker processes that inherit the already opened readers and ciphers (no secret is pickled or re-derived)
and return only small results (digests); bulk data is read and written by the workers themselves with
pread/pwrite at explicit offsets.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

from qcrypt._signals import DEFERRED, signals_deferred

R = TypeVar("R")

_task: Callable[..., Any] | None = None  # set in the parent just before the fork


PR_SET_PDEATHSIG = 1  # Linux prctl option


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: the kernel kills this worker if the parent dies (even by SIGKILL), so no worker
    outlives an interrupted migration holding its pipes and files open."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: rely on the pool's own shutdown
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _run(args: tuple[Any, ...]) -> Any:
    assert _task is not None
    return _task(*args)




def _submit(executor: ProcessPoolExecutor, item: tuple[Any, ...]) -> Future[Any]:
    """Submit with SIGINT/SIGTERM deferred: submit() may fork, and a Python signal handler that raises while
    fork's at-fork callbacks run has its exception printed and dropped. The signals are also blocked at the
    kernel level across the fork, so workers start with them blocked: the parent stops them (SIGKILL)."""
    with signals_deferred():
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED)
        try:
            return executor.submit(_run, item)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


M_TRIM_THRESHOLD = -1  # glibc mallopt parameters
M_MMAP_THRESHOLD = -3


def tune_malloc_for_streaming(chunk_bytes: int) -> None:
    """Keep multi-MiB chunk buffers on the heap instead of mmap/munmap per chunk (each fresh mapping costs
    page faults: measured 2-4x less kernel time on migrations). Process-wide, so only the CLI calls it;
    forked workers inherit it. No-op off glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 16 * chunk_bytes)
        libc.mallopt(M_TRIM_THRESHOLD, 64 * chunk_bytes)
    except (OSError, AttributeError):
        pass


def default_workers() -> int:
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 8))
    except AttributeError:
        return max(1, min(os.cpu_count() or 1, 8))


def ordered_map(task: Callable[..., R], items: Iterable[tuple[Any, ...]], *, workers: int | None = None,
                in_flight: int = 6) -> Iterator[R]:
    """``task(*item)`` for every item, results in order; at most ``in_flight`` items pending (bounded memory).

    With one worker (or where fork is unavailable) everything runs in this process. Callers must close the
    generator when they stop early (``with contextlib.closing(ordered_map(...))``): on an interrupt or error
    the workers are killed at once (their work only ever lands in a temporary file that is discarded).
    """
    workers = default_workers() if workers is None else workers
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for item in items:
            yield task(*item)
        return
    global _task
    _task = task
    pending: deque[Future[R]] = deque()
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_die_with_parent, initargs=(os.getpid(),))
    completed = False
    try:
        for item in items:
            pending.append(_submit(executor, item))
            if len(pending) >= in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
        completed = True
    finally:
        _task = None
        if completed:
            executor.shutdown(wait=True)
        else:
            _kill_workers(executor)


def _kill_workers(executor: ProcessPoolExecutor) -> None:
    """Stop now: workers block SIGTERM (see _submit), so SIGKILL them, then let the pool wind down."""
    for process in list(getattr(executor, "_processes", {}).values()):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            process.kill()
    executor.shutdown(wait=False, cancel_futures=True)
