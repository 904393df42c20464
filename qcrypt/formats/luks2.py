"""LUKS2 binary header declarations (recognition and reporting only).

References: cryptsetup lib/luks2/luks2.h (struct luks2_hdr_disk).
The 4096-byte binary header is followed by a JSON area up to ``hdr_size``.
"""

from __future__ import annotations

from construct import Bytes, Int16ub, Int64ub, Struct

VERSION = 2
BINARY_HEADER_SIZE = 4096
MIN_HDR_SIZE = 0x4000
MAX_HDR_SIZE = 0x400000
CSUM_OFFSET = 448
CSUM_SIZE = 64

# The text fields are kept as raw bytes: labels and subsystems may be UTF-8 (or anything), and a bad label must
# not make the whole header unreadable.
BinaryHeader = Struct(  # 4096 bytes
    "magic" / Bytes(6),
    "version" / Int16ub,
    "hdr_size" / Int64ub * "binary header + JSON area, bytes",
    "seqid" / Int64ub,
    "label" / Bytes(48),
    "checksum_alg" / Bytes(32),
    "salt" / Bytes(64),
    "uuid" / Bytes(40),
    "subsystem" / Bytes(48),
    "hdr_offset" / Int64ub,
    "_padding" / Bytes(184),
    "csum" / Bytes(CSUM_SIZE),
    "_padding4096" / Bytes(3584),
)
