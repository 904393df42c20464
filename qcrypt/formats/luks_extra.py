"""Extra LUKS1 declarations used by the reader (qcrypt/luks/engine.py).

References: cryptsetup lib/luks1/luks.h.
``PhdrRaw`` is ``luks1.Phdr`` with the four name fields kept as raw bytes: cryptsetup stops each name at
its first NUL and ignores whatever follows, so the reader must not fail on non-ASCII bytes after the NUL.
"""

from __future__ import annotations

from construct import Array, Bytes, Const, Int16ub, Int32ub, Int64ub, Struct

from qcrypt.formats.luks1 import DIGEST_SIZE, MAGIC, NUM_KEYSLOTS, SALT_SIZE, Keyslot

NAME_SIZE = 32
UUID_SIZE = 40

PhdrRaw = Struct(  # 592 bytes, same layout as luks1.Phdr
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

VersionProbe = Struct(  # the 8 bytes shared by LUKS1 and LUKS2: dispatch on version, not magic
    "magic" / Bytes(6),
    "version" / Int16ub,
)

# LUKS2 binary header with the text fields kept as raw bytes: labels and subsystems may be UTF-8 (or
# anything), and a bad label must not make the whole header unreadable. Same layout as luks2.BinaryHeader.
Luks2BinaryHeaderRaw = Struct(  # 4096 bytes
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
    "csum" / Bytes(64),
    "_padding4096" / Bytes(3584),
)
