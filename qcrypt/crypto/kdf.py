"""PBKDF2 as used by LUKS1 (keyslots and the master-key digest), plus the iteration-count benchmark.

References: RFC 8018 section 5.2 (PBKDF2); cryptsetup lib/luks1/keymanage.c (slot and digest iteration
conventions, minimum 1000); ../shared/docs/formats.md D.4.
"""

from __future__ import annotations

import hashlib
import time

from qcrypt.errors import UnsupportedFeatureError

# Hashes accepted for LUKS1 hash_spec (lowercase, as QEMU requires). cryptsetup refuses HMACs shorter than
# 20 bytes, so md5 is excluded. ripemd160 is added below only if this OpenSSL build still provides it.
_LUKS_HASHES = ("sha1", "sha224", "sha256", "sha384", "sha512")
MAX_ITERATIONS = 0xFFFFFFFF  # the on-disk field is a u32
_BENCH_MIN_SECONDS = 0.05
_BENCH_START_ITERATIONS = 1000


def _hash_available(hash_name: str) -> bool:
    try:
        hashlib.new(hash_name)
    except (ValueError, TypeError):
        return False
    return True


def supported_hashes() -> tuple[str, ...]:
    """Hash names usable as LUKS1 hash_spec by qcrypt."""
    extra = ("ripemd160",) if _hash_available("ripemd160") else ()
    return _LUKS_HASHES + extra


def check_hash(hash_name: str) -> None:
    """Raise UnsupportedFeatureError unless ``hash_name`` is a supported (lowercase) LUKS hash."""
    if hash_name not in supported_hashes():
        raise UnsupportedFeatureError(f"unsupported hash {hash_name!r} (supported: {', '.join(supported_hashes())})")


def digest_size(hash_name: str) -> int:
    """Digest length in bytes of a supported hash."""
    check_hash(hash_name)
    return hashlib.new(hash_name).digest_size


def pbkdf2(hash_name: str, password: bytes | bytearray, salt: bytes, iterations: int, length: int) -> bytearray:
    """PBKDF2-HMAC-``hash_name``; the result is a bytearray so the caller can wipe it."""
    check_hash(hash_name)
    if iterations < 1 or length < 1:
        raise UnsupportedFeatureError(f"PBKDF2 needs iterations >= 1 and length >= 1 (got {iterations}, {length})")
    return bytearray(hashlib.pbkdf2_hmac(hash_name, password, salt, iterations, length))


def benchmark_pbkdf2(hash_name: str, key_bytes: int) -> int:
    """PBKDF2 iterations per second of CPU time for a ``key_bytes`` output (a ~50-100 ms measurement)."""
    check_hash(hash_name)
    password, salt = b"qcrypt-benchmark", bytes(32)
    iterations = _BENCH_START_ITERATIONS
    while True:
        start = time.thread_time()
        hashlib.pbkdf2_hmac(hash_name, password, salt, iterations, key_bytes)
        elapsed_s = time.thread_time() - start
        if elapsed_s >= _BENCH_MIN_SECONDS or iterations >= MAX_ITERATIONS // 2:
            return max(1, int(iterations / max(elapsed_s, 1e-6)))
        # jump close to the target time in one step once we have a usable measurement
        factor = _BENCH_MIN_SECONDS / elapsed_s if elapsed_s > 0.005 else 8.0
        iterations = min(MAX_ITERATIONS // 2, int(iterations * min(max(factor * 1.1, 2.0), 64.0)))


def scale_iterations(rate_per_s: int, time_ms: int, minimum: int) -> int:
    """``rate_per_s`` x ``time_ms``, at least ``minimum`` and at most the u32 maximum."""
    return min(MAX_ITERATIONS, max(minimum, rate_per_s * time_ms // 1000))


def iterations_for(hash_name: str, key_bytes: int, iter_time_ms: int, minimum: int = 1000) -> int:
    """Iterations that take about ``iter_time_ms`` here (cryptsetup's --iter-time), never below ``minimum``."""
    return scale_iterations(benchmark_pbkdf2(hash_name, key_bytes), iter_time_ms, minimum)
