"""The auditor: classify images by container and encryption and grade them (headers only, no passphrase).

``inspect(path)`` never raises: whatever the path, it returns a JSON-able report (see README, "Report
fields"). ``scan(paths)`` walks files and directories and inspects each file once.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qcrypt import findings as F
from qcrypt import limits
from qcrypt.errors import FormatError, LimitExceededError, QcryptError
from qcrypt.formats import luks1 as luks1_fmt
from qcrypt.formats import qcow2 as qcow2_fmt
from qcrypt.imagefile import ImageFile, RawFile, open_image_file
from qcrypt.model import Snapshot
from qcrypt.qcow1 import QCowImage
from qcrypt.qcow2 import QCow2Image, WalkBudget, feature_names

SEVERITIES = ("ok", "info", "warning", "critical")
SEVERITY_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}
MAX_CHAIN_DEPTH = limits.MAX_CHAIN_DEPTH
PROBE_BYTES = 8

Report = dict[str, Any]


@dataclass
class Probe:
    """What the first bytes of a file say it is."""

    format: str  # qcow2 | qcow | luks | raw
    version: int | None = None


def probe(path: str) -> Probe:
    """Recognise the container from its magic (qcow and qcow2 share one; LUKS1/2 dispatch on version)."""
    with open_image_file(path) as fh:
        head = fh.read(PROBE_BYTES)
    if head[:4] == qcow2_fmt.MAGIC and len(head) == 8:
        version = int.from_bytes(head[4:8], "big")
        return Probe("qcow" if version == 1 else "qcow2", version)
    if head[:6] == luks1_fmt.MAGIC and len(head) == 8:
        return Probe("luks", int.from_bytes(head[6:8], "big"))
    return Probe("raw")


@dataclass
class ImageInfo:
    """The facts an inspection gathers before grading (the JSON report is built from it)."""

    path: str
    format: str
    format_version: int | None = None
    virtual_size: int | None = None
    encryption: str = "none"
    backing_file: str | None = None
    backing_format: str | None = None
    cluster_size: int | None = None
    features: dict[str, list[str]] | None = None
    snapshot_count: int = 0
    snapshots: list[Snapshot] = field(default_factory=list)  # parsed for the top image only (not in reports)
    luks: dict[str, Any] | None = None
    findings: list[F.Finding] = field(default_factory=list)
    error: str | None = None


# -- per-format inspection -----------------------------------------------------------------------------


def open_image(path: str) -> ImageFile:
    """Open a qcow2 or qcow file with the right reader (raises FormatError for anything else)."""
    kind = probe(path)
    if kind.format == "qcow":
        return QCowImage.open(path)
    return QCow2Image.open(path)


def _inspect_luks(image: ImageFile, offset: int, length: int, info: ImageInfo, *, raw: bool,
                  layer: bool = False) -> None:
    from qcrypt import luks, luks2

    read_at = luks.file_reader(image.fh, offset, length, path=image.path)
    version = int.from_bytes(read_at(6, 2), "big") if length >= 8 else 0
    if version == 2 and layer:  # a layer below the top: its kind is all the chain needs (JSON not parsed)
        info.encryption = "luks2"
        return
    if version == 2:
        hdr2 = luks2.read_luks2(read_at, length, path=image.path)
        info.encryption = "luks2"
        info.luks = hdr2.describe()
        info.findings += F.grade_luks2(hdr2)
        if raw:
            info.virtual_size = hdr2.payload_bytes(image.file_size)
        return
    hdr = luks.read_header(read_at, length, path=image.path)
    info.encryption = "luks1"
    info.luks = hdr.describe()
    info.findings += F.grade_luks1(hdr, raw=raw)
    if raw:
        payload_bytes = max(0, image.file_size - hdr.payload_offset * 512)
        info.virtual_size = -(-payload_bytes // 512) * 512



def _inspect_qcow(image: QCow2Image | QCowImage, info: ImageInfo, *, layer: bool) -> None:
    h = image.header
    info.format_version = h.version
    info.virtual_size = image.virtual_size
    info.cluster_size = image.cluster_size
    info.backing_file = image.backing_file
    info.backing_format = image.backing_format
    if h.crypt_method == qcow2_fmt.CRYPT_AES:  # known before anything that may fail below
        info.encryption = "aes-cbc-legacy"
    if isinstance(image, QCow2Image):
        info.snapshot_count = image.check_snapshot_table()
        if not layer:  # the layers of a chain are not described: their snapshot entries need no parsing
            info.snapshots = image.snapshots()
            info.snapshot_count = len(info.snapshots)
        info.features = feature_names(h)
        info.findings += F.grade_qcow2_features(image)
        crypto = image.crypto_header()
        if crypto:
            _inspect_luks(image, crypto[0], crypto[1], info, raw=False, layer=layer)
    if h.crypt_method == qcow2_fmt.CRYPT_AES:
        info.findings.append(F.legacy_aes(info.format, info.snapshot_count))


def inspect_one(path: str, *, layer: bool = False) -> ImageInfo:
    """Inspect one file's own headers (not its backing chain). Errors become ``info.error``.

    ``layer``: the file is a layer below the top of a chain; only what the chain report needs is read (the
    snapshot count from the header, the LUKS version), so that a deep chain costs what one image does."""
    info = ImageInfo(path=path, format="raw")
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            info.format, info.error = "directory", "is a directory"
            return info
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            info.format, info.error = "special", "not a regular file or block device (FIFO, socket, ...)"
            return info
        kind = probe(path)
        info.format = kind.format
        info.format_version = kind.version
        if kind.format in ("qcow", "qcow2"):
            with open_image(path) as image:
                _inspect_qcow(image, info, layer=layer)
        elif kind.format == "luks":
            with RawFile.open(path) as raw:
                _inspect_luks(raw, 0, raw.file_size, info, raw=True)
        else:
            info.virtual_size = _size_of(path, st)
    except FileNotFoundError:
        info.format, info.error = "missing", "no such file"
    except LimitExceededError as e:
        info.error = str(e)
        info.findings.append(F.limit_exceeded(str(e)))
        if info.encryption == "aes-cbc-legacy":  # legacy AES stays reported whatever else is wrong
            info.findings.append(F.legacy_aes(info.format, info.snapshot_count))
    except QcryptError as e:
        info.error = str(e)
        info.findings.append(F.unparseable(info.format, str(e)))
    except OSError as e:
        info.error = e.strerror or str(e)
        info.findings.append(F.unreadable(info.error))
    except (ValueError, TypeError, ArithmeticError, LookupError, RecursionError, MemoryError) as e:
        # a parser bug must not abort a fleet scan: report the file as unparseable and go on
        info.error = f"{path}: internal error while parsing ({type(e).__name__}: {e})"
        info.findings.append(F.unparseable(info.format, info.error))
    return info


def _size_of(path: str, st: os.stat_result) -> int:
    if stat.S_ISBLK(st.st_mode):
        with open(path, "rb") as fh:
            return fh.seek(0, os.SEEK_END)
    return st.st_size


# -- backing chains --------------------------------------------------------------------------------------


def resolve_backing(image_path: str, backing_file: str) -> str | None:
    """The local path QEMU would open for ``backing_file`` (relative to the image's folder), or None."""
    if backing_file.startswith("json:") or "://" in backing_file:
        return None
    if os.path.isabs(backing_file):
        return backing_file
    return os.path.join(os.path.dirname(image_path) or ".", backing_file)


def walk_chain(top: ImageInfo) -> tuple[list[ImageInfo], list[F.Finding]]:
    """Inspect every layer below ``top``; catch loops, missing files and non-local backing files."""
    chain: list[ImageInfo] = []
    problems: list[F.Finding] = []
    seen = {os.path.realpath(top.path)}
    current = top
    while current.backing_file:
        backing = resolve_backing(current.path, current.backing_file)
        if backing is None:
            problems.append(F.backing_not_local(current.backing_file))
            break
        real = os.path.realpath(backing)
        if real in seen:
            problems.append(F.backing_loop(backing))
            break
        if len(chain) >= MAX_CHAIN_DEPTH:
            problems.append(F.backing_too_deep(MAX_CHAIN_DEPTH))
            break
        seen.add(real)
        layer = inspect_one(backing, layer=True)
        chain.append(layer)
        if layer.format == "missing":
            problems.append(F.backing_missing(backing))
            break
        current = layer
    return chain, problems


# -- reports ---------------------------------------------------------------------------------------------


def severity_of(findings: Iterable[F.Finding]) -> str:
    return max((f.severity for f in findings), key=SEVERITY_RANK.__getitem__, default="ok")


def _layer_summary(layer: ImageInfo) -> dict[str, Any]:
    summary: dict[str, Any] = {"path": layer.path, "format": layer.format, "encryption": layer.encryption}
    if layer.error:
        summary["error"] = layer.error
    return summary


def build_report(info: ImageInfo, chain: list[ImageInfo], chain_findings: list[F.Finding]) -> Report:
    findings = list(info.findings) + chain_findings
    legacy_layers = [layer.path for layer in chain if layer.encryption == "aes-cbc-legacy"]
    if legacy_layers:
        findings.append(F.legacy_aes_backing(legacy_layers))
    report: Report = {
        "path": info.path,
        "format": info.format,
        "format_version": info.format_version,
        "virtual_size": info.virtual_size,
        "encryption": info.encryption,
        "severity": severity_of(findings),
        "findings": [f.as_dict() for f in findings],
        "backing_file": info.backing_file,
        "backing_chain": [_layer_summary(layer) for layer in chain],
    }
    if info.error:
        report["error"] = info.error
    return report


def inspect(path: str | os.PathLike[str]) -> Report:
    """The scan report of one image, backing chain included. Never raises for bad input."""
    try:
        path = os.fspath(path)
        os.stat(path)
    except (TypeError, ValueError) as e:
        bad = ImageInfo(path=repr(path), format="missing", error=f"not a usable path: {e}")
        return build_report(bad, [], [])
    except OSError:
        pass  # inspect_one reports missing or unreadable files
    info = inspect_one(path)
    chain, chain_findings = walk_chain(info)
    return build_report(info, chain, chain_findings)


def has_legacy(report: Report) -> bool:
    """True if the image or a layer of its backing chain uses legacy AES encryption."""
    return any(f["code"] in (F.LEGACY_AES, F.LEGACY_AES_BACKING) for f in report["findings"])


# -- walking paths ----------------------------------------------------------------------------------------


def iter_files(paths: Iterable[str]) -> Iterator[str]:
    """Every file under ``paths`` once (by device and inode), following symlinks without looping."""
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
    elif stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
        if key not in seen_files:
            seen_files.add(key)
            yield path


SCAN_BATCH = 64  # images per task when inspecting in worker processes


def _inspect_batch(paths: list[str]) -> list[Report]:
    return [inspect(path) for path in paths]


def scan(
    paths: Iterable[str],
    *,
    jobs: int = 1,
    progress: Callable[[Report], None] | None = None,
) -> list[Report]:
    """Inspect every file under ``paths``; ``progress`` is called once per finished image."""
    return scan_files(list(iter_files(paths)), jobs=jobs, progress=progress)


def scan_files(
    files: list[str],
    *,
    jobs: int = 1,
    progress: Callable[[Report], None] | None = None,
) -> list[Report]:
    """Inspect ``files`` (already walked by :func:`iter_files`), in order.

    With ``jobs`` > 1, batches of images are inspected in forked worker processes (parsing holds the GIL,
    so threads would not help).
    """
    from qcrypt.parallel import ordered_map

    batches = [(files[i : i + SCAN_BATCH],) for i in range(0, len(files), SCAN_BATCH)]
    workers = jobs if len(batches) > 1 else 1
    reports: list[Report] = []
    with contextlib.closing(ordered_map(_inspect_batch, batches, workers=workers, in_flight=2 * workers)) as results:
        for batch in results:
            for report in batch:
                if progress:
                    progress(report)
            reports += batch
    return reports


def summarize(reports: list[Report]) -> dict[str, Any]:
    """Counts by encryption, format and severity (the ``summary`` of ``scan --format json``)."""
    summary: dict[str, Any] = {"images": len(reports), "by_encryption": {}, "by_format": {}, "by_severity": {}}
    for r in reports:
        for key, value in (("by_encryption", r["encryption"]), ("by_format", r["format"]),
                           ("by_severity", r["severity"])):
            summary[key][value] = summary[key].get(value, 0) + 1
    summary["legacy"] = sum(1 for r in reports if has_legacy(r))
    return summary


# -- details for one image (qcrypt info) -------------------------------------------------------------------


def _add_finding(report: Report, finding: F.Finding) -> None:
    report["findings"].append(finding.as_dict())
    report["severity"] = severity_of([F.Finding(**f) for f in report["findings"]])


def _add_compressed_finding(report: Report, image: ImageFile, snapshots: list[Snapshot], budget: WalkBudget
                            ) -> None:
    """Legacy AES images keep compressed clusters in plaintext (formats.md B.1): count them, snapshots too."""
    at_least = False
    if isinstance(image, QCowImage):
        usage = image.table_usage(budget)
        count, at_least = len(usage.compressed_offsets), usage.compressed_truncated
    else:
        assert isinstance(image, QCow2Image)
        tables = [None, *snapshots]
        usages = [image.table_usage(table, budget) for table in tables]
        count = len(np.unique(np.concatenate([u.compressed_offsets for u in usages])))
        at_least = any(u.compressed_truncated for u in usages)
    if count:
        _add_finding(report, F.legacy_compressed_plaintext(count, at_least=at_least))


def allocated_bytes_of(path: str) -> int | None:
    """Guest bytes backed by data in ``path``'s own active table (not its chain), within the inspection budget:
    the progress and time estimates of migrate and migrate-domain. None when it cannot be counted cheaply."""
    try:
        if probe(path).format not in ("qcow", "qcow2"):
            return None
        with open_image(path) as image:
            return image.allocated_bytes(WalkBudget())
    except (QcryptError, OSError):
        return None


def describe(path: str | os.PathLike[str]) -> Report:
    """Everything ``qcrypt info`` shows: the scan report plus layout details. Raises FormatError if unparseable."""
    path = os.fspath(path)
    info = inspect_one(path)
    if info.error:
        if info.format == "missing":
            raise FileNotFoundError(2, "No such file or directory", path)
        raise FormatError(info.error.removeprefix(f"{path}: "), path=path)
    chain, chain_findings = walk_chain(info)
    report = build_report(info, chain, chain_findings)
    report["cluster_size"] = info.cluster_size
    report["backing_format"] = info.backing_format
    report["allocated_bytes"] = None
    report["snapshots"] = []
    if info.format in ("qcow", "qcow2"):
        with open_image(path) as image:
            report["snapshots"] = [s.describe() for s in info.snapshots]
            budget = WalkBudget()
            try:
                report["allocated_bytes"] = image.allocated_bytes(budget)
                if info.encryption == "aes-cbc-legacy":
                    _add_compressed_finding(report, image, info.snapshots, budget)
            except LimitExceededError as e:  # the header was fine: only the layout is too big to count here
                _add_finding(report, F.limit_exceeded(f"{e}; allocated bytes and compressed clusters were not "
                                                      "(fully) counted"))
    report["features"] = info.features
    if info.luks is not None:
        report["luks"] = info.luks
    return report
