"""qcrypt.libvirt.xmledit: the disk rewrite migrate-domain defines (pure XML, no libvirt needed)."""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET

import pytest

from qcrypt.errors import FormatError
from qcrypt.libvirt import xmledit
from qcrypt.libvirt.domainxml import domain_from_root, parse_domain_root

DOMAIN = """<domain type='qemu'>
  <name>web</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/i/web.qcow2'/>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file='/i/base.qcow2'/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <encryption format='qcow'>
        <secret type='passphrase' uuid='11111111-2222-3333-4444-555555555555'/>
      </encryption>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg/db'>
        <encryption format='qcow'><secret type='passphrase' usage='/dev/vg/db'/></encryption>
      </source>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/i/plain.qcow2'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <interface type='user'><mac address='52:54:00:12:34:56'/></interface>
  </devices>
</domain>"""
UUID = "99999999-8888-7777-6666-555555555555"


def disks(root: ET.Element) -> dict[str, ET.Element]:
    return {d.find("target").get("dev"): d for d in root.iterfind("devices/disk")}  # type: ignore[union-attr,misc]


def test_file_disk_moves_to_luks_with_the_secret_inside_source() -> None:
    root = parse_domain_root(DOMAIN)
    new = copy.deepcopy(root)
    xmledit.apply_change(new, xmledit.DiskChange("vda", "/i/web.luks.qcow2", "qcow2", UUID, flattened=False))
    vda = disks(new)["vda"]
    assert vda.find("source").get("file") == "/i/web.luks.qcow2"  # type: ignore[union-attr]
    assert vda.find("driver").attrib == {"name": "qemu", "type": "qcow2", "cache": "none"}  # type: ignore[union-attr]
    assert vda.find("encryption") is None
    (enc,) = vda.findall("source/encryption")
    assert enc.get("format") == "luks" and enc.find("secret").attrib == {"type": "passphrase", "uuid": UUID}  # type: ignore[union-attr]
    assert vda.find("backingStore/source").get("file") == "/i/base.qcow2"  # type: ignore[union-attr]  # kept
    # the other disks and devices are untouched
    for target in ("vdb", "vdc"):
        assert ET.tostring(disks(new)[target]) == ET.tostring(disks(root)[target])
    assert ET.tostring(new.find("devices/interface")) == ET.tostring(root.find("devices/interface"))  # type: ignore[arg-type]
    # the model reads the result as a LUKS disk
    (layer, *_rest) = domain_from_root(new).disks[0].layers
    assert layer.encryption == ("luks",) and layer.secret == f"uuid {UUID}"


def test_flattened_disk_loses_its_backing_store_and_block_becomes_file() -> None:
    new = parse_domain_root(DOMAIN)
    xmledit.apply_change(new, xmledit.DiskChange("vda", "/i/web.luks.qcow2", "qcow2", UUID, flattened=True))
    xmledit.apply_change(new, xmledit.DiskChange("vdb", "/out/db.luks", "raw", UUID, flattened=True))
    found = disks(new)
    assert found["vda"].find("backingStore") is None
    vdb = found["vdb"]
    assert vdb.get("type") == "file" and vdb.find("source").attrib == {"file": "/out/db.luks"}  # type: ignore[union-attr]
    assert [e.get("format") for e in vdb.iter("encryption")] == ["luks"]


def test_diff_shows_only_the_change() -> None:
    root = parse_domain_root(DOMAIN)
    new = copy.deepcopy(root)
    xmledit.apply_change(new, xmledit.DiskChange("vda", "/i/web.luks.qcow2", "qcow2", UUID, flattened=False))
    diff = xmledit.unified_diff("web", xmledit.serialize(copy.deepcopy(root)), xmledit.serialize(new))
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert any("web.luks.qcow2" in line for line in changed)
    assert not any("plain.qcow2" in line or "/dev/vg/db" in line or "mac" in line for line in changed)
    assert xmledit.unified_diff("web", xmledit.serialize(root), xmledit.serialize(copy.deepcopy(root))) == ""


def test_unknown_target_is_a_format_error() -> None:
    with pytest.raises(FormatError, match="no <disk> with target dev='vdz'"):
        xmledit.apply_change(parse_domain_root(DOMAIN), xmledit.DiskChange("vdz", "/x", "qcow2", UUID, False))
