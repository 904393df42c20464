"""``qcrypt migrate`` with a fault injected between writing and verification (a test seam, tests only).

Usage: python -m tests._faulty_migrate FAULT MIGRATE-ARGS...

Runs the real command line, but just before the read-back verification starts, the temporary output is
damaged as FAULT says (a raw LUKS output is read back chunk by chunk while it is written: there the byte is
flipped when its chunk has been written, just before that chunk is read back):

* ``late:GUEST_OFFSET``: as GUEST_OFFSET, but for a raw LUKS output after the read-back of its chunk too (only
  the final sample, read once more through the ordinary reader, can see it);
* ``GUEST_OFFSET``: one byte flipped where guest byte GUEST_OFFSET is stored (raw: at the offset; raw LUKS: past
  the header; qcow2: through the L1/L2 tables, decoded here in a few lines, independent of qcrypt's reader);
* ``snapshot``: one byte flipped in a data cluster that only the first internal snapshot references (LUKS: it
  was read back already; the snapshot's sample, which always holds its first run read back, must see it);
* ``snapshot-mapping``: one L2 entry of the first snapshot that shares its cluster with the active table
  re-pointed at another of the active table's data clusters (a snapshot range only mapped while writing is
  checked by its mapping);
* ``drop-snapshot``: the header's snapshot count lowered by one (the last snapshot vanishes);
* ``short-verify``: the output is intact, but verification reports one sector less than it compared (a
  read-back that skipped data must not pass).

A migration that really verifies must fail with VerificationError (exit 7) and leave nothing under the output
name. The hook writes "fault injected at ..." to stderr so the test knows the fault was placed.
"""

from __future__ import annotations

import struct
import sys
from typing import Any

from qcrypt.cli.main import main
from qcrypt.migrate import run as migration
from qcrypt.migrate.read_back import ReadBack

_QCOW_MAGIC = b"QFI\xfb"
_LUKS_MAGIC = b"LUKS\xba\xbe"
_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00


