"""Does decrypted data look like a disk? (legacy AES has no key check: formats.md B.1 item 6)

A wrong legacy passphrase decrypts every sector to uniformly random bytes. Real disks are full of zero runs,
partition tables, filesystem magic and low-entropy metadata. We sample allocated clusters across the image
and call the passphrase plausible as soon as one sample shows structure. Data that is itself random (a guest
that encrypts its own disk) fails this test: the caller offers --force for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

SECTOR = 512
RANDOM_ENTROPY_BITS = 7.2  # per byte, over a 4 KiB window; random data measures ~7.95
WINDOW = 4096
SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (510, b"\x55\xaa", "MBR/boot sector"),
    (512, b"EFI PART", "GPT header"),
    (1080, b"\x53\xef", "ext2/3/4 superblock"),
    (3, b"NTFS    ", "NTFS boot sector"),
    (0, b"XFSB", "XFS superblock"),
    (512, b"LABELONE", "LVM label"),
    (4086, b"SWAPSPACE2", "Linux swap"),
    (0, b"LUKS\xba\xbe", "LUKS header"),
    (32769, b"CD001", "ISO 9660"),
    (65600, b"_BHRfS_M", "btrfs superblock"),
)


@dataclass(frozen=True)
class Verdict:
    plausible: bool
    reason: str
    samples: int


def _entropy_bits(window: np.ndarray) -> float:
    counts = np.bincount(window, minlength=256)
    p = counts[counts > 0] / window.size
    return float(-(p * np.log2(p)).sum())


def _structure(guest_offset: int, data: bytes) -> str | None:
    for offset, magic, name in SIGNATURES:
        start = offset - guest_offset
        if start >= 0 and data[start : start + len(magic)] == magic:
            return name
    arr = np.frombuffer(data, dtype=np.uint8)
    sectors = arr[: len(arr) // SECTOR * SECTOR].reshape(-1, SECTOR)
    if len(sectors) and not sectors.any(axis=1).all():
        return "zero-filled sectors"
    for start in range(0, len(arr) - WINDOW + 1, WINDOW):
        if _entropy_bits(arr[start : start + WINDOW]) < RANDOM_ENTROPY_BITS:
            return "low-entropy data"
    return None


def judge(samples: Iterable[tuple[int, bytes]]) -> Verdict:
    """``samples`` = (guest_offset, plaintext) pairs; plausible if any shows disk structure. No sample at all
    is not plausible either: nothing was checked (``samples`` == 0 tells the caller why)."""
    count = 0
    for guest_offset, data in samples:
        count += 1
        found = _structure(guest_offset, data)
        if found:
            return Verdict(True, f"{found} at guest offset {guest_offset}", count)
    if count == 0:
        return Verdict(False, "no encrypted data cluster to check: the passphrase is unverified", 0)
    return Verdict(False, f"all {count} sampled clusters decrypt to random-looking data", count)


def sample(extents: Iterable[tuple[int, int]], limit: int = 32, seed: int = 0) -> list[tuple[int, int]]:
    """Up to ``limit`` extents spread over the image, always the first one (where the boot sector lives).

    Reservoir sampling: one pass, memory bounded by ``limit`` whatever the number of extents."""
    import random

    rng = random.Random(seed)
    chosen: list[tuple[int, int]] = []
    first: tuple[int, int] | None = None
    for seen, extent in enumerate(extents):
        if first is None:
            first = extent
            continue
        if len(chosen) < limit - 1:
            chosen.append(extent)
        else:
            slot = rng.randrange(seen)
            if slot < limit - 1:
                chosen[slot] = extent
    return ([first] if first else []) + sorted(chosen)
