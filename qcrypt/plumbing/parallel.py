"""Use both cores for chunked work, with worker processes that can neither hang us nor be hung by us.

cryptography's AES calls hold the GIL, so threads do not scale: we fork worker processes that inherit the
already opened readers and ciphers (no secret is pickled, written to disk or put on a command line) and
return only small results (digests); bulk data is read and written by the workers themselves with
pread/pwrite at explicit offsets.

Two rules keep this from hanging (docs/HANGS.md tells the story of the hang they fixed):

* **Fork only while this process runs a single thread.** A child inherits every lock in the state it had at
  fork time, but not the threads that held them: a lock held by another thread at that instant (in OpenSSL,
  malloc, a Python module) stays locked forever in the child, which blocks on its first use. qcrypt itself
  therefore runs background work (the keyslot PBKDF2, the fsync) in forked processes too, never in threads;
  an embedding program that has threads of its own gets the work done in its own process instead (slower,
  never stuck).
* **Never wait without a deadline.** Workers are watched with ``select``: a worker that dies, or a pool in
  which no task completes for ``stall_seconds``, raises :class:`~qcrypt.errors.WorkerError` naming the task
  it was on, and every worker is killed (their work only ever lands in a temporary file that is discarded).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Generic, TypeVar

from qcrypt.errors import WorkerError
from qcrypt.plumbing.signals import DEFERRED, signals_deferred

R = TypeVar("R")
log = logging.getLogger(__name__)

DEFAULT_STALL_SECONDS = 300.0  # no task completing for this long is a stall, not slowness
PR_SET_PDEATHSIG = 1  # Linux prctl option
_EXIT_TIMEOUT_S = 5.0


def other_threads() -> list[str]:
    """Names of the threads running beside the calling one."""
    me = threading.current_thread()
    return [t.name for t in threading.enumerate() if t is not me and t.is_alive()]


def can_fork() -> bool:
    """Forking is safe only when no other thread runs (and the platform has fork)."""
    return hasattr(os, "fork") and not other_threads()


def _die_with_parent(parent_pid: int) -> None:
    """In a worker: the kernel kills it if the parent dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: EOF on the socket still ends the worker
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _portable(error: BaseException) -> BaseException:
    """The worker's exception if it survives pickling, else a WorkerError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return WorkerError(f"{type(error).__name__}: {error}")


def _serve(task: Callable[..., Any], conn: Connection) -> None:
    """A worker's life: run tasks until the parent says stop (None) or goes away (EOF)."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        ticket, args = message
        try:
            reply = (ticket, True, task(*args))
        except BaseException as e:  # handed to the parent, which raises it
            reply = (ticket, False, _portable(e))
        conn.send(reply)


@dataclass
class _Worker:
    pid: int
    conn: Connection
    pending: deque[int] = field(default_factory=deque)  # tickets sent, oldest first
    since: float = 0.0  # when its oldest pending task was sent

    def exit_status(self, wait_s: float) -> str:
        """Reap the worker (waiting up to ``wait_s``) and describe how it ended. The wait ends when the worker
        does (a pidfd becomes readable then), not at the next tick of a polling loop."""
        deadline = time.monotonic() + wait_s
        pidfd = _pidfd(self.pid)
        try:
            while True:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:
                    return "exited"
                if pid:
                    if os.WIFSIGNALED(status):
                        return f"killed by signal {os.WTERMSIG(status)}"
                    return f"exited with status {os.WEXITSTATUS(status)}"
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "still running"
                if pidfd is None:
                    time.sleep(min(0.01, remaining))
                else:
                    select.select([pidfd], [], [], remaining)
        finally:
            if pidfd is not None:
                os.close(pidfd)


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when process ``pid`` ends (Linux 5.3 and later), or None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _fork_worker(task: Callable[..., Any], inherited: list[_Worker]) -> _Worker:
    parent_sock, child_sock = socket.socketpair()
    parent_pid = os.getpid()
    pid = os.fork()
    if pid == 0:  # the worker
        status = 1
        try:
            parent_sock.close()
            for sibling in inherited:  # so that only the parent holds each worker's other end
                sibling.conn.close()
            _die_with_parent(parent_pid)
            _serve(task, Connection(child_sock.detach()))
            status = 0
        finally:
            os._exit(status)
    child_sock.close()
    return _Worker(pid, Connection(parent_sock.detach()))


