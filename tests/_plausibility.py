"""Measure the wrong-passphrase guard (qcrypt.audit.plausibility) on real content, at every qcow2 cluster size.

Used by ``scripts/plausibility-rates`` (which prints the table in docs/PLAUSIBILITY.md) and by
tests/test_plausibility.py (a smaller run whose rates must be zero where the table says zero).

Content comes from this machine's own files, as a guest disk would hold them:

* ``ext4``: an ext4 file system (``mke2fs -d``) holding text, executables and compressed files;
* ``text``, ``executables``: those files back to back, no padding (no zero sectors between files);
* ``compressed``: .gz/.xz files back to back: as random as encrypted data, so refused without --force;
* ``random``: os.urandom, a guest encrypting its own disk: always refused without --force.

A trial samples clusters as qcrypt does (the first allocated one plus random others, 32 in all, at most 64 KiB
read from each), encrypts them with legacy AES under one passphrase, and judges them decrypted with the right
passphrase (a refusal is a false refusal) and with a wrong one (an acceptance is a false acceptance).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcrypt.audit import plausibility
from qcrypt.crypto.sector import legacy_cipher

CLUSTER_SIZES = tuple(512 << shift for shift in range(13))  # 512 B .. 2 MiB, every size qcow2 allows
SAMPLES = 32  # as qcrypt.audit.plausibility.sample's default
READ_LIMIT = 65536  # qcrypt reads at most this much of each sampled cluster
CONTENTS = ("ext4", "text", "executables", "compressed", "random")
RIGHT, WRONG = b"the right passphrase", b"a wrong passphrase!!"
_MKE2FS_TIMEOUT_S = 120


def _files(patterns: list[tuple[str, str]], limit_bytes: int, *, elf: bool = False) -> Iterator[Path]:
    total = 0
    for top, pattern in patterns:
        for path in sorted(Path(top).glob(pattern)):
            if total >= limit_bytes:
                return
            try:
                if not path.is_file() or path.is_symlink() or path.stat().st_size == 0:
                    continue
                if elf and path.open("rb").read(4) != b"\x7fELF":
                    continue
            except OSError:
                continue
            total += path.stat().st_size
            yield path


TEXT = [("/usr/lib/python3", "**/*.py"), ("/usr/share/doc", "*/copyright"), ("/usr/share/perl", "**/*.pm")]
EXECUTABLES = [("/usr/bin", "*"), ("/usr/sbin", "*")]
COMPRESSED = [("/usr/share/doc", "**/*.gz"), ("/usr/share/man", "**/*.gz"), ("/usr/share", "**/*.xz")]


def _concatenated(patterns: list[tuple[str, str]], size: int, *, elf: bool = False) -> bytes:
    out = bytearray()
    for path in _files(patterns, size, elf=elf):
        out += path.read_bytes()
        if len(out) >= size:
            break
    if len(out) < size // 4:
        raise RuntimeError(f"not enough files on this machine for {patterns}")
    return bytes(out[: len(out) // 512 * 512])


def _ext4(size: int) -> bytes:
    """An ext4 file system of ``size`` bytes, about half full of this machine's files."""
    mke2fs = shutil.which("mke2fs") or shutil.which("mke2fs", path="/usr/sbin:/sbin")
    if mke2fs is None:
        raise RuntimeError("mke2fs is not installed")
    with tempfile.TemporaryDirectory(prefix="qcrypt-plaus-") as scratch:
        tree = Path(scratch) / "tree"
        for name, patterns, share, elf in (
            ("text", TEXT, 0.2, False),
            ("bin", EXECUTABLES, 0.2, True),
            ("compressed", COMPRESSED, 0.08, False),
        ):
            for index, path in enumerate(_files(patterns, int(size * share), elf=elf)):
                target = tree / name / f"{index:05d}-{path.name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        image = Path(scratch) / "fs.img"
        subprocess.run(
            [mke2fs, "-q", "-F", "-t", "ext4", "-d", str(tree), str(image), f"{size // 1024}k"],
            check=True,
            capture_output=True,
            timeout=_MKE2FS_TIMEOUT_S,
        )
        return image.read_bytes()


