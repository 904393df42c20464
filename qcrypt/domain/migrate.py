"""Fix a whole libvirt domain: migrate every legacy-AES disk to LUKS, then define the new XML, or change nothing.

For one domain (:func:`migrate_domain`): read the inactive XML; find the file/block disks whose image, or a
layer of its backing chain, uses legacy AES (declared in the XML or not); refuse a running or paused domain
(a dry run previews it); get each layer's passphrase from the libvirt secret its own ``<encryption>`` names
(or the caller's fallback when the secret is private or missing); pre-check everything before writing (each
passphrase against its image or layer, lock holders, secret usages, leftovers, space; a dry run stops there);
migrate each disk with :func:`qcrypt.migrate.run.migrate` (temp file, verified, atomic, locks; keyslot passphrase
= the checked passphrase); create a secret for disks that had none or a private one (its value could not be
checked); save the old XML to a backup file; define the new XML. Any failure before the define succeeds
removes this run's new files and secrets: a domain is never half-migrated. The library never prints; progress
goes to a callback.
"""

from __future__ import annotations

import contextlib
import copy
import os
import stat
import syslog
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qcrypt.audit.describe import allocated_estimate
from qcrypt.audit.inspect import inspect_image
from qcrypt.audit.report import ImageReport
from qcrypt.crypto.secret import disable_core_dumps, wipe, without_line_ending
from qcrypt.errors import (
    BadPassphraseError,
    DomainActiveError,
    LibvirtError,
    MigrationError,
    MissingPathError,
    OutputExistsError,
    PassphraseInputError,
    QcryptError,
    QcryptIOError,
    SecretConflictError,
    SecretPrivateError,
    UnsafePathError,
)
from qcrypt.images.backing import BackingRefusedError, ChainRules
from qcrypt.libvirt import usage, xmledit
from qcrypt.libvirt.connection import SHUT_OFF, Connection
from qcrypt.libvirt.domainxml import (
    DomainDisk,
    declared_format,
    domain_from_root,
    parse_domain_root,
    parse_snapshot_root,
)
from qcrypt.migrate.options import MigrateOptions
from qcrypt.migrate.passphrase_check import check_legacy_passphrase
from qcrypt.migrate.run import migrate as migrate_image
from qcrypt.model import findings as F
from qcrypt.plumbing.locking import refuse_if_in_use
from qcrypt.plumbing.outputs import Placement, file_id, leftover_temps
from qcrypt.plumbing.syslog import SYSLOG_SOCKET, printable, send_to_syslog, syslog_listening

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


# -- which disks -------------------------------------------------------------------------------------------------


def _inspect(path: str, rules: ChainRules | None = None, declared: str | None = None) -> ImageReport:
    return inspect_image(path, rules=rules, declared_format=declared)


def legacy_layers(report: ImageReport) -> list[str]:
    """Paths of the image's layers (itself first, then its backing chain) that use legacy AES."""
    return report.legacy_paths


def xml_only(disk: DomainDisk, report: ImageReport) -> bool:
    """The image is LUKS already (migrated by hand) but the XML still says ``format='qcow'``: only the XML
    needs the fix (libvirt refuses to start the domain until then)."""
    return "qcow" in disk.layers[0].encryption and report.encryption.is_luks and not legacy_layers(report)


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
    if finding and (legacy_layers(report) or declared):
        raise BackingRefusedError(F.Finding(finding.code, finding.severity, f"disk {disk.target}: {finding.message}"))
    return report if legacy_layers(report) or xml_only(disk, report) else None


# -- planning ----------------------------------------------------------------------------------------------------


def target_for(disk: DomainDisk, opts: DomainOptions) -> str:
    if opts.to:
        return opts.to
    return "luks" if disk.driver_type == "raw" else "qcow2-luks"


def new_path_for(disk: DomainDisk, to: str, opts: DomainOptions) -> str:
    from qcrypt.migrate.naming import suggested_output

    path = disk.layers[0].path
    assert path is not None
    if disk.layers[0].source_type == "block":
        if not opts.output_dir:
            raise MigrationError(
                f"disk {disk.target} is the block device {path}: give --output-dir DIR for its new image file"
            )
        return os.path.join(os.path.abspath(opts.output_dir), suggested_output(path, to, local_dir=True))
    if opts.replace:
        return path
    return suggested_output(path, to, local_dir=False)


