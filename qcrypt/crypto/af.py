"""The LUKS anti-forensic (AF) information splitter.

References: cryptsetup lib/luks1/af.c and qemu crypto/afsplit.c (behaviour only).
``diffuse`` hashes every digest-sized chunk of the block
with a 4-byte big-endian chunk index in front; the last chunk may be partial.
"""

from __future__ import annotations

import hashlib
import os

from qcrypt.crypto.kdf import check_hash
from qcrypt.errors import FormatError


def diffuse(block: bytes | bytearray, hash_name: str) -> bytes:
    """The AF diffusion function H applied chunk-wise to ``block`` (same length out as in)."""
    check_hash(hash_name)
    digest_bytes = hashlib.new(hash_name).digest_size
    out = bytearray()
    for index, start in enumerate(range(0, len(block), digest_bytes)):
        chunk = block[start : start + digest_bytes]
        h = hashlib.new(hash_name, index.to_bytes(4, "big"))
        h.update(chunk)
        out += h.digest()[: len(chunk)]
    return bytes(out)


def _xor(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def _check_shape(key_bytes: int, stripes: int) -> None:
    if key_bytes < 1 or stripes < 1:
        raise FormatError(f"AF needs key_bytes >= 1 and stripes >= 1 (got {key_bytes}, {stripes})", field="stripes")


def af_split(key: bytes | bytearray, stripes: int, hash_name: str) -> bytearray:
    """Split ``key`` into ``stripes`` x len(key) bytes: stripes-1 random ones, then key XOR the diffusion."""
    key_bytes = len(key)
    _check_shape(key_bytes, stripes)
    check_hash(hash_name)
    material = bytearray(os.urandom(key_bytes * (stripes - 1)))
    block = bytes(key_bytes)
    for start in range(0, len(material), key_bytes):
        block = diffuse(_xor(block, material[start : start + key_bytes]), hash_name)
    material += bytes(k ^ b for k, b in zip(key, block))
    return material


def af_merge(material: bytes | bytearray, key_bytes: int, stripes: int, hash_name: str) -> bytearray:
    """Recover the key from AF ``material`` (at least key_bytes x stripes bytes; extra padding is ignored)."""
    _check_shape(key_bytes, stripes)
    check_hash(hash_name)
    needed = key_bytes * stripes
    if len(material) < needed:
        raise FormatError(f"AF material is {len(material)} bytes, need {needed}", field="key material")
    view = memoryview(material)
    block = bytes(key_bytes)
    for start in range(0, needed - key_bytes, key_bytes):
        block = diffuse(_xor(block, view[start : start + key_bytes]), hash_name)
    last = view[needed - key_bytes : needed]
    return bytearray(m ^ b for m, b in zip(last, block))
