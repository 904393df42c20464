"""qcow2 reader: header, extensions, L1/L2 lookups and snapshots. Lazy, read-only, bounds-checked.

References:
    qemu docs/interop/qcow2.txt; block/qcow2.c (qcow2_do_open, qcow2_read_extensions);
    block/qcow2-cluster.c (qcow2_get_cluster_type, qcow2_get_host_offset); docs/FORMATS.md section A.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qcrypt.errors import FormatError, LimitExceededError, UnsupportedFeatureError
from qcrypt.formats import qcow2 as qcow2_fmt
from qcrypt.formats._parse import parse, parse_bytes, read_exact
from qcrypt.images.walk import COMPRESSED_OFFSETS_KEPT, TableUsage, WalkBudget, decode_name, used_entries
from qcrypt.model.clusters import UNALLOCATED, ZERO, ClusterKind, ClusterMapping, Extension, Snapshot
from qcrypt.plumbing import limits
from qcrypt.plumbing.files import ImageFile

if TYPE_CHECKING:
    import numpy as np  # imported where tables are walked: reading a header needs no numpy


L2_CACHE_TABLES = 64
_SNAPSHOT_HEADER = struct.Struct(qcow2_fmt.SNAPSHOT_HEADER_FORMAT)
SNAPSHOT_READ_BYTES = 64 * 1024  # the snapshot table is read in pieces of this size (it is usually tiny)
SPARSE_L2_ENTRIES = 32  # an L2 table with at most this many used entries is decoded entry by entry


@dataclass(frozen=True)
class Header:
    """The qcow2 header with the v3 fields defaulted for v2 images."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = qcow2_fmt.V2_HEADER_LENGTH
    compression_type: int = qcow2_fmt.COMPRESSION_DEFLATE

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & qcow2_fmt.INCOMPAT_EXTL2)

    @property
    def l2_entry_bytes(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_bytes


def feature_names(header: Header) -> dict[str, list[str]]:
    """Names of the feature bits set in each mask (unknown bits as ``bit N``)."""
    names: dict[str, list[str]] = {}
    for mask_name, value in (
        ("incompatible", header.incompatible_features),
        ("compatible", header.compatible_features),
        ("autoclear", header.autoclear_features),
    ):
        names[mask_name] = [
            qcow2_fmt.FEATURE_NAMES.get((mask_name, bit), f"bit {bit}") for bit in range(64) if value >> bit & 1
        ]
    return names


class QCow2Image(ImageFile):
    """A qcow2 file opened for reading. Use :meth:`open` (a context manager)."""

    format_name = "qcow2"

    def _load(self) -> None:
        self.header = self._read_header()
        self._check_header()
        self.extensions = self._read_extensions()
        self.backing_file = self._read_backing_file()
        self._check_l1_geometry()
        self._l1_cache: dict[tuple[int, int], np.ndarray] = {}
        self._read_l2 = functools.lru_cache(maxsize=L2_CACHE_TABLES)(self._read_l2_uncached)

    # -- header ------------------------------------------------------------------------------------
    def _read_header(self) -> Header:
        length = min(qcow2_fmt.HEADER_READ_SIZE, self.file_size)
        raw = read_exact(self.fh, 0, length, path=self.path, what="header", file_size=self.file_size)
        c = parse_bytes(qcow2_fmt.Header, raw, path=self.path, what="header")
        if c.version not in (2, 3):
            raise FormatError(f"unsupported qcow2 version {c.version}", path=self.path, field="version")
        fields = {k: c[k] for k in Header.__dataclass_fields__ if k in c}
        if c.v3 is not None:
            fields.update({k: c.v3[k] for k in c.v3 if not k.startswith("_")})
            if c.v3.header_length > qcow2_fmt.COMPRESSION_TYPE_OFFSET and len(raw) > qcow2_fmt.COMPRESSION_TYPE_OFFSET:
                fields["compression_type"] = raw[qcow2_fmt.COMPRESSION_TYPE_OFFSET]
        return Header(**fields)

    def _check_header(self) -> None:
        h = self.header
        if not qcow2_fmt.MIN_CLUSTER_BITS <= h.cluster_bits <= qcow2_fmt.MAX_CLUSTER_BITS:
            raise self._fail("cluster_bits", f"{h.cluster_bits} is outside 9..21")
        if h.version == 3:
            if h.header_length < qcow2_fmt.V3_MIN_HEADER_LENGTH or h.header_length % 8:
                raise self._fail("header_length", f"{h.header_length} is invalid")
            if h.header_length > h.cluster_size:
                raise self._fail("header_length", "header is longer than a cluster")
            if h.refcount_order > 6:
                raise self._fail("refcount_order", f"{h.refcount_order} is above 6")
        if h.crypt_method > qcow2_fmt.CRYPT_LUKS:
            raise self._fail("crypt_method", f"unknown method {h.crypt_method}")
        if h.extended_l2 and h.cluster_bits < 14:
            raise self._fail("cluster_bits", "extended L2 entries need clusters of at least 16 KiB")
        if h.size > 1 << 62:
            raise self._fail("size", f"virtual size {h.size} is implausible")
        if h.compression_type not in (qcow2_fmt.COMPRESSION_DEFLATE, qcow2_fmt.COMPRESSION_ZSTD):
            raise self._fail("compression_type", f"unknown compression type {h.compression_type}")

    def _check_l1_geometry(self) -> None:
        h = self.header
        needed = -(-h.size // (h.cluster_size * h.l2_entries))
        if h.l1_size < needed:
            raise self._fail("l1_size", f"L1 table is too small ({h.l1_size} < {needed} entries)")
        if h.l1_size * 8 > limits.MAX_L1_BYTES:
            raise LimitExceededError(f"{h.l1_size} entries exceed the 32 MiB limit", path=self.path, field="l1_size")
        self._check_table("l1_table_offset", h.l1_table_offset, h.l1_size * 8)

    def _check_table(self, field: str, offset: int, length: int) -> None:
        if length == 0:
            return
        if offset % self.header.cluster_size:
            raise self._fail(field, f"offset {offset:#x} is not cluster-aligned")
        if offset + length > self.file_size:
            raise self._fail(field, f"table at {offset:#x} (+{length}) ends beyond the file ({self.file_size})")

    def unsupported_incompatible_features(self) -> int:
        """Incompatible feature bits qcrypt (and QEMU) do not know."""
        return self.header.incompatible_features & ~qcow2_fmt.INCOMPAT_KNOWN

    def check_readable(self) -> None:
        """Refuse images whose guest data we cannot read faithfully."""
        unknown = self.unsupported_incompatible_features()
        if unknown:
            raise UnsupportedFeatureError(
                f"unknown incompatible feature bits {unknown:#x}", path=self.path, field="incompatible_features"
            )
        if self.header.incompatible_features & qcow2_fmt.INCOMPAT_DATA_FILE:
            raise UnsupportedFeatureError(
                "images with an external data file are not supported",
                path=self.path,
                field="incompatible_features",
            )

    # -- extensions and backing file ---------------------------------------------------------------
    def _extension_area_end(self) -> int:
        h = self.header
        end = h.backing_file_offset if h.backing_file_offset else h.cluster_size
        return min(end, self.file_size, h.cluster_size)

    def _read_extensions(self) -> dict[int, Extension]:
        extensions: dict[int, Extension] = {}
        offset = self.header.header_length
        end = self._extension_area_end()
        while offset + 8 <= end:
            eh = parse(
                qcow2_fmt.ExtensionHeader,
                self.fh,
                offset,
                8,
                path=self.path,
                what="header extension",
                file_size=self.file_size,
            )
            if eh.type == qcow2_fmt.EXT_END:
                break
            if len(extensions) >= limits.MAX_HEADER_EXTENSIONS:
                raise LimitExceededError(
                    f"more than {limits.MAX_HEADER_EXTENSIONS} header extensions",
                    path=self.path,
                    field="header extension",
                )
            if offset + 8 + eh.length > end:
                raise self._fail("header extension", f"extension {eh.type:#x} runs past the extension area")
            if eh.type in extensions:
                raise self._fail("header extension", f"extension {eh.type:#x} appears twice")
            data = read_exact(
                self.fh, offset + 8, eh.length, path=self.path, what="header extension", file_size=self.file_size
            )
            extensions[eh.type] = Extension(eh.type, qcow2_fmt.EXTENSION_NAMES.get(eh.type, "unknown"), data)
            offset += 8 + (eh.length + 7) // 8 * 8
        return extensions

    def _read_backing_file(self) -> str | None:
        h = self.header
        if not h.backing_file_offset:
            return None
        if h.backing_file_size == 0 or h.backing_file_size > qcow2_fmt.MAX_BACKING_FILE_NAME:
            raise self._fail("backing_file_size", f"{h.backing_file_size} is outside 1..1023")
        if h.backing_file_offset + h.backing_file_size > h.cluster_size:
            raise self._fail("backing_file_offset", "backing file name does not fit in the first cluster")
        raw = read_exact(
            self.fh,
            h.backing_file_offset,
            h.backing_file_size,
            path=self.path,
            what="backing_file_offset",
            file_size=self.file_size,
        )
        return decode_name(raw, self.path, "backing file name")

    @property
    def backing_format(self) -> str | None:
        ext = self.extensions.get(qcow2_fmt.EXT_BACKING_FORMAT)
        return decode_name(ext.data, self.path, "backing format") if ext else None

    @property
    def data_file(self) -> str | None:
        ext = self.extensions.get(qcow2_fmt.EXT_DATA_FILE)
        return decode_name(ext.data, self.path, "data file name") if ext else None

    def crypto_header(self) -> tuple[int, int] | None:
        """(offset, length) of the embedded LUKS header (crypt_method 2), checked."""
        ext = self.extensions.get(qcow2_fmt.EXT_CRYPTO_HEADER)
        if ext is None:
            if self.header.crypt_method == qcow2_fmt.CRYPT_LUKS:
                raise self._fail("crypto_header", "crypt method 2 without the full-disk-encryption extension")
            return None
        if self.header.crypt_method != qcow2_fmt.CRYPT_LUKS:
            raise self._fail("crypto_header", "encryption header extension only expected with LUKS")
        if len(ext.data) != 16:
            raise self._fail("crypto_header", f"extension length {len(ext.data)} is not 16")
        c = parse_bytes(qcow2_fmt.CryptoHeaderExtension, ext.data, path=self.path, what="crypto_header")
        self._check_table("crypto_header.offset", c.offset, c.length)
        return c.offset, c.length

    # -- refcounts ---------------------------------------------------------------------------------
    @property
    def refcount_bits(self) -> int:
        return 1 << self.header.refcount_order

    def refcount_table(self) -> np.ndarray:
        """The refcount table (u64 entries; bits 9-63 = refcount block offset, 0 = all counts 0)."""
        import numpy as np

        h = self.header
        length = h.refcount_table_clusters * h.cluster_size
        if length > limits.MAX_REFTABLE_BYTES:
            raise LimitExceededError(
                f"{h.refcount_table_clusters} clusters exceed 8 MiB", path=self.path, field="refcount_table_clusters"
            )
        self._check_table("refcount_table_offset", h.refcount_table_offset, length)
        raw = read_exact(
            self.fh, h.refcount_table_offset, length, path=self.path, what="refcount table", file_size=self.file_size
        )
        return np.frombuffer(raw, dtype=">u8")

    def refcount(self, host_offset: int) -> int:
        """The refcount of the host cluster holding ``host_offset`` (qcow2.txt "Host cluster management")."""
        cs = self.header.cluster_size
        entries_per_block = cs * 8 // self.refcount_bits
        table_index, block_index = divmod(host_offset // cs, entries_per_block)
        table = self.refcount_table()
        if table_index >= len(table) or not int(table[table_index]) & qcow2_fmt.REFT_OFFSET_MASK:
            return 0
        block_offset = int(table[table_index]) & qcow2_fmt.REFT_OFFSET_MASK
        self._check_table("refcount table entry", block_offset, cs)
        bits = self.refcount_bits
        if bits >= 8:
            width = bits // 8
            raw = read_exact(
                self.fh,
                block_offset + block_index * width,
                width,
                path=self.path,
                what="refcount block",
                file_size=self.file_size,
            )
            return int.from_bytes(raw, "big")
        byte = read_exact(
            self.fh,
            block_offset + block_index * bits // 8,
            1,
            path=self.path,
            what="refcount block",
            file_size=self.file_size,
        )[0]
        return (byte >> (block_index * bits % 8)) & ((1 << bits) - 1)

    # -- snapshots ---------------------------------------------------------------------------------
    def check_snapshot_table(self) -> int:
        """The snapshot count, checked against the limits and the file size without parsing the entries."""
        h = self.header
        if h.nb_snapshots == 0:
            return 0
        if h.nb_snapshots > limits.MAX_SNAPSHOTS:
            raise LimitExceededError(
                f"{h.nb_snapshots} snapshots exceed the limit of {limits.MAX_SNAPSHOTS}",
                path=self.path,
                field="nb_snapshots",
            )
        min_bytes = h.nb_snapshots * qcow2_fmt.SNAPSHOT_HEADER_SIZE
        if min_bytes > limits.MAX_SNAPSHOT_TABLE_BYTES:
            raise self._table_too_big(min_bytes)
        self._check_table("snapshots_offset", h.snapshots_offset, min_bytes)
        return h.nb_snapshots

    def _table_too_big(self, length: int) -> LimitExceededError:
        return LimitExceededError(
            f"the snapshot table ({length} bytes or more) exceeds the limit of "
            f"{limits.MAX_SNAPSHOT_TABLE_BYTES >> 20} MiB",
            path=self.path,
            field="snapshot table",
        )

    def snapshots(self) -> list[Snapshot]:
        if not self.check_snapshot_table():
            return []
        table = _TableReader(self, self.header.snapshots_offset)
        snapshots = [self._read_snapshot(index, table) for index in range(self.header.nb_snapshots)]
        l1_bytes = sum(snapshot.l1_size * 8 for snapshot in snapshots)
        if l1_bytes > limits.MAX_SNAPSHOT_L1_TOTAL_BYTES:
            raise LimitExceededError(
                f"the snapshots' L1 tables ({l1_bytes} bytes together) exceed the limit of "
                f"{limits.MAX_SNAPSHOT_L1_TOTAL_BYTES >> 20} MiB",
                path=self.path,
                field="snapshot table",
            )
        return snapshots

    def _read_snapshot(self, index: int, table: _TableReader) -> Snapshot:
        start = table.need(qcow2_fmt.SNAPSHOT_HEADER_SIZE, index)
        (
            l1_table_offset,
            l1_size,
            id_size,
            name_size,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            extra_size,
        ) = _SNAPSHOT_HEADER.unpack_from(table.buffer, start)
        if extra_size > limits.MAX_SNAPSHOT_EXTRA:
            raise LimitExceededError(
                f"extra data size {extra_size} exceeds {limits.MAX_SNAPSHOT_EXTRA}",
                path=self.path,
                field=f"snapshot {index}",
            )
        length = qcow2_fmt.SNAPSHOT_HEADER_SIZE + extra_size + id_size + name_size
        start = table.need(length, index)
        table.position = start + length + -length % 8  # padding to 8 bytes (may end the file)
        entry = bytes(table.buffer[start : start + length])
        extra_end = qcow2_fmt.SNAPSHOT_HEADER_SIZE + extra_size
        disk_size = int.from_bytes(entry[48:56], "big") if extra_size >= 16 else None
        snap_id = decode_name(entry[extra_end : extra_end + id_size], self.path, f"snapshot {index} id")
        name = decode_name(entry[extra_end + id_size :], self.path, f"snapshot {index} name")
        if l1_size * 8 > limits.MAX_L1_BYTES:
            raise LimitExceededError(
                f"L1 size {l1_size} exceeds the 32 MiB limit", path=self.path, field=f"snapshot {index}"
            )
        if l1_size:
            self._check_table(f"snapshot {index} l1_table_offset", l1_table_offset, l1_size * 8)
        vm_state = int.from_bytes(entry[40:48], "big") if extra_size >= 8 else vm_state_size
        if vm_state > self.file_size:
            raise LimitExceededError(
                f"VM state of {vm_state} bytes is larger than the file ({self.file_size})",
                path=self.path,
                field=f"snapshot {index} vm_state_size",
            )
        return Snapshot(
            index,
            snap_id,
            name,
            l1_table_offset,
            l1_size,
            disk_size,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            entry,
        )

    # -- L1/L2 -------------------------------------------------------------------------------------
    def l1_table(self, snapshot: Snapshot | None = None) -> np.ndarray:
        """The active (or a snapshot's) L1 table as big-endian u64 entries."""
        import numpy as np

        offset = snapshot.l1_table_offset if snapshot else self.header.l1_table_offset
        size = snapshot.l1_size if snapshot else self.header.l1_size
        key = (offset, size)
        if key not in self._l1_cache:
            raw = read_exact(self.fh, offset, size * 8, path=self.path, what="L1 table", file_size=self.file_size)
            if snapshot is not None:  # keep the active table and one snapshot table (each up to 32 MiB)
                active = (self.header.l1_table_offset, self.header.l1_size)
                for old in [k for k in self._l1_cache if k != active]:
                    del self._l1_cache[old]
            self._l1_cache[key] = np.frombuffer(raw, dtype=">u8")
        return self._l1_cache[key]

    def _read_l2_uncached(self, l2_offset: int) -> np.ndarray:
        import numpy as np

        cs = self.header.cluster_size
        if l2_offset % cs or l2_offset + cs > self.file_size:
            raise self._fail("L1 entry", f"L2 table offset {l2_offset:#x} is unaligned or beyond the file")
        raw = read_exact(self.fh, l2_offset, cs, path=self.path, what="L2 table", file_size=self.file_size)
        return np.frombuffer(raw, dtype=">u8")

    def l2_offset(self, l1: np.ndarray, l1_index: int) -> int:
        if l1_index >= len(l1):
            return 0
        entry = int(l1[l1_index])
        if entry & qcow2_fmt.L1E_RESERVED_MASK:
            raise self._fail("L1 entry", f"entry {l1_index} has reserved bits set ({entry:#x})")
        return entry & qcow2_fmt.L1E_OFFSET_MASK

    @property
    def virtual_size(self) -> int:
        """What the guest sees: QEMU counts whole 512-byte sectors (a crafted odd size is rounded down)."""
        return self.header.size // 512 * 512

    @property
    def cluster_size(self) -> int:
        return self.header.cluster_size

    @property
    def guest_clusters(self) -> int:
        return -(-self.header.size // self.header.cluster_size)

    def map_cluster(self, guest_cluster: int, l1: np.ndarray | None = None) -> ClusterMapping:
        """Where guest cluster ``guest_cluster`` lives (qemu's cluster-type rules, docs/FORMATS.md A.6)."""
        if l1 is None:
            l1 = self.l1_table()
        l1_index, l2_index = divmod(guest_cluster, self.header.l2_entries)
        l2_offset = self.l2_offset(l1, l1_index)
        if not l2_offset:
            return UNALLOCATED
        l2 = self._read_l2(l2_offset)
        return self.decode_l2_entry(l2, l2_index)

    def l2_entries_of(self, l1: np.ndarray, first_guest_cluster: int, count: int) -> np.ndarray:
        """The raw L2 entries of guest clusters ``[first, first + count)`` of the table ``l1``, one row per
        cluster (two words with extended L2); zeros where no L2 table is allocated. Equal rows (the COPIED flag
        aside) read the same guest data. Vectorised: one L2 table read per 8192+ clusters."""
        import numpy as np

        per_l2 = self.header.l2_entries
        words = 2 if self.header.extended_l2 else 1
        rows = np.zeros((count, words), dtype=np.uint64)
        done = 0
        while done < count:
            l1_index, l2_index = divmod(first_guest_cluster + done, per_l2)
            take = min(count - done, per_l2 - l2_index)
            l2_offset = self.l2_offset(l1, l1_index)
            if l2_offset:
                table = self._read_l2(l2_offset).reshape(-1, words)
                rows[done : done + take] = table[l2_index : l2_index + take]
            done += take
        return rows

    def plain_runs(
        self, l1: np.ndarray, first_guest_cluster: int, count: int
    ) -> list[tuple[ClusterKind, int, int, int]] | None:
        """Guest clusters ``[first, first + count)`` of the table ``l1`` as runs (kind, first guest cluster,
        clusters, host offset of the first): NORMAL runs are host-contiguous, ZERO and UNALLOCATED runs merge.
        Vectorised over the L2 entries; None when any entry is not a plain one (compressed, reserved bits, an
        unaligned offset, extended L2, an external data file, a zero flag in a version 2 image): then
        :meth:`map_cluster` decodes them one by one, with its errors."""
        import numpy as np

        if self.header.extended_l2 or count <= 0:
            return None
        decoded = self._plain_kinds(self.l2_entries_of(l1, first_guest_cluster, count)[:, 0])
        if decoded is None:
            return None
        kinds, offsets = decoded
        cs = np.uint64(self.header.cluster_size)
        breaks = np.ones(count, dtype=bool)
        breaks[1:] = (kinds[1:] != kinds[:-1]) | ((kinds[1:] == 2) & (offsets[1:] != offsets[:-1] + cs))
        starts = np.flatnonzero(breaks)
        ends = np.append(starts[1:], count)
        names = (ClusterKind.UNALLOCATED, ClusterKind.ZERO, ClusterKind.NORMAL)
        return [
            (names[int(kinds[s])], first_guest_cluster + int(s), int(e - s), int(offsets[s]))
            for s, e in zip(starts, ends, strict=True)
        ]

    def _plain_kinds(self, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Standard L2 ``entries`` decoded at once: kinds (0 unallocated, 1 zero, 2 normal) and host offsets; None
        unless every entry is a plain one (see :meth:`plain_runs`), which the per-entry rules then decode."""
        import numpy as np

        h = self.header
        if h.extended_l2 or h.incompatible_features & qcow2_fmt.INCOMPAT_DATA_FILE:
            return None
        plain = entries & ~np.uint64(qcow2_fmt.OFLAG_COPIED)
        if (plain & np.uint64(qcow2_fmt.OFLAG_COMPRESSED | qcow2_fmt.L2E_STD_RESERVED_MASK)).any():
            return None
        zero = (plain & np.uint64(qcow2_fmt.OFLAG_ZERO)) != 0
        offsets = plain & np.uint64(qcow2_fmt.L2E_OFFSET_MASK)
        if (zero.any() and h.version < 3) or (offsets % np.uint64(h.cluster_size)).any():
            return None
        return np.where(zero, 1, np.where(offsets != 0, 2, 0)), offsets  # the zero flag wins over an offset

    def decode_l2_entry(self, l2: np.ndarray, l2_index: int) -> ClusterMapping:
        h = self.header
        if h.extended_l2:
            return self._decode_extended(int(l2[2 * l2_index]), int(l2[2 * l2_index + 1]))
        return self._decode_standard(int(l2[l2_index]))

    def _decode_standard(self, entry: int) -> ClusterMapping:
        if entry & qcow2_fmt.OFLAG_COMPRESSED:
            return self._decode_compressed(entry)
        if entry & qcow2_fmt.OFLAG_ZERO:
            if self.header.version < 3:
                raise self._fail("L2 entry", f"zero flag in a version 2 image ({entry:#x})")
            return ZERO
        if entry & qcow2_fmt.L2E_STD_RESERVED_MASK:
            raise self._fail("L2 entry", f"reserved bits set ({entry:#x})")
        host_offset = entry & qcow2_fmt.L2E_OFFSET_MASK
        if not host_offset and not self._data_file_cluster_at_zero(entry):
            return UNALLOCATED
        return self._normal(host_offset)

    def _data_file_cluster_at_zero(self, entry: int) -> bool:
        """With an external data file, offset 0 is a real place: an entry with the COPIED flag maps there
        (QEMU's rule; data_file_raw images map guest cluster 0 so)."""
        return bool(self.header.incompatible_features & qcow2_fmt.INCOMPAT_DATA_FILE and entry & qcow2_fmt.OFLAG_COPIED)

    def _normal(self, host_offset: int) -> ClusterMapping:
        if host_offset % self.header.cluster_size:
            raise self._fail("L2 entry", f"data cluster offset {host_offset:#x} is not cluster-aligned")
        return ClusterMapping(ClusterKind.NORMAL, host_offset)

    def _decode_compressed(self, entry: int) -> ClusterMapping:
        cb = self.header.cluster_bits
        x = 62 - (cb - 8)
        host_offset = entry & ((1 << x) - 1)
        sectors = ((entry >> x) & ((1 << (cb - 8)) - 1)) + 1
        csize = sectors * 512 - (host_offset & 511)
        if host_offset >= self.file_size:
            raise self._fail("L2 entry", f"compressed data at {host_offset:#x} is beyond the file")
        csize = min(csize, self.file_size - host_offset)
        return ClusterMapping(ClusterKind.COMPRESSED, host_offset, csize)

    def _decode_extended(self, entry: int, bitmap: int) -> ClusterMapping:
        if entry & qcow2_fmt.OFLAG_COMPRESSED:
            if bitmap:
                raise self._fail("L2 entry", "compressed cluster with a non-zero subcluster bitmap")
            return self._decode_compressed(entry)
        alloc, zero = bitmap & 0xFFFFFFFF, bitmap >> 32
        if alloc & zero:
            raise self._fail("L2 entry", f"subclusters both allocated and zero ({bitmap:#x})")
        host_offset = entry & qcow2_fmt.L2E_OFFSET_MASK
        if entry & (qcow2_fmt.L2E_STD_RESERVED_MASK | qcow2_fmt.OFLAG_ZERO):
            raise self._fail("L2 entry", f"reserved bits set ({entry:#x})")
        if alloc and not host_offset and not self._data_file_cluster_at_zero(entry):
            raise self._fail("L2 entry", "allocated subclusters without a host offset")
        if zero == 0xFFFFFFFF:
            return ZERO
        if alloc == 0xFFFFFFFF:
            return self._normal(host_offset)
        if not alloc and not zero:
            return UNALLOCATED
        if host_offset % self.header.cluster_size:
            raise self._fail("L2 entry", f"data cluster offset {host_offset:#x} is not cluster-aligned")
        return ClusterMapping(ClusterKind.SUBCLUSTERS, host_offset, 0, alloc, zero)

    def iter_mappings(self, snapshot: Snapshot | None = None) -> Iterator[tuple[int, ClusterMapping]]:
        """Every guest cluster that is not UNALLOCATED, in guest order, as (guest_cluster, mapping).

        A generator: memory stays bounded by one L2 table whatever the image size."""
        total = self._table_clusters(snapshot)
        per_l2 = self.header.l2_entries
        for l1_index, l2_offset in self._used_l1_entries(self.l1_table(snapshot), total):
            l2 = self._read_l2(l2_offset)
            first = l1_index * per_l2
            count = min(per_l2, total - first)
            decoded = self._plain_kinds(l2[:count]) if not self.header.extended_l2 else None
            if decoded is not None:  # a table of plain entries: decoded at once, same mappings
                yield from _plain_mappings(first, *decoded)
                continue
            for l2_index in self._nonzero_indexes(l2, count):
                mapping = self.decode_l2_entry(l2, l2_index)
                if mapping.kind is not ClusterKind.UNALLOCATED:
                    yield first + l2_index, mapping

    def _table_clusters(self, snapshot: Snapshot | None) -> int:
        size = snapshot.virtual_size if snapshot and snapshot.virtual_size else self.header.size
        return -(-size // self.header.cluster_size)

    def _used_l1_entries(self, l1: np.ndarray, total_clusters: int) -> Iterator[tuple[int, int]]:
        """(L1 index, L2 offset) of the L1 entries that cover guest clusters below ``total_clusters`` and point
        at an L2 table, checked as a whole first (vectorized: a 32 MiB L1 costs milliseconds, not seconds)."""
        import numpy as np

        used = l1[: min(len(l1), -(-total_clusters // self.header.l2_entries))]
        reserved = np.flatnonzero(used & np.uint64(qcow2_fmt.L1E_RESERVED_MASK))
        if len(reserved):
            index = int(reserved[0])
            raise self._fail("L1 entry", f"entry {index} has reserved bits set ({int(used[index]):#x})")
        indexes, targets = used_entries(used, qcow2_fmt.L1E_OFFSET_MASK, self.path)
        return ((int(i), int(o)) for i, o in zip(indexes, targets, strict=True))

    def table_usage(self, snapshot: Snapshot | None = None, budget: WalkBudget | None = None) -> TableUsage:
        """Allocated guest bytes and compressed host offsets of the active (or a snapshot's) table.

        Vectorized per L2 table and bounded by ``budget`` (LimitExceededError beyond it); the L2 tables are
        read once each, outside the L2 cache (memory stays at one table)."""
        import numpy as np

        h = self.header
        cs = self.header.cluster_size
        if budget is not None:
            budget.charge((snapshot.l1_size if snapshot else h.l1_size) * 8, self.path)
        total = self._table_clusters(snapshot)
        size = snapshot.virtual_size if snapshot and snapshot.virtual_size else h.size
        per_l2 = h.l2_entries
        allocated = 0
        compressed: list[np.ndarray] = []
        kept = 0
        for l1_index, l2_offset in self._used_l1_entries(self.l1_table(snapshot), total):
            if budget is not None:
                budget.charge(cs, self.path)
            l2 = self._read_l2_uncached(l2_offset)
            first = l1_index * per_l2
            count = min(per_l2, total - first)
            full, partial_bytes, offsets = self._count_l2(l2, count)
            allocated += full * cs + partial_bytes
            if first + count == total and size % cs:  # the last cluster of the disk is only partly inside it
                allocated -= self._last_cluster_excess(l2, count - 1, size % cs)
            if len(offsets) and kept < COMPRESSED_OFFSETS_KEPT:
                compressed.append(np.unique(offsets)[: COMPRESSED_OFFSETS_KEPT - kept])
                kept += len(compressed[-1])
        offsets = np.unique(np.concatenate(compressed)) if compressed else np.zeros(0, dtype=np.uint64)
        return TableUsage(allocated, offsets, kept >= COMPRESSED_OFFSETS_KEPT)

    def _count_l2(self, l2: np.ndarray, count: int) -> tuple[int, int, np.ndarray]:
        """(whole data clusters, bytes of allocated subclusters, compressed host offsets) of the first ``count``
        entries, with the same checks as :meth:`decode_l2_entry`: entry by entry for a sparse table, vectorized
        for a dense one (numpy's fixed cost per call only pays off beyond a few dozen entries)."""
        import numpy as np

        pairs = l2.reshape(-1, 2)[:count] if self.header.extended_l2 else None
        used = np.flatnonzero((pairs[:, 0] | pairs[:, 1]) if pairs is not None else l2[:count])
        if len(used) <= SPARSE_L2_ENTRIES:
            return self._count_sparse(l2, used.tolist())
        if self.header.extended_l2:
            pairs = l2.reshape(-1, 2)[:count]
            entries, bitmaps = pairs[:, 0], pairs[:, 1]
        else:
            entries, bitmaps = l2[:count], None
        compressed = (entries & np.uint64(qcow2_fmt.OFLAG_COMPRESSED)) != 0
        self._check_compressed(entries[compressed], bitmaps[compressed] if bitmaps is not None else None)
        plain = entries[~compressed]
        host = plain & np.uint64(qcow2_fmt.L2E_OFFSET_MASK)
        if bitmaps is None:
            flagged = (plain & np.uint64(qcow2_fmt.OFLAG_ZERO)) != 0
            if flagged.any() and self.header.version < 3:
                raise self._fail("L2 entry", "zero flag in a version 2 image")
            normal = ~flagged
            bad = normal & ((plain & np.uint64(qcow2_fmt.L2E_STD_RESERVED_MASK)) != 0)
            if bad.any():
                raise self._fail("L2 entry", f"reserved bits set ({int(plain[np.flatnonzero(bad)[0]]):#x})")
            data = normal & (host != 0)
            self._check_aligned(host[data])
            return int(compressed.sum() + data.sum()), 0, self._compressed_offsets(entries[compressed])
        plain_bitmaps = bitmaps[~compressed]
        alloc = plain_bitmaps & np.uint64(0xFFFFFFFF)
        zero = plain_bitmaps >> np.uint64(32)
        if ((alloc & zero) != 0).any():
            raise self._fail("L2 entry", "subclusters both allocated and zero")
        if ((plain & np.uint64(qcow2_fmt.L2E_STD_RESERVED_MASK | qcow2_fmt.OFLAG_ZERO)) != 0).any():
            raise self._fail("L2 entry", "reserved bits set")
        if ((alloc != 0) & (host == 0)).any():
            raise self._fail("L2 entry", "allocated subclusters without a host offset")
        counted = (alloc != 0) & (zero != 0xFFFFFFFF)
        self._check_aligned(host[counted])
        subclusters = _popcount32(alloc[counted])
        whole = int(compressed.sum()) + int((subclusters == qcow2_fmt.SUBCLUSTERS).sum())
        partial = int(subclusters[subclusters != qcow2_fmt.SUBCLUSTERS].sum()) * (
            self.header.cluster_size // qcow2_fmt.SUBCLUSTERS
        )
        return whole, partial, self._compressed_offsets(entries[compressed])

    def _count_sparse(self, l2: np.ndarray, used: list[int]) -> tuple[int, int, np.ndarray]:
        import numpy as np

        whole, subclusters, compressed = 0, 0, []
        for l2_index in used:
            m = self.decode_l2_entry(l2, l2_index)
            if m.kind is ClusterKind.NORMAL:
                whole += 1
            elif m.kind is ClusterKind.COMPRESSED:
                whole += 1
                compressed.append(m.host_offset)
            elif m.kind is ClusterKind.SUBCLUSTERS:
                subclusters += bin(m.alloc_bitmap).count("1")
        sc_size = self.header.cluster_size // qcow2_fmt.SUBCLUSTERS
        return whole, subclusters * sc_size, np.array(compressed, dtype=np.uint64)

    def _check_compressed(self, entries: np.ndarray, bitmaps: np.ndarray | None) -> None:
        import numpy as np

        if bitmaps is not None and (bitmaps != 0).any():
            raise self._fail("L2 entry", "compressed cluster with a non-zero subcluster bitmap")
        beyond = self._compressed_offsets(entries) >= np.uint64(self.file_size)
        if beyond.any():
            raise self._fail("L2 entry", "compressed data is beyond the file")

    def _compressed_offsets(self, entries: np.ndarray) -> np.ndarray:
        import numpy as np

        x = 62 - (self.header.cluster_bits - 8)
        return entries & np.uint64((1 << x) - 1)

    def _check_aligned(self, host_offsets: np.ndarray) -> None:
        import numpy as np

        unaligned = np.flatnonzero(host_offsets % np.uint64(self.header.cluster_size))
        if len(unaligned):
            raise self._fail(
                "L2 entry", f"data cluster offset {int(host_offsets[unaligned[0]]):#x} is not cluster-aligned"
            )

    def _last_cluster_excess(self, l2: np.ndarray, l2_index: int, inside: int) -> int:
        """Bytes counted for the disk's last (partial) cluster beyond ``inside`` bytes of it."""
        m = self.decode_l2_entry(l2, l2_index)
        cs = self.header.cluster_size
        if m.kind in (ClusterKind.NORMAL, ClusterKind.COMPRESSED):
            return cs - inside
        if m.kind is ClusterKind.SUBCLUSTERS:
            counted = bin(m.alloc_bitmap).count("1") * (cs // qcow2_fmt.SUBCLUSTERS)
            return counted - min(inside, counted)
        return 0

    def _nonzero_indexes(self, l2: np.ndarray, count: int) -> list[int]:
        import numpy as np

        if self.header.extended_l2:
            pairs = l2.reshape(-1, 2)[:count]
            return [int(i) for i in np.flatnonzero((pairs[:, 0] != 0) | (pairs[:, 1] != 0))]
        return [int(i) for i in np.flatnonzero(l2[:count])]

    def allocated_bytes(self, budget: WalkBudget | None = None) -> int:
        """Guest bytes backed by data (normal or compressed) clusters in the active L1/L2."""
        return self.table_usage(None, budget).allocated_bytes


def _plain_mappings(first: int, kinds: np.ndarray, offsets: np.ndarray) -> Iterator[tuple[int, ClusterMapping]]:
    """(guest cluster, mapping) of the zero and normal entries of a decoded table, in guest order."""
    import numpy as np

    used = np.flatnonzero(kinds)
    for index, kind, host_offset in zip(used.tolist(), kinds[used].tolist(), offsets[used].tolist(), strict=True):
        yield first + index, ZERO if kind == 1 else ClusterMapping(ClusterKind.NORMAL, host_offset)


def _popcount32(values: np.ndarray) -> np.ndarray:
    """Bits set in each (32-bit) value of a uint64 array."""
    import numpy as np

    _M1, _M2, _M4 = np.uint64(0x55555555), np.uint64(0x33333333), np.uint64(0x0F0F0F0F)
    v = values - ((values >> np.uint64(1)) & _M1)
    v = (v & _M2) + ((v >> np.uint64(2)) & _M2)
    v = (v + (v >> np.uint64(4))) & _M4
    return ((v * np.uint64(0x01010101)) & np.uint64(0xFFFFFFFF)) >> np.uint64(24)


class _TableReader:
    """Sequential reads of a table that starts at ``offset``: pieces of SNAPSHOT_READ_BYTES, at most
    ``limits.MAX_SNAPSHOT_TABLE_BYTES`` in all and never past the end of the file."""

    def __init__(self, image: QCow2Image, offset: int) -> None:
        self.image = image
        self.offset = offset
        self.buffer = bytearray()
        self.position = 0

    def need(self, length: int, index: int) -> int:
        """Make ``length`` bytes from the current position available in ``buffer``; returns the position."""
        end = self.position + length
        if end > len(self.buffer):
            self._fill(end, index)
        return self.position

    def _fill(self, end: int, index: int) -> None:
        if end > limits.MAX_SNAPSHOT_TABLE_BYTES:
            raise self.image._table_too_big(end)
        file_left = self.image.file_size - self.offset - len(self.buffer)
        want = min(
            max(end - len(self.buffer), SNAPSHOT_READ_BYTES),
            limits.MAX_SNAPSHOT_TABLE_BYTES - len(self.buffer),
            file_left,
        )
        if end - len(self.buffer) > want:
            raise FormatError(
                f"table entry runs past the end of the file ({self.image.file_size})",
                path=self.image.path,
                field=f"snapshot {index}",
            )
        self.buffer += read_exact(
            self.image.fh,
            self.offset + len(self.buffer),
            want,
            path=self.image.path,
            what=f"snapshot {index}",
            file_size=self.image.file_size,
        )