def plan_disk(disk: DomainDisk, report: ImageReport, opts: DomainOptions) -> DiskPlan:
    top = disk.layers[0]
    if xml_only(disk, report):
        return DiskPlan(
            target=disk.target or "?",
            source=str(top.path),
            new_path=str(top.path),
            to="qcow2-luks" if report.format == "qcow2" else "luks",
            virtual_size=report.virtual_size or 0,
            allocated_size=0,
            secret_uuid=None,
            secret_created=False,
            flatten=False,
            source_type=top.source_type,
            legacy_layers=[],
            xml_only=True,
        )
    to = target_for(disk, opts)
    if to not in ("luks", "qcow2-luks"):
        raise MigrationError(f"--to {to}: migrate-domain writes encrypted images only (luks or qcow2-luks)")
    legacy = legacy_layers(report)
    flatten = any(path != report.path for path in legacy) or (to == "luks" and bool(report.backing_file))
    new_path = new_path_for(disk, to, opts)
    if not opts.replace and os.path.lexists(new_path):
        raise OutputExistsError(f"disk {disk.target}: {new_path} exists already (move it away, or use --replace)")
    return DiskPlan(
        target=disk.target or "?",
        source=str(top.path),
        new_path=new_path,
        to=to,
        virtual_size=report.virtual_size or 0,
        allocated_size=allocated_estimate(report, flatten=flatten),
        secret_uuid=None,
        secret_created=False,
        flatten=flatten,
        source_type=top.source_type,
        legacy_layers=legacy,
        replace=opts.replace and top.source_type == "file",
        source_format=declared_format(top),
        rules=disk.chain_rules(opts.rules),
    )


def check_space(plans: list[DiskPlan]) -> list[str]:
    """One line per output filesystem; raises QcryptIOError (after listing all) when one is too small."""
    needed: dict[int, tuple[str, int, int]] = {}
    for p in plans:
        if p.xml_only:
            continue
        folder = os.path.dirname(p.new_path) or "."
        st = os.statvfs(folder)
        device = os.stat(folder).st_dev
        _, total, free = needed.get(device, (folder, 0, st.f_bavail * st.f_frsize))
        needed[device] = (folder, total + p.work_bytes + LUKS_HEADER_BYTES, free)
    lines, short = [], []
    for folder, total, free in needed.values():
        ok = free >= total
        lines.append(f"{folder}: needs up to {total} bytes, {free} free: {'ok' if ok else 'NOT ENOUGH'}")
        if not ok:
            short.append(folder)
    if not short:
        return lines or ["no new image to write"]
    return [*lines, f"not enough free space in {', '.join(short)}"]


def estimate_seconds(plans: list[DiskPlan], opts: DomainOptions) -> float:
    pbkdf = 0.0 if opts.iterations else opts.iter_time_ms / 1000
    return sum(p.work_bytes / ESTIMATE_BYTES_PER_S + pbkdf for p in plans if not p.xml_only)


# -- secrets and passphrases ---------------------------------------------------------------------------------------


@dataclass
class DiskSecrets:
    """One disk's passphrases: ``passphrase`` for its image (and the new keyslot), ``layers`` for backing
    layers whose own ``<encryption>`` names another secret (by the path the XML gives)."""

    passphrase: bytearray = field(repr=False)
    layers: dict[str, bytearray] = field(default_factory=dict, repr=False)

    def by_real_path(self) -> dict[str, bytearray]:
        return {os.path.realpath(path): value for path, value in self.layers.items()}

    def wipe(self) -> None:
        for value in (self.passphrase, *self.layers.values()):
            wipe(value)


