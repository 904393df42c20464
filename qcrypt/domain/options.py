"""What migrate-domain is asked to do (:class:`DomainOptions`), what it plans per disk (:class:`DiskPlan`) and
what it did (:class:`DomainOutcome`); errors tagged with the disk they are about.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qcrypt.errors import (
    QcryptError,
)
from qcrypt.images.backing import ChainRules
from qcrypt.plumbing.outputs import Placement

DEFAULT_BACKUP_DIR = "/var/lib/qcrypt/backups"
ESTIMATE_BYTES_PER_S = 100 * 1024 * 1024  # conservative migrate rate on 2 cores (docs/BENCHMARKS.md)
LUKS_HEADER_BYTES = 16 * 1024 * 1024  # upper bound of a LUKS1 header area plus qcow2 metadata slack
NEW_SECRET = "(new secret)"
RECORD_IDENT = "qcrypt-migrate-domain"
PassphraseSource = Callable[[], bytearray]
PASSPHRASE_FILE = "passphrase file"
SECRET_VALUE = "libvirt secret"
RANDOM_CONTENT_OPTION = "--accept-random-content"


@dataclass
class DomainOptions:
    to: str | None = None  # None: qcow2-luks for qcow/qcow2 disks, luks for raw-driver disks
    replace: bool = False
    dry_run: bool = False
    start: bool = False
    iter_time_ms: int = 2000
    iterations: int | None = None
    backup_dir: str = DEFAULT_BACKUP_DIR
    output_dir: str | None = None  # where new images of block disks go (a block device has no "beside")
    fallback_passphrase: PassphraseSource | None = field(default=None, repr=False)
    progress: Callable[[int], None] | None = None
    rules: ChainRules | None = None  # --allow-backing-dir (each disk adds its declared <backingStore> layers)
    accept_unverified_passphrase: bool = False  # legacy layers without data cannot check the passphrase
    accept_random_content: bool = False  # legacy plaintext that looks random is the guest's (encrypted inside)
    fallback_label: str = PASSPHRASE_FILE  # where fallback_passphrase comes from: "passphrase file", "prompt"...
    precheck: bool = True  # False: plan sizes only (no secret, passphrase, lock or secret-usage check)
    on_disk: Callable[[str, DiskPlan], None] | None = None  # called with (domain, disk) before a disk is migrated


@dataclass
class DiskPlan:
    target: str
    source: str
    new_path: str
    to: str
    virtual_size: int
    allocated_size: int | None
    secret_uuid: str | None
    secret_created: bool
    flatten: bool
    source_type: str
    legacy_layers: list[str]
    replace: bool = False  # the new image takes the source's name; the original is kept as *.qcrypt-orig
    xml_only: bool = False  # the image is LUKS already: only the XML changes
    old_images: list[str] = field(default_factory=list)
    passphrase_from: str | None = None  # "libvirt secret" | DomainOptions.fallback_label (| "... without its
    # trailing newline")
    layer_secrets: dict[str, str] = field(default_factory=dict)  # backing layer path -> its own secret's UUID
    old_secret_uuid: str | None = None  # a private secret left untouched: the new disk gets a new secret
    notes: list[str] = field(default_factory=list)  # what the pre-checks found that the operator should know
    unchecked_images: list[str] = field(default_factory=list)  # old images not checked to be what qcrypt read
    image_users: dict[str, list[str]] = field(default_factory=dict)  # old image -> domains/images still using it
    placement: Placement | None = field(default=None, repr=False)  # the new image, by folder descriptor
    source_id: tuple[int, int] | None = field(default=None, repr=False)  # the source file qcrypt read
    source_format: str | None = None  # the disk's format as its XML declares it
    passphrase_verified: bool | None = None  # after migrating a legacy disk: did its data confirm the passphrase
    rules: ChainRules | None = field(default=None, repr=False)  # where its backing chain may reach

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "source": self.source,
            "new_path": self.new_path,
            "to": self.to,
            "virtual_size": self.virtual_size,
            "allocated_size": self.allocated_size,
            "secret_uuid": self.secret_uuid,
            "secret_created": self.secret_created,
            "flatten": self.flatten,
            "legacy_layers": self.legacy_layers,
            "old_images": self.old_images,
            "passphrase_from": self.passphrase_from,
            "xml_only": self.xml_only,
            "unchecked_images": self.unchecked_images,
            "passphrase_verified": self.passphrase_verified,
            "layer_secrets": self.layer_secrets,
            "old_secret_uuid": self.old_secret_uuid,
            "notes": self.notes,
            "old_image_users": self.image_users,
        }

    @property
    def work_bytes(self) -> int:
        """Bytes the migration reads and writes (for progress and the time estimate)."""
        if self.to in ("luks", "raw") or self.allocated_size is None:
            return self.virtual_size
        return self.allocated_size


@dataclass
class SnapshotOutcome:
    """A snapshot libvirt has registered for the domain, and what became of its metadata."""

    name: str
    status: str  # planned | redefined | not redefined
    detail: str
    backup: str | None = None  # its old XML

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "backup": self.backup}


@dataclass
class DomainOutcome:
    name: str
    status: str = "unchanged"  # migrated | unchanged | planned | skipped | failed
    reason: str | None = None
    disks: list[DiskPlan] = field(default_factory=list)
    xml_backup: str | None = None
    xml_diff: str = ""
    started: bool | None = None
    start_error: str | None = None
    undo_errors: list[str] = field(default_factory=list)  # what a failed run could not put back, and why
    users_checked: list[str] = field(default_factory=list)  # where other users of the old images were looked for
    users_unknown: list[str] = field(default_factory=list)  # why that look was incomplete (then: no shred advice)
    record: str | None = None  # the syslog record of the change, or why there is none
    snapshots: list[SnapshotOutcome] = field(default_factory=list)
    space: list[str] = field(default_factory=list)
    estimated_seconds: float | None = None
    state: str | None = None  # the domain's state when it was looked at ("shut off", "running", ...)
    error: QcryptError | None = field(default=None, repr=False)
    error_disk: str | None = None  # the disk target the error is about (None: the domain as a whole)
    error_path: str | None = None  # that disk's image

    def as_dict(self) -> dict[str, Any]:
        error = None
        if self.error is not None:
            error = {
                "code": self.error.code,
                "disk": self.error_disk,
                "path": self.error_path,
                "message": str(self.error),
            }
        return {
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "state": self.state,
            "error": error,
            "disks": [d.as_dict() for d in self.disks],
            "xml_backup": self.xml_backup,
            "xml_diff": self.xml_diff,
            "started": self.started,
            "start_error": self.start_error,
            "free_space": self.space,
            "estimated_seconds": self.estimated_seconds,
            "undo_errors": self.undo_errors,
            "users_checked": self.users_checked,
            "users_unknown": self.users_unknown,
            "record": self.record,
            "snapshots": [s.as_dict() for s in self.snapshots],
        }


def _tag(error: BaseException, target: str | None, path: str | None) -> None:
    """Note which disk an error is about (the first, innermost, tag wins)."""
    if getattr(error, "disk_target", None) is None:
        error.disk_target, error.disk_path = target, path  # type: ignore[attr-defined]


@contextlib.contextmanager
def _about_disk(target: str | None, path: str | None) -> Any:
    try:
        yield
    except (QcryptError, OSError) as e:
        _tag(e, target, path)
        raise
