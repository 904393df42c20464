"""Planning one disk: the target format, the new image's name, whether the chain is flattened, the estimates,
and the change to the disk's XML.
"""

from __future__ import annotations

import os

from qcrypt.audit.describe import allocated_estimate
from qcrypt.audit.report import ImageReport
from qcrypt.domain.disks import xml_only
from qcrypt.domain.options import ESTIMATE_BYTES_PER_S, LUKS_HEADER_BYTES, NEW_SECRET, DiskPlan, DomainOptions
from qcrypt.errors import (
    MigrationError,
    OutputExistsError,
)
from qcrypt.libvirt import xmledit
from qcrypt.libvirt.domainxml import (
    DomainDisk,
    declared_format,
)


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
    legacy = report.legacy_paths
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


def xml_change(plan: DiskPlan) -> xmledit.DiskChange:
    return xmledit.DiskChange(
        target=plan.target,
        new_path=plan.new_path,
        driver_type="raw" if plan.to == "luks" else "qcow2",
        secret_uuid=plan.secret_uuid or NEW_SECRET,
        flattened=plan.flatten,
    )
