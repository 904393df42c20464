"""The auditor: classify images by container and encryption and grade them (headers only, no passphrase).

``inspect_image(path)`` never raises: whatever the path, it returns an :class:`ImageReport` (its JSON form is
documented in docs/REFERENCE.md, "Report fields"). :mod:`qcrypt.audit.walk` scans many paths.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from qcrypt.audit import grading
from qcrypt.audit.report import ChainLayer, ImageReport
from qcrypt.errors import LimitExceededError, QcryptError
from qcrypt.formats import qcow2 as qcow2_fmt
from qcrypt.images.backing import BackingRefusedError, ChainContext, ChainRules, open_backing, resolve_backing
from qcrypt.images.probe import QCOW_FORMATS, declared_container, open_qcow_image
from qcrypt.images.qcow1_reader import QCowImage
from qcrypt.images.qcow2_reader import QCow2Image, feature_names
from qcrypt.model import findings as F
from qcrypt.model.clusters import Snapshot
from qcrypt.model.encryption import Encryption
from qcrypt.plumbing import limits
from qcrypt.plumbing.files import ImageFile, RawFile, SpecialFileError, open_image_file

CRYPT_METHOD_OFFSET = {"qcow2": 32, "qcow": 36}  # header byte offset of crypt_method


@dataclass
class ImageInfo:
    """The facts an inspection gathers before grading (the JSON report is built from it)."""

    path: str
    format: str
    format_version: int | None = None
    virtual_size: int | None = None
    encryption: Encryption = Encryption.NONE
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


def _inspect_luks(
    image: ImageFile, offset: int, length: int, info: ImageInfo, *, raw: bool, layer: bool = False
) -> None:
    from qcrypt.luks import header as luks_header
    from qcrypt.luks import luks2

    read_at = luks_header.file_reader(image.fh, offset, length, path=image.path)
    version = int.from_bytes(read_at(6, 2), "big") if length >= 8 else 0
    # what the header says, even if it fails to parse
    info.encryption = Encryption.LUKS2 if version == 2 else Encryption.LUKS1
    if version == 2 and layer:  # a layer below the top: its kind is all the chain needs (JSON not parsed)
        return
    if version == 2:
        hdr2 = luks2.read_luks2(read_at, length, path=image.path)
        info.encryption = Encryption.LUKS2
        info.luks = hdr2.describe()
        info.findings += grading.grade_luks2(hdr2)
        if raw:
            info.virtual_size = hdr2.payload_bytes(image.file_size)
        return
    hdr = luks_header.read_header(read_at, length, path=image.path)
    info.encryption = Encryption.LUKS1
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
        info.encryption = Encryption.LEGACY_AES
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
        if info.encryption is Encryption.NONE:
            info.encryption = _declared_encryption(info.path, info.format, info.format_version)
        if info.encryption is Encryption.LEGACY_AES:  # legacy AES stays reported whatever else is wrong
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
    if info.encryption is Encryption.NONE:
        info.encryption = _declared_encryption(info.path, info.format, info.format_version)
    if info.encryption is Encryption.LEGACY_AES and not any(f.code == F.LEGACY_AES for f in info.findings):
        info.findings.append(F.legacy_aes(info.format, 0, parseable=False))


def _declared_encryption(path: str, format_name: str, version: int | None) -> Encryption:
    """The encryption a header's fixed fields declare: qcow/qcow2 crypt_method, the LUKS version."""
    if format_name == "luks":
        return Encryption.LUKS2 if version == 2 else Encryption.LUKS1
    if format_name not in ("qcow", "qcow2"):
        return Encryption.NONE
    try:
        with open_image_file(path) as fh:
            method_field = os.pread(fh.fileno(), 4, CRYPT_METHOD_OFFSET[format_name])
    except OSError:
        return Encryption.NONE
    method = int.from_bytes(method_field, "big") if len(method_field) == 4 else 0
    if method == qcow2_fmt.CRYPT_AES:
        return Encryption.LEGACY_AES
    if method == qcow2_fmt.CRYPT_LUKS and format_name == "qcow2":
        return Encryption.LUKS1  # QEMU's qcow2 encryption is LUKS1 only
    return Encryption.NONE


def _inspect_open(path: str, fh: BinaryIO, info: ImageInfo, *, layer: bool = False) -> None:
    kind = declared_container(info.declared_format, fh)
    info.format = kind.format
    info.format_version = kind.version
    if kind.format in QCOW_FORMATS:
        image = open_qcow_image(path, _dup(fh), kind.format)
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
        if len(chain) >= limits.MAX_CHAIN_DEPTH:
            problems.append(F.backing_too_deep(limits.MAX_CHAIN_DEPTH))
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


def build_report(info: ImageInfo, chain: list[ImageInfo], chain_findings: list[F.Finding]) -> ImageReport:
    findings = list(info.findings) + chain_findings
    legacy_layers = [layer.path for layer in chain if layer.encryption is Encryption.LEGACY_AES]
    if legacy_layers:
        findings.append(F.legacy_aes_backing(legacy_layers))
    return ImageReport(
        path=info.path,
        format=info.format,
        format_version=info.format_version,
        virtual_size=info.virtual_size,
        encryption=info.encryption,
        findings=findings,
        backing_file=info.backing_file,
        backing_chain=[ChainLayer(layer.path, layer.format, layer.encryption, layer.error) for layer in chain],
        error=info.error,
    )


def inspect_image(
    path: str | os.PathLike[str],
    *,
    rules: ChainRules | None = None,
    declared_format: str | None = None,
    allow_block: bool = True,
) -> ImageReport:
    """The scan report of one image, backing chain included. Never raises for bad input.

    ``rules``: where backing files may be (beyond the image's folder; see qcrypt.images.backing).
    ``declared_format``: the disk's format as the domain XML declares it (its ``<driver type>``; "luks" for a
    raw driver with ``<encryption format='luks'>``): the file is read as that, never probed."""
    try:
        path_text = os.fspath(path)
        os.stat(path_text)
    except (TypeError, ValueError) as e:
        bad = ImageInfo(path=repr(path), format="missing", error=f"not a usable path: {e}")
        return build_report(bad, [], [])
    except OSError:
        pass  # inspect_one reports missing or unreadable files
    info = inspect_one(path_text, declared_format=declared_format, rules=rules, allow_block=allow_block)
    chain, chain_findings = walk_chain(info)
    return build_report(info, chain, chain_findings)


# -- walking paths ----------------------------------------------------------------------------------------


# -- details for one image (qcrypt info) -------------------------------------------------------------------