def content(kind: str, size: int = 24 << 20) -> bytes:
    """``size`` bytes (about) of one kind of guest content."""
    if kind == "ext4":
        return _ext4(size)
    if kind == "text":
        return _concatenated(TEXT, size)
    if kind == "executables":
        return _concatenated(EXECUTABLES, size, elf=True)
    if kind == "compressed":
        return _concatenated(COMPRESSED, size)
    if kind == "random":
        return os.urandom(size)
    raise ValueError(kind)


@dataclass
class Cell:
    content: str
    cluster_size: int
    trials: int
    false_refusals: int  # right passphrase judged wrong
    false_acceptances: int  # wrong passphrase judged plausible


def _allocated(data: bytes, cluster_size: int) -> list[int]:
    """Clusters a guest wrote something other than zeros to (a sparse image allocates only those)."""
    view = memoryview(data)
    return [
        c
        for c in range(len(data) // cluster_size)
        if view[c * cluster_size : (c + 1) * cluster_size].tobytes().count(0) != cluster_size
    ]


def _sample(allocated: list[int], rng: random.Random) -> list[int]:
    if len(allocated) <= SAMPLES:
        return allocated
    return [allocated[0], *sorted(rng.sample(allocated[1:], SAMPLES - 1))]


def _judged(data: bytes, clusters: list[int], cluster_size: int, passphrase: bytes) -> bool:
    """Encrypt the sampled clusters with the right passphrase (legacy AES, IV = guest sector), decrypt with
    ``passphrase``, and return the guard's verdict."""
    right, used = legacy_cipher(RIGHT), legacy_cipher(passphrase)
    samples = []
    for cluster in clusters:
        guest_offset = cluster * cluster_size
        plain = data[guest_offset : guest_offset + min(cluster_size, READ_LIMIT)]
        sector = guest_offset // 512
        samples.append((guest_offset, used.decrypt(right.encrypt(plain, sector), sector)))
    right.wipe()
    used.wipe()
    return plausibility.judge(samples).plausible


def measure(
    kind: str, data: bytes, cluster_size: int, trials: int, wrong_trials: int | None = None, seed: int = 0
) -> Cell:
    allocated = _allocated(data, cluster_size)
    rng = random.Random(seed)
    refusals = acceptances = 0
    for _ in range(trials):
        if not _judged(data, _sample(allocated, rng), cluster_size, RIGHT):
            refusals += 1
    wrong = trials if wrong_trials is None else wrong_trials
    for _ in range(wrong):
        if _judged(data, _sample(allocated, rng), cluster_size, WRONG):
            acceptances += 1
    return Cell(kind, cluster_size, trials, refusals, acceptances)


def random_sector_statistics(sectors: int, seed: int = 1) -> tuple[float, float, float, int]:
    """Over ``sectors`` random 512-byte sectors: (mean, std, min) byte entropy and the most repeats of one
    byte value, to compare with the guard's thresholds."""
    rng = np.random.default_rng(seed)
    entropies, repeats = [], 0
    for start in range(0, sectors, 8192):
        n = min(8192, sectors - start)
        block = rng.integers(0, 256, size=(n, 512), dtype=np.uint8)
        rows = np.arange(n, dtype=np.int64)[:, None] * 256
        counts = np.bincount((rows + block).ravel(), minlength=n * 256).reshape(n, 256)
        repeats = max(repeats, int(counts.max()))
        p = counts / 512
        entropies.append(-(p * np.log2(p, out=np.zeros_like(p), where=p > 0)).sum(axis=1))
    values = np.concatenate(entropies)
    return float(values.mean()), float(values.std()), float(values.min()), repeats
