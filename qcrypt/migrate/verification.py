"""Verification: read the finished output back through qcrypt's own reader and compare it with the digests taken
while writing, for the active layer and every snapshot.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Mapping
from typing import Any

from qcrypt.crypto.encryption import DataEncryption
from qcrypt.errors import VerificationError
from qcrypt.formats import qcow2 as qcow2_fmt
from qcrypt.guest.stream import Opener, QcowReader, RawLuksReader, Secret, open_image
from qcrypt.images.backing import ChainRules
from qcrypt.images.probe import probe
from qcrypt.images.qcow2_reader import QCow2Image
from qcrypt.migrate.read_back import differs_message, parameters_of
from qcrypt.migrate.writing import Digests, describe_run
from qcrypt.model.clusters import ClusterKind, Snapshot
from qcrypt.plumbing import checksum
from qcrypt.plumbing.parallel import DEFAULT_STALL_SECONDS, ordered_map


def verify(
    output_path: str,
    passphrase: Secret | None,
    digests: Digests,
    *,
    target: str,
    snapshots: list[Snapshot],
    stall_seconds: float = DEFAULT_STALL_SECONDS,
    source: str | None = None,
    backing_passphrase: Secret | None = None,
    backing_passphrases: Mapping[str, Secret] | None = None,
    rules: ChainRules | None = None,
    direct_io: bool = False,
) -> int:
    """Read the output back through our reader; every range must hash as the source plaintext did.
    Returns the guest bytes accounted for: compared, or (snapshot ranges) shared with the active table.

    ``passphrase`` is normally the KnownMasterKey we encrypted with: the header written on disk must carry
    its digest (re-deriving the keyslot would cost another --iter-time of PBKDF2; cryptsetup's
    --test-passphrase accepting our keyslots is established by the test suite).

    With ``source`` (a qcow2 with these snapshots), a snapshot range is not decrypted again when every one of
    its clusters is shared with the active table in *both* images: the output's snapshot L2 entry points at the
    same host cluster as its active L2 entry, and the source's do too. Both then read what the active table
    reads there, which the active table's check has just compared with the source.

    A snapshot range that was only mapped while writing (``Digests.mapped``) is checked without reading data:
    each of its clusters must point at a host cluster that a run read back while writing was written to for
    the same guest cluster, and the source's L2 entries there must be equal in the snapshot and in that run's
    table (equal entries read equal data; the output's IVs follow the host offset, so equal host clusters
    decrypt equally).

    A kept backing chain opens with the source's passphrases (``backing_passphrase`` and, per layer by real
    path, ``backing_passphrases``): only the output itself uses ``passphrase``.

    ``direct_io``: the output's encrypted data is read past the page cache (it was written so), which checks
    what reached the disk."""
    if target == "luks":
        luks = RawLuksReader(output_path, passphrase)
        try:
            if direct_io:
                luks.file.use_direct_reads()
            if digests.read_back_with is None:
                return _check_ranges(luks.read, digests.ranges, -1, output_path, stall_seconds)
            _check_parameters(luks.encryption, digests, output_path)
            _check_raw_coverage(luks.size, luks.payload_host_offset, digests, output_path)
            _check_ranges(luks.read, sample_ranges(digests.ranges), -1, output_path, stall_seconds, workers=1)
            return sum(length for _, _, length, _ in digests.read_back)
        finally:
            luks.close()
    if target == "raw":
        with open_image(output_path, passphrase, container="raw") as stream:
            return _check_ranges(stream.read_at, digests.ranges, -1, output_path, stall_seconds)
    layers = dict(backing_passphrases or {})
    if passphrase is not None:
        layers[os.path.realpath(output_path)] = passphrase
    opener = Opener(backing_passphrase, layers, rules)
    top = opener.open(output_path)
    try:
        assert isinstance(top, QcowReader)
        if direct_io:
            top.image.use_direct_reads()
        placed = _ReadBackPlacement(top, digests, output_path)
        active = [r for r in digests.ranges if r[0] == -1]
        compared = placed.check(-1, None)
        compared += _check_ranges(top.read, placed.not_read_back(active), -1, output_path, stall_seconds)
        _check_ranges(top.read, sample_ranges(placed.read_back(active)), -1, output_path, stall_seconds, workers=1)
        written = top.image.snapshots()
        if len(written) != len(snapshots):
            raise VerificationError(f"{output_path}: snapshot count differs from the source")
        shared = _SharedClusters(placed.image, source, written)
        try:
            for table, snapshot in enumerate(written):
                snap_reader = QcowReader(top.image, top.encryption, top.backing, snapshot)
                compared += placed.check(table, placed.image.l1_table(snapshot))
                compared += _check_mapped(shared, placed, [r for r in digests.mapped if r[0] == table], output_path)
                own = [r for r in digests.ranges if r[0] == table]
                mine = placed.not_read_back(own)
                ranges = [r for r in mine if not shared.covers(table, r[1], r[2])]
                compared += _check_ranges(snap_reader.read, ranges, table, output_path, stall_seconds)
                sample = sample_ranges(placed.read_back(own), SNAPSHOT_SAMPLE_RANGES)
                _check_ranges(snap_reader.read, sample, table, output_path, stall_seconds, workers=1)
                compared += sum(r[2] for r in mine) - sum(r[2] for r in ranges)  # checked through the active table
        finally:
            shared.close()
    finally:
        top.close()
    return compared


READ_BACK_SAMPLE_RANGES = 8
SNAPSHOT_SAMPLE_RANGES = 2  # per snapshot table: its first and last run read back
Range = tuple[int, int, int, bytes]  # (table, guest_offset, length, digest); table -1: the active layer


def _check_parameters(encryption: DataEncryption | None, digests: Digests, path: str) -> None:
    """The output, opened as any reader opens it (its master key digest matched), decrypts as the runs read
    back while writing were decrypted (:mod:`qcrypt.migrate.read_back`)."""
    on_disk = parameters_of(encryption) if encryption is not None else None
    if on_disk != digests.read_back_with:
        raise VerificationError(
            f"{path}: the LUKS header written describes {on_disk}, but the data was checked as "
            f"{digests.read_back_with}; the output was not kept"
        )


def _check_raw_coverage(payload_bytes: int, payload_offset: int, digests: Digests, path: str) -> None:
    """Raw LUKS: the runs read back while writing are the runs written, once each, in order, stored where the
    header's payload offset puts them, and they tile the whole payload: no write can have landed on checked
    data afterwards."""
    written = [(table, guest_offset, length) for table, guest_offset, length, _ in digests.ranges]
    position = 0
    for table, guest_offset, length, host_offset in digests.read_back:
        if table != -1 or guest_offset != position or length <= 0 or host_offset != payload_offset + guest_offset:
            break
        position += length
    if [(t, g, n) for t, g, n, _ in digests.read_back] != written or position != payload_bytes:
        raise VerificationError(
            f"{path}: the ranges read back while writing do not cover the {payload_bytes}-byte payload exactly "
            "once; the output was not kept"
        )


class _ReadBackPlacement:
    """qcow2: the runs read back while writing must be where the output's tables map their guest clusters, and
    no two of them may share a host byte (a run written over another after its read-back)."""

    def __init__(self, reader: QcowReader, digests: Digests, path: str) -> None:
        assert isinstance(reader.image, QCow2Image)  # qcrypt writes qcow2 v3
        self.image = reader.image
        self.path = path
        self.by_table: dict[int, list[tuple[int, int, int]]] = {}
        self.keys = {(table, guest_offset, length) for table, guest_offset, length, _ in digests.read_back}
        self._index: tuple[Any, Any] | None = None
        if digests.read_back_with is None:
            return
        _check_parameters(reader.encryption, digests, path)
        cs = self.image.cluster_size
        spans = sorted((host, host + -(-length // cs) * cs) for _, _, length, host in digests.read_back)
        for (_, end), (start, _) in itertools.pairwise(spans):
            if start < end:
                raise VerificationError(
                    f"{path}: two runs read back while writing share host byte {start}; the output was not kept"
                )
        for table, guest_offset, length, host_offset in digests.read_back:
            self.by_table.setdefault(table, []).append((guest_offset, length, host_offset))

    def written_at(self, host_clusters: Any) -> tuple[Any, Any]:
        """(table, guest cluster) of the run read back while writing at each of ``host_clusters``; (-2, -1)
        where no run was."""
        import numpy as np

        if self._index is None:
            cs = self.image.cluster_size
            runs = [(t, g, n, h) for t, spans in self.by_table.items() for g, n, h in spans]
            end = max((h // cs + -(-n // cs) for _, _, n, h in runs), default=0)
            tables, guests = np.full(end, -2, dtype=np.int64), np.full(end, -1, dtype=np.int64)
            for table, guest_offset, length, host_offset in runs:
                first, count = host_offset // cs, -(-length // cs)
                tables[first : first + count] = table
                guests[first : first + count] = np.arange(guest_offset // cs, guest_offset // cs + count)
            self._index = tables, guests
        tables, guests = self._index
        inside = host_clusters < np.uint64(len(tables))
        at = np.where(inside, host_clusters, 0).astype(np.int64)
        return np.where(inside, tables[at] if len(tables) else -2, -2), np.where(
            inside, guests[at] if len(guests) else -1, -1
        )

    def read_back(self, ranges: list[Range]) -> list[Range]:
        return [r for r in ranges if (r[0], r[1], r[2]) in self.keys]

    def not_read_back(self, ranges: list[Range]) -> list[Range]:
        return [r for r in ranges if (r[0], r[1], r[2]) not in self.keys]

    def check(self, table: int, l1: Any) -> int:
        """Guest bytes of ``table`` (whose L1 table is ``l1``; None: the active one) read back and mapped there."""
        import numpy as np

        cs = self.image.cluster_size
        checked = 0
        for guest_offset, length, host_offset in self.by_table.get(table, []):
            count = -(-length // cs)
            host_offsets = data_host_offsets(
                self.image, self.image.l1_table() if l1 is None else l1, guest_offset, count
            )
            expected = host_offset + np.arange(count, dtype=np.uint64) * np.uint64(cs)
            if guest_offset % cs or host_offsets is None or not np.array_equal(host_offsets, expected):
                raise VerificationError(
                    f"{self.path}: guest bytes {guest_offset}..{guest_offset + length} are not mapped where they "
                    "were written and read back; the output was not kept"
                )
            checked += length
        return checked


def data_host_offsets(image: QCow2Image, l1: Any, guest_offset: int, count: int) -> Any:
    """The host offsets of ``count`` guest clusters from ``guest_offset`` (rounded down to a cluster) in the table
    ``l1`` of a qcow2 file qcrypt wrote (standard L2 entries), as a numpy array; None unless every one of them
    is a plain data cluster (no compressed, zero or reserved bit, a non-zero offset)."""
    import numpy as np

    if image.header.extended_l2:
        return None  # qcrypt never writes extended L2 entries
    entries = image.l2_entries_of(l1, guest_offset // image.cluster_size, count)[:, 0]
    host_offsets = entries & np.uint64(qcow2_fmt.L2E_OFFSET_MASK)
    if (entries & ~np.uint64(qcow2_fmt.OFLAG_COPIED | qcow2_fmt.L2E_OFFSET_MASK)).any() or not host_offsets.all():
        return None
    if (host_offsets % np.uint64(image.cluster_size)).any():
        return None
    return host_offsets


def sample_ranges(ranges: list[Range], count: int = READ_BACK_SAMPLE_RANGES) -> list[Range]:
    """The first and the last range and others evenly spaced between them, ``count`` (at least 2) at most: read
    once more through the ordinary reader, end to end."""
    if len(ranges) <= count:
        return list(ranges)
    step = (len(ranges) - 1) / (count - 1)
    return [ranges[round(i * step)] for i in range(count)]


class _SharedClusters:
    """Which snapshot clusters the output shares with its other tables, and whether the source shares them
    alike (see verify)."""

    def __init__(self, output: QCow2Image, source: str | None, written: list[Snapshot]) -> None:
        self.output = output
        self.source = None
        if source is not None and probe(source).format == "qcow2":
            self.source = QCow2Image.open(source)
            if len(self.source.snapshots()) != len(written) or self.source.cluster_size != output.cluster_size:
                self.source.close()
                self.source = None
        self.output_l1 = [output.l1_table(snapshot) for snapshot in written]
        self.source_l1 = [self.source.l1_table(s) for s in self.source.snapshots()] if self.source else []

    def covers(self, table: int, guest_offset: int, length: int) -> bool:
        if self.source is None or length <= 0:
            return False
        cs = self.output.cluster_size
        return all(self._shared(table, g) for g in range(guest_offset // cs, -(-(guest_offset + length) // cs)))

    def _shared(self, table: int, guest_cluster: int) -> bool:
        assert self.source is not None
        if guest_cluster >= min(self.output.guest_clusters, self.source.guest_clusters):
            return False  # VM state, or beyond a smaller active disk: no active counterpart
        out_snap = self.output.map_cluster(guest_cluster, self.output_l1[table])
        out_active = self.output.map_cluster(guest_cluster)
        if out_snap.kind is not ClusterKind.NORMAL or out_snap != out_active:
            return False
        src_snap = self.source.map_cluster(guest_cluster, self.source_l1[table])
        return src_snap.kind not in (ClusterKind.ZERO, ClusterKind.UNALLOCATED) and (
            src_snap == self.source.map_cluster(guest_cluster)
        )

    def maps_read_back(self, table: int, guest_offset: int, length: int, placed: _ReadBackPlacement) -> bool:
        """Snapshot ``table``'s guest range points, cluster by cluster, at host clusters read back while writing
        for the same guest clusters, by tables whose source L2 entries there equal this snapshot's."""
        import numpy as np

        cs = self.output.cluster_size
        if self.source is None or length <= 0 or guest_offset % cs:
            return False
        first = guest_offset // cs
        count = -(-(guest_offset + length) // cs) - first
        host_offsets = data_host_offsets(self.output, self.output_l1[table], guest_offset, count)
        if host_offsets is None:
            return False  # not all plain data clusters
        tables, guest_clusters = placed.written_at(host_offsets // np.uint64(cs))
        if not np.array_equal(guest_clusters, np.arange(first, first + count)):
            return False
        mine = self._source_entries(self.source_l1[table], first, count)
        for earlier in set(tables.tolist()):  # np.unique would import numpy.ma (10 ms)
            l1 = self.source.l1_table() if earlier == -1 else self.source_l1[earlier]
            rows = tables == earlier
            if not np.array_equal(mine[rows], self._source_entries(l1, first, count)[rows]):
                return False
        return True

    def _source_entries(self, l1: Any, first: int, count: int) -> Any:
        import numpy as np

        assert self.source is not None
        entries = self.source.l2_entries_of(l1, first, count)
        entries[:, 0] &= ~np.uint64(qcow2_fmt.OFLAG_COPIED)
        return entries

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


def _check_mapped(
    shared: _SharedClusters, placed: _ReadBackPlacement, ranges: list[tuple[int, int, int]], path: str
) -> int:
    """Guest bytes of snapshot ranges that were only mapped while writing, each checked by
    :meth:`_SharedClusters.maps_read_back`."""
    for table, guest_offset, length in ranges:
        if not shared.maps_read_back(table, guest_offset, length, placed):
            raise VerificationError(
                f"{path}: snapshot {table + 1}'s guest bytes {guest_offset}..{guest_offset + length} do not point at "
                "data read back from the same source clusters; the output was not kept"
            )
    return sum(length for _, _, length in ranges)


def _check_ranges(
    read: Callable[[int, int], bytes],
    ranges: list[tuple[int, int, int, bytes]],
    table: int,
    path: str,
    stall_seconds: float,
    workers: int | None = None,
) -> int:
    def digest_of(guest_offset: int, length: int, expected: bytes) -> tuple[int, int, bool]:
        return guest_offset, length, checksum.digest(read(guest_offset, length)) == expected

    mine = [(off, length, digest) for t, off, length, digest in ranges if t == table]
    if not mine:  # no workers forked for nothing
        return 0
    compared = 0
    with contextlib.closing(
        ordered_map(digest_of, mine, workers=workers, stall_seconds=stall_seconds, describe=describe_run)
    ) as results:
        for guest_offset, length, same in results:
            if not same:
                raise VerificationError(differs_message(path, guest_offset, length))
            compared += length
    return compared
