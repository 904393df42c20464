"""qcow2 (versions 2 and 3) on-disk declarations.

References:
    qemu docs/interop/qcow2.txt / qcow2.rst; block/qcow2.h (QCowHeader, masks); block/qcow2.c.

All integers are big-endian. Entries of L1/L2/refcount tables are parsed as plain integers and masked in
Python (construct's bit structs are MSB-first, QEMU numbers bits LSB-first).
"""

from __future__ import annotations

from construct import Const, If, Int8ub, Int16ub, Int32ub, Int64ub, Struct, this

MAGIC = b"QFI\xfb"
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

# incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = 0x1F
COMPAT_LAZY_REFCOUNTS = 1 << 0
COMPAT_KNOWN = 0x01
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = 0x03

FEATURE_NAMES = {
    ("incompatible", 0): "dirty",
    ("incompatible", 1): "corrupt",
    ("incompatible", 2): "external data file",
    ("incompatible", 3): "compression type",
    ("incompatible", 4): "extended L2 entries",
    ("compatible", 0): "lazy refcounts",
    ("autoclear", 0): "bitmaps",
    ("autoclear", 1): "raw external data",
}

COMPRESSION_DEFLATE = 0
COMPRESSION_ZSTD = 1

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_DATA_FILE = 0x44415441
EXTENSION_NAMES = {
    EXT_BACKING_FORMAT: "backing_format",
    EXT_FEATURE_TABLE: "feature_name_table",
    EXT_BITMAPS: "bitmaps",
    EXT_CRYPTO_HEADER: "crypto_header",
    EXT_DATA_FILE: "data_file",
}
MAX_BACKING_FILE_NAME = 1023
MAX_BACKING_FORMAT_NAME = 15

# L1 / L2 / refcount-table masks
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00

# limits on header quantities: defined (and explained) in qcrypt.plumbing.limits
SUBCLUSTERS = 32

Header = Struct(
    "magic" / Const(MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub * "virtual disk size in bytes",
    "crypt_method" / Int32ub * "0 none, 1 AES (legacy), 2 LUKS",
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
    "v3"
    / If(
        this.version >= 3,
        Struct(
            "incompatible_features" / Int64ub,
            "compatible_features" / Int64ub,
            "autoclear_features" / Int64ub,
            "refcount_order" / Int32ub,
            "header_length" / Int32ub,
        ),
    ),
)
HEADER_READ_SIZE = 112  # enough for v2, v3 and the optional compression_type byte
COMPRESSION_TYPE_OFFSET = 104

ExtensionHeader = Struct(
    "type" / Int32ub,
    "length" / Int32ub,
)

CryptoHeaderExtension = Struct(  # exactly 16 bytes
    "offset" / Int64ub,
    "length" / Int64ub,
)


SnapshotHeader = Struct(  # 40 bytes, then extra data, id string, name, padding to 8
    "l1_table_offset" / Int64ub,
    "l1_size" / Int32ub,
    "id_str_size" / Int16ub,
    "name_size" / Int16ub,
    "date_sec" / Int32ub,
    "date_nsec" / Int32ub,
    "vm_clock_nsec" / Int64ub,
    "vm_state_size" / Int32ub,
    "extra_data_size" / Int32ub,
)
SNAPSHOT_HEADER_SIZE = 40
# The same 40 bytes as a struct format, for the reader's hot loop (a table may hold 65536 entries: construct
# costs ~13 us per entry, struct ~0.2 us). tests/test_bombs.py checks that both agree field by field.
SNAPSHOT_HEADER_FORMAT = ">QIHHIIQII"


# -- declarations used only when writing (qcrypt.images.qcow2_writer) -------------------------------------

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
