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
from dataclasses import dataclass, field
from typing import Any

from qcrypt.audit.report import ImageReport
from qcrypt.crypto.secret import disable_core_dumps
from qcrypt.domain.aftermath import _after_define, redefine_snapshots
from qcrypt.domain.backup import save_backup
from qcrypt.domain.disks import affected_disks
from qcrypt.domain.options import (
    NEW_SECRET,
    RANDOM_CONTENT_OPTION,
    DiskPlan,
    DomainOptions,
    DomainOutcome,
    _about_disk,
    _tag,
)
from qcrypt.domain.plan import check_space, estimate_seconds, plan_disk, xml_change
from qcrypt.domain.precheck import precheck_disk
from qcrypt.domain.secrets import DiskSecrets, disk_secrets
from qcrypt.errors import (
    DomainActiveError,
    LibvirtError,
    QcryptError,
    QcryptIOError,
    UnsafePathError,
)
from qcrypt.libvirt import xmledit
from qcrypt.libvirt.connection import SHUT_OFF, Connection
from qcrypt.libvirt.domainxml import (
    DomainDisk,
    domain_from_root,
    parse_domain_root,
)
from qcrypt.migrate.options import MigrateOptions
from qcrypt.migrate.run import migrate as migrate_image
from qcrypt.plumbing.outputs import file_id


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
        start_domain(conn, name, outcome)


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
        xmledit.apply_change(new_root, xml_change(plan))
    outcome.xml_diff = xmledit.unified_diff(
        outcome.name, xmledit.serialize(copy.deepcopy(root)), xmledit.serialize(new_root)
    )
    outcome.status = "planned"
    redefine_snapshots(conn, outcome, dry_run=True)
    if outcome.space[-1].startswith("not enough"):
        outcome.reason = outcome.space[-1]


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
        xmledit.apply_change(new_root, xml_change(plan))
    return new_root


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


def start_domain(conn: Connection, name: str, outcome: DomainOutcome) -> None:
    try:
        conn.start(name)
    except LibvirtError as e:
        outcome.started, outcome.start_error = False, str(e)
        return
    outcome.started = conn.domain_state(name) == "running"
