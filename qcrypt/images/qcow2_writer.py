"""Streaming qcow2 v3 writer, plain or with an embedded LUKS1 header (``qcrypt migrate --to qcow2[-luks]``).

References:
    qemu docs/interop/qcow2.txt (header, L1/L2, refcounts, snapshot table); docs/FORMATS.md sections A, C.1, C.2, H.2
    and Pitfalls 1, 6, 13, 21.

Host layout (clusters are handed out by a bump pointer and never freed, so the file has no holes):

* cluster 0: the header, its extensions and the backing file name (written last, by :meth:`finish`);
* clusters 1..k: the LUKS header area when there is one (FDE extension 0x0537BE77), zero-padded;
* then L2 tables (allocated when first touched) and data clusters, in call order;
* then, from :meth:`finish`: every L1 table, the snapshot table, the refcount blocks and the refcount table.

Only the current L2 table of each table id stays in memory (at most :data:`L2_CACHE_TABLES` of them; an evicted
one is re-read if its table comes back to it), and refcounts are one ``uint16`` per host cluster, so memory
does not grow with the virtual size. ``share_keys`` keeps one dict entry per distinct key.

Data clusters are always written in full; with a LUKS area they are encrypted with IV sector = absolute host
offset / 512 (docs/FORMATS.md C.2), so clusters shared between snapshots need no re-encryption. The COPIED flag
(bit 63) of L1 and L2 entries is set exactly when the referenced cluster's refcount is 1, in every table.
"""

from __future__ import annotations

import errno
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import BinaryIO, TypeAlias

import numpy as np
from construct import Container

from qcrypt.errors import MigrationError, QcryptIOError
from qcrypt.formats import luks1
from qcrypt.formats import qcow2 as qcow2_fmt
from qcrypt.formats._parse import parse_bytes
from qcrypt.model.units import SECTOR
from qcrypt.plumbing import limits

__all__ = ["ACTIVE", "L2_CACHE_TABLES", "Buffer", "EncryptFn", "Qcow2Writer"]

Buffer: TypeAlias = "bytes | bytearray | memoryview"
EncryptFn: TypeAlias = "Callable[[Buffer, int], Buffer]"

ACTIVE = -1  # table id of the active L1
L2_CACHE_TABLES = 64  # L2 tables kept in memory at once (one "current" table per table id)
_COPIED = np.uint64(qcow2_fmt.OFLAG_COPIED)
_ZERO_ENTRY = qcow2_fmt.OFLAG_ZERO  # v3 ZERO_PLAIN: zero flag, no host offset
_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF


@dataclass
class _Snapshot:
    """What the snapshot table entry needs besides the L1 location."""

    id_bytes: bytes
    name_bytes: bytes
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    extra: bytes


@dataclass
class _Table:
    """One L1 table being built (the active one or a snapshot's)."""

    l1: np.ndarray  # native uint64: host offset of each L2 table, 0 = none
    disk_clusters: int  # guest clusters of the disk
    vm_state_first: int  # guest cluster range [first, end) of a snapshot's VM state (empty otherwise)
    vm_state_end: int
    snapshot: _Snapshot | None = None
    next_guest_cluster: int = 0  # calls must not go below this
    current_l1_index: int = -1  # the L2 table the last call touched


