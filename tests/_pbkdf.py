"""PBKDF2 speed measured in the tests themselves, independently of qcrypt's own benchmark."""

from __future__ import annotations

import hashlib
import time


def measured_rate(hash_name: str, key_bytes: int) -> float:
    """PBKDF2 iterations per CPU second, timed with hashlib directly (at least 0.05 s of CPU)."""
    iterations = 20_000
    while True:
        start = time.thread_time()
        hashlib.pbkdf2_hmac(hash_name, b"password", bytes(32), iterations, key_bytes)
        elapsed = time.thread_time() - start
        if elapsed >= 0.05:
            return iterations / elapsed
        iterations *= 4
