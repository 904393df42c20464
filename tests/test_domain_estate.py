"""``migrate-domain`` on a real estate, against a real libvirtd and QEMU (TCG): images shared between domains
(backing files the XML does not declare), the syslog record of each change, the way back, internal snapshots
registered in libvirt. Oracles: virsh, qemu-img, ``qcrypt scan --libvirt-xml``, a listener at /dev/log."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import syslog
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from qcrypt.hook import check as hooklib
from tests._libvirt import (
    CONFIG_DIR,
    MIB,
    PW,
    Lab,
    as_json,
    backends,
    disk_xml,
    qcrypt_domain,
    reload_libvirtd,
    run,
    same_guest_data,
    sha256,
    virsh,
)

pytestmark = [pytest.mark.interop, pytest.mark.libvirt]


def legacy_with_data(lab: Lab, name: str, pw: Path) -> Path:
    """A legacy-AES qcow2 holding 64 KiB of data (a passphrase with no data to check it is refused)."""
    path = lab.legacy_image(name, pw)
    lab.write(path, 0x5A, 0, 65536, pw)
    return path


def legacy_overlay(lab: Lab, name: str, backing: Path, pw: Path) -> Path:
    """A legacy-AES qcow2 overlay of ``backing`` (named by its header only)."""
    path = lab.folder / name
    run(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        str(backing),
        "-F",
        "qcow2",
        "--object",
        f"secret,id=s,file={pw}",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=s",
        path,
        "16M",
    )
    return path


def scan_users(*paths: Path | str) -> dict[str, list[str] | None]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "qcrypt",
            "scan",
            "--format",
            "json",
            "--fail-on",
            "never",
            "--libvirt-xml",
            str(CONFIG_DIR),
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return {image["path"]: image.get("domains") for image in json.loads(done.stdout)["images"]}


# -- images shared between domains --------------------------------------------------------------------------------


def test_shared_base_without_backing_store_is_never_advised_for_destruction(lab: Lab, tmp_path: Path) -> None:
    """Two domains, each a legacy overlay over one legacy base, no <backingStore> in their XML; a third image
    (no domain) uses the first domain's overlay. Scan names both domains as users of the base; after
    migrate-domain of the first, the summary names every user and gives no command to destroy a used file. A
    third domain's raw disk whose guest data looks like an overlay of the base is not taken for a user."""
    pw = lab.passphrase_file("pw", PW)
    base = legacy_with_data(lab, "base.qcow2", pw)
    lab.write(base, 0x21, 0, MIB, pw)
    top1, top2 = legacy_overlay(lab, "top1.qcow2", base, pw), legacy_overlay(lab, "top2.qcow2", base, pw)
    lab.write(top1, 0x31, MIB, MIB, pw, pw)
    clone = lab.plain_image("clone.qcow2", backing=top1)
    guest = lab.plain_image("guest.raw", backing=base)  # a raw disk whose guest data looks like an overlay
    secret = lab.secret(PW)
    one, two, three = f"{lab.prefix}-one", f"{lab.prefix}-two", f"{lab.prefix}-three"
    for name, top in ((one, top1), (two, top2)):
        lab.define_as_after_upgrade(name, [disk_xml("vda", top, encryption="qcow", secret=secret)])
    lab.define(three, [disk_xml("vda", guest, driver="raw")])
    assert "backingStore" not in lab.inactive_xml(one) or "<backingStore/>" in lab.inactive_xml(one)

    users = scan_users(lab.folder)
    assert users[str(base)] == sorted([one, two]) and users[str(top1)] == [one] and users[str(clone)] is None
    assert users[str(guest)] == [three]  # its content is guest data: it makes no domain a user of the base

    done = qcrypt_domain(lab, tmp_path, one)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"still in use, keep: {base} (used by domain {two}, image {clone}, image {top2})" in out
    assert f"still in use, keep: {top1} (used by image {clone})" in out
    assert "shred" not in out  # every old image has another user
    assert "other users looked for in: the " in out and f"the images in {lab.folder}" in out
    same_guest_data(
        lab,
        [f"driver=qcow2,file.filename={top1},encrypt.key-secret=s,backing.encrypt.key-secret=s"],
        lab.folder / "top1.luks.qcow2",
        pw,
    )

    after = scan_users(lab.folder)
    assert after[str(base)] == [two] and after[str(top1)] is None
    assert after[str(lab.folder / "top1.luks.qcow2")] == [one]


