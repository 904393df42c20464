"""PBKDF2 known answers (RFC 6070 for SHA-1, RFC 7914 section 11 for SHA-256) and the benchmark."""

from __future__ import annotations

import time

import pytest

from qcrypt.crypto.kdf import (
    MAX_ITERATIONS,
    benchmark_pbkdf2,
    digest_size,
    iterations_for,
    pbkdf2,
    scale_iterations,
    supported_hashes,
)
from qcrypt.crypto.secret import secret, wipe
from qcrypt.errors import UnsupportedFeatureError
from tests._pbkdf import measured_rate

KAT = [
    pytest.param("sha1", b"password", b"salt", 1, 20, "0c60c80f961f0e71f3a9b524af6012062fe037a6", id="rfc6070-1"),
    pytest.param("sha1", b"password", b"salt", 2, 20, "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957", id="rfc6070-2"),
    pytest.param("sha1", b"password", b"salt", 4096, 20, "4b007901b765489abead49d926f721d065a429c1", id="rfc6070-4096"),
    pytest.param(
        "sha1",
        b"passwordPASSWORDpassword",
        b"saltSALTsaltSALTsaltSALTsaltSALTsalt",
        4096,
        25,
        "3d2eec4fe41c849b80c8d83662c0e44a8b291a964cf2f07038",
        id="rfc6070-long",
    ),
    pytest.param("sha1", b"pass\0word", b"sa\0lt", 4096, 16, "56fa6aa75548099dcc37d7f03425e0c3", id="rfc6070-nul"),
    pytest.param(
        "sha256",
        b"passwd",
        b"salt",
        1,
        64,
        "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        "49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783",
        id="rfc7914-sha256",
    ),
]


@pytest.mark.parametrize(("hash_name", "password", "salt", "iterations", "length", "expected"), KAT)
def test_pbkdf2_known_answers(
    hash_name: str, password: bytes, salt: bytes, iterations: int, length: int, expected: str
) -> None:
    derived = pbkdf2(hash_name, password, salt, iterations, length)
    assert isinstance(derived, bytearray)
    assert derived.hex() == expected


def test_pbkdf2_accepts_bytearray_password() -> None:
    assert pbkdf2("sha1", bytearray(b"password"), b"salt", 2, 20) == pbkdf2("sha1", b"password", b"salt", 2, 20)


@pytest.mark.parametrize("bad", ["md5", "SHA256", "whirlpool", ""])
def test_unsupported_hash(bad: str) -> None:
    with pytest.raises(UnsupportedFeatureError):
        pbkdf2(bad, b"p", b"s", 1, 20)


def test_zero_iterations_refused() -> None:
    with pytest.raises(UnsupportedFeatureError):
        pbkdf2("sha256", b"p", b"s", 0, 20)


def test_supported_hashes_include_luks_basics() -> None:
    assert {"sha1", "sha256", "sha512"} <= set(supported_hashes())
    assert digest_size("sha1") == 20
    assert digest_size("sha512") == 64


def test_benchmark_is_short_and_positive() -> None:
    start = time.perf_counter()
    rate = benchmark_pbkdf2("sha256", 64)
    assert time.perf_counter() - start < 2.0
    reference = measured_rate("sha256", 64)
    assert reference / 3 <= rate <= reference * 3, (rate, reference)


def test_iterations_for_respects_minimum_and_scale() -> None:
    assert iterations_for("sha1", 32, 1, minimum=10**8) == 10**8
    expected = measured_rate("sha512", 64) * 10 // 1000
    assert max(1000, expected // 3) <= iterations_for("sha512", 64, 10) <= max(1000, expected * 3)
    assert scale_iterations(400_000, 2000, 1000) == 800_000
    assert scale_iterations(400_000, 125, 1000) == 50_000
    assert scale_iterations(100, 2000, 1000) == 1000
    assert scale_iterations(10**12, 2000, 1000) == MAX_ITERATIONS


def test_wipe_and_secret_context() -> None:
    key = pbkdf2("sha256", b"pw", b"salt", 1, 32)
    view = memoryview(key)
    with pytest.raises(RuntimeError), secret(key) as inside:
        assert inside is key and any(key)
        raise RuntimeError
    assert key == bytearray(32) and view.nbytes == 32  # wiped in place, even on error
    wipe(None)
    wipe(memoryview(b"read-only"))  # silently ignored
    words = bytearray(b"\xff" * 16)
    wipe(memoryview(words).cast("Q"))
    assert words == bytearray(16)