def disk_secrets(conn: Connection, disk: DomainDisk, plan: DiskPlan, opts: DomainOptions) -> DiskSecrets:
    """Each layer's passphrase from the secret its own ``<encryption>`` names: the first secret of the chain
    is the disk's (its image and the new keyslot); a backing layer naming another secret gets that one's value.
    A private secret cannot be checked against the image: the caller's fallback passphrase is used instead, and
    the new disk gets a new secret holding it (the private one stays as it is)."""
    top_ref = next((layer.secret for layer in disk.layers if layer.secret), None)
    secrets = DiskSecrets(_disk_passphrase(conn, top_ref, plan, opts))
    try:
        for layer in disk.layers[1:]:
            if layer.path and layer.secret and layer.secret != top_ref:
                uuid = conn.secret_uuid(layer.secret)
                plan.layer_secrets[layer.path] = uuid
                secrets.layers[layer.path] = _layer_passphrase(conn, uuid, layer.path, plan, opts)
    except BaseException:
        secrets.wipe()
        raise
    return secrets


def _disk_passphrase(conn: Connection, ref: str | None, plan: DiskPlan, opts: DomainOptions) -> bytearray:
    if ref:
        uuid = conn.secret_uuid(ref)
        try:
            value = conn.secret_value(uuid)
            plan.secret_uuid, plan.passphrase_from = uuid, SECRET_VALUE
            return value
        except SecretPrivateError as e:
            if plan.xml_only:  # the image is LUKS already and keeps its path: only the XML changes
                plan.secret_uuid = uuid
                plan.notes.append(
                    f"libvirt secret {uuid} is private: qcrypt cannot check that it opens this LUKS "
                    "image (only the XML changes; libvirt says so at start if it does not)"
                )
                return bytearray()
            if opts.fallback_passphrase is None:
                raise PassphraseInputError(
                    f"disk {plan.target}: {e}: give its passphrase with --passphrase-file FILE (or '-' for stdin)"
                ) from e
            plan.old_secret_uuid = uuid
            plan.notes.append(
                f"libvirt secret {uuid} is private: its value cannot be checked against the image, "
                "so the new disk gets a new secret holding the passphrase checked here (the old "
                "secret is left as it is)"
            )
    elif opts.fallback_passphrase is None:
        raise PassphraseInputError(
            f"disk {plan.target} ({plan.source}) names no libvirt secret: give its "
            "passphrase with --passphrase-file FILE (or '-' for stdin)"
        )
    plan.passphrase_from = opts.fallback_label
    assert opts.fallback_passphrase is not None
    return bytearray(opts.fallback_passphrase())


def _layer_passphrase(conn: Connection, uuid: str, path: str, plan: DiskPlan, opts: DomainOptions) -> bytearray:
    try:
        return conn.secret_value(uuid)
    except SecretPrivateError as e:
        if opts.fallback_passphrase is None:
            raise PassphraseInputError(
                f"disk {plan.target}: backing layer {path}: {e}: give its passphrase with "
                "--passphrase-file FILE (or '-' for stdin)"
            ) from e
    plan.notes.append(
        f"backing layer {path}: its libvirt secret {uuid} is private: the {opts.fallback_label} is used for it"
    )
    return bytearray(opts.fallback_passphrase())


# -- pre-checks: everything the run checks before it writes -----------------------------------------------------


def precheck_disk(
    conn: Connection,
    plan: DiskPlan,
    report: ImageReport,
    secrets: DiskSecrets,
    opts: DomainOptions,
    *,
    check_locks: bool,
) -> None:
    """Check, without writing, what would stop the migration of one disk: each passphrase against its image
    (or layer), who holds the image's locks, temporary files of another run, and the usage a new secret needs.
    Raises the error the real run would raise; notes what the operator should know in ``plan.notes``."""
    if plan.xml_only:
        if plan.passphrase_from is not None:  # None: a private secret, named in the plan's notes
            _check_xml_only_passphrase(plan, report, secrets.passphrase)
    else:
        chain = [plan.source, *report.chain_paths]
        layers = {os.path.realpath(path) for path in chain}
        strangers = [path for path in secrets.layers if os.path.realpath(path) not in layers]
        if strangers:  # the XML's <backingStore> names a file the image's chain does not reach
            raise MigrationError(
                f"the XML's <backingStore> names {strangers[0]} with a secret of its own, but it "
                f"is not a layer of {plan.source}'s chain (layers: {', '.join(chain)})"
            )
        _check_legacy_passphrases(plan, secrets, opts)
        if check_locks:
            for path in [plan.source, *report.chain_paths]:
                refuse_if_in_use(path)
        _check_leftovers(plan)
    if plan.secret_uuid is None:
        check_secret_usage(conn, plan)


