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


def wipe(buf: bytearray | memoryview | None) -> None:
    """Overwrite ``buf`` with zeros in place (no-op for ``None`` and for read-only buffers)."""
    if buf is None:
        return
    view = memoryview(buf)
    if view.readonly:
        return
    with view.cast("B") as flat:
        flat[:] = bytes(flat.nbytes)


@contextmanager
def secret(buf: Buffer) -> Iterator[Buffer]:
    """Yield ``buf`` and wipe it when the block exits, even on error."""
    try:
        yield buf
    finally:
        wipe(buf)