def test_unshared_old_images_are_advised_for_destruction(lab: Lab, tmp_path: Path) -> None:
    """The same chain used by one domain only: the summary's shred command names the overlay (checked to be
    the file qcrypt read), and the base is reported as not checked, never shredded by qcrypt's word."""
    pw = lab.passphrase_file("pw", PW)
    base = legacy_with_data(lab, "base.qcow2", pw)
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
    out = run(
        "qemu-img",
        "snapshot",
        "-U",
        "-l",
        "--object",
        f"secret,id=s,file={pw}",
        "--image-opts",
        f"driver=qcow2,file.filename={path},encrypt.key-secret=s",
    ).stdout
    return [line.split()[1] for line in out.splitlines()[2:] if line.strip()]


@pytest.mark.parametrize("backend", backends())
def test_registered_internal_snapshot_is_redefined_for_the_new_disk(lab: Lab, tmp_path: Path, backend: str) -> None:
    """A legacy disk with an internal snapshot that libvirt has registered (snapshot-create --redefine): the
    new image keeps the snapshot, libvirt's snapshot XML is redefined to name the new disk (path, driver,
    LUKS encryption) and stays current, its old XML is saved, and a revert no longer touches the old file.
    What libvirt 9 then does with the snapshot of a LUKS qcow2 disk is asserted as measured (docs/GUIDE.md,
    "Snapshots")."""
    pw = lab.passphrase_file("pw", PW)
    web = legacy_with_data(lab, "web.qcow2", pw)
    lab.write(web, 0x41, 0, MIB, pw)
    run(
        "qemu-img",
        "snapshot",
        "-c",
        "before-upgrade",
        "--object",
        f"secret,id=s,file={pw}",
        "--image-opts",
        f"driver=qcow2,file.filename={web},encrypt.key-secret=s",
    )
    lab.write(web, 0x42, 0, MIB, pw)
    name = f"{lab.prefix}-snap"
    lab.define_as_after_upgrade(name, [disk_xml("vda", web, encryption="qcow", secret=lab.secret(PW))])
    snapshot = (
        "<domainsnapshot><name>before-upgrade</name><state>shutoff</state><creationTime>1700000000"
        "</creationTime><memory snapshot='no'/><disks><disk name='vda' snapshot='internal'/></disks>"
        f"{lab.inactive_xml(name)}</domainsnapshot>"
    )
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
    assert virsh("snapshot-list", name, "--name").stdout.split() == ["before-upgrade"]

    # libvirt 9 with the snapshot of a LUKS qcow2 disk, as measured (docs/GUIDE.md, "Snapshots")
    old_sha = sha256(web)
    revert = virsh("snapshot-revert", name, "before-upgrade", check=False)
    assert revert.returncode != 0 and "encrypt.key-secret' is required" in revert.stderr and str(new) in revert.stderr
    assert sha256(web) == old_sha  # the old file is not touched
    assert "format='qcow'" not in lab.inactive_xml(name) and str(new) in lab.inactive_xml(name)  # still the new disk
    offline = virsh("snapshot-create-as", name, "another", check=False)
    assert offline.returncode != 0 and "encrypt.key-secret' is required" in offline.stderr
    assert virsh("snapshot-delete", name, "before-upgrade").returncode == 0
    assert snapshot_tags(new, pw) == ["before-upgrade"]  # only libvirt's metadata went
    # the way that works: qemu-img with the secret, the domain shut off
    run(
        "qemu-img",
        "snapshot",
        "-a",
        "before-upgrade",
        "--object",
        f"secret,id=s,file={pw}",
        "--image-opts",
        f"driver=qcow2,file.filename={new},encrypt.key-secret=s",
    )
    run("qemu-io", *lab.image_opts(new, pw), "-c", f"read -P 0x41 0 {MIB}")


