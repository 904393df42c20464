"""PBKDF2 as used by LUKS1 (keyslots and the master-key digest), plus the iteration-count benchmark.

References: RFC 8018 section 5.2 (PBKDF2); cryptsetup lib/luks1/keymanage.c (slot and digest iteration
conventions, minimum 1000).
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time

from qcrypt.errors import LimitExceededError, UnsupportedFeatureError
from qcrypt.plumbing import limits

# Hashes accepted for LUKS1 hash_spec (lowercase, as QEMU requires). cryptsetup refuses HMACs shorter than
# 20 bytes, so md5 is excluded. ripemd160 is added below only if this OpenSSL build still provides it.
_LUKS_HASHES = ("sha1", "sha224", "sha256", "sha384", "sha512")
MAX_ITERATIONS = 0xFFFFFFFF  # the on-disk field is a u32
_BENCH_MIN_SECONDS = 0.04  # the measurement that counts lasts at least this long
_BENCH_TARGET_SECONDS = 0.06  # what the last trial is sized for (a low estimate still lands above the minimum)
_BENCH_USABLE_SECONDS = 0.002  # a shorter trial only sizes the next one
_BENCH_START_ITERATIONS = 1000
CHECKED_ITERATIONS = 1 << 17  # at or above this, a header's count is compared with the measured rate first
INTERRUPTIBLE_ITERATIONS = 1 << 16  # at or above this, PBKDF2 runs in a thread so Ctrl-C and SIGTERM act at once
_max_seconds = [limits.MAX_PBKDF2_SECONDS]


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
    """PBKDF2-HMAC-``hash_name``; the result is a bytearray so the caller can wipe it.

    hashlib releases the GIL but the main thread only runs signal handlers between bytecodes: a long
    derivation runs in a helper thread while the main thread waits in short, interruptible steps, so that
    KeyboardInterrupt (Ctrl-C, or SIGTERM where the CLI maps it) is raised within a fraction of a second."""
    check_hash(hash_name)
    if iterations < 1 or length < 1:
        raise UnsupportedFeatureError(f"PBKDF2 needs iterations >= 1 and length >= 1 (got {iterations}, {length})")
    if iterations > limits.MAX_PBKDF2_ITERATIONS:
        raise LimitExceededError(
            f"{iterations} PBKDF2 iterations exceed the limit of {limits.MAX_PBKDF2_ITERATIONS}", field="iterations"
        )
    if iterations < INTERRUPTIBLE_ITERATIONS or threading.current_thread() is not threading.main_thread():
        return bytearray(hashlib.pbkdf2_hmac(hash_name, password, salt, iterations, length))
    result: list[bytearray] = []
    failure: list[BaseException] = []

    def derive() -> None:
        try:
            result.append(bytearray(hashlib.pbkdf2_hmac(hash_name, password, salt, iterations, length)))
        except BaseException as e:  # handed to the waiting thread
            failure.append(e)

    worker = threading.Thread(target=derive, name="qcrypt-pbkdf2", daemon=True)  # abandoned on interrupt
    worker.start()
    while worker.is_alive():
        worker.join(0.05)
    if failure:
        raise failure[0]
    return result[0]


def set_max_pbkdf2_seconds(seconds: float) -> None:
    """Raise (or lower) the PBKDF2 time a header may ask of one keyslot (``migrate --max-pbkdf2-seconds``)."""
    _max_seconds[0] = seconds


def max_pbkdf2_seconds() -> float:
    return _max_seconds[0]


@functools.lru_cache(maxsize=16)
def _cached_rate(hash_name: str, length: int) -> int:
    return benchmark_pbkdf2(hash_name, length)


def pbkdf2_seconds(hash_name: str, iterations: int, length: int) -> float:
    """About how long ``iterations`` of PBKDF2 take on this machine (0 for counts too small to matter)."""
    if iterations < CHECKED_ITERATIONS:
        return 0.0
    check_hash(hash_name)
    return iterations / _cached_rate(hash_name, length)


def check_pbkdf2_cost(hash_name: str, iterations: int, length: int, *, what: str, path: str | None = None) -> None:
    """Raise LimitExceededError if a header's iteration count would cost more than the allowed seconds here."""
    if iterations > limits.MAX_PBKDF2_ITERATIONS:
        raise LimitExceededError(
            f"{iterations} PBKDF2 iterations exceed the limit of {limits.MAX_PBKDF2_ITERATIONS}", path=path, field=what
        )
    seconds = pbkdf2_seconds(hash_name, iterations, length)
    if seconds > max_pbkdf2_seconds():
        raise LimitExceededError(
            f"{iterations} PBKDF2 iterations would take about {seconds:.0f} s on this machine, more than the "
            f"{max_pbkdf2_seconds():g} s allowed (raise it with --max-pbkdf2-seconds)",
            path=path,
            field=what,
        )


def benchmark_pbkdf2(hash_name: str, key_bytes: int) -> int:
    """PBKDF2 iterations per second of CPU time for a ``key_bytes`` output: short trials size one of about
    60 ms (at least 40), which gives the rate (~65 ms in all)."""
    check_hash(hash_name)
    password, salt = b"qcrypt-benchmark", bytes(32)
    iterations = _BENCH_START_ITERATIONS
    while True:
        start = time.thread_time()
        hashlib.pbkdf2_hmac(hash_name, password, salt, iterations, key_bytes)
        elapsed_s = time.thread_time() - start
        if elapsed_s >= _BENCH_MIN_SECONDS or iterations >= MAX_ITERATIONS // 2:
            return max(1, int(iterations / max(elapsed_s, 1e-6)))
        # jump to the target time in one step once a measurement is usable (2 ms of CPU time: the thread clock
        # counts nanoseconds)
        factor = _BENCH_TARGET_SECONDS / elapsed_s if elapsed_s > _BENCH_USABLE_SECONDS else 8.0
        iterations = min(MAX_ITERATIONS // 2, int(iterations * min(max(factor, 2.0), 64.0)))


def scale_iterations(rate_per_s: int, time_ms: int, minimum: int) -> int:
    """``rate_per_s`` x ``time_ms``, at least ``minimum`` and at most the u32 maximum."""
    return min(MAX_ITERATIONS, max(minimum, rate_per_s * time_ms // 1000))


def iterations_for(hash_name: str, key_bytes: int, iter_time_ms: int, minimum: int = 1000) -> int:
    """Iterations that take about ``iter_time_ms`` here (cryptsetup's --iter-time), never below ``minimum``."""
    return scale_iterations(benchmark_pbkdf2(hash_name, key_bytes), iter_time_ms, minimum)
