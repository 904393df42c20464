"""Scanning paths: walk files and folders (each file once) and inspect them, in worker processes for many."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterable, Iterator

from qcrypt.audit.inspect import inspect_image
from qcrypt.audit.report import ImageReport
from qcrypt.images.backing import ChainRules


def iter_files(paths: Iterable[str]) -> Iterator[str]:
    """Every file under ``paths`` once (by device and inode), following symlinks without looping.

    FIFOs, sockets and character devices met in a folder are skipped; block devices and /proc-like files
    (regular files on a kernel pseudo filesystem, e.g. behind a symlink) are listed and then reported as
    ``special`` without being read (see :func:`scan_files`)."""
    seen_files: set[tuple[int, int]] = set()
    seen_dirs: set[tuple[int, int]] = set()
    for top in paths:
        yield from _walk(top, seen_files, seen_dirs)


def _walk(path: str, seen_files: set[tuple[int, int]], seen_dirs: set[tuple[int, int]]) -> Iterator[str]:
    try:
        st = os.stat(path)
    except OSError:
        yield path  # reported as missing/unreadable by inspect
        return
    key = (st.st_dev, st.st_ino)
    if stat.S_ISDIR(st.st_mode):
        if key in seen_dirs:
            return
        seen_dirs.add(key)
        try:
            names = sorted(os.listdir(path))
        except OSError:
            yield path
            return
        for name in names:
            yield from _walk(os.path.join(path, name), seen_files, seen_dirs)
    elif (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)) and key not in seen_files:
        seen_files.add(key)
        yield path


SCAN_BATCH = 64  # images per task when inspecting in worker processes


def _inspect_batch(
    paths: list[str], rules: ChainRules | None, declared: dict[str, str], named: frozenset[str]
) -> list[ImageReport]:
    return [
        inspect_image(
            path, rules=rules, declared_format=declared.get(os.path.realpath(path)), allow_block=path in named
        )
        for path in paths
    ]


def scan(
    paths: Iterable[str],
    *,
    jobs: int = 1,
    progress: Callable[[ImageReport], None] | None = None,
    rules: ChainRules | None = None,
    declared: dict[str, str] | None = None,
) -> list[ImageReport]:
    """Inspect every file under ``paths``; ``progress`` is called once per finished image."""
    paths = list(paths)
    return scan_files(
        list(iter_files(paths)), jobs=jobs, progress=progress, rules=rules, declared=declared, named=paths
    )


def scan_files(
    files: list[str],
    *,
    jobs: int = 1,
    progress: Callable[[ImageReport], None] | None = None,
    rules: ChainRules | None = None,
    declared: dict[str, str] | None = None,
    named: Iterable[str] | None = None,
) -> list[ImageReport]:
    """Inspect ``files`` (already walked by :func:`iter_files`), in order.

    ``rules``: where backing files may be besides each image's folder. ``declared``: real path -> format the
    domain XML declares for it (never probed then). ``named``: the paths the operator named; only those are
    read when they are block devices (a block device met in a folder walk is reported, not read). None means
    every file was named.

    With ``jobs`` > 1, batches of images are inspected in forked worker processes (parsing holds the GIL,
    so threads would not help).
    """
    from qcrypt.plumbing.parallel import ordered_map

    named_set = frozenset(files if named is None else named)
    batches = [(files[i : i + SCAN_BATCH], rules, declared or {}, named_set) for i in range(0, len(files), SCAN_BATCH)]
    workers = jobs if len(batches) > 1 else 1
    reports: list[ImageReport] = []
    with contextlib.closing(ordered_map(_inspect_batch, batches, workers=workers, in_flight=2 * workers)) as results:
        for batch in results:
            for report in batch:
                if progress:
                    progress(report)
            reports += batch
    return reports