def test_snapshot_the_new_image_cannot_hold_keeps_its_images_out_of_the_shred_advice(lab: Lab, tmp_path: Path) -> None:
    """--to luks: a raw LUKS image has no internal snapshots, so the registered snapshot is not redefined, the
    plan and the summary say so, and the old image it still names is kept out of the shred command."""
    pw = lab.passphrase_file("pw", PW)
    web = legacy_with_data(lab, "web.qcow2", pw)
    run(
        "qemu-img",
        "snapshot",
        "-c",
        "s1",
        "--object",
        f"secret,id=s,file={pw}",
        "--image-opts",
        f"driver=qcow2,file.filename={web},encrypt.key-secret=s",
    )
    name = f"{lab.prefix}-rawsnap"
    lab.define_as_after_upgrade(name, [disk_xml("vda", web, encryption="qcow", secret=lab.secret(PW))])
    snapshot = (
        "<domainsnapshot><name>s1</name><state>shutoff</state><creationTime>1700000000</creationTime>"
        f"<memory snapshot='no'/><disks><disk name='vda' snapshot='internal'/></disks>"
        f"{lab.inactive_xml(name)}</domainsnapshot>"
    )
    virsh("snapshot-create", name, "--xmlfile", "/dev/stdin", "--redefine", stdin=snapshot.encode())
    old_snapshot = virsh("snapshot-dumpxml", name, "s1", "--security-info").stdout
    reason = "snapshot s1: not redefined: disk vda's new image (luks) cannot hold internal snapshots"
    dry = qcrypt_domain(lab, tmp_path, name, "--to", "luks", "--dry-run")
    assert dry.returncode == 0 and reason in dry.stdout, dry.stdout + dry.stderr
    done = qcrypt_domain(lab, tmp_path, name, "--to", "luks")
    assert done.returncode == 0, done.stdout + done.stderr
    assert reason in done.stdout
    assert f"still in use, keep: {web} (used by libvirt snapshot s1 of this domain)" in done.stdout
    assert "shred" not in done.stdout
    assert virsh("snapshot-dumpxml", name, "s1", "--security-info").stdout == old_snapshot


# -- the record and the way back --------------------------------------------------------------------------------

DEV_LOG = "/dev/log"


