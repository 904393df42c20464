"""Best-effort handling of secrets (passphrases, keys) kept in mutable buffers.

Python cannot promise that no copy of a secret survives (immutable ``bytes`` made along the way, the
garbage collector, swap), so this is hygiene, not a guarantee: keep secrets in ``bytearray`` objects and
overwrite them as soon as they are no longer needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

Buffer = TypeVar("Buffer", bytearray, memoryview)


def wipe(*buffers: bytes | bytearray | memoryview | None) -> None:
    """Overwrite each buffer with zeros in place: the one way qcrypt forgets a secret. ``None`` and read-only
    buffers (``bytes``) are skipped: nothing can overwrite them, so secrets are kept in bytearrays."""
    for buf in buffers:
        if buf is None:
            continue
        view = memoryview(buf)
        if view.readonly:
            continue
        with view.cast("B") as flat:
            flat[:] = bytes(flat.nbytes)


@contextmanager
def secret(buf: Buffer) -> Iterator[Buffer]:
    """Yield ``buf`` and wipe it when the block exits, even on error."""
    try:
        yield buf
    finally:
        wipe(buf)


PR_SET_DUMPABLE = 4  # Linux prctl options
PR_GET_DUMPABLE = 3


def disable_core_dumps() -> None:
    """Keep this process's memory (passphrases, master keys) out of core dumps, as cryptsetup does.

    Sets the soft RLIMIT_CORE to 0 (no core file; the hard limit is left alone, so a program embedding
    qcrypt can restore its own setting later) and, on Linux, clears the "dumpable" flag
    (``prctl(PR_SET_DUMPABLE, 0)``: no core through a core-pattern pipe either, and no ptrace or
    /proc/PID/mem access by the same non-root user). Forked workers inherit both. Call it before the first
    secret is read; calling it again is harmless. Best effort where the platform lacks either.
    """
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    except (ImportError, OSError, ValueError):
        pass
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        pass


def core_dumps_disabled() -> bool:
    """True when this process would write no core: RLIMIT_CORE 0 and (on Linux) not dumpable."""
    import resource

    if resource.getrlimit(resource.RLIMIT_CORE)[0] != 0:
        return False
    try:
        import ctypes

        return int(ctypes.CDLL(None, use_errno=True).prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return True


def without_line_ending(data: bytes | bytearray) -> bytearray | None:
    """A copy of ``data`` without its one trailing line ending ("\\n" or "\\r\\n"); None when it has none or
    nothing would be left. The second candidate of a keyfile: the exact bytes are tried first, as cryptsetup's
    --key-file and QEMU's secret,file= use them."""
    if data.endswith(b"\r\n"):
        cut = 2
    elif data.endswith(b"\n"):
        cut = 1
    else:
        return None
    return bytearray(data[:-cut]) if len(data) > cut else None
