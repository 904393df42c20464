"""``migrate-domain`` on a real estate, against a real libvirtd and QEMU (TCG): images shared between domains
(backing files the XML does not declare), the syslog record of each change, the way back, internal snapshots
registered in libvirt. Oracles: virsh, qemu-img, ``qcrypt scan --libvirt-xml``, a listener at /dev/log."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests._libvirt import CONFIG_DIR, Lab, disk_xml, run, sha256, virsh
from tests.test_migrate_domain import MIB, PW, as_json, backends, qcrypt_domain, same_guest_data
from tests.test_migrate_domain import lab as lab

pytestmark = [pytest.mark.interop, pytest.mark.libvirt]


def legacy_overlay(lab: Lab, name: str, backing: Path, pw: Path) -> Path:
    """A legacy-AES qcow2 overlay of ``backing`` (named by its header only)."""
    path = lab.folder / name
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "qcow2", "--object",
        f"secret,id=s,file={pw}", "-o", "encrypt.format=aes,encrypt.key-secret=s", path, "16M")
    return path


def scan_users(*paths: Path | str) -> dict[str, list[str] | None]:
    done = subprocess.run([sys.executable, "-m", "qcrypt", "scan", "--format", "json", "--fail-on", "never",
                           "--libvirt-xml", str(CONFIG_DIR), *map(str, paths)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return {image["path"]: image.get("domains") for image in json.loads(done.stdout)["images"]}


# -- images shared between domains --------------------------------------------------------------------------------


def test_shared_base_without_backing_store_is_never_advised_for_destruction(lab: Lab, tmp_path: Path) -> None:
    """Two domains, each a legacy overlay over one legacy base, no <backingStore> in their XML; a third image
    (no domain) uses the first domain's overlay. Scan names both domains as users of the base; after
    migrate-domain of the first, the summary names every user and gives no command to destroy a used file."""
    pw = lab.passphrase_file("pw", PW)
    base = lab.legacy_image("base.qcow2", pw)
    lab.write(base, 0x21, 0, MIB, pw)
    top1, top2 = legacy_overlay(lab, "top1.qcow2", base, pw), legacy_overlay(lab, "top2.qcow2", base, pw)
    lab.write(top1, 0x31, MIB, MIB, pw, pw)
    clone = lab.plain_image("clone.qcow2", backing=top1)
    secret = lab.secret(PW)
    one, two = f"{lab.prefix}-one", f"{lab.prefix}-two"
    for name, top in ((one, top1), (two, top2)):
        lab.define_as_after_upgrade(name, [disk_xml("vda", top, encryption="qcow", secret=secret)])
    assert "backingStore" not in lab.inactive_xml(one) or "<backingStore/>" in lab.inactive_xml(one)

    users = scan_users(lab.folder)
    assert users[str(base)] == sorted([one, two]) and users[str(top1)] == [one] and users[str(clone)] is None

    done = qcrypt_domain(lab, tmp_path, one)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"still in use, keep: {base} (used by domain {two}, image {clone}, image {top2})" in out
    assert f"still in use, keep: {top1} (used by image {clone})" in out
    assert "shred" not in out  # every old image has another user
    assert "other users looked for in: the " in out and f"the images in {lab.folder}" in out
    same_guest_data(lab, [f"driver=qcow2,file.filename={top1},encrypt.key-secret=s,"
                          "backing.encrypt.key-secret=s"], lab.folder / "top1.luks.qcow2", pw)

    after = scan_users(lab.folder)
    assert after[str(base)] == [two] and after[str(top1)] is None
    assert after[str(lab.folder / "top1.luks.qcow2")] == [one]


def test_unshared_old_images_are_advised_for_destruction(lab: Lab, tmp_path: Path) -> None:
    """The same chain used by one domain only: the summary's shred command names the overlay (checked to be
    the file qcrypt read), and the base is reported as not checked, never shredded by qcrypt's word."""
    pw = lab.passphrase_file("pw", PW)
    base = lab.legacy_image("base.qcow2", pw)
    top = legacy_overlay(lab, "top.qcow2", base, pw)
    name = f"{lab.prefix}-alone"
    lab.define_as_after_upgrade(name, [disk_xml("vda", top, encryption="qcow", secret=lab.secret(PW))])
    done = qcrypt_domain(lab, tmp_path, name)
    assert done.returncode == 0, done.stdout + done.stderr
    shred = next(line for line in done.stdout.splitlines() if "shred -u" in line)
    assert f"shred -u {top} " in shred and str(base) not in shred
    assert "still in use" not in done.stdout


# -- internal snapshots registered in libvirt -------------------------------------------------------------------


