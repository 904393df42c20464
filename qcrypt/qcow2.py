"""qcow2 reader: header, extensions, L1/L2 lookups and snapshots. Lazy, read-only, bounds-checked.

References:
    qemu docs/interop/qcow2.txt; block/qcow2.c (qcow2_do_open, qcow2_read_extensions);
    block/qcow2-cluster.c (qcow2_get_cluster_type, qcow2_get_host_offset); formats.md section A.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from qcrypt.errors import FormatError, UnsupportedFeatureError
from qcrypt.formats import qcow2 as fmt
from qcrypt.formats._parse import parse, parse_bytes, read_exact
from qcrypt.imagefile import ImageFile
from qcrypt.model import UNALLOCATED, ZERO, ClusterKind, ClusterMapping, Extension, Snapshot

L2_CACHE_TABLES = 64


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
    header_length: int = fmt.V2_HEADER_LENGTH
    compression_type: int = fmt.COMPRESSION_DEFLATE

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & fmt.INCOMPAT_EXTL2)

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
            fmt.FEATURE_NAMES.get((mask_name, bit), f"bit {bit}") for bit in range(64) if value >> bit & 1
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
        self._l1_cache: dict[int, np.ndarray] = {}
        self._read_l2 = functools.lru_cache(maxsize=L2_CACHE_TABLES)(self._read_l2_uncached)

    # -- header ------------------------------------------------------------------------------------
    def _read_header(self) -> Header:
        length = min(fmt.HEADER_READ_SIZE, self.file_size)
        raw = read_exact(self.fh, 0, length, path=self.path, what="header", file_size=self.file_size)
        c = parse_bytes(fmt.Header, raw, path=self.path, what="header")
        if c.version not in (2, 3):
            raise FormatError(f"unsupported qcow2 version {c.version}", path=self.path, field="version")
        fields = {k: c[k] for k in Header.__dataclass_fields__ if k in c}
        if c.v3 is not None:
            fields.update({k: c.v3[k] for k in c.v3 if not k.startswith("_")})
            if c.v3.header_length > fmt.COMPRESSION_TYPE_OFFSET and len(raw) > fmt.COMPRESSION_TYPE_OFFSET:
                fields["compression_type"] = raw[fmt.COMPRESSION_TYPE_OFFSET]
        return Header(**fields)

    def _check_header(self) -> None:
        h = self.header
        if not fmt.MIN_CLUSTER_BITS <= h.cluster_bits <= fmt.MAX_CLUSTER_BITS:
            raise self._fail("cluster_bits", f"{h.cluster_bits} is outside 9..21")
        if h.version == 3:
            if h.header_length < fmt.V3_MIN_HEADER_LENGTH or h.header_length % 8:
                raise self._fail("header_length", f"{h.header_length} is invalid")
            if h.header_length > h.cluster_size:
                raise self._fail("header_length", "header is longer than a cluster")
            if h.refcount_order > 6:
                raise self._fail("refcount_order", f"{h.refcount_order} is above 6")
        if h.crypt_method > fmt.CRYPT_LUKS:
            raise self._fail("crypt_method", f"unknown method {h.crypt_method}")
        if h.extended_l2 and h.cluster_bits < 14:
            raise self._fail("cluster_bits", "extended L2 entries need clusters of at least 16 KiB")
        if h.size > 1 << 62:
            raise self._fail("size", f"virtual size {h.size} is implausible")
        if h.compression_type not in (fmt.COMPRESSION_DEFLATE, fmt.COMPRESSION_ZSTD):
            raise self._fail("compression_type", f"unknown compression type {h.compression_type}")

    def _check_l1_geometry(self) -> None:
        h = self.header
        needed = -(-h.size // (h.cluster_size * h.l2_entries))
        if h.l1_size < needed:
            raise self._fail("l1_size", f"L1 table is too small ({h.l1_size} < {needed} entries)")
        if h.l1_size * 8 > fmt.MAX_L1_BYTES:
            raise self._fail("l1_size", f"{h.l1_size} entries exceed the 32 MiB limit")
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
        return self.header.incompatible_features & ~fmt.INCOMPAT_KNOWN

    def check_readable(self) -> None:
        """Refuse images whose guest data we cannot read faithfully."""
        unknown = self.unsupported_incompatible_features()
        if unknown:
            raise UnsupportedFeatureError(
                f"unknown incompatible feature bits {unknown:#x}", path=self.path, field="incompatible_features"
            )
        if self.header.incompatible_features & fmt.INCOMPAT_DATA_FILE:
            raise UnsupportedFeatureError(
                "images with an external data file are not supported", path=self.path,
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
            eh = parse(fmt.ExtensionHeader, self.fh, offset, 8, path=self.path, what="header extension",
                       file_size=self.file_size)
            if eh.type == fmt.EXT_END:
                break
            if offset + 8 + eh.length > end:
                raise self._fail("header extension", f"extension {eh.type:#x} runs past the extension area")
            if eh.type in extensions:
                raise self._fail("header extension", f"extension {eh.type:#x} appears twice")
            data = read_exact(self.fh, offset + 8, eh.length, path=self.path, what="header extension",
                              file_size=self.file_size)
            extensions[eh.type] = Extension(eh.type, fmt.EXTENSION_NAMES.get(eh.type, "unknown"), data)
            offset += 8 + (eh.length + 7) // 8 * 8
        return extensions

    def _read_backing_file(self) -> str | None:
        h = self.header
        if not h.backing_file_offset:
            return None
        if h.backing_file_size == 0 or h.backing_file_size > fmt.MAX_BACKING_FILE_NAME:
            raise self._fail("backing_file_size", f"{h.backing_file_size} is outside 1..1023")
        if h.backing_file_offset + h.backing_file_size > h.cluster_size:
            raise self._fail("backing_file_offset", "backing file name does not fit in the first cluster")
        raw = read_exact(self.fh, h.backing_file_offset, h.backing_file_size, path=self.path,
                         what="backing_file_offset", file_size=self.file_size)
        return _decode_name(raw, self.path, "backing file name")

    @property
    def backing_format(self) -> str | None:
        ext = self.extensions.get(fmt.EXT_BACKING_FORMAT)
        return _decode_name(ext.data, self.path, "backing format") if ext else None

    @property
    def data_file(self) -> str | None:
        ext = self.extensions.get(fmt.EXT_DATA_FILE)
        return _decode_name(ext.data, self.path, "data file name") if ext else None

    def crypto_header(self) -> tuple[int, int] | None:
        """(offset, length) of the embedded LUKS header (crypt_method 2), checked."""
        ext = self.extensions.get(fmt.EXT_CRYPTO_HEADER)
        if ext is None:
            if self.header.crypt_method == fmt.CRYPT_LUKS:
                raise self._fail("crypto_header", "crypt method 2 without the full-disk-encryption extension")
            return None
        if self.header.crypt_method != fmt.CRYPT_LUKS:
            raise self._fail("crypto_header", "encryption header extension only expected with LUKS")
        if len(ext.data) != 16:
            raise self._fail("crypto_header", f"extension length {len(ext.data)} is not 16")
        c = parse_bytes(fmt.CryptoHeaderExtension, ext.data, path=self.path, what="crypto_header")
        self._check_table("crypto_header.offset", c.offset, c.length)
        return c.offset, c.length

    # -- refcounts ---------------------------------------------------------------------------------
    @property
    def refcount_bits(self) -> int:
        return 1 << self.header.refcount_order

    def refcount_table(self) -> np.ndarray:
        """The refcount table (u64 entries; bits 9-63 = refcount block offset, 0 = all counts 0)."""
        h = self.header
        length = h.refcount_table_clusters * h.cluster_size
        if length > fmt.MAX_REFTABLE_BYTES:
            raise self._fail("refcount_table_clusters", f"{h.refcount_table_clusters} clusters exceed 8 MiB")
        self._check_table("refcount_table_offset", h.refcount_table_offset, length)
        raw = read_exact(self.fh, h.refcount_table_offset, length, path=self.path, what="refcount table",
                         file_size=self.file_size)
        return np.frombuffer(raw, dtype=">u8")

    def refcount(self, host_offset: int) -> int:
        """The refcount of the host cluster holding ``host_offset`` (qcow2.txt "Host cluster management")."""
        cs = self.header.cluster_size
        entries_per_block = cs * 8 // self.refcount_bits
        table_index, block_index = divmod(host_offset // cs, entries_per_block)
        table = self.refcount_table()
        if table_index >= len(table) or not int(table[table_index]) & fmt.REFT_OFFSET_MASK:
            return 0
        block_offset = int(table[table_index]) & fmt.REFT_OFFSET_MASK
        self._check_table("refcount table entry", block_offset, cs)
        bits = self.refcount_bits
        if bits >= 8:
            width = bits // 8
            raw = read_exact(self.fh, block_offset + block_index * width, width, path=self.path,
                             what="refcount block", file_size=self.file_size)
            return int.from_bytes(raw, "big")
        byte = read_exact(self.fh, block_offset + block_index * bits // 8, 1, path=self.path,
                          what="refcount block", file_size=self.file_size)[0]
        return (byte >> (block_index * bits % 8)) & ((1 << bits) - 1)

    # -- snapshots ---------------------------------------------------------------------------------
    def snapshots(self) -> list[Snapshot]:
        h = self.header
        if h.nb_snapshots == 0:
            return []
        if h.nb_snapshots > fmt.MAX_SNAPSHOTS:
            raise self._fail("nb_snapshots", f"{h.nb_snapshots} exceeds {fmt.MAX_SNAPSHOTS}")
        self._check_table("snapshots_offset", h.snapshots_offset, fmt.SNAPSHOT_HEADER_SIZE)
        offset = h.snapshots_offset
        result = []
        for index in range(h.nb_snapshots):
            snapshot, offset = self._read_snapshot(index, offset)
            result.append(snapshot)
        return result

    def _read_snapshot(self, index: int, offset: int) -> tuple[Snapshot, int]:
        what = f"snapshot {index}"
        c = parse(fmt.SnapshotHeader, self.fh, offset, fmt.SNAPSHOT_HEADER_SIZE, path=self.path, what=what,
                  file_size=self.file_size)
        if c.extra_data_size > fmt.MAX_SNAPSHOT_EXTRA:
            raise self._fail(what, f"extra data size {c.extra_data_size} exceeds 1024")
        total = fmt.SNAPSHOT_HEADER_SIZE + c.extra_data_size + c.id_str_size + c.name_size
        entry = read_exact(self.fh, offset, total, path=self.path, what=what, file_size=self.file_size)
        extra = entry[fmt.SNAPSHOT_HEADER_SIZE : fmt.SNAPSHOT_HEADER_SIZE + c.extra_data_size]
        disk_size = None
        if len(extra) >= fmt.SNAPSHOT_EXTRA_DISK_SIZE_END - 8:
            disk_size = int.from_bytes(extra[8:16], "big")
        strings = entry[fmt.SNAPSHOT_HEADER_SIZE + c.extra_data_size :]
        snap_id = _decode_name(strings[: c.id_str_size], self.path, f"{what} id")
        name = _decode_name(strings[c.id_str_size :], self.path, f"{what} name")
        if c.l1_size * 8 > fmt.MAX_L1_BYTES:
            raise self._fail(what, f"L1 size {c.l1_size} exceeds the 32 MiB limit")
        self._check_table(f"{what} l1_table_offset", c.l1_table_offset, c.l1_size * 8)
        padded = (total + 7) // 8 * 8
        snapshot = Snapshot(index, snap_id, name, c.l1_table_offset, c.l1_size, disk_size, c.date_sec,
                            c.date_nsec, c.vm_clock_nsec, c.vm_state_size, entry)
        return snapshot, offset + padded

    # -- L1/L2 -------------------------------------------------------------------------------------
    def l1_table(self, snapshot: Snapshot | None = None) -> np.ndarray:
        """The active (or a snapshot's) L1 table as big-endian u64 entries."""
        offset = snapshot.l1_table_offset if snapshot else self.header.l1_table_offset
        size = snapshot.l1_size if snapshot else self.header.l1_size
        key = offset
        if key not in self._l1_cache:
            raw = read_exact(self.fh, offset, size * 8, path=self.path, what="L1 table",
                             file_size=self.file_size)
            self._l1_cache[key] = np.frombuffer(raw, dtype=">u8")
        return self._l1_cache[key]

    def _read_l2_uncached(self, l2_offset: int) -> np.ndarray:
        cs = self.header.cluster_size
        if l2_offset % cs or l2_offset + cs > self.file_size:
            raise self._fail("L1 entry", f"L2 table offset {l2_offset:#x} is unaligned or beyond the file")
        raw = read_exact(self.fh, l2_offset, cs, path=self.path, what="L2 table", file_size=self.file_size)
        return np.frombuffer(raw, dtype=">u8")

    def l2_offset(self, l1: np.ndarray, l1_index: int) -> int:
        if l1_index >= len(l1):
            return 0
        entry = int(l1[l1_index])
        if entry & fmt.L1E_RESERVED_MASK:
            raise self._fail("L1 entry", f"entry {l1_index} has reserved bits set ({entry:#x})")
        return entry & fmt.L1E_OFFSET_MASK

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
        """Where guest cluster ``guest_cluster`` lives (qemu's cluster-type rules, formats.md A.6)."""
        if l1 is None:
            l1 = self.l1_table()
        l1_index, l2_index = divmod(guest_cluster, self.header.l2_entries)
        l2_offset = self.l2_offset(l1, l1_index)
        if not l2_offset:
            return UNALLOCATED
        l2 = self._read_l2(l2_offset)
        return self.decode_l2_entry(l2, l2_index)

    def decode_l2_entry(self, l2: np.ndarray, l2_index: int) -> ClusterMapping:
        h = self.header
        if h.extended_l2:
            return self._decode_extended(int(l2[2 * l2_index]), int(l2[2 * l2_index + 1]))
        return self._decode_standard(int(l2[l2_index]))

    def _decode_standard(self, entry: int) -> ClusterMapping:
        if entry & fmt.OFLAG_COMPRESSED:
            return self._decode_compressed(entry)
        if entry & fmt.OFLAG_ZERO:
            if self.header.version < 3:
                raise self._fail("L2 entry", f"zero flag in a version 2 image ({entry:#x})")
            return ZERO
        if entry & fmt.L2E_STD_RESERVED_MASK:
            raise self._fail("L2 entry", f"reserved bits set ({entry:#x})")
        host_offset = entry & fmt.L2E_OFFSET_MASK
        if not host_offset and not self._data_file_cluster_at_zero(entry):
            return UNALLOCATED
        return self._normal(host_offset)

    def _data_file_cluster_at_zero(self, entry: int) -> bool:
        """With an external data file, offset 0 is a real place: an entry with the COPIED flag maps there
        (QEMU's rule; data_file_raw images map guest cluster 0 so)."""
        return bool(self.header.incompatible_features & fmt.INCOMPAT_DATA_FILE and entry & fmt.OFLAG_COPIED)

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
        if entry & fmt.OFLAG_COMPRESSED:
            if bitmap:
                raise self._fail("L2 entry", "compressed cluster with a non-zero subcluster bitmap")
            return self._decode_compressed(entry)
        alloc, zero = bitmap & 0xFFFFFFFF, bitmap >> 32
        if alloc & zero:
            raise self._fail("L2 entry", f"subclusters both allocated and zero ({bitmap:#x})")
        host_offset = entry & fmt.L2E_OFFSET_MASK
        if entry & (fmt.L2E_STD_RESERVED_MASK | fmt.OFLAG_ZERO):
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
        l1 = self.l1_table(snapshot)
        size = snapshot.virtual_size if snapshot and snapshot.virtual_size else self.header.size
        total = -(-size // self.header.cluster_size)
        per_l2 = self.header.l2_entries
        for l1_index in range(min(len(l1), -(-total // per_l2))):
            l2_offset = self.l2_offset(l1, l1_index)
            if not l2_offset:
                continue
            l2 = self._read_l2(l2_offset)
            first = l1_index * per_l2
            for l2_index in self._nonzero_indexes(l2, min(per_l2, total - first)):
                mapping = self.decode_l2_entry(l2, l2_index)
                if mapping.kind is not ClusterKind.UNALLOCATED:
                    yield first + l2_index, mapping

    def _nonzero_indexes(self, l2: np.ndarray, count: int) -> list[int]:
        if self.header.extended_l2:
            pairs = l2.reshape(-1, 2)[:count]
            return [int(i) for i in np.flatnonzero((pairs[:, 0] != 0) | (pairs[:, 1] != 0))]
        return [int(i) for i in np.flatnonzero(l2[:count])]

    def allocated_bytes(self) -> int:
        """Guest bytes backed by data (normal or compressed) clusters in the active L1/L2."""
        cs = self.header.cluster_size
        sc_size = cs // fmt.SUBCLUSTERS
        total = 0
        for guest_cluster, m in self.iter_mappings():
            span = min(cs, self.header.size - guest_cluster * cs)
            if m.kind in (ClusterKind.NORMAL, ClusterKind.COMPRESSED):
                total += span
            elif m.kind is ClusterKind.SUBCLUSTERS:
                total += min(span, bin(m.alloc_bitmap).count("1") * sc_size)
        return total



def _decode_name(raw: bytes, path: str, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError("is not valid UTF-8", path=path, field=what) from e
