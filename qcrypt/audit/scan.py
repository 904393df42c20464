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
from typing import Any, BinaryIO

import numpy as np

from qcrypt.audit import grading
from qcrypt.errors import FormatError, LimitExceededError, QcryptError, QcryptIOError
from qcrypt.formats import luks1 as luks1_fmt
from qcrypt.formats import qcow2 as qcow2_fmt
from qcrypt.images.backing import BackingRefusedError, ChainContext, ChainRules, open_backing
from qcrypt.images.qcow1_reader import QCowImage
from qcrypt.images.qcow2_reader import QCow2Image, WalkBudget, feature_names
from qcrypt.model import findings as F
from qcrypt.model.clusters import Snapshot
from qcrypt.plumbing import limits
from qcrypt.plumbing.files import ImageFile, RawFile, SpecialFileError, open_image_file

SEVERITIES = ("ok", "info", "warning", "critical")
SEVERITY_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}
MAX_CHAIN_DEPTH = limits.MAX_CHAIN_DEPTH
PROBE_BYTES = 8
CRYPT_METHOD_OFFSET = {"qcow2": 32, "qcow": 36}  # header byte offset of crypt_method

Report = dict[str, Any]


@dataclass
class Probe:
    """What the first bytes of a file say it is."""

    format: str  # qcow2 | qcow | luks | raw
    version: int | None = None


def probe(path: str) -> Probe:
    """Recognise the container from its magic (qcow and qcow2 share one; LUKS1/2 dispatch on version).

    Only for files nobody declared a format for: a disk the domain XML declares raw is never probed."""
    with open_image_file(path) as fh:
        return probe_file(fh)


def probe_file(fh: BinaryIO) -> Probe:
    """:func:`probe` on an open file (its position is not used)."""
    head = os.pread(fh.fileno(), PROBE_BYTES, 0)
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
    declared_format: str | None = None  # the format the domain XML (or the layer above) declares
    chain_context: ChainContext | None = field(default=None, repr=False)  # set when the file was opened


# -- per-format inspection -----------------------------------------------------------------------------


def open_image(path: str, fh: BinaryIO | None = None, declared_format: str | None = None) -> ImageFile:
    """Open a qcow2 or qcow file with the right reader (raises FormatError for anything else). With ``fh``,
    that open file is used (and owned by the result); ``declared_format`` ("qcow" or "qcow2") skips probing."""
    if fh is None:
        fh = open_image_file(path)
    try:
        kind = declared_format or probe_file(fh).format
        return QCowImage(fh, path) if kind == "qcow" else QCow2Image(fh, path)
    except BaseException:
        fh.close()
        raise


QCOW_FORMATS = ("qcow", "qcow2")


def declared_container(declared_format: str | None, fh: BinaryIO) -> Probe:
    """What to read a file as: its declared format when there is one (a raw disk's content is guest data,
    never parsed as an image; "luks" = raw driver with LUKS encryption declared), else what its magic says."""
    if declared_format is None:
        return probe_file(fh)
    if declared_format in QCOW_FORMATS or declared_format == "luks":
        return Probe(declared_format)
    return Probe("raw")


def _inspect_luks(
    image: ImageFile, offset: int, length: int, info: ImageInfo, *, raw: bool, layer: bool = False
) -> None:
    from qcrypt.luks import engine as luks
    from qcrypt.luks import luks2

    read_at = luks.file_reader(image.fh, offset, length, path=image.path)
    version = int.from_bytes(read_at(6, 2), "big") if length >= 8 else 0
    info.encryption = "luks2" if version == 2 else "luks1"  # what the header says, even if it fails to parse
    if version == 2 and layer:  # a layer below the top: its kind is all the chain needs (JSON not parsed)
        return
    if version == 2:
        hdr2 = luks2.read_luks2(read_at, length, path=image.path)
        info.encryption = "luks2"
        info.luks = hdr2.describe()
        info.findings += grading.grade_luks2(hdr2)
        if raw:
            info.virtual_size = hdr2.payload_bytes(image.file_size)
        return
    hdr = luks.read_header(read_at, length, path=image.path)
    info.encryption = "luks1"
    info.luks = hdr.describe()
    info.findings += grading.grade_luks1(hdr, raw=raw)
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
        info.findings += grading.grade_qcow2_features(image)
        crypto = image.crypto_header()
        if crypto:
            _inspect_luks(image, crypto[0], crypto[1], info, raw=False, layer=layer)
    if h.crypt_method == qcow2_fmt.CRYPT_AES:
        info.findings.append(F.legacy_aes(info.format, info.snapshot_count))


