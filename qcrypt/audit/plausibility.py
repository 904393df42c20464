"""Does decrypted data look like a disk? (legacy AES has no key check: docs/FORMATS.md B.1 item 6)

A wrong legacy passphrase decrypts every sector to uniformly random bytes. Real disks are full of zero runs,
partition tables, filesystem magic and low-entropy metadata. We sample allocated clusters across the image
and call the passphrase plausible as soon as one sample shows structure. Data that is itself random (a guest
that encrypts its own disk) fails this test: the caller offers --force for it.

Every test works on 512-byte sectors as well as on 4 KiB windows, so samples smaller than 4 KiB (512 B-2 KiB
clusters, extended-L2 subclusters, qcow v1 overlays) are judged as soundly as large ones. A sector of random
bytes holds no byte value 24 times or more (probability below 4e-15 per sector: 256 x C(512, 24) / 256^24) and
its byte entropy measures 7.59 +- 0.03 bits, far above the 7.0-bit threshold. docs/PLAUSIBILITY.md has the
false-refusal and false-acceptance rates measured on real content at every cluster size
(``scripts/plausibility-rates``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from qcrypt.model.units import SECTOR

RANDOM_ENTROPY_BITS = 7.2  # per byte, over a 4 KiB window; random data measures ~7.95
WINDOW = 4096
SECTOR_RANDOM_ENTROPY_BITS = 7.0  # per byte, over one 512-byte sector; random sectors measure 7.59 +- 0.03
SECTOR_MAX_REPEATS = 24  # one byte value this many times in a sector: random data, < 4e-15 per sector
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
    return _sector_structure(sectors)


def _sector_structure(sectors: np.ndarray) -> str | None:
    """Structure visible within single 512-byte sectors: a byte value repeated, or low byte entropy."""
    if not len(sectors):
        return None
    rows = np.arange(len(sectors), dtype=np.int64)[:, None] * 256
    counts = np.bincount((rows + sectors).ravel(), minlength=len(sectors) * 256).reshape(len(sectors), 256)
    if (counts.max(axis=1) >= SECTOR_MAX_REPEATS).any():
        return "repeated byte values"
    p = counts / SECTOR
    logs = np.log2(p, out=np.zeros_like(p), where=p > 0)
    if (-(p * logs).sum(axis=1) < SECTOR_RANDOM_ENTROPY_BITS).any():
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
