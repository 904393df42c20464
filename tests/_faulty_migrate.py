"""``qcrypt migrate`` with a fault injected between writing and verification (a test seam, tests only).

Usage: python -m tests._faulty_migrate GUEST_OFFSET MIGRATE-ARGS...

Runs the real command line, but just before the read-back verification starts, one byte of the temporary
output, where guest byte GUEST_OFFSET is stored, is flipped (raw: at the offset; raw LUKS: past the header;
qcow2: through the L1/L2 tables, decoded here in a few lines, independent of qcrypt's reader). A migration that
really verifies must fail with VerificationError (exit 7) and leave nothing under the output name. The hook
writes "fault injected at HOST_OFFSET" to stderr so the test knows the fault was placed.
"""

from __future__ import annotations

import struct
import sys
from typing import Any

from qcrypt import migrate as migration
from qcrypt.cli.main import main

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


def _corrupting(original: Any, guest_offset: int) -> Any:
    def verify(output_path: str, *args: Any, **kwargs: Any) -> Any:
        where = host_offset(output_path, guest_offset)
        with open(output_path, "r+b") as fh:
            fh.seek(where)
            byte = fh.read(1)
            fh.seek(where)
            fh.write(bytes([byte[0] ^ 0x01]))
        print(f"fault injected at {where}", file=sys.stderr)
        return original(output_path, *args, **kwargs)

    return verify


if __name__ == "__main__":
    target_offset = int(sys.argv[1])
    migration.verify = _corrupting(migration.verify, target_offset)
    sys.argv = ["qcrypt", *sys.argv[2:]]
    main()