def inspect_one(
    path: str,
    *,
    fh: BinaryIO | None = None,
    declared_format: str | None = None,
    rules: ChainRules | None = None,
    allow_block: bool = True,
    layer: bool = False,
) -> ImageInfo:
    """Inspect one file's own headers (not its backing chain). Errors become ``info.error``.

    ``fh``: the file, already opened (a backing layer opened by the chain rules); it stays open.
    ``declared_format``: the format the domain XML declares ("raw" content is never parsed as an image).
    ``allow_block``: read a block device (explicitly named ones are; those found in a folder walk are not).
    ``layer``: the file is a layer below the top of a chain; only what the chain report needs is read (the
    snapshot count from the header, the LUKS version), so that a deep chain costs what one image does."""
    info = ImageInfo(path=path, format="raw", declared_format=declared_format)
    own = fh is None
    try:
        if fh is None:
            if stat.S_ISDIR(os.stat(path).st_mode):
                info.format, info.error = "directory", "is a directory"
                return info
            fh = open_image_file(path, allow_block=allow_block)
            info.chain_context = ChainContext.for_top(path, fh, rules)
        try:
            _inspect_open(path, fh, info, layer=layer)
        finally:
            if own:
                fh.close()
    except SpecialFileError as e:
        info.format, info.error = "special", str(e)
        info.findings.append(F.special_file(str(e).removeprefix(f"{path}: file type: ")))
    except FileNotFoundError:
        info.format, info.error = "missing", "no such file"
    except LimitExceededError as e:
        info.error = str(e)
        info.findings.append(F.limit_exceeded(str(e)))
        if info.encryption == "none":
            info.encryption = _declared_encryption(info.path, info.format, info.format_version)
        if info.encryption == "aes-cbc-legacy":  # legacy AES stays reported whatever else is wrong
            info.findings.append(F.legacy_aes(info.format, info.snapshot_count))
    except QcryptError as e:
        info.error = str(e)
        _unparseable(info, str(e))
    except OSError as e:
        info.error = e.strerror or str(e)
        info.findings.append(F.unreadable(info.error))
    except (ValueError, TypeError, ArithmeticError, LookupError, RecursionError, MemoryError) as e:
        # a parser bug must not abort a fleet scan: report the file as unparseable and go on
        info.error = f"{path}: internal error while parsing ({type(e).__name__}: {e})"
        _unparseable(info, info.error)
    return info


def _unparseable(info: ImageInfo, error: str) -> None:
    """An image whose headers do not parse still says how it is encrypted: keep that (a legacy AES image with
    a damaged header is still legacy AES, not "none")."""
    info.findings.append(F.unparseable(info.format, error))
    if info.encryption == "none":
        info.encryption = _declared_encryption(info.path, info.format, info.format_version)
    if info.encryption == "aes-cbc-legacy" and not any(f.code == F.LEGACY_AES for f in info.findings):
        info.findings.append(F.legacy_aes(info.format, 0, parseable=False))


def _declared_encryption(path: str, format_name: str, version: int | None) -> str:
    """The encryption a header's fixed fields declare: qcow/qcow2 crypt_method, the LUKS version."""
    if format_name == "luks":
        return "luks2" if version == 2 else "luks1"
    if format_name not in ("qcow", "qcow2"):
        return "none"
    try:
        with open_image_file(path) as fh:
            method_field = os.pread(fh.fileno(), 4, CRYPT_METHOD_OFFSET[format_name])
    except OSError:
        return "none"
    method = int.from_bytes(method_field, "big") if len(method_field) == 4 else 0
    if method == qcow2_fmt.CRYPT_AES:
        return "aes-cbc-legacy"
    if method == qcow2_fmt.CRYPT_LUKS and format_name == "qcow2":
        return "luks1"  # QEMU's qcow2 encryption is LUKS1 only
    return "none"


def _inspect_open(path: str, fh: BinaryIO, info: ImageInfo, *, layer: bool = False) -> None:
    kind = declared_container(info.declared_format, fh)
    info.format = kind.format
    info.format_version = kind.version
    if kind.format in QCOW_FORMATS:
        image = open_image(path, _dup(fh), kind.format)
        with image:
            _inspect_qcow(image, info, layer=layer)
    elif kind.format == "luks":
        with RawFile(_dup(fh), path) as raw:
            _inspect_luks(raw, 0, raw.file_size, info, raw=True)
    else:
        info.virtual_size = _size_of(fh)


def _dup(fh: BinaryIO) -> BinaryIO:
    """A second file object on the same open file (the readers close theirs)."""
    return os.fdopen(os.dup(fh.fileno()), "rb")