class Qcow2Writer:
    """Build a qcow2 v3 image into ``fh`` (an empty file opened ``"w+b"``); see the module docstring.

    ``luks_area`` is the complete LUKS1 header area (phdr + key material, ``payload_offset * 512`` bytes); with
    it the image has crypt_method 2 and ``encrypt(plaintext, host_offset) -> ciphertext`` is required
    (``host_offset``: where in the file the ciphertext goes, in bytes; see :mod:`qcrypt.crypto.encryption`).
    ``encrypt`` receives a bytes-like buffer (bytes, bytearray or memoryview) of whole clusters.
    The writer seeks and writes ``fh``; it never closes or syncs it.
    """

    def __init__(
        self,
        fh: BinaryIO,
        *,
        virtual_size: int,
        cluster_bits: int = 16,
        luks_area: bytes | None = None,
        encrypt: EncryptFn | None = None,
        backing_file: str | None = None,
        backing_format: str | None = None,
        luks_area_size: int | None = None,
    ) -> None:
        _check_geometry(virtual_size, cluster_bits)
        if luks_area is not None and luks_area_size is not None:
            raise MigrationError("give the LUKS header area or its size, not both")
        if (luks_area is None and luks_area_size is None) != (encrypt is None):
            raise MigrationError("a LUKS header area and an encrypt function go together")
        self._fh = fh
        self.virtual_size = virtual_size
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.l2_entries = self.cluster_size // 8
        self.bytes_written = 0  # bytes of data clusters written to the file (shared clusters count once)
        self._encrypt = encrypt
        self._refcounts = np.zeros(1024, dtype=np.uint16)
        self._refcounts_per_block = self.cluster_size * 8 >> qcow2_fmt.WRITE_REFCOUNT_ORDER
        self._max_clusters = limits.MAX_REFTABLE_BYTES // 8 * self._refcounts_per_block  # QEMU's table limit
        self._next_cluster = 0
        self._tables: dict[int, _Table] = {ACTIVE: self._new_table(virtual_size, 0)}
        self._l2_cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._shared: dict[Hashable, int] = {}  # share key -> host cluster
        self._shared_any = False  # some refcount went above 1 (L2 COPIED flags need a final pass)
        self._finished = False
        self._allocate(1)  # cluster 0: the header
        self._luks_offset = 0
        self._luks_length = 0
        self._luks_pending = False
        if luks_area is not None:
            self._luks_offset = self._place_luks_area(luks_area)
            self._luks_length = len(luks_area)
        elif luks_area_size is not None:  # the area comes later (set_luks_area): its PBKDF2 runs meanwhile
            self._luks_offset = self._reserve_luks_area(luks_area_size)
            self._luks_length = luks_area_size
            self._luks_pending = True
        self._cluster0_tail = self._build_extensions(backing_file, backing_format)
        self._backing_name = backing_file.encode("utf-8") if backing_file else b""

    # -- public API -------------------------------------------------------------------------------------

    def add_snapshot_table(
        self,
        *,
        id: str,
        name: str,
        date_sec: int,
        date_nsec: int,
        vm_clock_nsec: int,
        vm_state_size: int,
        disk_size: int,
        extra: bytes = b"",
    ) -> int:
        """Register an internal snapshot; returns its table id (0, 1, ... in call order).

        ``extra`` is kept verbatim, except that its disk_size field is set to ``disk_size`` and it is completed
        to the 24 bytes QEMU 7.2 writes (vm_state_size_large = ``vm_state_size``, icount = -1 when absent).
        A snapshot with VM state may also get data in its VM-state area, see :meth:`vm_state_guest_offset`.
        """
        self._check_open()
        table_id = len(self._tables) - 1
        if table_id >= limits.MAX_SNAPSHOTS:
            raise MigrationError(f"more than {limits.MAX_SNAPSHOTS} snapshots")
        _check_geometry(disk_size, self.cluster_bits, what=f"snapshot {table_id} disk size")
        for value, field, limit in (
            (date_sec, "date_sec", _U32),
            (date_nsec, "date_nsec", _U32),
            (vm_clock_nsec, "vm_clock_nsec", _U64),
            (vm_state_size, "vm_state_size", _U64),
        ):
            if not 0 <= value <= limit:
                raise MigrationError(f"snapshot {table_id}: {field} {value} is out of range")
        snapshot = _Snapshot(
            id_bytes=_snapshot_string(id, "id", table_id),
            name_bytes=_snapshot_string(name, "name", table_id),
            date_sec=date_sec,
            date_nsec=date_nsec,
            vm_clock_nsec=vm_clock_nsec,
            vm_state_size=vm_state_size,
            extra=_snapshot_extra(extra, vm_state_size, disk_size, table_id),
        )
        vm_state_bytes = int.from_bytes(snapshot.extra[:8], "big")
        table = self._new_table(disk_size, vm_state_bytes)
        table.snapshot = snapshot
        self._tables[table_id] = table
        return table_id

    def vm_state_guest_offset(self, table: int) -> int:
        """Guest offset where a snapshot's VM state starts (after the L2 ranges covering its disk, as QEMU
        places it); its clusters may be written like disk clusters, after the disk ones."""
        return self._table(table).vm_state_first * self.cluster_size

    def write_clusters(
        self,
        table: int,
        first_guest_cluster: int,
        plaintext: Buffer,
        *,
        share_keys: Sequence[Hashable] | None = None,
    ) -> None:
        """Write guest clusters ``[first, first + n)`` of ``table`` (the last one may be short: zero-padded).

        New clusters are allocated host-contiguously and encrypted with one ``encrypt`` call. With
        ``share_keys`` (one key per cluster, None = never share), a cluster whose key was seen before is not
        written again: it points at the earlier host cluster, whose refcount goes up.
        """
        self._check_open()
        t = self._table(table)
        view = _byte_view(plaintext)
        count = -(-len(view) // self.cluster_size)
        if count == 0:
            return
        keys = self._check_keys(share_keys, count)
        self._claim(table, t, first_guest_cluster, count)
        host_clusters, new_positions = self._place(keys, count)
        self._write_data(view, host_clusters, new_positions)
        self._map(table, t, first_guest_cluster, count, host_clusters << np.uint64(self.cluster_bits))

    def reserve_clusters(self, table: int, first_guest_cluster: int, count: int) -> int:
        """Allocate and map ``count`` fresh, host-contiguous clusters; the caller writes their data.

        Returns the host offset. The caller must write all ``count * cluster_size`` bytes there (encrypted
        with IV sector = host offset // 512) before :meth:`finish`; this lets several processes encrypt and
        write data in parallel while this object keeps the metadata.
        """
        self._check_open()
        t = self._table(table)
        if count <= 0:
            raise MigrationError(f"cannot reserve {count} clusters")
        self._claim(table, t, first_guest_cluster, count)
        first = self._allocate(count)
        host_clusters = np.arange(first, first + count, dtype=np.uint64)
        self._map(table, t, first_guest_cluster, count, host_clusters << np.uint64(self.cluster_bits))
        self.bytes_written += count * self.cluster_size
        self._fh.flush()
        return first * self.cluster_size

    def has_shared(self, share_key: Hashable) -> bool:
        """Whether a cluster with ``share_key`` was written already (a later table then only maps it)."""
        return share_key in self._shared

    def reserve_shareable(self, table: int, first_guest_cluster: int, share_keys: Sequence[Hashable]) -> int | None:
        """:meth:`reserve_clusters` for clusters that later tables may share: when no key of the run was seen
        before (nor twice in it), allocate and map the clusters, remember their keys and return the host offset
        (the caller writes the data, so workers can encrypt shared runs in parallel); otherwise do nothing and
        return None (use :meth:`write_clusters`, which maps seen keys onto their clusters)."""
        keys = [key for key in share_keys if key is not None]
        if len(set(keys)) != len(keys) or any(key in self._shared for key in keys):
            return None
        host_offset = self.reserve_clusters(table, first_guest_cluster, len(share_keys))
        first = host_offset >> self.cluster_bits
        for index, key in enumerate(share_keys):
            if key is not None:
                self._shared[key] = first + index
        return host_offset

    def map_shared(self, table: int, first_guest_cluster: int, share_keys: Sequence[Hashable]) -> None:
        """Map guest clusters ``[first, first + len(share_keys))`` onto the clusters written before under these
        keys (every key must have been seen); nothing is read or written."""
        self._check_open()
        t = self._table(table)
        missing = [key for key in share_keys if key not in self._shared]
        if missing or not share_keys:
            raise MigrationError(
                f"table {table}: {len(missing)} of {len(share_keys)} clusters to share were never written"
            )
        self._claim(table, t, first_guest_cluster, len(share_keys))
        host_clusters = np.array([self._shared[key] for key in share_keys], dtype=np.uint64)
        self._add_references(host_clusters)
        self._map(table, t, first_guest_cluster, len(share_keys), host_clusters << np.uint64(self.cluster_bits))

    def write_zero_clusters(self, table: int, first_guest_cluster: int, count: int) -> None:
        """Mark ``count`` guest clusters as reading zeros (v3 zero flag, no host cluster; hides a backing file)."""
        self._check_open()
        t = self._table(table)
        if count < 0:
            raise MigrationError(f"negative cluster count {count}")
        if count == 0:
            return
        self._claim(table, t, first_guest_cluster, count)
        self._map(table, t, first_guest_cluster, count, _ZERO_ENTRY)

    def finish(self) -> None:
        """Write the remaining L2 tables, every L1, the snapshot table, the refcounts and the header."""
        self._check_open()
        if self._luks_pending:
            raise MigrationError("the LUKS header area was reserved but never set")
        self._finished = True
        while self._l2_cache:
            self._evict_oldest_l2()
        if self._shared_any:
            self._fix_copied_flags()
        l1_offsets = {table_id: self._write_l1(t) for table_id, t in self._tables.items()}
        snapshots_offset = self._write_snapshot_table(l1_offsets)
        reftable_offset, reftable_clusters = self._write_refcounts()
        self._write_header(l1_offsets[ACTIVE], snapshots_offset, reftable_offset, reftable_clusters)

    # -- setup ------------------------------------------------------------------------------------------

    def _new_table(self, disk_size: int, vm_state_bytes: int) -> _Table:
        per_l1 = self.cluster_size * self.l2_entries
        disk_l1 = -(-disk_size // per_l1)
        vm_first = disk_l1 * self.l2_entries
        vm_end = vm_first + -(-vm_state_bytes // self.cluster_size)
        l1_size = max(disk_l1, -(-vm_end // self.l2_entries))
        if l1_size * 8 > limits.MAX_L1_BYTES:
            raise MigrationError(
                f"a {disk_size}-byte disk needs an L1 table above 32 MiB with {self.cluster_size}-byte clusters;"
                " use larger clusters"
            )
        return _Table(np.zeros(l1_size, dtype=np.uint64), -(-disk_size // self.cluster_size), vm_first, vm_end)

    def _reserve_luks_area(self, size: int) -> int:
        if size <= 0 or size % SECTOR:
            raise MigrationError(f"LUKS header area size {size} is not a positive multiple of 512")
        clusters = -(-size // self.cluster_size)
        first = self._allocate(clusters)
        self._write_at(first * self.cluster_size, bytes(clusters * self.cluster_size), "LUKS header area")
        return first * self.cluster_size

    def set_luks_area(self, luks_area: bytes) -> None:
        """Supply the LUKS header area reserved with ``luks_area_size`` (before :meth:`finish`)."""
        self._check_open()
        if not self._luks_pending:
            raise MigrationError("no LUKS header area is waiting to be set")
        self._check_luks_area(luks_area)
        if len(luks_area) != self._luks_length:
            raise MigrationError(f"the LUKS header area is {len(luks_area)} bytes, {self._luks_length} reserved")
        self._write_at(self._luks_offset, luks_area, "LUKS header area")
        self._luks_pending = False

    def _check_luks_area(self, luks_area: bytes) -> None:
        phdr = parse_bytes(
            luks1.Phdr, bytes(luks_area[: luks1.PHDR_SIZE]), path="<LUKS header area>", what="LUKS header"
        )
        if phdr.version != luks1.VERSION:
            raise MigrationError(f"the LUKS header area has version {phdr.version}, not 1")
        if len(luks_area) != phdr.payload_offset * SECTOR:
            raise MigrationError(
                f"the LUKS header area is {len(luks_area)} bytes, its payload offset says "
                f"{phdr.payload_offset * SECTOR}"
            )

    def _place_luks_area(self, luks_area: bytes) -> int:
        self._check_luks_area(luks_area)
        clusters = -(-len(luks_area) // self.cluster_size)
        first = self._allocate(clusters)
        padded = bytearray(clusters * self.cluster_size)
        padded[: len(luks_area)] = luks_area
        self._write_at(first * self.cluster_size, padded, "LUKS header area")
        return first * self.cluster_size

    def _build_extensions(self, backing_file: str | None, backing_format: str | None) -> bytes:
        """Extensions, end marker and backing file name that follow the 112-byte header in cluster 0."""
        if backing_format is not None and not backing_file:
            raise MigrationError("a backing format needs a backing file")
        area = bytearray()
        if backing_format is not None:
            fmt_bytes = backing_format.encode("utf-8")
            if not 0 < len(fmt_bytes) <= qcow2_fmt.MAX_BACKING_FORMAT_NAME:
                raise MigrationError(f"backing format {backing_format!r} must be 1..15 bytes")
            area += _extension(qcow2_fmt.EXT_BACKING_FORMAT, fmt_bytes)
        if self._luks_length:
            crypto = qcow2_fmt.CryptoHeaderExtension.build(
                Container(offset=self._luks_offset, length=self._luks_length)
            )
            area += _extension(qcow2_fmt.EXT_CRYPTO_HEADER, crypto)
        area += qcow2_fmt.ExtensionHeader.build(Container(type=qcow2_fmt.EXT_END, length=0))
        if backing_file is not None:
            name = backing_file.encode("utf-8")
            if not 0 < len(name) <= qcow2_fmt.MAX_BACKING_FILE_NAME:
                raise MigrationError("the backing file name must be 1..1023 bytes")
            if qcow2_fmt.WRITE_HEADER_LENGTH + len(area) + len(name) > self.cluster_size:
                raise MigrationError("the backing file name does not fit in the first cluster; use larger clusters")
        return bytes(area)

    # -- validation -------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._finished:
            raise MigrationError("the qcow2 writer is already finished")

    def _table(self, table: int) -> _Table:
        t = self._tables.get(table)
        if t is None:
            raise MigrationError(f"unknown table id {table}")
        return t

    def _claim(self, table: int, t: _Table, first: int, count: int) -> None:
        """Check that ``[first, first + count)`` lies in the table and after its previous call."""
        if first < 0:
            raise MigrationError(f"table {table}: negative guest cluster {first}")
        if first < t.next_guest_cluster:
            raise MigrationError(
                f"table {table}: guest cluster {first} comes after cluster {t.next_guest_cluster - 1} was written"
            )
        end = first + count
        in_disk = end <= t.disk_clusters
        in_vm_state = t.vm_state_first <= first and end <= t.vm_state_end
        if not (in_disk or in_vm_state):
            raise MigrationError(f"table {table}: guest clusters {first}..{end - 1} are outside the disk")
        t.next_guest_cluster = end

    def _check_keys(self, share_keys: Sequence[Hashable] | None, count: int) -> Sequence[Hashable] | None:
        if share_keys is None:
            return None
        if len(share_keys) != count:
            raise MigrationError(f"{len(share_keys)} share keys for {count} clusters")
        return share_keys

    # -- allocation and data ----------------------------------------------------------------------------

    def _allocate(self, count: int) -> int:
        """``count`` fresh host clusters with refcount 1; returns the first one's index."""
        first = self._next_cluster
        end = first + count
        if end > self._max_clusters:
            raise MigrationError(
                f"the image would need a refcount table above 8 MiB with {self.cluster_size}-byte clusters;"
                " use larger clusters"
            )
        if end > len(self._refcounts):
            grown = np.zeros(max(end, 2 * len(self._refcounts)), dtype=np.uint16)
            grown[: len(self._refcounts)] = self._refcounts
            self._refcounts = grown
        self._refcounts[first:end] = 1
        self._next_cluster = end
        return first

    def _place(self, keys: Sequence[Hashable] | None, count: int) -> tuple[np.ndarray, list[int] | None]:
        """Host cluster of each of ``count`` clusters, and the positions to write (None = all of them)."""
        if keys is None:
            first = self._allocate(count)
            return np.arange(first, first + count, dtype=np.uint64), None
        host_clusters = np.zeros(count, dtype=np.uint64)
        new_positions: list[int] = []
        reused: list[int] = []
        fresh: dict[Hashable, int] = {}  # key first seen in this call -> index in new_positions
        for position, key in enumerate(keys):
            if key is None:
                new_positions.append(position)
            elif key in self._shared:
                host_clusters[position] = self._shared[key]
                reused.append(position)
            elif key in fresh:
                reused.append(position)
            else:
                fresh[key] = len(new_positions)
                new_positions.append(position)
        first = self._allocate(len(new_positions))
        host_clusters[new_positions] = np.arange(first, first + len(new_positions), dtype=np.uint64)
        for key, index in fresh.items():
            self._shared[key] = first + index
        for position in reused:
            key = keys[position]
            if key in fresh:
                host_clusters[position] = first + fresh[key]
        self._add_references(host_clusters[reused])
        return host_clusters, new_positions

    def _add_references(self, host_clusters: np.ndarray) -> None:
        if not len(host_clusters):
            return
        clusters, counts = _unique_counts(host_clusters.astype(np.int64))
        if int((self._refcounts[clusters].astype(np.int64) + counts).max()) > qcow2_fmt.REFCOUNT_MAX:
            raise MigrationError("a cluster is shared more than 65535 times")
        self._refcounts[clusters] += counts.astype(np.uint16)
        self._shared_any = True

    def _write_data(self, view: memoryview, host_clusters: np.ndarray, new_positions: list[int] | None) -> None:
        cs = self.cluster_size
        if new_positions is None:
            data: Buffer = view if len(view) % cs == 0 else _padded(view, len(host_clusters) * cs)
            first = int(host_clusters[0])
        elif not new_positions:
            return
        else:
            buffer = bytearray(len(new_positions) * cs)
            target = memoryview(buffer)
            for index, position in enumerate(new_positions):
                chunk = view[position * cs : (position + 1) * cs]
                target[index * cs : index * cs + len(chunk)] = chunk
            data = buffer
            first = int(host_clusters[new_positions[0]])
        host_offset = first * cs
        if self._encrypt is not None:
            ciphertext = self._encrypt(data, host_offset)
            if memoryview(ciphertext).nbytes != memoryview(data).nbytes:
                raise MigrationError("the encrypt function changed the data length")
            data = ciphertext
        self._write_at(host_offset, data, "data clusters")
        self.bytes_written += memoryview(data).nbytes

    # -- L2 tables --------------------------------------------------------------------------------------

    def _map(self, table: int, t: _Table, first: int, count: int, entries: np.ndarray | int) -> None:
        """Set the L2 entries of guest clusters ``[first, first + count)`` (array, or one value for all)."""
        done = 0
        while done < count:
            l1_index, l2_index = divmod(first + done, self.l2_entries)
            take = min(count - done, self.l2_entries - l2_index)
            l2 = self._l2_table(table, t, l1_index)
            if isinstance(entries, np.ndarray):
                l2[l2_index : l2_index + take] = entries[done : done + take]
            else:
                l2[l2_index : l2_index + take] = entries
            done += take

    def _l2_table(self, table: int, t: _Table, l1_index: int) -> np.ndarray:
        """The in-memory L2 table (native uint64, no COPIED flags) for ``l1_index`` of ``table``."""
        key = (table, l1_index)
        l2 = self._l2_cache.get(key)
        if l2 is not None:
            self._l2_cache.move_to_end(key)
            return l2
        previous = (table, t.current_l1_index)
        if previous in self._l2_cache:  # calls go up in guest order: the previous table is complete
            self._flush_l2(previous, self._l2_cache.pop(previous))
        t.current_l1_index = l1_index
        if t.l1[l1_index]:
            l2 = self._read_l2(int(t.l1[l1_index]))
        else:
            t.l1[l1_index] = self._allocate(1) << self.cluster_bits
            l2 = np.zeros(self.l2_entries, dtype=np.uint64)
        self._l2_cache[key] = l2
        while len(self._l2_cache) > L2_CACHE_TABLES:
            self._evict_oldest_l2()
        return l2

    def _evict_oldest_l2(self) -> None:
        key, l2 = self._l2_cache.popitem(last=False)
        self._flush_l2(key, l2)

    def _flush_l2(self, key: tuple[int, int], l2: np.ndarray) -> None:
        table, l1_index = key
        host_offset = int(self._tables[table].l1[l1_index])
        self._write_at(host_offset, self._with_copied(l2, qcow2_fmt.L2E_OFFSET_MASK).tobytes(), "L2 table")

    def _read_l2(self, host_offset: int) -> np.ndarray:
        raw = self._read_at(host_offset, self.cluster_size, "L2 table")
        return np.frombuffer(raw, dtype=qcow2_fmt.TABLE_ENTRY_DTYPE).astype(np.uint64) & ~_COPIED

    def _with_copied(self, entries: np.ndarray, offset_mask: int) -> np.ndarray:
        """Big-endian copy of ``entries`` with COPIED set where the referenced cluster's refcount is 1."""
        offsets = entries & np.uint64(offset_mask)
        used = np.flatnonzero(offsets)
        out = entries.astype(qcow2_fmt.TABLE_ENTRY_DTYPE)
        clusters = (offsets[used] >> np.uint64(self.cluster_bits)).astype(np.int64)
        single = used[self._refcounts[clusters] == 1]
        out[single] |= _COPIED
        return out

    def _fix_copied_flags(self) -> None:
        """Refcounts went up after some L2 tables were written: rewrite those whose COPIED flags changed."""
        for t in self._tables.values():
            for l2_offset in t.l1[np.flatnonzero(t.l1)]:
                host_offset = int(l2_offset)
                raw = self._read_at(host_offset, self.cluster_size, "L2 table")
                stored = np.frombuffer(raw, dtype=qcow2_fmt.TABLE_ENTRY_DTYPE)
                wanted = self._with_copied(stored.astype(np.uint64) & ~_COPIED, qcow2_fmt.L2E_OFFSET_MASK)
                if not np.array_equal(stored, wanted):
                    self._write_at(host_offset, wanted.tobytes(), "L2 table")

    # -- finish -----------------------------------------------------------------------------------------

    def _write_l1(self, t: _Table) -> int:
        if not len(t.l1):  # an empty disk: no L1 table at all (offset 0), as qemu-img writes it
            return 0
        entries = self._with_copied(t.l1, qcow2_fmt.L1E_OFFSET_MASK).tobytes()
        return self._write_new_clusters(entries, "L1 table")

    def _write_snapshot_table(self, l1_offsets: dict[int, int]) -> int:
        entries = bytearray()
        for table_id, t in self._tables.items():
            if t.snapshot is not None:
                entries += _snapshot_entry(t.snapshot, l1_offsets[table_id], len(t.l1))
        return self._write_new_clusters(bytes(entries), "snapshot table") if entries else 0

    def _write_new_clusters(self, data: bytes, what: str) -> int:
        """Allocate clusters for ``data`` (zero-padded), write it; returns the host offset."""
        clusters = max(1, -(-len(data) // self.cluster_size))
        host_offset = self._allocate(clusters) * self.cluster_size
        self._write_at(host_offset, _padded(memoryview(data), clusters * self.cluster_size), what)
        return host_offset

    def _write_refcounts(self) -> tuple[int, int]:
        """Refcount blocks then the refcount table, sized to count themselves; returns (offset, clusters)."""
        cs = self.cluster_size
        per_block = self._refcounts_per_block
        used = self._next_cluster
        blocks = table_clusters = 0
        while True:
            needed_blocks = -(-(used + blocks + table_clusters) // per_block)
            needed_table = -(-needed_blocks * 8 // cs)
            if (needed_blocks, needed_table) == (blocks, table_clusters):
                break
            blocks, table_clusters = needed_blocks, needed_table
        first_block = self._allocate(blocks)
        table_offset = self._allocate(table_clusters) * cs
        counts = np.zeros(blocks * per_block, dtype=qcow2_fmt.REFCOUNT_DTYPE)
        counts[: self._next_cluster] = self._refcounts[: self._next_cluster]
        self._write_at(first_block * cs, counts.tobytes(), "refcount blocks")
        table = np.zeros(table_clusters * cs // 8, dtype=qcow2_fmt.TABLE_ENTRY_DTYPE)
        table[:blocks] = np.arange(first_block, first_block + blocks, dtype=np.uint64) << np.uint64(self.cluster_bits)
        self._write_at(table_offset, table.tobytes(), "refcount table")
        return table_offset, table_clusters

    def _write_header(
        self, l1_offset: int, snapshots_offset: int, reftable_offset: int, reftable_clusters: int
    ) -> None:
        backing_offset = qcow2_fmt.WRITE_HEADER_LENGTH + len(self._cluster0_tail) if self._backing_name else 0
        header = qcow2_fmt.Header.build(
            Container(
                version=qcow2_fmt.WRITE_VERSION,
                backing_file_offset=backing_offset,
                backing_file_size=len(self._backing_name),
                cluster_bits=self.cluster_bits,
                size=self.virtual_size,
                crypt_method=qcow2_fmt.CRYPT_LUKS if self._luks_length else qcow2_fmt.CRYPT_NONE,
                l1_size=len(self._tables[ACTIVE].l1),
                l1_table_offset=l1_offset,
                refcount_table_offset=reftable_offset,
                refcount_table_clusters=reftable_clusters,
                nb_snapshots=len(self._tables) - 1,
                snapshots_offset=snapshots_offset,
                v3=Container(
                    incompatible_features=0,
                    compatible_features=0,
                    autoclear_features=0,
                    refcount_order=qcow2_fmt.WRITE_REFCOUNT_ORDER,
                    header_length=qcow2_fmt.WRITE_HEADER_LENGTH,
                ),
            )
        )
        cluster0 = header + qcow2_fmt.HeaderTail.build(Container(compression_type=qcow2_fmt.COMPRESSION_DEFLATE))
        cluster0 += self._cluster0_tail + self._backing_name
        self._write_at(0, _padded(memoryview(cluster0), self.cluster_size), "header")

    # -- I/O --------------------------------------------------------------------------------------------

    def _write_at(self, host_offset: int, data: Buffer, what: str) -> None:
        length = memoryview(data).nbytes
        try:
            self._fh.seek(host_offset)
            written = self._fh.write(data)
        except OSError as e:
            raise QcryptIOError(e.errno, f"writing the qcow2 {what} at {host_offset:#x}: {e.strerror or e}") from e
        if written is not None and written != length:
            raise QcryptIOError(errno.EIO, f"short write of the qcow2 {what} at {host_offset:#x}")

    def _read_at(self, host_offset: int, length: int, what: str) -> bytes:
        try:
            self._fh.seek(host_offset)
            data = self._fh.read(length)
        except OSError as e:
            raise QcryptIOError(e.errno, f"reading back the qcow2 {what} at {host_offset:#x}: {e.strerror or e}") from e
        if len(data) != length:
            raise QcryptIOError(errno.EIO, f"short read of the qcow2 {what} at {host_offset:#x}")
        return data


# -- helpers ----------------------------------------------------------------------------------------------


def _check_geometry(size: int, cluster_bits: int, *, what: str = "virtual size") -> None:
    """Sizes are whole sectors; a disk may be empty (qemu-img creates 0-byte disks), a LUKS area may not."""
    if not qcow2_fmt.MIN_CLUSTER_BITS <= cluster_bits <= qcow2_fmt.MAX_CLUSTER_BITS:
        raise MigrationError(f"cluster_bits {cluster_bits} is outside 9..21")
    if size < 0 or size % SECTOR or (size == 0 and what != "virtual size"):
        raise MigrationError(f"{what} {size} must be a {'' if what == 'virtual size' else 'positive '}multiple of 512")
    if size > 1 << 62:
        raise MigrationError(f"{what} {size} is too large")


def _byte_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B")
    return view


def _padded(view: memoryview, length: int) -> bytearray:
    out = bytearray(length)
    out[: len(view)] = view
    return out


def _extension(ext_type: int, data: bytes) -> bytes:
    head = qcow2_fmt.ExtensionHeader.build(Container(type=ext_type, length=len(data)))
    return head + data + bytes(-len(data) % 8)


def _snapshot_string(value: str, what: str, table_id: int) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > qcow2_fmt.SNAPSHOT_NAME_MAX:
        raise MigrationError(f"snapshot {table_id}: {what} is longer than 65535 bytes")
    return raw


def _snapshot_extra(extra: bytes, vm_state_size: int, disk_size: int, table_id: int) -> bytes:
    """The source's extra data, completed to 24 bytes, with the disk_size field set."""
    if len(extra) > limits.MAX_SNAPSHOT_EXTRA:
        raise MigrationError(f"snapshot {table_id}: extra data is longer than {limits.MAX_SNAPSHOT_EXTRA} bytes")
    data = bytearray(extra)
    if len(data) < qcow2_fmt.SNAPSHOT_EXTRA_V3_SIZE:
        template = qcow2_fmt.SnapshotExtraV3.build(
            Container(vm_state_size_large=vm_state_size, disk_size=disk_size, icount=qcow2_fmt.ICOUNT_NONE)
        )
        data += template[len(data) :]
    start = qcow2_fmt.SNAPSHOT_EXTRA_DISK_SIZE_OFFSET
    data[start : start + 8] = disk_size.to_bytes(8, "big")
    return bytes(data)


def _snapshot_entry(snapshot: _Snapshot, l1_offset: int, l1_size: int) -> bytes:
    head = qcow2_fmt.SnapshotHeader.build(
        Container(
            l1_table_offset=l1_offset,
            l1_size=l1_size,
            id_str_size=len(snapshot.id_bytes),
            name_size=len(snapshot.name_bytes),
            date_sec=snapshot.date_sec,
            date_nsec=snapshot.date_nsec,
            vm_clock_nsec=snapshot.vm_clock_nsec,
            vm_state_size=snapshot.vm_state_size & _U32,
            extra_data_size=len(snapshot.extra),
        )
    )
    entry = head + snapshot.extra + snapshot.id_bytes + snapshot.name_bytes
    return entry + bytes(-len(entry) % 8)


def _unique_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values (sorted) and how often each occurs: np.unique(return_counts=True) without the 10 ms
    import of numpy.ma that np.unique costs on its first call."""
    ordered = np.sort(values)
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    return ordered[starts], np.diff(np.append(starts, len(ordered)))