class SyslogListener:
    """A datagram listener bound at /dev/log for one test, drained by a thread all along: every program on this
    machine logs to it meanwhile, and a full queue would block their syslog(3) calls (and ours)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(DEV_LOG)
        self.sock.settimeout(0.1)
        self.lines: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while not self.stop.is_set():
            try:
                line = self.sock.recv(65536).decode("utf-8", "replace")
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.lines.append(line)

    def records_of(
        self, domain: str, *, ident: str = "qcrypt-migrate-domain", wait_s: float = 5, count: int = 1
    ) -> list[str]:
        """The ``ident`` lines about ``domain`` received so far, waiting up to ``wait_s`` for ``count`` of them."""
        deadline = time.monotonic() + wait_s
        while True:
            with self.lock:
                found = [line for line in self.lines if f"{ident}[" in line and f"'{domain}'" in line]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()
        os.unlink(DEV_LOG)


@pytest.fixture
def syslog_listener() -> Iterator[SyslogListener]:
    """/dev/log for the test (none runs in this sandbox; a live one is never taken over)."""
    if os.path.exists(DEV_LOG):
        pytest.skip(f"{DEV_LOG} exists (a syslog daemon runs here): not taking it over")
    try:
        listener = SyslogListener()
    except OSError as e:
        pytest.skip(f"cannot bind {DEV_LOG}: {e}")
    try:
        yield listener
    finally:
        listener.close()


def test_each_changed_domain_leaves_one_syslog_record(
    lab: Lab, tmp_path: Path, syslog_listener: SyslogListener
) -> None:
    """One line per redefined domain (ident qcrypt-migrate-domain, facility daemon, notice): domain, disk, old
    and new paths, the secret (UUID, never its value), the backup file. Nothing for an unchanged domain."""
    pw = lab.passphrase_file("pw", PW)
    web = legacy_with_data(lab, "web.qcow2", pw)
    name = f"{lab.prefix}-rec"
    lab.define(name, [disk_xml("vda", web)])  # no secret: qcrypt creates one
    done = qcrypt_domain(lab, tmp_path, name, "--passphrase-file", str(pw), "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = as_json(done)["domains"]
    (record,) = syslog_listener.records_of(name)
    new, secret = lab.folder / "web.luks.qcow2", result["disks"][0]["secret_uuid"]
    assert record.startswith(f"<{syslog.LOG_DAEMON | syslog.LOG_NOTICE}>") and "qcrypt-migrate-domain[" in record
    assert (
        f"domain '{name}' redefined by migrate-domain: disk vda: {web} -> {new} (qcow2-luks), secret {secret} "
        f"(new), old image kept as {web}; old XML saved to {result['xml_backup']}"
    ) in record
    assert PW.decode() not in record
    assert result["record"] == "logged to syslog as 'qcrypt-migrate-domain' (journalctl -t qcrypt-migrate-domain)"

    rerun = qcrypt_domain(lab, tmp_path, name)
    assert rerun.returncode == 0 and "nothing to do" in rerun.stdout
    assert len(syslog_listener.records_of(name, wait_s=1, count=2)) == 1  # an unchanged domain is not recorded


def test_without_a_syslog_socket_the_summary_says_there_is_no_record(lab: Lab, tmp_path: Path) -> None:
    if hooklib.syslog_listening():
        pytest.skip(f"a syslog daemon listens at {DEV_LOG} here")
    pw = lab.passphrase_file("pw", PW)
    web = legacy_with_data(lab, "web.qcow2", pw)
    name = f"{lab.prefix}-norec"
    lab.define_as_after_upgrade(name, [disk_xml("vda", web, encryption="qcow", secret=lab.secret(PW))])
    done = qcrypt_domain(lab, tmp_path, name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "  record: not logged: no syslog socket at /dev/log (this summary is the only record)" in done.stdout


def test_the_way_back(lab: Lab, tmp_path: Path) -> None:
    """docs/GUIDE.md "The record and the way back", step by step, on libvirt 9: 'virsh define' of the backup is refused
    (as documented); putting it back as libvirt's config file and reloading restores the old definition, the
    snapshot XML backup restores the snapshot, the new secret and image go, the original is untouched, and a
    new migrate-domain works from there."""
    pw = lab.passphrase_file("pw", PW)
    web = legacy_with_data(lab, "web.qcow2", pw)
    lab.write(web, 0x51, 0, MIB, pw)
    run(
        "qemu-img",
        "snapshot",
        "-c",
        "s1",
        "--object",
        f"secret,id=s,file={pw}",
        "--image-opts",
        f"driver=qcow2,file.filename={web},encrypt.key-secret=s",
    )
    name = f"{lab.prefix}-back"
    lab.define_as_after_upgrade(
        name,
        [
            disk_xml("vda", web, encryption="qcow", secret=lab.secret(PW)),
            disk_xml("vdb", legacy_with_data(lab, "data.qcow2", pw)),
        ],
    )
    snapshot = (
        "<domainsnapshot><name>s1</name><state>shutoff</state><creationTime>1700000000</creationTime>"
        "<memory snapshot='no'/><disks>"
        f"<disk name='vda' snapshot='internal'/></disks>{lab.inactive_xml(name)}</domainsnapshot>"
    )
    virsh("snapshot-create", name, "--xmlfile", "/dev/stdin", "--redefine", "--current", stdin=snapshot.encode())
    before_xml, before_snapshot = lab.inactive_xml(name), virsh("snapshot-dumpxml", name, "s1").stdout
    originals = {p: sha256(lab.folder / p) for p in ("web.qcow2", "data.qcow2")}
    done = qcrypt_domain(lab, tmp_path, name, "--passphrase-file", str(pw), "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = as_json(done)["domains"]
    backup, (snap,) = result["xml_backup"], result["snapshots"]
    assert snap["status"] == "redefined", snap

    refused = virsh("define", backup, check=False)  # libvirt 9 refuses the old XML (docs/GUIDE.md)
    assert refused.returncode != 0 and "old qcow/qcow2 encryption is not supported" in refused.stderr

    # the way back, as docs/GUIDE.md gives it
    run("install", "-m", "0600", backup, CONFIG_DIR / f"{name}.xml")
    reload_libvirtd()
    deadline = time.monotonic() + 30
    while str(web) not in lab.inactive_xml(name):
        assert time.monotonic() < deadline, "libvirtd did not reload the old definition"
        time.sleep(0.2)
    virsh("snapshot-create", name, "--xmlfile", snap["backup"], "--redefine", "--current")
    for disk in result["disks"]:
        if disk["secret_created"]:
            virsh("secret-undefine", disk["secret_uuid"])
        Path(disk["new_path"]).unlink()

    assert lab.inactive_xml(name) == before_xml
    assert virsh("snapshot-dumpxml", name, "s1").stdout == before_snapshot
    assert virsh("snapshot-current", name, "--name").stdout.strip() == "s1"
    assert {p: sha256(lab.folder / p) for p in originals} == originals
    assert sorted(lab.qcrypt_secrets()) == sorted(s for s in lab.secrets if s in lab.qcrypt_secrets())
    again = qcrypt_domain(lab, tmp_path, name, "--passphrase-file", str(pw), "--start")
    assert again.returncode == 0 and "started: the domain is running" in again.stdout, again.stdout + again.stderr


# -- the VM-start hook in the real libvirtd ------------------------------------------------------------------------

HOOKS_DIR = Path("/etc/libvirt/hooks")


def qcrypt_hook(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qcrypt", "hook", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_hook_in_libvirtd_warns_once_per_start_and_uninstall_leaves_nothing(
    lab: Lab, syslog_listener: SyslogListener
) -> None:
    """Installed in the real libvirtd's hooks folder and picked up by a reload (SIGHUP, as the install says):
    a start of a domain with a legacy disk gives one warning (not one per hook operation), whose migrate-domain
    hint carries --passphrase-file because the disk names no secret; uninstall removes the folders install
    created."""
    if HOOKS_DIR.exists():
        pytest.skip(f"{HOOKS_DIR} exists on this host: not installing a test hook into it")
    script_name = f"50-{lab.prefix}"
    try:
        installed = qcrypt_hook("install", "--name", script_name)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert "systemctl reload libvirtd" in installed.stdout and "restart" not in installed.stdout
        assert "Warnings go to syslog/journal as 'qcrypt-hook'" in installed.stdout  # the listener is there
        reload_libvirtd()
        pw = lab.passphrase_file("pw", PW)
        web = legacy_with_data(lab, "web.qcow2", pw)
        name = f"{lab.prefix}-hooked"
        lab.define(name, [disk_xml("vda", web)])  # no <encryption>: libvirt accepts it, QEMU refuses the start
        deadline = time.monotonic() + 10
        while True:  # the reload is asynchronous: start until the hook has run for one start
            refused = virsh("start", name, check=False)
            assert refused.returncode != 0 and "AES-CBC encrypted qcow2 images is no longer supported" in refused.stderr
            lines = syslog_listener.records_of(name, ident="qcrypt-hook", wait_s=2)
            if lines or time.monotonic() > deadline:
                break
        lines = syslog_listener.records_of(name, ident="qcrypt-hook", wait_s=1, count=2)  # a second one, if any
        assert len(lines) == 1, lines
        fix = f"Fix it with the VM shut off: qcrypt migrate-domain {name} --passphrase-file PASSPHRASE_FILE "
        assert fix in lines[0]
    finally:
        removed = qcrypt_hook("uninstall", "--name", script_name)
        reload_libvirtd()
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert f"empty folder removed: {HOOKS_DIR}" in removed.stdout and "systemctl reload libvirtd" in removed.stdout
    assert not HOOKS_DIR.exists()
