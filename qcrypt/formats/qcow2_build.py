"""qcow2 v3 declarations used only when writing images (see :mod:`qcrypt.images.qcow2_writer`).

References:
    qemu docs/interop/qcow2.txt / qcow2.rst (header, snapshot table); formats.md sections A.2, A.7, A.8, H.2.

Everything else (header, extension, snapshot header layouts and masks) is in :mod:`qcrypt.formats.qcow2`.
"""

from __future__ import annotations

from construct import Const, Int8ub, Int64ub, Struct

WRITE_VERSION = 3
WRITE_HEADER_LENGTH = 112  # what QEMU 7.2 writes: the 104-byte v3 header plus the compression_type tail
WRITE_REFCOUNT_ORDER = 4  # 16-bit refcounts
REFCOUNT_DTYPE = ">u2"  # one refcount-block entry at refcount_order 4
TABLE_ENTRY_DTYPE = ">u8"  # L1, L2 and refcount-table entries
REFCOUNT_MAX = 0xFFFF

HeaderTail = Struct(  # bytes 104..111 of a header with header_length 112
    "compression_type" / Int8ub * "0 = deflate",
    "padding" / Const(bytes(7)),
)

SnapshotExtraV3 = Struct(  # the 24 bytes of extra data QEMU 7.2 writes per snapshot
    "vm_state_size_large" / Int64ub,
    "disk_size" / Int64ub,
    "icount" / Int64ub * "-1 (all ones) when icount was not recorded",
)
SNAPSHOT_EXTRA_V3_SIZE = 24
SNAPSHOT_EXTRA_DISK_SIZE_OFFSET = 8
ICOUNT_NONE = 0xFFFF_FFFF_FFFF_FFFF
SNAPSHOT_NAME_MAX = 0xFFFF  # id_str_size and name_size are u16
