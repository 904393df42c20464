"""What walking an image's tables may cost, and what a walk found: shared by the qcow2 and qcow readers.

A header may declare tables far larger than any real image has; every walk is charged against a
:class:`WalkBudget` (limits in :mod:`qcrypt.plumbing.limits`, documented in docs/SECURITY.md, "Limits").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qcrypt.errors import FormatError, LimitExceededError
from qcrypt.plumbing import limits

if TYPE_CHECKING:
    import numpy as np

COMPRESSED_OFFSETS_KEPT = 1 << 20  # compressed clusters counted one by one (8 MiB of offsets) before "at least"


def used_entries(table: np.ndarray, offset_mask: int, path: str) -> tuple[np.ndarray, np.ndarray]:
    """(indexes, offsets) of the entries of an L1 table that point at an L2 table; FormatError if two point at
    the same one. QEMU gives every L1 entry of a table its own L2 table: a shared one maps the same data again
    and again (an image of a few MiB could claim petabytes of data, and days of work, this way)."""
    import numpy as np

    indexes = np.flatnonzero(table & np.uint64(offset_mask))
    offsets = table[indexes] & np.uint64(offset_mask)
    ordered = np.sort(offsets)
    if len(ordered) > 1 and (ordered[1:] == ordered[:-1]).any():
        raise FormatError("two entries of one L1 table point at the same L2 table", path=path, field="L1 entry")
    return indexes, offsets


class WalkBudget:
    """What one inspection may spend reading L1/L2 tables (``limits.MAX_WALK_TABLE_BYTES`` and
    ``MAX_WALK_TABLES``); shared by every table of an image. ``None`` limits mean unlimited (migrate)."""

    def __init__(
        self, table_bytes: int | None = limits.MAX_WALK_TABLE_BYTES, tables: int | None = limits.MAX_WALK_TABLES
    ) -> None:
        self.table_bytes = table_bytes
        self.tables = tables

    def charge(self, length: int, path: str) -> None:
        """Account for reading one table of ``length`` bytes; raise LimitExceededError once over budget."""
        if self.table_bytes is not None:
            self.table_bytes -= length
        if self.tables is not None:
            self.tables -= 1
        if (self.table_bytes is not None and self.table_bytes < 0) or (self.tables is not None and self.tables < 0):
            raise LimitExceededError(
                f"its L1/L2 tables exceed what one inspection reads ({limits.MAX_WALK_TABLES} tables, "
                f"{limits.MAX_WALK_TABLE_BYTES >> 20} MiB)",
                path=path,
                field="L1/L2 tables",
            )


@dataclass(frozen=True)
class TableUsage:
    """What one L1 table maps: guest bytes backed by data, and the host offsets of its compressed clusters."""

    allocated_bytes: int
    compressed_offsets: np.ndarray  # unique, at most COMPRESSED_OFFSETS_KEPT of them
    compressed_truncated: bool = False  # True: there may be more than those


def decode_name(raw: bytes, path: str, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError("is not valid UTF-8", path=path, field=what) from e