def host_offset(path: str, guest_offset: int) -> int:
    """Where guest byte ``guest_offset`` lives in the file (standard L2 entries only for qcow2)."""
    with open(path, "rb") as fh:
        head = fh.read(592)
        if head.startswith(_LUKS_MAGIC):
            (payload_sectors,) = struct.unpack_from(">I", head, 104)
            return payload_sectors * 512 + guest_offset
        if not head.startswith(_QCOW_MAGIC):
            return guest_offset
        (cluster_bits,) = struct.unpack_from(">I", head, 20)
        (l1_offset,) = struct.unpack_from(">Q", head, 40)
        cluster = 1 << cluster_bits
        entries = cluster // 8
        guest_cluster = guest_offset // cluster
        fh.seek(l1_offset + 8 * (guest_cluster // entries))
        (l1_entry,) = struct.unpack(">Q", fh.read(8))
        fh.seek((l1_entry & _OFFSET_MASK) + 8 * (guest_cluster % entries))
        (l2_entry,) = struct.unpack(">Q", fh.read(8))
        data_cluster = l2_entry & _OFFSET_MASK
        if not data_cluster:
            raise SystemExit(f"guest offset {guest_offset} is not allocated in {path}")
        return data_cluster + guest_offset % cluster


def _l2_entry_places(fh: Any, l1_offset: int, l1_size: int, cluster: int) -> dict[int, tuple[int, int]]:
    """guest cluster -> (file offset of its L2 entry, entry) for the standard data clusters one L1 maps."""
    places = {}
    entries = cluster // 8
    for l1_index in range(l1_size):
        fh.seek(l1_offset + 8 * l1_index)
        l2_offset = struct.unpack(">Q", fh.read(8))[0] & _OFFSET_MASK
        if not l2_offset:
            continue
        fh.seek(l2_offset)
        for index, entry in enumerate(struct.unpack(f">{entries}Q", fh.read(cluster))):
            if entry & _OFFSET_MASK and not entry & (1 << 62):
                places[l1_index * entries + index] = (l2_offset + 8 * index, entry)
    return places


def _l2_data_clusters(fh: Any, l1_offset: int, l1_size: int, cluster: int) -> list[int]:
    """Host offsets of the standard data clusters one L1 table maps, in guest order."""
    return [entry & _OFFSET_MASK for _, entry in _l2_entry_places(fh, l1_offset, l1_size, cluster).values()]


def snapshot_only_cluster(path: str) -> int:
    """A data cluster referenced by the first snapshot's L1 table and not by the active one."""
    with open(path, "rb") as fh:
        head = fh.read(72)
        cluster = 1 << struct.unpack_from(">I", head, 20)[0]
        l1_size, l1_offset = struct.unpack_from(">IQ", head, 36)
        snapshots_offset = struct.unpack_from(">Q", head, 64)[0]
        fh.seek(snapshots_offset)
        snap_l1_offset, snap_l1_size = struct.unpack(">QI", fh.read(12))
        active = set(_l2_data_clusters(fh, l1_offset, l1_size, cluster))
        only = [c for c in _l2_data_clusters(fh, snap_l1_offset, snap_l1_size, cluster) if c not in active]
    if not only:
        raise SystemExit(f"{path}: the first snapshot shares all its clusters with the active layer")
    return only[0]


def repoint_shared_cluster(path: str) -> int:
    """Re-point the first snapshot's first cluster shared with the active table at the active table's data
    cluster of another guest cluster; returns the L2 entry's file offset."""
    with open(path, "r+b") as fh:
        head = fh.read(72)
        cluster = 1 << struct.unpack_from(">I", head, 20)[0]
        l1_size, l1_offset = struct.unpack_from(">IQ", head, 36)
        fh.seek(struct.unpack_from(">Q", head, 64)[0])
        snap_l1_offset, snap_l1_size = struct.unpack(">QI", fh.read(12))
        active = _l2_entry_places(fh, l1_offset, l1_size, cluster)
        snapshot = _l2_entry_places(fh, snap_l1_offset, snap_l1_size, cluster)
        shared = [
            g
            for g, (_, entry) in snapshot.items()
            if g in active and active[g][1] & _OFFSET_MASK == entry & _OFFSET_MASK
        ]
        if not shared:
            raise SystemExit(f"{path}: the first snapshot shares no cluster with the active layer")
        where, entry = snapshot[shared[0]]
        other = next(e for g, (_, e) in active.items() if e & _OFFSET_MASK != entry & _OFFSET_MASK)
        fh.seek(where)
        fh.write(struct.pack(">Q", other))
    return where


def _flip(path: str, where: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(where)
        byte = fh.read(1)
        fh.seek(where)
        fh.write(bytes([byte[0] ^ 0x01]))


def _drop_snapshot(path: str) -> None:
    with open(path, "r+b") as fh:
        fh.seek(60)
        (count,) = struct.unpack(">I", fh.read(4))
        fh.seek(60)
        fh.write(struct.pack(">I", count - 1))


def _faulty(original: Any, fault: str) -> Any:
    def verify(output_path: str, *args: Any, **kwargs: Any) -> Any:
        if fault == "short-verify":
            print("fault injected at the result", file=sys.stderr)
            return original(output_path, *args, **kwargs) - 512
        if fault == "drop-snapshot":
            _drop_snapshot(output_path)
            print("fault injected at the snapshot count", file=sys.stderr)
        elif fault == "snapshot-mapping":
            print(f"fault injected at {repoint_shared_cluster(output_path)}", file=sys.stderr)
        else:
            guest_offset = fault.removeprefix("late:")
            where = (
                snapshot_only_cluster(output_path)
                if fault == "snapshot"
                else host_offset(output_path, int(guest_offset))
            )
            _flip(output_path, where)
            print(f"fault injected at {where}", file=sys.stderr)
        return original(output_path, *args, **kwargs)

    return verify


def _faulty_read_back(original: Any, guest_offset: int) -> Any:
    """ReadBack.stored_plaintext damaging the run that holds ``guest_offset`` (of the active layer, the first
    such run) just before the worker that wrote it reads it back."""

    def stored_plaintext(self: ReadBack, host_offset: int, length: int, run_offset: int) -> bytes | memoryview:
        if run_offset <= guest_offset < run_offset + length and not _flipped:
            where = host_offset + guest_offset - run_offset
            _flip(f"/proc/self/fd/{self.fd}", where)
            _flipped.append(where)
            print(f"fault injected at {where}", file=sys.stderr, flush=True)
        return original(self, host_offset, length, run_offset)

    return stored_plaintext


_flipped: list[int] = []

if __name__ == "__main__":
    target = sys.argv[sys.argv.index("--to") + 1]
    if sys.argv[1].isdigit() and target in ("luks", "qcow2-luks"):  # read back while writing
        ReadBack.stored_plaintext = _faulty_read_back(ReadBack.stored_plaintext, int(sys.argv[1]))  # type: ignore[method-assign]
    else:
        migration.verify = _faulty(migration.verify, sys.argv[1])
    sys.argv = ["qcrypt", *sys.argv[2:]]
    main()