def snapshot_tags(path: Path, pw: Path) -> list[str]:
    out = run("qemu-img", "snapshot", "-U", "-l", "--object", f"secret,id=s,file={pw}", "--image-opts",
              f"driver=qcow2,file.filename={path},encrypt.key-secret=s").stdout
    return [line.split()[1] for line in out.splitlines()[2:] if line.strip()]


@pytest.mark.parametrize("backend", backends())
def test_registered_internal_snapshot_is_redefined_for_the_new_disk(lab: Lab, tmp_path: Path, backend: str) -> None:
    """A legacy disk with an internal snapshot that libvirt has registered (snapshot-create --redefine): the
    new image keeps the snapshot, libvirt's snapshot XML is redefined to name the new disk (path, driver,
    LUKS encryption) and stays current, its old XML is saved, and a revert no longer touches the old file.
    What libvirt 9 then does with the snapshot of a LUKS qcow2 disk is asserted as measured (README)."""
    pw = lab.passphrase_file("pw", PW)
    web = lab.legacy_image("web.qcow2", pw)
    lab.write(web, 0x41, 0, MIB, pw)
    run("qemu-img", "snapshot", "-c", "before-upgrade", "--object", f"secret,id=s,file={pw}", "--image-opts",
        f"driver=qcow2,file.filename={web},encrypt.key-secret=s")
    lab.write(web, 0x42, 0, MIB, pw)
    name = f"{lab.prefix}-snap"
    lab.define_as_after_upgrade(name, [disk_xml("vda", web, encryption="qcow", secret=lab.secret(PW))])
    snapshot = ("<domainsnapshot><name>before-upgrade</name><state>shutoff</state><creationTime>1700000000"
                "</creationTime><memory snapshot='no'/><disks><disk name='vda' snapshot='internal'/></disks>"
                f"{lab.inactive_xml(name)}</domainsnapshot>")
    virsh("snapshot-create", name, "--xmlfile", "/dev/stdin", "--redefine", "--current", stdin=snapshot.encode())
    old_snapshot_xml = virsh("snapshot-dumpxml", name, "before-upgrade", "--security-info").stdout

    dry = qcrypt_domain(lab, tmp_path, name, "--dry-run", backend=backend)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "snapshot before-upgrade: planned: its saved domain definition will name the new disks" in dry.stdout
    assert "libvirt 9 lists them, but 'virsh snapshot-revert'" in dry.stdout

    done = qcrypt_domain(lab, tmp_path, name, "--format", "json", backend=backend)
    assert done.returncode == 0, done.stdout + done.stderr
    (snap,) = as_json(done)["domains"][0]["snapshots"]
    assert snap["name"] == "before-upgrade" and snap["status"] == "redefined", snap
    assert Path(snap["backup"]).read_text().strip() == old_snapshot_xml.strip()
    new = lab.folder / "web.luks.qcow2"
    assert snapshot_tags(new, pw) == ["before-upgrade"]  # the image carries it over
    redefined = ET.fromstring(virsh("snapshot-dumpxml", name, "before-upgrade", "--security-info").stdout)
    vda = next(d for d in redefined.iterfind("domain/devices/disk") if d.find("target").get("dev") == "vda")  # type: ignore[union-attr]
    assert vda.find("source").get("file") == str(new) and vda.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert vda.find("source/encryption").get("format") == "luks"  # type: ignore[union-attr]
    assert str(web) not in ET.tostring(redefined, encoding="unicode")
    assert virsh("snapshot-current", name, "--name").stdout.strip() == "before-upgrade"

    # libvirt 9 with the snapshot of a LUKS qcow2 disk, as measured (README "Snapshots")
    old_sha = sha256(web)
    revert = virsh("snapshot-revert", name, "before-upgrade", check=False)
    assert revert.returncode != 0 and "encrypt.key-secret' is required" in revert.stderr and str(new) in revert.stderr
    assert sha256(web) == old_sha  # the old file is not touched
    assert "old qcow/qcow2 encryption" not in lab.inactive_xml(name) and str(new) in lab.inactive_xml(name)
    offline = virsh("snapshot-create-as", name, "another", check=False)
    assert offline.returncode != 0 and "encrypt.key-secret' is required" in offline.stderr
    assert virsh("snapshot-delete", name, "before-upgrade").returncode == 0
    assert snapshot_tags(new, pw) == ["before-upgrade"]  # only libvirt's metadata went
    # the way that works: qemu-img with the secret, the domain shut off
    run("qemu-img", "snapshot", "-a", "before-upgrade", "--object", f"secret,id=s,file={pw}", "--image-opts",
        f"driver=qcow2,file.filename={new},encrypt.key-secret=s")
    run("qemu-io", *lab.image_opts(new, pw), "-c", f"read -P 0x41 0 {MIB}")
