"""The domain XML change ``migrate-domain`` defines: one ``<disk>`` moved to its LUKS image, and the diff.

Only the migrated disks change: their ``<driver type>``, ``<source>`` (path; a block disk whose new image is
a file becomes ``type='file'``), ``<encryption>`` (one ``format='luks'`` element inside ``<source>``, where
libvirt puts it, naming the secret) and, when the chain was flattened, ``<backingStore>``.
"""

from __future__ import annotations

import copy
import difflib
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from qcrypt.errors import FormatError


@dataclass(frozen=True)
class DiskChange:
    """How one disk changes: the target device it is found by, and what it becomes."""

    target: str
    new_path: str
    driver_type: str  # qcow2 | raw
    secret_uuid: str
    flattened: bool  # the new image has no backing file: drop the <backingStore> chain


def serialize(root: ET.Element) -> str:
    """The document as text, indented two spaces as libvirt does (one serializer for the old and the new
    document, so their diff shows only real changes)."""
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def find_disk(root: ET.Element, target: str) -> ET.Element:
    for disk in root.iterfind("devices/disk"):
        found = disk.find("target")
        if found is not None and found.get("dev") == target:
            return disk
    raise FormatError(f"no <disk> with target dev='{target}'", field="domain XML")


def apply_change(root: ET.Element, change: DiskChange) -> None:
    """Rewrite the disk ``change.target`` of ``root`` in place."""
    disk = find_disk(root, change.target)
    _set_driver(disk, change.driver_type)
    source = _set_source(disk, change.new_path)
    for holder in (disk, source):
        for old in holder.findall("encryption"):
            holder.remove(old)
    source.append(_luks_encryption(change.secret_uuid))
    if change.flattened:
        for store in disk.findall("backingStore"):
            disk.remove(store)


def _set_driver(disk: ET.Element, driver_type: str) -> None:
    driver = disk.find("driver")
    if driver is None:
        driver = ET.Element("driver", {"name": "qemu"})
        disk.insert(0, driver)
    driver.set("type", driver_type)


def _set_source(disk: ET.Element, new_path: str) -> ET.Element:
    source = disk.find("source")
    if source is None:
        source = ET.Element("source")
        disk.insert(1 if disk.find("driver") is not None else 0, source)
    if disk.get("type") == "block":
        disk.set("type", "file")  # the new image is a file
        source.attrib.pop("dev", None)
    source.set("file", new_path)
    return source


def _luks_encryption(secret_uuid: str) -> ET.Element:
    encryption = ET.Element("encryption", {"format": "luks"})
    ET.SubElement(encryption, "secret", {"type": "passphrase", "uuid": secret_uuid})
    return encryption


def change_snapshot(root: ET.Element, changes: list[DiskChange]) -> ET.Element:
    """A copy of a ``<domainsnapshot>`` whose saved domain definitions (``<domain>``, ``<inactiveDomain>``) have
    their disks changed as the domain's were, so that a revert puts the domain on the new disks. Raises
    FormatError when a changed disk's snapshot is external (its data is in another file)."""
    new = copy.deepcopy(root)
    targets = {change.target for change in changes}
    for disk in new.iterfind("disks/disk"):
        if disk.get("name") in targets and disk.get("snapshot") == "external":
            raise FormatError(f"disk {disk.get('name')} has an external snapshot", field="snapshot XML")
    for tag in ("domain", "inactiveDomain"):
        for domain in new.findall(tag):
            present = {found.get("dev") for found in domain.iterfind("devices/disk/target")}
            for change in changes:
                if change.target in present:
                    apply_change(domain, change)
    return new


def unified_diff(name: str, old_text: str, new_text: str) -> str:
    """A unified diff of two serialized documents; "" when they are equal."""
    lines = difflib.unified_diff(
        old_text.splitlines(keepends=True),
        new_text.splitlines(keepends=True),
        fromfile=f"{name} (old)",
        tofile=f"{name} (new)",
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)
