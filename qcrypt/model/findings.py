"""Findings: the stable codes, their severities and the typed :class:`Finding` every layer reports with.

Codes are part of the public interface (JSON, Prometheus, hook): never rename one. The grading rules that
decide which findings a LUKS header or a qcow2 image earns are in :mod:`qcrypt.audit.grading`.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

LEGACY_AES = "legacy-aes"
LEGACY_AES_BACKING = "legacy-aes-backing"
LUKS_LOW_ITERATIONS = "luks-low-iterations"
LUKS_PREDICTABLE_IV = "luks-predictable-iv"
LUKS_ECB = "luks-ecb"
LUKS_SHA1 = "luks-sha1"
LUKS_SHORT_KEY = "luks-short-key"
LUKS_PLAIN_IV_WRAPS = "luks-plain-iv-wraps"
LUKS2_NOT_QEMU = "luks2-not-qemu"
LUKS2_CHECKSUM = "luks2-checksum-mismatch"
LUKS1_UNALIGNED_PAYLOAD = "luks1-unaligned-payload"
LUKS_NO_ACTIVE_KEYSLOT = "luks-no-active-keyslot"
LUKS1_QEMU_REFUSES_LAYOUT = "luks1-qemu-refuses-layout"
LUKS1_UNSUPPORTED_ALGORITHM = "luks1-unsupported-algorithm"
QCOW2_UNKNOWN_INCOMPATIBLE = "qcow2-unknown-incompatible-features"
QCOW2_CORRUPT = "qcow2-corrupt"
QCOW2_DIRTY = "qcow2-dirty"
QCOW2_EXTERNAL_DATA = "qcow2-external-data-file"
UNPARSEABLE = "unparseable"
UNREADABLE = "unreadable"
BACKING_MISSING = "backing-missing"
BACKING_LOOP = "backing-loop"
BACKING_NOT_LOCAL = "backing-not-local"
BACKING_TOO_DEEP = "backing-too-deep"
LEGACY_COMPRESSED_PLAINTEXT = "legacy-aes-compressed-plaintext"
BACKING_OUTSIDE_STORAGE = "backing-outside-storage"
BACKING_NOT_OWNER_READABLE = "backing-not-owner-readable"
BACKING_SPECIAL_FILE = "backing-special-file"
SPECIAL_FILE = "special-file"
BACKING_REFUSED = (BACKING_OUTSIDE_STORAGE, BACKING_NOT_OWNER_READABLE, BACKING_SPECIAL_FILE)
LIMIT_EXCEEDED = "limit-exceeded"

MIN_PBKDF2_ITERATIONS = 1000  # cryptsetup's minimum for a LUKS1 keyslot
STRONG_CIPHER_KEY_BITS = 256  # cryptsetup's default: AES-256 (a 512-bit XTS key holds two 256-bit keys)
CRYPTSETUP_ALIGN_SECTORS = 2048


class Severity(str, enum.Enum):
    """How bad a finding is, in rising order; an image's severity is its worst finding's ("ok" if none)."""

    OK = "ok"
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _SEVERITY_ORDER.index(self)

    def __str__(self) -> str:
        return self.value


_SEVERITY_ORDER = list(Severity)


def worst(severities: Iterable[Severity]) -> Severity:
    """The highest of ``severities``; OK when there are none."""
    return max(severities, key=lambda s: s.rank, default=Severity.OK)


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity.value, "message": self.message}


def legacy_aes(format_name: str, snapshot_count: int, *, parseable: bool = True) -> Finding:
    snaps = f"; its {snapshot_count} internal snapshot(s) hold legacy ciphertext too" if snapshot_count else ""
    advice = (
        "migrate with 'qcrypt migrate'"
        if parseable
        else "its header cannot be parsed (see the unparseable finding): qcrypt cannot migrate it as it is"
    )
    return Finding(
        LEGACY_AES,
        Severity.CRITICAL,
        f"{format_name} legacy AES-CBC encryption (passphrase used as key, predictable IVs): QEMU system "
        f"emulators refuse it; {advice}{snaps}",
    )


def legacy_aes_backing(paths: list[str]) -> Finding:
    return Finding(
        LEGACY_AES_BACKING,
        Severity.CRITICAL,
        "backing chain holds legacy AES-encrypted layer(s): " + ", ".join(paths),
    )


def legacy_compressed_plaintext(clusters: int, *, at_least: bool = False) -> Finding:
    count = f"at least {clusters}" if at_least else f"{clusters}"
    return Finding(
        LEGACY_COMPRESSED_PLAINTEXT,
        Severity.CRITICAL,
        f"{count} compressed cluster(s) are stored unencrypted (QEMU never encrypts compressed "
        "clusters of legacy AES images): their data is readable without the passphrase",
    )


def unparseable(format_name: str, error: str) -> Finding:
    return Finding(UNPARSEABLE, Severity.WARNING, f"looks like {format_name} but cannot be parsed: {error}")


def limit_exceeded(error: str) -> Finding:
    return Finding(
        LIMIT_EXCEEDED,
        Severity.WARNING,
        f"its header declares more than qcrypt inspects (see docs/SECURITY.md, 'Limits'): {error}",
    )


def unreadable(error: str) -> Finding:
    return Finding(UNREADABLE, Severity.WARNING, f"cannot be read: {error}")


def backing_missing(path: str) -> Finding:
    return Finding(BACKING_MISSING, Severity.WARNING, f"backing file {path} does not exist; the chain is incomplete")


def backing_loop(path: str) -> Finding:
    return Finding(BACKING_LOOP, Severity.WARNING, f"backing chain loops back to {path}")


def backing_not_local(name: str) -> Finding:
    return Finding(BACKING_NOT_LOCAL, Severity.INFO, f"backing file {name!r} is not a local file; not inspected")


def backing_too_deep(depth: int) -> Finding:
    return Finding(
        BACKING_TOO_DEEP, Severity.WARNING, f"backing chain deeper than {depth} layers; not followed further"
    )


def backing_outside(image: str, name: str, real: str, storage: tuple[str, ...]) -> Finding:
    where = real if real == name else f"{name} ({real})"
    return Finding(
        BACKING_OUTSIDE_STORAGE,
        Severity.WARNING,
        f"backing file {where} of {image} lies outside the image's storage ({', '.join(storage)}): "
        "not followed. If the administrator trusts that folder, rerun with --allow-backing-dir "
        f"{os.path.dirname(real) or real}",
    )


def backing_not_owner_readable(image: str, real: str, owner: str, problem: str) -> Finding:
    return Finding(
        BACKING_NOT_OWNER_READABLE,
        Severity.CRITICAL,
        f"backing file {real} of {image} is not readable by the image's owner {owner}: {problem}; "
        "not followed (its content would end up in their disk). Someone who can write the image "
        "named it: check the image; if the file really is its base, let the owner read it",
    )


def backing_special(image: str, real: str, reason: str) -> Finding:
    return Finding(
        BACKING_SPECIAL_FILE,
        Severity.CRITICAL,
        f"backing file {real} of {image} is {reason}: never read. If it really is the disk's base, "
        "declare it in the domain XML (<backingStore type='block'>); otherwise remove the reference",
    )


def special_file(reason: str) -> Finding:
    return Finding(
        SPECIAL_FILE,
        Severity.INFO,
        f"{reason}, not a disk image file: never read (name a block device explicitly to inspect it)",
    )
