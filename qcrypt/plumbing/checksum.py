"""128-bit digests of guest plaintext for ``migrate``'s read-back verification.

The verification guards against corruption and bugs, not an adversary, so it needs a digest that catches
accidental differences, not a cryptographic one. xxHash's XXH3-128 (the ``xxhash`` wheel) runs at tens of
GB/s; SHA-256 (OpenSSL with SHA-NI, about 1.8 GB/s here) was a quarter of a migration's CPU time. Without
the ``xxhash`` module (a platform without its wheel) SHA-256 is used instead: slower, same guarantees.

Both sides of a comparison must use the same function; forked workers inherit the choice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TypeAlias

Buffer: TypeAlias = "bytes | bytearray | memoryview"
DigestFn: TypeAlias = "Callable[[Buffer], bytes]"


def _sha256(data: Buffer) -> bytes:
    return hashlib.sha256(data).digest()


def _available() -> dict[str, DigestFn]:
    found: dict[str, DigestFn] = {"sha256": _sha256}
    try:
        import xxhash
    except ImportError:
        return found
    found["xxh3_128"] = xxhash.xxh3_128_digest
    return found


AVAILABLE: dict[str, DigestFn] = _available()
_current: list[tuple[str, DigestFn]] = [next((n, f) for n, f in reversed(AVAILABLE.items()))]


def digest(data: Buffer) -> bytes:
    """The digest of ``data`` with the function in use (XXH3-128 when available, else SHA-256)."""
    return _current[0][1](data)


def name() -> str:
    """The function in use: ``"xxh3_128"`` or ``"sha256"``."""
    return _current[0][0]


def use(function_name: str) -> str:
    """Switch the function (tests run both); returns the previous name."""
    previous = _current[0][0]
    _current[0] = (function_name, AVAILABLE[function_name])
    return previous
