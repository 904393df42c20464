"""AF splitter: inverse property (hypothesis) and fixed vectors checked against a naive model in this file."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcrypt.crypto.af import af_merge, af_split, diffuse
from qcrypt.errors import FormatError, UnsupportedFeatureError

HASHES = ["sha1", "sha256", "sha512"]


def naive_diffuse(block: bytes, hash_name: str) -> bytes:
    """docs/FORMATS.md D.3 read literally: chunk i -> first len(chunk) bytes of H(BE32(i) || chunk)."""
    size = hashlib.new(hash_name).digest_size
    out = b""
    i = 0
    while i * size < len(block):
        chunk = block[i * size : (i + 1) * size]
        counter = bytes([(i >> 24) & 0xFF, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF])
        out += hashlib.new(hash_name, counter + chunk).digest()[: len(chunk)]
        i += 1
    return out


def naive_merge(material: bytes, key_bytes: int, stripes: int, hash_name: str) -> bytes:
    block = bytes(key_bytes)
    for n in range(stripes - 1):
        stripe = material[n * key_bytes : (n + 1) * key_bytes]
        block = naive_diffuse(bytes(a ^ b for a, b in zip(block, stripe)), hash_name)
    last = material[(stripes - 1) * key_bytes : stripes * key_bytes]
    return bytes(a ^ b for a, b in zip(last, block))


def test_diffuse_sha1_partial_last_chunk() -> None:
    block = bytes(range(64))  # sha1: chunks of 20, 20, 20 and a final 4 bytes
    expected = b"".join(
        hashlib.sha1(i.to_bytes(4, "big") + block[start : start + 20]).digest()[: len(block[start : start + 20])]
        for i, start in enumerate(range(0, 64, 20))
    )
    assert diffuse(block, "sha1") == expected
    assert len(expected) == 64


def test_diffuse_fixed_vector_sha256() -> None:
    block = bytes(range(64))
    expected = hashlib.sha256(b"\0\0\0\0" + block[:32]).digest() + hashlib.sha256(b"\0\0\0\1" + block[32:]).digest()
    assert diffuse(block, "sha256") == expected


@pytest.mark.parametrize("hash_name", HASHES)
@pytest.mark.parametrize("key_bytes", [16, 32, 64])
def test_merge_fixed_material_matches_naive_model(hash_name: str, key_bytes: int) -> None:
    rng = random.Random(f"{hash_name}-{key_bytes}")
    stripes = 4000
    material = rng.randbytes(key_bytes * stripes + 300)  # trailing sector padding is ignored
    assert bytes(af_merge(material, key_bytes, stripes, hash_name)) == naive_merge(
        material, key_bytes, stripes, hash_name
    )


@pytest.mark.parametrize("hash_name", HASHES)
def test_split_merge_4000_stripes_64_byte_key(hash_name: str) -> None:
    key = bytes(range(1, 65))
    material = af_split(key, 4000, hash_name)
    assert len(material) == 64 * 4000
    assert af_merge(material, 64, 4000, hash_name) == key
    assert naive_merge(bytes(material), 64, 4000, hash_name) == key
    assert af_split(key, 4000, hash_name)[:64] != material[:64]  # random stripes


@settings(max_examples=60, deadline=None)
@given(key=st.binary(min_size=1, max_size=80), stripes=st.integers(1, 40), hash_name=st.sampled_from(HASHES))
def test_merge_inverts_split(key: bytes, stripes: int, hash_name: str) -> None:
    material = af_split(key, stripes, hash_name)
    assert len(material) == len(key) * stripes
    assert af_merge(material, len(key), stripes, hash_name) == key


def test_merge_rejects_short_material() -> None:
    with pytest.raises(FormatError):
        af_merge(bytes(100), 32, 4000, "sha256")


def test_bad_shape_and_hash() -> None:
    with pytest.raises(FormatError):
        af_split(b"", 4000, "sha256")
    with pytest.raises(FormatError):
        af_merge(bytes(64), 32, 0, "sha256")
    with pytest.raises(UnsupportedFeatureError):
        af_split(b"k" * 32, 10, "md5")
