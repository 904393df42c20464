"""The scan report of one image (typed), its JSON form, and the summary of many.

The JSON form (:meth:`ImageReport.to_json`) is what ``scan --format json``, ``info --json``, the Ansible
modules and :func:`qcrypt.inspect` give; its fields are documented in docs/REFERENCE.md, "Report fields".
Inside qcrypt every layer uses the typed report.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from qcrypt.errors import FormatError, QcryptIOError
from qcrypt.model import findings as F
from qcrypt.model.encryption import Encryption
from qcrypt.model.findings import Finding, Severity

MISSING = "missing"  # the format of a path that does not exist


@dataclass(frozen=True)
class ChainLayer:
    """One layer below the top of a backing chain, as far as the chain report needs it."""

    path: str
    format: str
    encryption: Encryption
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"path": self.path, "format": self.format, "encryption": self.encryption.value}
        if self.error:
            found["error"] = self.error
        return found


@dataclass
class ImageReport:
    """What the auditor found about one image and its backing chain (headers only, no passphrase)."""

    path: str
    format: str  # qcow2 | qcow | luks | raw | missing | directory | special
    format_version: int | None
    virtual_size: int | None  # bytes
    encryption: Encryption
    findings: list[Finding]
    backing_file: str | None
    backing_chain: list[ChainLayer]
    error: str | None = None
    domains: list[str] | None = None  # libvirt domains using the image (scan with domain XML only)

    @property
    def severity(self) -> Severity:
        return F.worst(f.severity for f in self.findings)

    @property
    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    @property
    def has_legacy(self) -> bool:
        """True if the image or a layer of its backing chain uses legacy AES encryption."""
        return bool(self.codes & {F.LEGACY_AES, F.LEGACY_AES_BACKING})

    @property
    def chain_paths(self) -> list[str]:
        """The paths of the layers below the image, top down."""
        return [layer.path for layer in self.backing_chain]

    @property
    def layers(self) -> list[tuple[str, Encryption]]:
        """The image and every layer of its backing chain, top down: (path, encryption)."""
        return [(self.path, self.encryption), *((layer.path, layer.encryption) for layer in self.backing_chain)]

    @property
    def encrypted_paths(self) -> list[str]:
        """The image and chain layers that are encrypted (either way), top down."""
        return [path for path, encryption in self.layers if encryption is not Encryption.NONE]

    @property
    def encrypted_anywhere(self) -> bool:
        return bool(self.encrypted_paths)

    @property
    def legacy_paths(self) -> list[str]:
        """The image and chain layers that use legacy AES encryption, top down."""
        return [path for path, encryption in self.layers if encryption is Encryption.LEGACY_AES]

    def refused_backing(self) -> Finding | None:
        """The first finding saying a backing file was refused by the chain rules, if any."""
        return next((f for f in self.findings if f.code in F.BACKING_REFUSED), None)

    def add(self, finding: Finding) -> None:
        self.findings.append(finding)

    def error_to_raise(self) -> Exception:
        """The one error ``qcrypt info`` and ``qcrypt migrate`` raise for an image whose report has an error:
        the same text (naming the file once) and so the same exit code as ``scan`` shows."""
        error = self.error or "unreadable"
        if self.format == MISSING:
            return FileNotFoundError(2, "No such file or directory", self.path)
        if F.UNREADABLE in self.codes:
            return QcryptIOError(f"{self.path}: {error}")
        return FormatError(error.removeprefix(f"{self.path}: "), path=self.path)

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "path": self.path,
            "format": self.format,
            "format_version": self.format_version,
            "virtual_size": self.virtual_size,
            "encryption": self.encryption.value,
            "severity": self.severity.value,
            "findings": [f.as_dict() for f in self.findings],
            "backing_file": self.backing_file,
            "backing_chain": [layer.to_json() for layer in self.backing_chain],
        }
        if self.error:
            found["error"] = self.error
        if self.domains is not None:
            found["domains"] = self.domains
        return found


@dataclass
class ImageDetails(ImageReport):
    """The scan report plus the layout details ``qcrypt info`` shows."""

    cluster_size: int | None = None  # bytes
    backing_format: str | None = None
    allocated_bytes: int | None = None  # guest bytes backed by data in the image's own active table
    snapshots: list[dict[str, Any]] = field(default_factory=list)  # JSON form of each internal snapshot
    features: dict[str, list[str]] | None = None  # qcow2 feature bits by name, per mask
    luks: dict[str, Any] | None = None  # JSON form of the LUKS header

    def to_json(self) -> dict[str, Any]:
        found = super().to_json()
        found.update(
            cluster_size=self.cluster_size,
            backing_format=self.backing_format,
            allocated_bytes=self.allocated_bytes,
            snapshots=self.snapshots,
            features=self.features,
        )
        if self.luks is not None:
            found["luks"] = self.luks
        return found


@dataclass
class ScanSummary:
    """Counts over many reports (the ``summary`` of ``scan --format json``)."""

    images: int = 0
    by_encryption: dict[str, int] = field(default_factory=dict)
    by_format: dict[str, int] = field(default_factory=dict)
    by_severity: dict[str, int] = field(default_factory=dict)
    legacy: int = 0

    @classmethod
    def of(cls, reports: Iterable[ImageReport]) -> ScanSummary:
        summary = cls()
        for r in reports:
            summary.images += 1
            for counts, value in (
                (summary.by_encryption, r.encryption.value),
                (summary.by_format, r.format),
                (summary.by_severity, r.severity.value),
            ):
                counts[value] = counts.get(value, 0) + 1
            summary.legacy += r.has_legacy
        return summary

    def to_json(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "by_encryption": self.by_encryption,
            "by_format": self.by_format,
            "by_severity": self.by_severity,
            "legacy": self.legacy,
        }
