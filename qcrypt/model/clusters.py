"""The typed model shared by the qcow2 and qcow readers: cluster mappings and snapshots.

No construct containers escape the readers: they are turned into these frozen dataclasses.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ClusterKind(enum.Enum):
    """How a guest cluster is backed (qemu's qcow2_get_cluster_type, plus subcluster-mixed)."""

    UNALLOCATED = "unallocated"  # read from the backing file, or zeros
    ZERO = "zero"  # reads as zeros, never decrypted, backing not consulted
    NORMAL = "normal"  # host_offset holds the (possibly encrypted) data
    COMPRESSED = "compressed"  # host_offset/compressed_bytes hold deflate/zstd data, never encrypted
    SUBCLUSTERS = "subclusters"  # extended L2: per-subcluster allocated/zero bitmaps


@dataclass(frozen=True)
class ClusterMapping:
    """Where one guest cluster's data lives in the image file."""

    kind: ClusterKind
    host_offset: int = 0
    compressed_bytes: int = 0
    alloc_bitmap: int = 0  # extended L2 only: bit i = subcluster i allocated at host_offset + i * sc_size
    zero_bitmap: int = 0  # extended L2 only: bit i = subcluster i reads as zeros


UNALLOCATED = ClusterMapping(ClusterKind.UNALLOCATED)
ZERO = ClusterMapping(ClusterKind.ZERO)


@dataclass(frozen=True)
class Snapshot:
    """One internal qcow2 snapshot."""

    index: int
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    virtual_size: int | None
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    entry: bytes = field(repr=False, default=b"")  # the raw table entry, for writers that keep snapshots

    def describe(self) -> dict[str, object]:
        """A JSON-able summary (as in ``qcrypt info``)."""
        return {
            "id": self.id,
            "name": self.name,
            "virtual_size": self.virtual_size,
            "date_sec": self.date_sec,
            "vm_state_size": self.vm_state_size,
        }


@dataclass(frozen=True)
class Extension:
    """A qcow2 header extension, kept verbatim (unknown ones included)."""

    type: int
    name: str
    data: bytes