def _size_of(fh: BinaryIO) -> int:
    st = os.fstat(fh.fileno())
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fh.fileno(), 0, os.SEEK_END)
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
    """Inspect every layer below ``top`` that the chain rules let qcrypt open (see qcrypt.images.backing); catch
    refused backing files, loops, missing files and non-local backing files."""
    chain: list[ImageInfo] = []
    problems: list[F.Finding] = []
    ctx = top.chain_context
    if ctx is None:
        return chain, problems
    seen: set[tuple[int, int]] = set()
    with contextlib.suppress(OSError):
        st = os.stat(top.path)
        seen.add((st.st_dev, st.st_ino))
    current = top
    while current.backing_file:
        backing = resolve_backing(current.path, current.backing_file)
        if backing is None:
            problems.append(F.backing_not_local(current.backing_file))
            break
        if len(chain) >= MAX_CHAIN_DEPTH:
            problems.append(F.backing_too_deep(MAX_CHAIN_DEPTH))
            break
        try:
            fh, declared = open_backing(current.path, backing, ctx)
        except FileNotFoundError:
            chain.append(ImageInfo(path=backing, format="missing", error="no such file"))
            problems.append(F.backing_missing(backing))
            break
        except BackingRefusedError as e:
            problems.append(e.finding)
            break
        except OSError as e:
            layer = ImageInfo(path=backing, format="raw", error=e.strerror or str(e))
            layer.findings.append(F.unreadable(layer.error or ""))
            chain.append(layer)
            break
        with fh:
            st = os.fstat(fh.fileno())
            if (st.st_dev, st.st_ino) in seen:
                problems.append(F.backing_loop(backing))
                break
            seen.add((st.st_dev, st.st_ino))
            layer_format = (
                declared.format
                if declared and declared.format
                else ("raw" if current.backing_format == "raw" else None)
            )
            layer = inspect_one(backing, fh=fh, declared_format=layer_format, layer=True)
        chain.append(layer)
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


def inspect(
    path: str | os.PathLike[str],
    *,
    rules: ChainRules | None = None,
    declared_format: str | None = None,
    allow_block: bool = True,
) -> Report:
    """The scan report of one image, backing chain included. Never raises for bad input.

    ``rules``: where backing files may be (beyond the image's folder; see qcrypt.images.backing).
    ``declared_format``: the disk's format as the domain XML declares it (its ``<driver type>``; "luks" for a
    raw driver with ``<encryption format='luks'>``): the file is read as that, never probed."""
    try:
        path = os.fspath(path)
        os.stat(path)
    except (TypeError, ValueError) as e:
        bad = ImageInfo(path=repr(path), format="missing", error=f"not a usable path: {e}")
        return build_report(bad, [], [])
    except OSError:
        pass  # inspect_one reports missing or unreadable files
    info = inspect_one(path, declared_format=declared_format, rules=rules, allow_block=allow_block)
    chain, chain_findings = walk_chain(info)
    return build_report(info, chain, chain_findings)


def report_error(report: Report) -> Exception:
    """The one error ``qcrypt info`` and ``qcrypt migrate`` raise for an image whose report has an ``error``:
    the same text (naming the file once) and so the same exit code as ``scan`` shows."""
    path, error = report["path"], report["error"]
    if report["format"] == "missing":
        return FileNotFoundError(2, "No such file or directory", path)
    if any(f["code"] == F.UNREADABLE for f in report["findings"]):
        return QcryptIOError(f"{path}: {error}")
    return FormatError(error.removeprefix(f"{path}: "), path=path)


def has_legacy(report: Report) -> bool:
    """True if the image or a layer of its backing chain uses legacy AES encryption."""
    return any(f["code"] in (F.LEGACY_AES, F.LEGACY_AES_BACKING) for f in report["findings"])


# -- walking paths ----------------------------------------------------------------------------------------


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
) -> list[Report]:
    return [
        inspect(path, rules=rules, declared_format=declared.get(os.path.realpath(path)), allow_block=path in named)
        for path in paths
    ]


def scan(
    paths: Iterable[str],
    *,
    jobs: int = 1,
    progress: Callable[[Report], None] | None = None,
    rules: ChainRules | None = None,
    declared: dict[str, str] | None = None,
) -> list[Report]:
    """Inspect every file under ``paths``; ``progress`` is called once per finished image."""
    paths = list(paths)
    return scan_files(
        list(iter_files(paths)), jobs=jobs, progress=progress, rules=rules, declared=declared, named=paths
    )


def scan_files(
    files: list[str],
    *,
    jobs: int = 1,
    progress: Callable[[Report], None] | None = None,
    rules: ChainRules | None = None,
    declared: dict[str, str] | None = None,
    named: Iterable[str] | None = None,
) -> list[Report]:
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
        for key, value in (
            ("by_encryption", r["encryption"]),
            ("by_format", r["format"]),
            ("by_severity", r["severity"]),
        ):
            summary[key][value] = summary[key].get(value, 0) + 1
    summary["legacy"] = sum(1 for r in reports if has_legacy(r))
    return summary


# -- details for one image (qcrypt info) -------------------------------------------------------------------


def _add_finding(report: Report, finding: F.Finding) -> None:
    report["findings"].append(finding.as_dict())
    report["severity"] = severity_of([F.Finding(**f) for f in report["findings"]])


def _add_compressed_finding(report: Report, image: ImageFile, snapshots: list[Snapshot], budget: WalkBudget) -> None:
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


def describe(path: str | os.PathLike[str], *, rules: ChainRules | None = None) -> Report:
    """Everything ``qcrypt info`` shows: the scan report plus layout details. Raises FormatError if unparseable."""
    path = os.fspath(path)
    info = inspect_one(path, rules=rules)
    if info.error:
        raise report_error(build_report(info, [], []))
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
                _add_finding(
                    report, F.limit_exceeded(f"{e}; allocated bytes and compressed clusters were not (fully) counted")
                )
    report["features"] = info.features
    if info.luks is not None:
        report["luks"] = info.luks
    return report
