"""After the define: snapshot metadata redefined for the new disks, who still uses the old images (only those
named nowhere else may be shredded), and one syslog record per changed domain.
"""

from __future__ import annotations

import os
import syslog
from collections.abc import Callable
from typing import Any

from qcrypt.domain.backup import save_backup
from qcrypt.domain.options import RECORD_IDENT, DiskPlan, DomainOutcome, SnapshotOutcome
from qcrypt.domain.plan import xml_change
from qcrypt.errors import (
    LibvirtError,
    QcryptError,
)
from qcrypt.libvirt import usage, xmledit
from qcrypt.libvirt.connection import Connection
from qcrypt.libvirt.domainxml import (
    domain_from_root,
    parse_domain_root,
    parse_snapshot_root,
)
from qcrypt.plumbing.syslog import SYSLOG_SOCKET, printable, send_to_syslog, syslog_listening


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
    changes = [xml_change(plan) for plan in outcome.disks]
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