class ForkPool(Generic[R]):
    """Worker processes forked now, each running ``task(*args)`` for the argument tuples it is sent.

    Use as a context manager: leaving it normally lets the workers finish; leaving it by an exception (or
    calling :meth:`kill`) SIGKILLs them at once.
    """

    def __init__(
        self,
        task: Callable[..., R],
        workers: int,
        *,
        stall_seconds: float = DEFAULT_STALL_SECONDS,
        describe: Callable[[tuple[Any, ...]], str] = repr,
    ) -> None:
        threads = other_threads()
        if threads:
            raise WorkerError(f"internal error: refusing to fork while other threads run ({', '.join(threads)})")
        self.stall_seconds = stall_seconds
        self.describe = describe
        self.workers: list[_Worker] = []
        self._sent: dict[int, tuple[Any, ...]] = {}
        self._next_ticket = 0
        # SIGINT/SIGTERM deferred (a Python handler raising inside fork's at-fork callbacks is lost) and blocked
        # across the fork, so workers start with them blocked: the parent stops them with SIGKILL.
        with signals_deferred():
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED)
            try:
                for _ in range(workers):
                    self.workers.append(_fork_worker(task, self.workers))
            except BaseException:
                self.kill()
                raise
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def __enter__(self) -> ForkPool[R]:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.kill()

    def submit(self, args: tuple[Any, ...]) -> int:
        """Send ``args`` to the least busy worker; returns the task's ticket."""
        worker = min(self.workers, key=lambda w: len(w.pending))
        ticket = self._next_ticket
        self._next_ticket += 1
        if not worker.pending:
            worker.since = time.monotonic()
        worker.pending.append(ticket)
        self._sent[ticket] = args
        try:
            worker.conn.send((ticket, args))
        except OSError as e:
            raise WorkerError(self._death_message(worker)) from e
        return ticket

    def busy(self) -> int:
        return sum(len(w.pending) for w in self.workers)

    def collect(self) -> list[tuple[int, bool, Any]]:
        """Wait for at least one result: [(ticket, ok, value)]; raise WorkerError on a death or a stall."""
        waiting = [w for w in self.workers if w.pending]
        ready = wait([w.conn for w in waiting], timeout=self.stall_seconds)
        if not ready:
            raise WorkerError(self._stall_message(waiting))
        results = []
        for worker in waiting:
            if worker.conn in ready:
                results.append(self._receive(worker))
        return results

    def _receive(self, worker: _Worker) -> tuple[int, bool, Any]:
        try:
            ticket, ok, value = worker.conn.recv()
        except (EOFError, OSError) as e:
            raise WorkerError(self._death_message(worker)) from e
        if worker.pending and worker.pending[0] == ticket:
            worker.pending.popleft()
        worker.since = time.monotonic()
        del self._sent[ticket]
        return ticket, ok, value

    def _death_message(self, worker: _Worker) -> str:
        on = self.describe(self._sent[worker.pending[0]])
        return f"worker process {worker.pid} {worker.exit_status(_EXIT_TIMEOUT_S)} while processing {on}"

    def _stall_message(self, waiting: list[_Worker]) -> str:
        oldest = min(waiting, key=lambda w: w.since)
        on = self.describe(self._sent[oldest.pending[0]])
        return (
            f"no progress for {self.stall_seconds:.0f} s: worker process {oldest.pid} is stuck on {on} "
            f"({len(waiting)} of {len(self.workers)} workers busy); stopped them all"
        )

    def close(self) -> None:
        """Tell idle workers to exit and reap them; kill any that do not."""
        for worker in self.workers:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
        for worker in self.workers:
            if worker.exit_status(_EXIT_TIMEOUT_S) == "still running":
                _kill(worker)
            worker.conn.close()
        self.workers = []

    def kill(self) -> None:
        """SIGKILL every worker now and reap it."""
        for worker in self.workers:
            _kill(worker)
            worker.conn.close()
        self.workers = []


