"""qcow version 1 reader (legacy "QCOW"): header, L1/L2 lookups. Lazy, read-only, bounds-checked.

References: qemu block/qcow.c (qcow_open, get_cluster_offset); docs/FORMATS.md section A.11.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING

from qcrypt.errors import LimitExceededError
from qcrypt.formats import qcow1 as qcow1_fmt
from qcrypt.formats._parse import parse, read_exact
from qcrypt.images.walk import COMPRESSED_OFFSETS_KEPT, TableUsage, WalkBudget, decode_name, used_entries
from qcrypt.model.clusters import UNALLOCATED, ClusterKind, ClusterMapping, Extension, Snapshot
from qcrypt.plumbing import limits
from qcrypt.plumbing.files import ImageFile

if TYPE_CHECKING:
    import numpy as np  # imported where tables are walked: reading a header needs no numpy


L1E_OFFSET_MASK = (1 << 64) - 1  # qcow v1 L1 entries are plain offsets


class QCowImage(ImageFile):
    """A qcow v1 file opened for reading."""

    format_name = "qcow"
    extensions: dict[int, Extension] = {}

    def _load(self) -> None:
        self.header = parse(
            qcow1_fmt.Header, self.fh, 0, qcow1_fmt.HEADER_SIZE, path=self.path, what="header", file_size=self.file_size
        )
        self._check_header()
        self.backing_file = self._read_backing_file()
        self._l1: np.ndarray | None = None
        self._read_l2 = functools.lru_cache(maxsize=64)(self._read_l2_uncached)

    def _check_header(self) -> None:
        h = self.header
        if h.version != 1:
            raise self._fail("version", f"expected 1, found {h.version}")
        if not qcow1_fmt.MIN_CLUSTER_BITS <= h.cluster_bits <= qcow1_fmt.MAX_CLUSTER_BITS:
            raise self._fail("cluster_bits", f"{h.cluster_bits} is outside 9..16")
        if not qcow1_fmt.MIN_L2_BITS <= h.l2_bits <= qcow1_fmt.MAX_L2_BITS:
            raise self._fail("l2_bits", f"{h.l2_bits} is outside 6..13")
        if h.size <= 1 or h.size > 1 << 62:
            raise self._fail("size", f"virtual size {h.size} is implausible")
        if h.crypt_method > qcow1_fmt.CRYPT_AES:
            raise self._fail("crypt_method", f"unknown method {h.crypt_method}")
        if self.l1_size * 8 > limits.MAX_L1_BYTES:
            raise LimitExceededError("L1 table would exceed 32 MiB", path=self.path, field="size")
        if h.l1_table_offset + self.l1_size * 8 > self.file_size:
            raise self._fail("l1_table_offset", f"L1 table at {h.l1_table_offset:#x} ends beyond the file")

    def _read_backing_file(self) -> str | None:
        h = self.header
        if not h.backing_file_offset:
            return None
        if h.backing_file_size == 0 or h.backing_file_size > 1023:
            raise self._fail("backing_file_size", f"{h.backing_file_size} is outside 1..1023")
        raw = read_exact(
            self.fh,
            h.backing_file_offset,
            h.backing_file_size,
            path=self.path,
            what="backing_file_offset",
            file_size=self.file_size,
        )
        return decode_name(raw, self.path, "backing file name")

    backing_format = None
    data_file = None

    def crypto_header(self) -> None:
        return None

    def snapshots(self) -> list[Snapshot]:
        return []

    def unsupported_incompatible_features(self) -> int:
        return 0

    def check_readable(self) -> None:
        """qcow v1 has no feature bits; every valid header is readable."""

    @property
    def virtual_size(self) -> int:
        """What the guest sees: QEMU counts whole 512-byte sectors (a crafted odd size is rounded down)."""
        return self.header.size // 512 * 512

    @property
    def cluster_size(self) -> int:
        return 1 << self.header.cluster_bits

    @property
    def guest_clusters(self) -> int:
        return -(-self.header.size // self.cluster_size)

    @property
    def l2_entries(self) -> int:
        return 1 << self.header.l2_bits

    @property
    def l1_size(self) -> int:
        shift = self.header.cluster_bits + self.header.l2_bits
        return -(-self.header.size // (1 << shift))

    def l1_table(self) -> np.ndarray:
        import numpy as np

        if self._l1 is None:
            raw = read_exact(
                self.fh,
                self.header.l1_table_offset,
                self.l1_size * 8,
                path=self.path,
                what="L1 table",
                file_size=self.file_size,
            )
            self._l1 = np.frombuffer(raw, dtype=">u8")
        return self._l1

    def _read_l2_uncached(self, l2_offset: int) -> np.ndarray:
        import numpy as np

        length = self.l2_entries * 8
        if l2_offset + length > self.file_size:
            raise self._fail("L1 entry", f"L2 table at {l2_offset:#x} ends beyond the file")
        raw = read_exact(self.fh, l2_offset, length, path=self.path, what="L2 table", file_size=self.file_size)
        return np.frombuffer(raw, dtype=">u8")

    def map_cluster(self, guest_cluster: int) -> ClusterMapping:
        l1_index, l2_index = divmod(guest_cluster, self.l2_entries)
        l1 = self.l1_table()
        if l1_index >= len(l1) or not int(l1[l1_index]):
            return UNALLOCATED
        return self._decode(int(self._read_l2(int(l1[l1_index]))[l2_index]))

    def _decode(self, entry: int) -> ClusterMapping:
        if not entry:
            return UNALLOCATED
        cb = self.header.cluster_bits
        if entry & qcow1_fmt.L2E_COMPRESSED:
            host_offset = entry & ((1 << (63 - cb)) - 1)
            csize = (entry >> (63 - cb)) & ((1 << cb) - 1)
            if host_offset >= self.file_size:
                raise self._fail("L2 entry", f"compressed data at {host_offset:#x} is beyond the file")
            return ClusterMapping(ClusterKind.COMPRESSED, host_offset, min(csize, self.file_size - host_offset))
        if entry % self.cluster_size:
            raise self._fail("L2 entry", f"data cluster offset {entry:#x} is not cluster-aligned")
        return ClusterMapping(ClusterKind.NORMAL, entry)

    def _used_l1_entries(self) -> Iterator[tuple[int, int]]:
        indexes, offsets = used_entries(self.l1_table(), L1E_OFFSET_MASK, self.path)
        return ((int(i), int(o)) for i, o in zip(indexes, offsets, strict=True))

    def iter_mappings(self, snapshot: Snapshot | None = None) -> Iterator[tuple[int, ClusterMapping]]:
        """Every allocated guest cluster, in guest order (a generator: one L2 table in memory)."""
        import numpy as np

        total = self.guest_clusters
        for l1_index, l2_offset in self._used_l1_entries():
            l2 = self._read_l2(l2_offset)
            first = l1_index * self.l2_entries
            for l2_index in np.flatnonzero(l2[: max(0, min(self.l2_entries, total - first))]):
                yield first + int(l2_index), self._decode(int(l2[l2_index]))

    def table_usage(self, budget: WalkBudget | None = None) -> TableUsage:
        """Allocated guest bytes and compressed host offsets, vectorized per L2 table, within ``budget``."""
        import numpy as np

        cs, total = self.cluster_size, self.guest_clusters
        if budget is not None:
            budget.charge(self.l1_size * 8, self.path)
        allocated, kept = 0, 0
        compressed: list[np.ndarray] = []
        for l1_index, l2_offset in self._used_l1_entries():
            if budget is not None:
                budget.charge(self.l2_entries * 8, self.path)
            l2 = self._read_l2_uncached(l2_offset)
            first = l1_index * self.l2_entries
            entries = l2[: max(0, min(self.l2_entries, total - first))]
            is_compressed = (entries & np.uint64(qcow1_fmt.L2E_COMPRESSED)) != 0
            offsets = entries[is_compressed] & np.uint64((1 << (63 - self.header.cluster_bits)) - 1)
            if (offsets >= np.uint64(self.file_size)).any():
                raise self._fail("L2 entry", "compressed data is beyond the file")
            normal = entries[~is_compressed]
            unaligned = np.flatnonzero(normal % np.uint64(cs))
            if len(unaligned):
                raise self._fail(
                    "L2 entry", f"data cluster offset {int(normal[unaligned[0]]):#x} is not cluster-aligned"
                )
            allocated += int(np.count_nonzero(entries)) * cs
            if first + len(entries) == total and entries[-1:].any():
                allocated -= total * cs - self.header.size  # the disk's last cluster is only partly inside it
            if len(offsets) and kept < COMPRESSED_OFFSETS_KEPT:
                compressed.append(np.unique(offsets)[: COMPRESSED_OFFSETS_KEPT - kept])
                kept += len(compressed[-1])
        offsets = np.unique(np.concatenate(compressed)) if compressed else np.zeros(0, dtype=np.uint64)
        return TableUsage(allocated, offsets, kept >= COMPRESSED_OFFSETS_KEPT)

    def allocated_bytes(self, budget: WalkBudget | None = None) -> int:
        return self.table_usage(budget).allocated_bytes
