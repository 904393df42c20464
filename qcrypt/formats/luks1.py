"""LUKS1 on-disk declarations.

References: cryptsetup lib/luks1/luks.h (struct luks_phdr); qemu crypto/block-luks.c.
Big-endian throughout; the phdr is 592 bytes (208 + 8 x 48).
"""

from __future__ import annotations

from construct import Array, Bytes, Const, Int16ub, Int32ub, Struct

MAGIC = b"LUKS\xba\xbe"
VERSION = 1
PHDR_SIZE = 592
NUM_KEYSLOTS = 8
STRIPES = 4000
KEY_ENABLED = 0x00AC71F3
KEY_DISABLED = 0x0000DEAD
SALT_SIZE = 32
DIGEST_SIZE = 20
ALIGN_KEYSLOTS_SECTORS = 8  # 4 KiB
MIN_ITERATIONS = 1000
DEFAULT_DATA_ALIGNMENT_SECTORS = 2048  # 1 MiB, as cryptsetup

Keyslot = Struct(  # 48 bytes
    "active" / Int32ub * "0x00AC71F3 enabled, 0x0000DEAD disabled",
    "iterations" / Int32ub,
    "salt" / Bytes(SALT_SIZE),
    "key_material_offset" / Int32ub * "in 512-byte sectors from the header start",
    "stripes" / Int32ub,
)

NAME_SIZE = 32
UUID_SIZE = 40

# The name fields are kept as raw bytes: cryptsetup stops each name at its first NUL and ignores whatever
# follows, so a reader must not fail on non-ASCII bytes after the NUL. Writers pad with NULs.
Phdr = Struct(  # 592 bytes
    "magic" / Const(MAGIC),
    "version" / Int16ub,
    "cipher_name" / Bytes(NAME_SIZE),
    "cipher_mode" / Bytes(NAME_SIZE),
    "hash_spec" / Bytes(NAME_SIZE),
    "payload_offset" / Int32ub * "in 512-byte sectors",
    "key_bytes" / Int32ub,
    "mk_digest" / Bytes(DIGEST_SIZE),
    "mk_digest_salt" / Bytes(SALT_SIZE),
    "mk_digest_iter" / Int32ub,
    "uuid" / Bytes(UUID_SIZE),
    "keyslots" / Array(NUM_KEYSLOTS, Keyslot),
)

VersionProbe = Struct(  # the 8 bytes LUKS1 and LUKS2 share: dispatch on version, not magic
    "magic" / Bytes(6),
    "version" / Int16ub,
)
