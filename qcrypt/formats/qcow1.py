"""qcow version 1 ("QCOW") on-disk declarations.

References: qemu block/qcow.c (QCowHeader).
The magic is shared with qcow2; version = 1; crypt_method sits at offset 36 (not 32 as in qcow2).
"""

from __future__ import annotations

from construct import Const, Int8ub, Int32ub, Int64ub, Padding, Struct

from qcrypt.formats.qcow2 import CRYPT_AES, CRYPT_NONE, MAGIC  # noqa: F401 - shared by both versions

HEADER_SIZE = 48
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 16
MIN_L2_BITS = 6
MAX_L2_BITS = 13
L2E_COMPRESSED = 1 << 63

Header = Struct(
    "magic" / Const(MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "mtime" / Int32ub,
    "size" / Int64ub,
    "cluster_bits" / Int8ub,
    "l2_bits" / Int8ub,
    Padding(2),
    "crypt_method" / Int32ub * "offset 36: 0 none, 1 AES",
    "l1_table_offset" / Int64ub,
)
