"""Which domains and disks migrate-domain changes: file/block disks whose image or backing chain uses legacy AES,
or whose LUKS image the XML still declares as qcow; each read as its XML declares it.
"""

from __future__ import annotations

from qcrypt.audit.inspect import inspect_image
from qcrypt.audit.report import ImageReport
from qcrypt.domain.options import _about_disk
from qcrypt.errors import (
    MigrationError,
    MissingPathError,
    QcryptError,
)
from qcrypt.images.backing import BackingRefusedError, ChainRules
from qcrypt.libvirt.connection import Connection
from qcrypt.libvirt.domainxml import (
    DomainDisk,
    declared_format,
    domain_from_root,
    parse_domain_root,
)
from qcrypt.model import findings as F


def _inspect(path: str, rules: ChainRules | None = None, declared: str | None = None) -> ImageReport:
    return inspect_image(path, rules=rules, declared_format=declared)


def xml_only(disk: DomainDisk, report: ImageReport) -> bool:
    """The image is LUKS already (migrated by hand) but the XML still says ``format='qcow'``: only the XML
    needs the fix (libvirt refuses to start the domain until then)."""
    return "qcow" in disk.layers[0].encryption and report.encryption.is_luks and not report.legacy_paths


def affected_disks(
    disks: tuple[DomainDisk, ...], rules: ChainRules | None = None
) -> list[tuple[DomainDisk, ImageReport]]:
    """Local file/block disks whose image or backing chain uses legacy AES, or whose LUKS image the XML still
    declares as ``format='qcow'``, with their scan reports.

    Each disk is read as the format its XML declares (a raw disk is guest data, never parsed as an image), and
    its backing chain is followed only within ``rules`` and its declared ``<backingStore>`` layers. A legacy
    disk whose chain holds a refused backing file raises BackingRefusedError (exit 8)."""
    found = []
    for disk in disks:
        top = disk.layers[0]
        if top.source_type not in ("file", "block") or not top.path:
            continue
        with _about_disk(disk.target, top.path):
            report = _affected(disk, rules)
        if report is not None:
            found.append((disk, report))
    return found


def _affected(disk: DomainDisk, rules: ChainRules | None) -> ImageReport | None:
    top = disk.layers[0]
    assert top.path is not None
    report = _inspect(top.path, disk.chain_rules(rules), declared_format(top))
    declared = any(fmt in ("qcow", "default") for fmt in top.encryption)
    if report.error:
        if declared and report.format == "missing":
            raise MissingPathError(f"disk {disk.target}: {top.path}: no such file or device")
        if declared:  # the XML says legacy but the image cannot be read: do not guess
            raise MigrationError(f"disk {disk.target}: {report.error}")
        return None
    finding = report.refused_backing()
    if finding and (report.legacy_paths or declared):
        raise BackingRefusedError(F.Finding(finding.code, finding.severity, f"disk {disk.target}: {finding.message}"))
    return report if report.legacy_paths or xml_only(disk, report) else None


def domains_to_fix(conn: Connection, rules: ChainRules | None = None) -> list[str]:
    """``--all``: every domain of the connection with an affected disk (unreadable XML is included, to fail
    visibly rather than be skipped in silence)."""
    names = []
    for name in conn.domain_names():
        try:
            if affected_disks(domain_from_root(parse_domain_root(conn.inactive_xml(name))).disks, rules):
                names.append(name)
        except QcryptError:
            names.append(name)
    return names
