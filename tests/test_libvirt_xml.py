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


# -- snapshots ---------------------------------------------------------------------------------------------------

SNAPSHOT = """<domainsnapshot><name>s1</name><state>shutoff</state><creationTime>1700000000</creationTime>
<disks><disk name='vda' snapshot='{mode}'/><disk name='vdb' snapshot='internal'/></disks>
<domain type='qemu'><name>web</name><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/i/web.qcow2'/>
<target dev='vda' bus='virtio'/><encryption format='qcow'><secret type='passphrase' uuid='{uuid}'/></encryption></disk>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/i/data.qcow2'/>
<target dev='vdb' bus='virtio'/></disk></devices></domain></domainsnapshot>"""


def test_snapshot_definition_follows_the_disk_change() -> None:
    from qcrypt.libvirt.domainxml import parse_snapshot_root

    root = parse_snapshot_root(SNAPSHOT.format(mode="internal", uuid=UUID))
    change = xmledit.DiskChange("vda", "/i/web.luks.qcow2", "qcow2", UUID, flattened=False)
    new = xmledit.change_snapshot(root, [change])
    vda, vdb = new.findall("domain/devices/disk")
    assert vda.find("source").get("file") == "/i/web.luks.qcow2"  # type: ignore[union-attr]
    assert vda.find("source/encryption").get("format") == "luks" and vda.find("encryption") is None  # type: ignore[union-attr]
    assert vdb.find("source").get("file") == "/i/data.qcow2"  # type: ignore[union-attr]
    assert root.find("domain/devices/disk/source").get("file") == "/i/web.qcow2"  # type: ignore[union-attr]  # a copy
    assert new.findtext("name") == "s1" and new.find("disks") is not None


def test_snapshot_with_an_external_disk_snapshot_is_refused() -> None:
    from qcrypt.libvirt.domainxml import parse_snapshot_root

    root = parse_snapshot_root(SNAPSHOT.format(mode="external", uuid=UUID))
    with pytest.raises(FormatError, match="disk vda has an external snapshot"):
        xmledit.change_snapshot(root, [xmledit.DiskChange("vda", "/i/web.luks.qcow2", "qcow2", UUID, False)])


@pytest.mark.parametrize("xml", ["<domain/>", "<!DOCTYPE x><domainsnapshot/>", ""])
def test_snapshot_xml_refusals(xml: str) -> None:
    from qcrypt.libvirt.domainxml import parse_snapshot_root

    with pytest.raises(FormatError):
        parse_snapshot_root(xml)


def test_a_raw_luks_target_cannot_carry_internal_snapshots() -> None:
    from qcrypt.domain.aftermath import _snapshot_loss
    from qcrypt.domain.options import DiskPlan
    from qcrypt.libvirt.domainxml import parse_snapshot_root

    root = parse_snapshot_root(SNAPSHOT.format(mode="internal", uuid=UUID))

    def plan(to: str) -> DiskPlan:
        return DiskPlan(
            target="vda",
            source="/i/web.qcow2",
            new_path="/i/web.luks",
            to=to,
            virtual_size=0,
            allocated_size=0,
            secret_uuid=UUID,
            secret_created=False,
            flatten=False,
            source_type="file",
            legacy_layers=["/i/web.qcow2"],
        )

    assert _snapshot_loss(root, [plan("qcow2-luks")]) is None
    assert _snapshot_loss(root, [plan("luks")]) == "disk vda's new image (luks) cannot hold internal snapshots"