def _kill(worker: _Worker) -> None:
    with contextlib.suppress(OSError):
        os.kill(worker.pid, signal.SIGKILL)
    worker.exit_status(_EXIT_TIMEOUT_S)


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


def disk_bound_workers() -> int:
    """Workers for tasks that also wait for the disk (direct I/O): one per core plus one, so that a core whose
    worker waits for a write or a read-back has another worker to run (measured on 2 cores, 512 MiB to raw
    LUKS: write phase 0.93-0.98 s with 2 workers, 0.72-0.76 s with 3, no better with 4 or 6)."""
    return default_workers() + 1


def _in_process(task: Callable[..., R], items: Iterable[tuple[Any, ...]], workers: int) -> bool:
    if workers <= 1 or not hasattr(os, "fork"):
        return True
    threads = other_threads()
    if threads:
        log.warning(
            "running %d-way work in this process: other threads run (%s), so forking is unsafe",
            workers,
            ", ".join(threads),
        )
        return True
    return False


def ordered_map(
    task: Callable[..., R],
    items: Iterable[tuple[Any, ...]],
    *,
    workers: int | None = None,
    in_flight: int = 6,
    stall_seconds: float = DEFAULT_STALL_SECONDS,
    describe: Callable[[tuple[Any, ...]], str] = repr,
) -> Generator[R, None, None]:
    """``task(*item)`` for every item, results in order; at most ``in_flight`` items pending (bounded memory).

    With one worker, where fork is unavailable, or while other threads run, everything runs in this process.
    Callers must close the generator when they stop early (``with contextlib.closing(ordered_map(...))``): on
    an interrupt or error the workers are killed at once. ``describe(item)`` names an item in the error raised
    when a worker dies or no item completes for ``stall_seconds``.
    """
    workers = default_workers() if workers is None else workers
    if _in_process(task, items, workers):
        for item in items:
            yield task(*item)
        return
    with ForkPool(task, workers, stall_seconds=stall_seconds, describe=describe) as pool:
        yield from _pump(pool, iter(items), max(in_flight, workers))


def _pump(pool: ForkPool[R], items: Iterator[tuple[Any, ...]], in_flight: int) -> Generator[R, None, None]:
    done: dict[int, tuple[bool, Any]] = {}
    next_out = 0
    exhausted = False
    while True:
        while not exhausted and pool.busy() + len(done) < in_flight:
            item = next(items, None)
            if item is None:
                exhausted = True
            else:
                pool.submit(item)
        while next_out in done:
            ok, value = done.pop(next_out)
            next_out += 1
            if not ok:
                raise value
            yield value
        if exhausted and not pool.busy() and not done:
            return
        if pool.busy():
            for ticket, ok, value in pool.collect():
                done[ticket] = (ok, value)


class Background(Generic[R]):
    """``task(*args)`` in a forked process (a thread would make later forks unsafe): start it, go on,
    then :meth:`result`. Runs at once in this process where forking is unsafe."""

    def __init__(
        self, task: Callable[..., R], *args: Any, what: str, stall_seconds: float = DEFAULT_STALL_SECONDS
    ) -> None:
        self._value: tuple[bool, Any] | None = None
        self._pool: ForkPool[R] | None = None
        if not can_fork():
            try:
                self._value = (True, task(*args))
            except Exception as e:
                self._value = (False, e)
            return
        self._pool = ForkPool(task, 1, stall_seconds=stall_seconds, describe=lambda _args: what)
        self._pool.submit(args)

    def result(self) -> R:
        """Wait for the task (a stall or a death raises WorkerError) and return its value or raise its error."""
        if self._value is None:
            assert self._pool is not None
            try:
                (_ticket, ok, value), *_ = self._pool.collect()
            except BaseException:
                self.cancel()
                raise
            self._pool.close()
            self._pool, self._value = None, (ok, value)
        ok, value = self._value
        if not ok:
            raise value
        return value

    def cancel(self) -> None:
        if self._pool is not None:
            self._pool.kill()
            self._pool = None
