"""Comparing large byte buffers without pytest's assertion diff (which can run for minutes on MiBs).

``assert_same_bytes(actual, expected, what)`` raises AssertionError naming the first differing offset, the
lengths and 16 bytes around the difference on each side, or returns when equal.
"""

from __future__ import annotations

from typing import TypeAlias

Buffer: TypeAlias = "bytes | bytearray | memoryview"
_STEP = 1 << 16
_CONTEXT = 16


def first_difference(actual: Buffer, expected: Buffer) -> int | None:
    """Offset of the first differing byte (the shorter length if one is a prefix of the other), or None."""
    a, b = memoryview(actual).cast("B"), memoryview(expected).cast("B")
    common = min(len(a), len(b))
    for start in range(0, common, _STEP):
        end = min(start + _STEP, common)
        if a[start:end] != b[start:end]:
            return next(i for i in range(start, end) if a[i] != b[i])
    return None if len(a) == len(b) else common


def assert_same_bytes(actual: Buffer, expected: Buffer, what: str = "bytes") -> None:
    offset = first_difference(actual, expected)
    if offset is None:
        return
    a, b = bytes(actual[offset : offset + _CONTEXT]), bytes(expected[offset : offset + _CONTEXT])
    raise AssertionError(
        f"{what}: first difference at offset {offset} (0x{offset:x}, sector {offset // 512}); "
        f"lengths {len(actual)} vs {len(expected)}; got {a.hex()} expected {b.hex()}"
    )
