"""The verification digest: XXH3-128 from the xxhash wheel, SHA-256 as the fallback."""

from __future__ import annotations

import hashlib

import pytest

from qcrypt.plumbing import checksum


def test_xxh3_128_is_the_default_and_matches_the_reference_vector() -> None:
    # XXH3_128bits of the empty input, canonical (big-endian) form, from the xxHash reference test suite
    assert checksum.name() == "xxh3_128"
    assert checksum.digest(b"").hex() == "99aa06d3014798d86001c324468d497f"
    assert len(checksum.digest(bytes(1 << 20))) == 16


@pytest.mark.parametrize("name", ["xxh3_128", "sha256"])
def test_digest_sees_one_flipped_bit_and_takes_every_buffer_type(name: str) -> None:
    previous = checksum.use(name)
    try:
        data = bytearray(b"\x5a" * 70000)
        reference = checksum.digest(bytes(data))
        assert checksum.digest(data) == checksum.digest(memoryview(data)) == reference
        data[65536] ^= 0x01
        assert checksum.digest(data) != reference
    finally:
        checksum.use(previous)


def test_fallback_is_sha256() -> None:
    previous = checksum.use("sha256")
    try:
        assert checksum.name() == "sha256"
        assert checksum.digest(b"abc") == hashlib.sha256(b"abc").digest()
    finally:
        checksum.use(previous)
