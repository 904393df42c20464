"""Verification: read the finished output back through qcrypt's own reader and compare it with the digests taken
while writing, for the active layer and every snapshot.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from typing import Any

from qcrypt.errors import (
    VerificationError,
)
from qcrypt.guest.stream import Opener, QcowReader, RawLuksReader, Secret, open_image
from qcrypt.images.backing import ChainRules
from qcrypt.images.probe import probe
from qcrypt.images.qcow2_reader import QCow2Image
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
            _check_read_back(luks, digests, output_path)
            _check_ranges(luks.read, sample_ranges(digests.ranges), -1, output_path, stall_seconds, workers=1)
            return sum(length for _, length in digests.read_back)
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
        compared = _check_ranges(top.read, digests.ranges, -1, output_path, stall_seconds)
        written = top.image.snapshots()
        if len(written) != len(snapshots):
            raise VerificationError(f"{output_path}: snapshot count differs from the source")
        shared = _SharedWithActive(top.image, source, written)
        try:
            for table, snapshot in enumerate(written):
                snap_reader = QcowReader(top.image, top.encryption, top.backing, snapshot)
                mine = [r for r in digests.ranges if r[0] == table]
                ranges = [r for r in mine if not shared.covers(table, r[1], r[2])]
                compared += _check_ranges(snap_reader.read, ranges, table, output_path, stall_seconds)
                compared += sum(r[2] for r in mine) - sum(r[2] for r in ranges)  # checked through the active table
        finally:
            shared.close()
    finally:
        top.close()
    return compared


READ_BACK_SAMPLE_RANGES = 8


def _check_read_back(luks: RawLuksReader, digests: Digests, path: str) -> None:
    """What makes the chunks read back while writing (:mod:`qcrypt.migrate.read_back`) a verification of the
    output: the header on disk (whose master key digest matched when ``luks`` opened) describes the cipher, key
    size and payload offset they were decrypted with, and they tile the payload exactly, once each."""
    cipher = luks.encryption.cipher
    on_disk = (cipher.cipher_name, cipher.cipher_mode, cipher.key_bytes, luks.encryption.payload_offset)
    if on_disk != digests.read_back_with:
        raise VerificationError(
            f"{path}: the LUKS header written describes {on_disk[0]}-{on_disk[1]}, {on_disk[2] * 8}-bit key, payload "
            f"at byte {on_disk[3]}, but the data was checked as {digests.read_back_with}; the output was not kept"
        )
    written = [(guest_offset, length) for table, guest_offset, length, _ in digests.ranges if table == -1]
    position = 0
    for guest_offset, length in digests.read_back:
        if guest_offset != position or length <= 0:
            break
        position += length
    if digests.read_back != written or position != luks.size:
        raise VerificationError(
            f"{path}: the ranges read back while writing do not cover the {luks.size}-byte payload exactly once; "
            "the output was not kept"
        )


def sample_ranges(ranges: list[tuple[int, int, int, bytes]]) -> list[tuple[int, int, int, bytes]]:
    """The first and the last range and others evenly spaced between them, :data:`READ_BACK_SAMPLE_RANGES` at
    most: read once more through the ordinary reader, end to end."""
    if len(ranges) <= READ_BACK_SAMPLE_RANGES:
        return list(ranges)
    step = (len(ranges) - 1) / (READ_BACK_SAMPLE_RANGES - 1)
    return [ranges[round(i * step)] for i in range(READ_BACK_SAMPLE_RANGES)]


class _SharedWithActive:
    """Which snapshot clusters both the output and the source share with their active table (see verify)."""

    def __init__(self, output: Any, source: str | None, written: list[Snapshot]) -> None:
        self.output = output
        self.source = None
        if source is not None and probe(source).format == "qcow2":
            self.source = QCow2Image.open(source)
            if len(self.source.snapshots()) != len(written):
                self.source.close()
                self.source = None
        self.output_l1 = [output.l1_table(snapshot) for snapshot in written]
        self.source_l1 = [self.source.l1_table(s) for s in self.source.snapshots()] if self.source else []

    def covers(self, table: int, guest_offset: int, length: int) -> bool:
        if self.source is None or length <= 0:
            return False
        cs = self.output.cluster_size
        if cs != self.source.cluster_size:
            return False
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

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


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

    mine = ((off, length, digest) for t, off, length, digest in ranges if t == table)
    compared = 0
    with contextlib.closing(
        ordered_map(digest_of, mine, workers=workers, stall_seconds=stall_seconds, describe=describe_run)
    ) as results:
        for guest_offset, length, same in results:
            if not same:
                raise VerificationError(
                    f"{path}: guest bytes {guest_offset}..{guest_offset + length} differ "
                    "from the source after writing; the output was not kept"
                )
            compared += length
    return compared
