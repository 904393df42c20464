"""Use both cores for chunked work. cryptography's AES calls hold the GIL, so threads do not scale: we fork
worker processes that inherit the already opened readers and ciphers (no secret is pickled or re-derived)
and return only small results (digests); bulk data is read and written by the workers themselves with
pread/pwrite at explicit offsets.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

R = TypeVar("R")

_task: Callable[..., Any] | None = None  # set in the parent just before the fork


def _run(args: tuple[Any, ...]) -> Any:
    assert _task is not None
    return _task(*args)


def default_workers() -> int:
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 8))
    except AttributeError:
        return max(1, min(os.cpu_count() or 1, 8))


def ordered_map(task: Callable[..., R], items: Iterable[tuple[Any, ...]], *, workers: int | None = None,
                in_flight: int = 6) -> Iterator[R]:
    """``task(*item)`` for every item, results in order; at most ``in_flight`` items pending (bounded memory).

    With one worker (or where fork is unavailable) everything runs in this process.
    """
    workers = default_workers() if workers is None else workers
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for item in items:
            yield task(*item)
        return
    global _task
    _task = task
    pending: deque[Future[R]] = deque()
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))
    try:
        for item in items:
            pending.append(executor.submit(_run, item))
            if len(pending) >= in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        executor.shutdown(wait=True, cancel_futures=True)
        _task = None