def _check_legacy_passphrases(plan: DiskPlan, secrets: DiskSecrets, opts: DomainOptions) -> None:
    fallback = _file_fallback(plan, secrets.passphrase)

    def check(passphrase: bytearray) -> bool:
        return check_legacy_passphrase(
            plan.source,
            passphrase,
            force=opts.accept_random_content,
            accept_unverified=opts.accept_unverified_passphrase,
            rules=plan.rules,
            source_format=plan.source_format,
            passphrases=secrets.by_real_path(),
            random_option=RANDOM_CONTENT_OPTION,
        ).verified

    try:
        try:
            plan.passphrase_verified = check(secrets.passphrase)
        except BadPassphraseError as exact_error:
            if fallback is None or bytes(fallback) == bytes(secrets.passphrase):
                raise
            try:
                plan.passphrase_verified = check(fallback)
            except BadPassphraseError:
                raise BadPassphraseError(
                    f"{exact_error} (tried the {opts.fallback_label}'s exact bytes, and without its trailing newline)"
                ) from None
            _use_fallback(plan, secrets.passphrase, fallback)
    finally:
        if fallback is not None:
            wipe(fallback)


def _check_leftovers(plan: DiskPlan) -> None:
    """Temporary files of other runs for the new image: a killed run's are removed by the real run; one whose
    process still runs is left alone (that run's lock on the source stops this one, see precheck_disk)."""
    final = os.path.realpath(plan.source) if plan.replace else plan.new_path
    for path, pid, alive in leftover_temps(final):
        if alive:
            plan.notes.append(
                f"temporary file {path} belongs to process {pid}, which still runs: the real run leaves it"
            )
        else:
            plan.notes.append(f"leftover temporary file {path} of a killed run (PID {pid}): the real run removes it")


def check_secret_usage(conn: Connection, plan: DiskPlan) -> None:
    """A new secret for the new image needs the usage 'volume NEW_PATH': refuse now (before any copy) when a
    secret has it already, naming the domains that use that secret."""
    holder = conn.secret_by_usage(plan.new_path)
    if holder is None:
        return
    if holder == plan.old_secret_uuid:
        how = (
            "qcrypt cannot prove it opens the image, nor define a second secret for the same path"
            if plan.xml_only
            else "rerun without --replace (the new image then gets a name, and a secret, of its own)"
        )
        raise SecretConflictError(
            f"the disk's own libvirt secret {holder} is private and its usage is volume "
            f"{plan.new_path}, the new image's path: {how}"
        )
    users = [name for name in conn.domain_names() if holder in conn.inactive_xml(name)]
    if users:
        raise SecretConflictError(
            f"libvirt secret {holder} already has usage volume {plan.new_path}, which a new "
            f"secret for the new image needs, and domain {', '.join(users)} uses it: "
            f"look at it (virsh secret-dumpxml {holder}) before anything else"
        )
    raise SecretConflictError(
        f"libvirt secret {holder} already has usage volume {plan.new_path} (left by an "
        f"earlier run?), which a new secret for the new image needs; no domain uses it: "
        f"remove it with 'virsh secret-undefine {holder}', then rerun"
    )


# -- one domain ----------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What this run created, so that a failure can undo it."""

    conn: Connection
    outputs: list[DiskPlan] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    backup: str | None = None

    def undo(self) -> list[str]:
        """Put every original back under its name (--replace) or remove the new image: through the folder
        descriptor opened before the migration, on names checked by inode, never on a path resolved again.
        Returns what could not be undone, and why."""
        problems = []
        for plan in reversed(self.outputs):
            if plan.placement is not None:
                try:
                    plan.placement.undo()
                except UnsafePathError as e:
                    problems.append(str(e))
                except OSError as e:
                    problems.append(f"disk {plan.target}: {e.strerror or e}")
        for uuid in self.secrets:
            with contextlib.suppress(LibvirtError):
                self.conn.undefine_secret(uuid)
        if self.backup:
            with contextlib.suppress(OSError):
                os.unlink(self.backup)
        return problems

    def close(self) -> None:
        for plan in self.outputs:
            if plan.placement is not None:
                plan.placement.close()
                plan.placement = None


def migrate_domain(conn: Connection, name: str, opts: DomainOptions) -> DomainOutcome:
    """Plan (``opts.dry_run``) or carry out the fix of one domain. Errors land in the outcome, never raised."""
    outcome = DomainOutcome(name=name)
    try:
        _migrate_domain(conn, name, opts, outcome)
    except DomainActiveError as e:
        outcome.status, outcome.reason, outcome.error = "skipped", str(e), e
    except QcryptError as e:
        outcome.status, outcome.reason, outcome.error = "failed", str(e), e
    except OSError as e:
        error = QcryptIOError(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
        _tag(error, getattr(e, "disk_target", None), getattr(e, "disk_path", None))
        outcome.status, outcome.reason, outcome.error = "failed", str(error), error
    if outcome.error is not None:
        outcome.error_disk = getattr(outcome.error, "disk_target", None)
        outcome.error_path = getattr(outcome.error, "disk_path", None)
    return outcome


def _migrate_domain(conn: Connection, name: str, opts: DomainOptions, outcome: DomainOutcome) -> None:
    old_xml = conn.inactive_xml(name)
    root = parse_domain_root(old_xml)
    found = affected_disks(domain_from_root(root).disks, opts.rules)
    if not found:
        outcome.reason = "no disk uses legacy AES encryption: nothing to do"
        return
    outcome.state = state = conn.domain_state(name)
    active = state != SHUT_OFF
    if active and not opts.dry_run:
        raise DomainActiveError(f"{state}: shut it down first")
    for disk, report in found:
        with _about_disk(disk.target, disk.layers[0].path):
            outcome.disks.append(plan_disk(disk, report, opts))
    outcome.space = check_space(outcome.disks)
    outcome.estimated_seconds = round(estimate_seconds(outcome.disks, opts), 1)
    if outcome.space[-1].startswith("not enough") and opts.precheck:
        raise QcryptIOError(outcome.space[-1])
    secrets: list[DiskSecrets] = []
    disable_core_dumps()  # secrets (libvirt secret values, passphrases) stay out of core dumps
    try:
        for (disk, report), plan in zip(found, outcome.disks):  # every check first: fail before writing
            if not opts.precheck:
                break
            with _about_disk(plan.target, plan.source):
                secrets.append(disk_secrets(conn, disk, plan, opts))
                # a running domain's own QEMU may hold its images' locks: the real run checks them once it is off
                precheck_disk(conn, plan, report, secrets[-1], opts, check_locks=not active)
        if opts.dry_run:
            _plan_only(conn, root, outcome)
            if active:
                outcome.reason = f"{state}: the real run needs it shut off"
            return
        _migrate_checked(conn, name, root, old_xml, found, secrets, opts, outcome)
    finally:
        for disk_secret in secrets:
            disk_secret.wipe()
    if opts.start:
        _start(conn, name, outcome)


def _migrate_checked(
    conn: Connection,
    name: str,
    root: Any,
    old_xml: str,
    found: list[tuple[DomainDisk, ImageReport]],
    secrets: list[DiskSecrets],
    opts: DomainOptions,
    outcome: DomainOutcome,
) -> None:
    run = _Run(conn)
    try:
        try:
            new_root = _carry_out(conn, root, secrets, opts, outcome, run)
            old_text, new_text = xmledit.serialize(copy.deepcopy(root)), xmledit.serialize(new_root)
            outcome.xml_diff = xmledit.unified_diff(name, old_text, new_text)
            run.backup = save_backup(old_xml, name, opts.backup_dir)
            conn.define_xml(new_text)
        except BaseException:
            outcome.undo_errors = run.undo()
            raise
        for plan in outcome.disks:
            _check_old_images(plan)
    finally:
        run.close()
    outcome.status, outcome.xml_backup = "migrated", run.backup
    _after_define(conn, outcome)


def _plan_only(conn: Connection, root: Any, outcome: DomainOutcome) -> None:
    new_root = copy.deepcopy(root)
    for plan in outcome.disks:
        if plan.secret_uuid is None:
            plan.secret_uuid, plan.secret_created = NEW_SECRET, True
        xmledit.apply_change(new_root, _change(plan))
    outcome.xml_diff = xmledit.unified_diff(
        outcome.name, xmledit.serialize(copy.deepcopy(root)), xmledit.serialize(new_root)
    )
    outcome.status = "planned"
    redefine_snapshots(conn, outcome, dry_run=True)
    if outcome.space[-1].startswith("not enough"):
        outcome.reason = outcome.space[-1]


def _change(plan: DiskPlan) -> xmledit.DiskChange:
    return xmledit.DiskChange(
        target=plan.target,
        new_path=plan.new_path,
        driver_type="raw" if plan.to == "luks" else "qcow2",
        secret_uuid=plan.secret_uuid or NEW_SECRET,
        flattened=plan.flatten,
    )


def _carry_out(
    conn: Connection, root: Any, secrets: list[DiskSecrets], opts: DomainOptions, outcome: DomainOutcome, run: _Run
) -> Any:
    for plan, disk_secret in zip(outcome.disks, secrets):
        if not plan.xml_only:
            with _about_disk(plan.target, plan.source):
                if opts.on_disk is not None:
                    opts.on_disk(outcome.name, plan)
                _migrate_disk(plan, disk_secret, opts, run)
    new_root = copy.deepcopy(root)
    for plan, disk_secret in zip(outcome.disks, secrets):
        if plan.secret_uuid is None:  # no secret, or a private one: a new secret holding the checked passphrase
            with _about_disk(plan.target, plan.source):
                plan.secret_uuid = conn.create_volume_secret(plan.new_path, bytes(disk_secret.passphrase))
            plan.secret_created = True
            run.secrets.append(plan.secret_uuid)
        xmledit.apply_change(new_root, _change(plan))
    return new_root


def _file_fallback(plan: DiskPlan, passphrase: bytearray) -> bytearray | None:
    """For a passphrase from the caller (file, stdin, prompt): its content without the trailing newline
    (tried second)."""
    return without_line_ending(passphrase) if plan.passphrase_from not in (None, SECRET_VALUE) else None


def _use_fallback(plan: DiskPlan, passphrase: bytearray, fallback: bytearray) -> None:
    """The file's content without its newline opened the image: the new keyslot and secret take that value."""
    passphrase[:] = fallback
    plan.passphrase_from = f"{plan.passphrase_from} without its trailing newline"


def _migrate_disk(plan: DiskPlan, secrets: DiskSecrets, opts: DomainOptions, run: _Run) -> None:
    """Migrate one disk whose passphrases the pre-checks chose (exact bytes or without the newline)."""
    migrate_opts = MigrateOptions(
        target=plan.to,
        output=None if plan.replace else plan.new_path,
        passphrase=secrets.passphrase,
        passphrases=dict(secrets.layers),
        iter_time_ms=opts.iter_time_ms,
        iterations=opts.iterations,
        flatten=plan.flatten,
        replace=plan.replace,
        progress=opts.progress,
        keep_placement=True,
        rules=plan.rules,
        source_format=plan.source_format,
        accept_unverified_passphrase=opts.accept_unverified_passphrase,
        accept_random_content=opts.accept_random_content,
        random_content_option=RANDOM_CONTENT_OPTION,
    )
    result = migrate_image(plan.source, migrate_opts)
    plan.placement, plan.source_id = result.placement, result.source_id
    plan.passphrase_verified = result.passphrase_verified
    plan.old_images = [result.original_kept or plan.source] + [p for p in plan.legacy_layers if p != plan.source]
    run.outputs.append(plan)


def _check_old_images(plan: DiskPlan) -> None:
    """Which old images may be named in destructive advice: only the file qcrypt read, still under the name
    printed (the kept NAME.qcrypt-orig checked through its folder descriptor; the source path followed as
    shred would follow it). Backing layers qcrypt did not keep itself are never checked."""
    if plan.xml_only or not plan.old_images:
        return
    first, *layers = plan.old_images
    if plan.replace:
        ok = plan.placement is not None and plan.placement.original_intact()
    else:
        try:
            st = os.stat(first)
        except OSError:
            st = None
        ok = st is not None and stat.S_ISREG(st.st_mode) and file_id(st) == plan.source_id
    plan.unchecked_images = ([] if ok else [first]) + layers


def _check_xml_only_passphrase(plan: DiskPlan, report: ImageReport, passphrase: bytearray) -> None:
    fallback = _file_fallback(plan, passphrase)
    try:
        check_luks_passphrase(plan.source, report, passphrase)
    except BadPassphraseError:
        if fallback is None:
            raise
        check_luks_passphrase(plan.source, report, fallback)
        _use_fallback(plan, passphrase, fallback)
    finally:
        if fallback is not None:
            wipe(fallback)


# -- after the define: snapshots, who still uses the old images, and the record ---------------------------------------


def _snapshot_loss(snapshot: Any, plans: list[DiskPlan]) -> str | None:
    """Why the snapshot's internal data is not in the new images (None when every changed disk keeps it: a
    qcow2-luks migration carries every internal snapshot over, or fails)."""
    internal = {d.get("name") for d in snapshot.iterfind("disks/disk") if d.get("snapshot", "internal") == "internal"}
    for plan in plans:
        if plan.target in internal and not plan.xml_only and plan.to != "qcow2-luks":
            return f"disk {plan.target}'s new image ({plan.to}) cannot hold internal snapshots"
    return None


def redefine_snapshots(conn: Connection, outcome: DomainOutcome, *, dry_run: bool = False) -> None:
    """Redefine each snapshot libvirt has for the domain so that its saved definition names the new disks (a
    revert would otherwise put the domain back on the old images). The old snapshot XML is saved beside the
    domain's backup. A snapshot whose data the new images do not hold is left as it was, and said so."""
    try:
        names = conn.snapshot_names(outcome.name)
        current = conn.current_snapshot(outcome.name) if names else None
    except LibvirtError as e:
        outcome.snapshots.append(SnapshotOutcome("?", "not redefined", f"listing the snapshots failed: {e}"))
        return
    changes = [_change(plan) for plan in outcome.disks]
    for snap in names:
        found = SnapshotOutcome(
            snap,
            "planned" if dry_run else "redefined",
            "its saved domain definition names the new disks"
            if not dry_run
            else "its saved domain definition will name the new disks",
        )
        outcome.snapshots.append(found)
        try:
            old_xml = conn.snapshot_xml(outcome.name, snap)
            root = parse_snapshot_root(old_xml)
            new_root = xmledit.change_snapshot(root, changes)
            loss = _snapshot_loss(root, outcome.disks)
            if loss:
                found.status, found.detail = "not redefined", f"{loss}: it still names the old images"
                continue
            if dry_run:
                continue
            assert outcome.xml_backup is not None
            found.backup = save_backup(old_xml, f"{outcome.name}.snapshot-{snap}", os.path.dirname(outcome.xml_backup))
            conn.redefine_snapshot(outcome.name, xmledit.serialize(new_root), current=snap == current)
        except (QcryptError, OSError) as e:
            found.status, found.detail = "not redefined", f"{e}: it still names the old images"


# -- after the define: who still uses the old images, and the record -----------------------------------------------


def _after_define(conn: Connection, outcome: DomainOutcome) -> None:
    """Snapshots, other users of the old images, the record: the domain is migrated whatever happens here, so a
    failure is reported in the outcome, never raised (and never a reason to name an old image for shredding)."""
    try:
        redefine_snapshots(conn, outcome)
    except (QcryptError, OSError) as e:
        outcome.snapshots.append(SnapshotOutcome("?", "not redefined", str(e)))
    try:
        find_old_image_users(conn, outcome)
    except (QcryptError, OSError) as e:
        outcome.users_unknown.append(str(e))
    outcome.record = log_change(outcome)


def find_old_image_users(conn: Connection, outcome: DomainOutcome) -> None:
    """Name, for each old image, the defined domains (this one with its new XML included) and the images in
    the old images' folders that still use it, through domain XML and image headers alike. Another old image
    of the same disk is not a user (they go together). Anything unreadable makes the look incomplete."""
    old = {os.path.realpath(p) for d in outcome.disks for p in d.old_images}
    if not old:
        return
    domains = []
    try:
        names = conn.domain_names()
    except LibvirtError as e:
        names = []
        outcome.users_unknown.append(f"listing the domains: {e}")
    for other in names:
        try:
            domains.append(domain_from_root(parse_domain_root(conn.inactive_xml(other))))
        except QcryptError as e:
            outcome.users_unknown.append(f"domain {other}: {e}")
    by_domain = usage.domain_users(domains)
    folders = sorted({os.path.dirname(p) for d in outcome.disks for p in d.old_images})
    by_image = usage.folder_users(folders, skip=usage.raw_disk_paths(domains))
    outcome.users_checked = [
        f"the {len(names)} domains of this libvirt connection (XML and image headers)",
        f"the images in {', '.join(folders)}",
    ]
    outcome.users_unknown += [
        f"{folder}: more than {usage.MAX_FOLDER_ENTRIES} entries or unreadable" for folder in by_image.incomplete
    ]
    stale = [
        f"libvirt snapshot {snap.name} of this domain" for snap in outcome.snapshots if snap.status == "not redefined"
    ]  # its saved definition still names the old images
    for plan in outcome.disks:
        for path in plan.old_images:
            real = os.path.realpath(path)
            users = [f"domain {n}" for n in sorted(by_domain.get(real, ()))]
            users += [f"image {p}" for p in sorted(by_image.users.get(real, ())) if os.path.realpath(p) not in old]
            users += stale
            if users:
                plan.image_users[path] = users


def destroyable(outcome: DomainOutcome) -> list[str]:
    """The old images that advice may tell to destroy: checked to be the files qcrypt read, no other user
    found, and every place a user could be was looked at."""
    if outcome.users_unknown:
        return []
    return [p for d in outcome.disks for p in d.old_images if p not in d.unchecked_images and p not in d.image_users]


def log_change(outcome: DomainOutcome) -> str:
    """One syslog line for the domain just redefined (no secret value, ever); returns what happened to it."""
    disks = "; ".join(
        f"disk {d.target}: {d.source}{' (' + ', '.join(d.legacy_layers[1:]) + ')' if len(d.legacy_layers) > 1 else ''}"
        f" -> {d.new_path} ({d.to}{', flattened' if d.flatten else ''}), secret {d.secret_uuid}"
        f"{' (new)' if d.secret_created else ''}{', old image kept as ' + d.old_images[0] if d.old_images else ''}"
        for d in outcome.disks
    )
    redefined = [snap.name for snap in outcome.snapshots if snap.status == "redefined"]
    snapshots = f"; snapshots redefined: {', '.join(redefined)}" if redefined else ""
    line = printable(
        f"domain {outcome.name!r} redefined by migrate-domain: {disks}{snapshots}; "
        f"old XML saved to {outcome.xml_backup}"
    )
    if not syslog_listening():
        return f"not logged: no syslog socket at {SYSLOG_SOCKET} (this summary is the only record)"
    try:
        record_sink(syslog.LOG_NOTICE, line)
    except OSError as e:
        return f"not logged: {e.strerror or e}"
    return f"logged to syslog as '{RECORD_IDENT}' (journalctl -t {RECORD_IDENT})"


def _send_record(priority: int, line: str) -> None:
    send_to_syslog(priority, line, ident=RECORD_IDENT)


record_sink: Callable[[int, str], None] = _send_record
"""Where :func:`log_change` sends its line (replace it to collect the lines)."""


def check_luks_passphrase(path: str, report: ImageReport, passphrase: bytearray) -> None:
    """Raise BadPassphraseError unless ``passphrase`` opens a keyslot of the LUKS image at ``path``."""
    from qcrypt.migrate.luks_output import source_luks

    opened = source_luks(path, report, bytes(passphrase))
    if opened:
        master_key = opened[2]
        wipe(master_key)


def save_backup(xml: str, name: str, backup_dir: str) -> str:
    """Write the old XML to ``backup_dir/NAME-<UTC time>.xml`` (owner-only: it may hold passwords)."""
    os.makedirs(backup_dir, mode=0o700, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    for attempt in range(100):
        path = os.path.join(backup_dir, f"{safe}-{stamp}{f'-{attempt}' if attempt else ''}.xml")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(xml)
            fh.flush()
            os.fsync(fh.fileno())
        return path
    raise QcryptIOError(f"cannot name a backup file in {backup_dir}")


def _start(conn: Connection, name: str, outcome: DomainOutcome) -> None:
    try:
        conn.start(name)
    except LibvirtError as e:
        outcome.started, outcome.start_error = False, str(e)
        return
    outcome.started = conn.domain_state(name) == "running"


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
