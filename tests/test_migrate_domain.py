"""``qcrypt migrate-domain`` against a real libvirtd and QEMU (TCG): domains set up as a host upgrade leaves
them, fixed by the CLI, then started by libvirt with QEMU reading the guest data through the new disks.
Oracles: virsh dumpxml, qemu-img compare (with the secrets), QEMU's qemu-io inside the running domain."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from io import StringIO
from pathlib import Path
from typing import Any

import pytest

from qcrypt.cli.domain import print_outcome
from qcrypt.domain import migrate as domain_migrate
from qcrypt.domain.migrate import migrate_domain
from qcrypt.domain.options import DomainOptions, DomainOutcome
from qcrypt.errors import VerificationError
from qcrypt.libvirt.connection import open_connection
from qcrypt.migrate.options import MigrateOptions, MigrateResult
from tests._libvirt import (
    FAST,
    MIB,
    PW,
    Lab,
    as_json,
    backends,
    disk_of,
    disk_xml,
    node_of,
    qcrypt_domain,
    qemu_reads,
    run,
    same_guest_data,
    sha256,
    virsh,
)
from tests._tools import FIXTURES, require_tool

pytestmark = [pytest.mark.interop, pytest.mark.libvirt]


def start_and_read(name: str, path: Path, reads: list[tuple[int, int, int]]) -> None:
    """The domain runs, and QEMU reads every (pattern, offset, length) through the disk at ``path``."""
    assert virsh("domstate", name).stdout.strip() == "running"
    node = node_of(name, path)
    for pattern, offset, length in reads:
        assert qemu_reads(name, node, pattern, offset, length), (pattern, offset)
    pattern, offset, length = reads[0]
    assert not qemu_reads(name, node, pattern ^ 0xFF, offset, length)  # the oracle can say no


# -- the whole story: dry run, fix, start, read, rerun ----------------------------------------------------------


@pytest.mark.parametrize("backend", backends())
def test_declared_qcow_disk_with_readable_secret(lab: Lab, tmp_path: Path, backend: str) -> None:
    pw = lab.passphrase_file("pw", PW)
    web = lab.legacy_image("web.qcow2", pw)
    lab.write(web, 0x33, 0, MIB, pw)
    lab.write(web, 0x44, 9 * MIB, 512 * 1024, pw)
    plain = lab.plain_image("data.qcow2")
    lab.write(plain, 0x5A, MIB, 64 * 1024)
    secret = lab.secret(PW)
    name = f"{lab.prefix}-web"
    lab.define_as_after_upgrade(name, [disk_xml("vda", web, encryption="qcow", secret=secret), disk_xml("vdb", plain)])
    refused = virsh("start", name, check=False)
    assert "old qcow/qcow2 encryption is not supported" in refused.stderr  # what operators see (docs/GUIDE.md)
    before_xml, before_files = lab.inactive_xml(name), lab.files()

    dry = qcrypt_domain(lab, tmp_path, name, "--dry-run", "--format", "json", backend=backend)
    assert dry.returncode == 0, dry.stderr
    (planned,) = as_json(dry)["domains"]
    assert planned["status"] == "planned" and planned["xml_backup"] is None
    assert '+        <encryption format="luks">' in planned["xml_diff"] and 'format="qcow"' in planned["xml_diff"]
    assert [d["target"] for d in planned["disks"]] == ["vda"]
    assert lab.inactive_xml(name) == before_xml and lab.files() == before_files  # the dry run changed nothing

    done = qcrypt_domain(lab, tmp_path, name, "--start", "--format", "json", backend=backend)
    assert done.returncode == 0, done.stderr
    document = as_json(done)
    assert document["summary"] == {"migrated": 1, "unchanged": 0, "planned": 0, "skipped": 0, "failed": 0}
    (result,) = document["domains"]
    (disk,) = result["disks"]
    new = lab.folder / "web.luks.qcow2"
    assert disk["new_path"] == str(new) and disk["secret_uuid"] == secret and disk["secret_created"] is False
    assert result["started"] is True
    assert Path(result["xml_backup"]).read_text().strip() == before_xml.strip()  # the old XML, as libvirt had it
    # the new XML, as libvirt now has it
    vda = disk_of(lab.inactive_xml(name), "vda")
    assert vda.find("source").get("file") == str(new)  # type: ignore[union-attr]
    assert vda.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    enc = vda.find("source/encryption")
    assert enc is not None and enc.get("format") == "luks" and vda.find("encryption") is None
    assert enc.find("secret").get("uuid") == secret  # type: ignore[union-attr]
    assert ET.tostring(disk_of(lab.inactive_xml(name), "vdb")) == ET.tostring(disk_of(before_xml, "vdb"))
    # the images: the plain disk and the old image untouched, the new one the same guest data (qemu-img)
    after = lab.files()
    assert after["data.qcow2"] == before_files["data.qcow2"] and after["web.qcow2"] == before_files["web.qcow2"]
    same_guest_data(lab, [f"driver=qcow2,file.filename={web},encrypt.key-secret=s"], new, pw)
    # QEMU inside the running VM reads the guest data through the new disk
    start_and_read(name, new, [(0x33, 0, MIB), (0x44, 9 * MIB, 512 * 1024), (0x00, 4 * MIB, MIB)])
    start_and_read(name, plain, [(0x5A, MIB, 64 * 1024)])

    virsh("destroy", name)
    rerun = qcrypt_domain(lab, tmp_path, name, backend=backend)
    assert rerun.returncode == 0 and "unchanged" in rerun.stdout and "nothing to do" in rerun.stdout
    assert lab.files() == after


@pytest.mark.parametrize("backend", backends())
def test_legacy_disk_without_encryption_gets_a_new_secret(lab: Lab, tmp_path: Path, backend: str) -> None:
    pw = lab.passphrase_file("pw", PW)
    web = lab.legacy_image("web.qcow2", pw)
    lab.write(web, 0x61, 3 * MIB, MIB, pw)
    name = f"{lab.prefix}-noenc"
    lab.define(name, [disk_xml("vda", web)])  # libvirt accepts it: nothing declares the encryption
    refused = virsh("start", name, check=False)
    assert "Use of AES-CBC encrypted qcow2 images is no longer supported in system emulators" in refused.stderr

    missing = qcrypt_domain(lab, tmp_path, name, "--format", "json", backend=backend)
    assert missing.returncode == 2 and "names no libvirt secret" in as_json(missing)["domains"][0]["reason"]

    done = qcrypt_domain(lab, tmp_path, name, "--passphrase-file", "-", "--start", stdin=PW + b"\n", backend=backend)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "new secret" in done.stdout and "started: the domain is running" in done.stdout
    assert PW.decode() not in done.stdout + done.stderr
    new = lab.folder / "web.luks.qcow2"
    (created,) = lab.qcrypt_secrets()
    assert f"<volume>{new}</volume>" in virsh("secret-dumpxml", created).stdout  # usage volume = the new path
    assert "private" in virsh("secret-get-value", created, check=False).stderr  # never readable back
    enc = disk_of(lab.inactive_xml(name), "vda").find("source/encryption")
    assert enc is not None and enc.find("secret").get("uuid") == created  # type: ignore[union-attr]
    # the new keyslot (and secret) hold every byte given, the newline included, as cryptsetup --key-file would:
    # the legacy key is the same either way (its first 16 bytes), so the exact bytes open the source
    pw_with_newline = lab.passphrase_file("pw-nl", PW + b"\n")
    same_guest_data(lab, [f"driver=qcow2,file.filename={web},encrypt.key-secret=s"], new, pw_with_newline)
    start_and_read(name, new, [(0x61, 3 * MIB, MIB)])


def test_legacy_base_under_plain_overlay_is_flattened_to_raw_luks(lab: Lab, tmp_path: Path) -> None:
    pw = lab.passphrase_file("pw", PW)
    base = lab.legacy_image("base.qcow2", pw)
    lab.write(base, 0x21, 0, 2 * MIB, pw)
    overlay = lab.plain_image("overlay.qcow2", backing=base)
    lab.write(overlay, 0x22, MIB, 64 * 1024, backing_pw=pw)
    secret = lab.secret(PW)
    name = f"{lab.prefix}-chain"
    lab.define_as_after_upgrade(name, [disk_xml("vda", overlay, encryption="qcow", secret=secret)])
    done = qcrypt_domain(lab, tmp_path, name, "--format", "json", "--start", "--to", "luks")
    assert done.returncode == 0, done.stderr
    (disk,) = as_json(done)["domains"][0]["disks"]
    assert disk["flatten"] is True and str(base) in disk["legacy_layers"] and disk["to"] == "luks"
    new = lab.folder / "overlay.luks"
    info = json.loads(run("qemu-img", "info", "-U", "--output", "json", new).stdout)
    assert info["format"] == "luks" and "backing-filename" not in info
    same_guest_data(lab, [f"driver=qcow2,file.filename={overlay},backing.encrypt.key-secret=s"], new, pw, "luks")
    vda = disk_of(lab.inactive_xml(name), "vda")
    assert vda.find("driver").get("type") == "raw"  # type: ignore[union-attr]
    assert vda.find("backingStore") is None or len(vda.find("backingStore")) == 0  # type: ignore[arg-type]
    start_and_read(name, new, [(0x21, 0, MIB), (0x22, MIB, 64 * 1024), (0x21, MIB + 64 * 1024, 64 * 1024)])


def test_luks_image_still_declared_qcow_gets_only_its_xml_fixed(lab: Lab, tmp_path: Path) -> None:
    """The image was migrated by hand (it is LUKS) but the XML still says format='qcow', which libvirt
    refuses: only the XML changes, with the same secret, and no file is written."""
    passphrase = b"qcrypt luks test passphrase"  # of the qemu-img made fixture (tests/fixtures/manifest.json)
    pw = lab.passphrase_file("pw", passphrase)
    image = lab.folder / "web.qcow2"
    image.write_bytes(gzip.decompress((FIXTURES / "luks-qcow2-v3-c64k.qcow2.gz").read_bytes()))
    lab.write(image, 0x71, 1536 * 1024, 256 * 1024, pw)
    name = f"{lab.prefix}-xmlonly"
    lab.define_as_after_upgrade(name, [disk_xml("vda", image, encryption="qcow", secret=lab.secret(passphrase))])
    before_files = lab.files()
    done = qcrypt_domain(lab, tmp_path, name, "--start", "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    (disk,) = as_json(done)["domains"][0]["disks"]
    assert disk["xml_only"] is True and disk["new_path"] == str(image)
    assert lab.files() == before_files
    enc = disk_of(lab.inactive_xml(name), "vda").find("source/encryption")
    assert enc is not None and enc.get("format") == "luks"
    start_and_read(name, image, [(0x71, 1536 * 1024, 256 * 1024)])


def test_block_disk_gets_a_file_in_the_output_dir(lab: Lab, tmp_path: Path) -> None:
    """A legacy image on a block device: without --output-dir a clear error and no change; with it, the new
    image is a file there, the disk becomes a file disk, the device is untouched and the VM reads the data."""
    require_tool("losetup")
    pw = lab.passphrase_file("pw", PW)
    device = lab.loop_device("lv.img", 48 * MIB)
    run(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        f"secret,id=s,file={pw}",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=s",
        device,
        "32M",
    )
    lab.write(Path(device), 0x77, 5 * MIB, MIB, pw)
    name = f"{lab.prefix}-block"
    lab.define_as_after_upgrade(name, [disk_xml("vda", device, encryption="qcow", secret=lab.secret(PW), block=True)])
    before_xml, before_files = lab.inactive_xml(name), lab.files()
    refused = qcrypt_domain(lab, tmp_path, name)
    assert refused.returncode == 8 and "--output-dir" in refused.stdout
    assert lab.inactive_xml(name) == before_xml and lab.files() == before_files
    out = lab.folder / "out"
    out.mkdir()
    done = qcrypt_domain(lab, tmp_path, name, "--output-dir", str(out), "--start")
    assert done.returncode == 0, done.stdout + done.stderr
    new = out / f"{Path(device).name}.luks.qcow2"
    vda = disk_of(lab.inactive_xml(name), "vda")
    assert vda.get("type") == "file" and vda.find("source").attrib == {"file": str(new)}  # type: ignore[union-attr]
    assert lab.files()["lv.img"] == before_files["lv.img"]  # the device's bytes are untouched
    same_guest_data(lab, [f"driver=qcow2,file.filename={device},encrypt.key-secret=s"], new, pw)
    start_and_read(name, new, [(0x77, 5 * MIB, MIB)])


def test_passphrase_file_with_a_newline_the_key_lacks(lab: Lab, tmp_path: Path) -> None:
    """A short legacy key made without a newline, given in a file that ends in one: the exact bytes open
    nothing, the content without the newline does; the run says so, and the new keyslot and secret take it."""
    short = b"short pw"  # under 16 bytes: the newline would be part of the legacy key
    key = lab.passphrase_file("key", short)
    web = lab.legacy_image("nl.qcow2", key, size="4M")
    lab.write(web, 0x3C, 0, MIB, key)
    name = f"{lab.prefix}-newline"
    lab.define(name, [disk_xml("vda", web)])
    echoed = lab.passphrase_file("echoed", short + b"\n")
    done = qcrypt_domain(lab, tmp_path, name, "--passphrase-file", str(echoed), "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    (disk,) = as_json(done)["domains"][0]["disks"]
    assert disk["passphrase_from"] == "passphrase file without its trailing newline"
    same_guest_data(lab, [f"driver=qcow2,file.filename={web},encrypt.key-secret=s"], lab.folder / "nl.luks.qcow2", key)


# -- refusals: nothing changes -----------------------------------------------------------------------------------


def _two_disk_domain(lab: Lab, second_secret_value: bytes, *, private: bool = False) -> tuple[str, Path]:
    pw = lab.passphrase_file("pw", PW)
    first = lab.legacy_image("a.qcow2", pw)
    lab.write(first, 0x11, 0, MIB, pw)
    second = lab.legacy_image("b.qcow2", pw)
    lab.write(second, 0x12, 0, MIB, pw)
    name = f"{lab.prefix}-two"
    lab.define_as_after_upgrade(
        name,
        [
            disk_xml("vda", first, encryption="qcow", secret=lab.secret(PW)),
            disk_xml("vdb", second, encryption="qcow", secret=lab.secret(second_secret_value, private=private)),
        ],
    )
    return name, pw


@pytest.mark.parametrize("backend", backends())
def test_private_secret_without_passphrase_file(lab: Lab, tmp_path: Path, backend: str) -> None:
    name, pw = _two_disk_domain(lab, PW, private=True)
    before_xml, before_files, secrets = lab.inactive_xml(name), lab.files(), lab.qcrypt_secrets()
    done = qcrypt_domain(lab, tmp_path, name, backend=backend)
    assert done.returncode == 2
    assert "private" in done.stdout and "--passphrase-file" in done.stdout
    assert "Traceback" not in done.stderr
    assert lab.inactive_xml(name) == before_xml and lab.files() == before_files
    assert lab.qcrypt_secrets() == secrets and not (tmp_path / "backups").exists()
    # with the passphrase file it goes through (the private secret is kept and reused)
    fixed = qcrypt_domain(lab, tmp_path, name, "--passphrase-file", str(pw), "--format", "json", backend=backend)
    assert fixed.returncode == 0, fixed.stderr
    disks = as_json(fixed)["domains"][0]["disks"]
    assert [d["passphrase_from"] for d in disks] == ["libvirt secret", "passphrase file"]


def test_wrong_passphrase_on_the_second_disk_rolls_everything_back(lab: Lab, tmp_path: Path) -> None:
    """The second disk's secret is wrong: the pre-checks find it before the first disk is copied; nothing is
    written or defined, no secret or backup remains, and the error names the disk."""
    name, _pw = _two_disk_domain(lab, b"not the passphrase")
    before_xml, before_files, secrets = lab.inactive_xml(name), lab.files(), lab.qcrypt_secrets()
    done = qcrypt_domain(lab, tmp_path, name, "--format", "json")
    assert done.returncode == 4, done.stderr
    (failed,) = as_json(done)["domains"]
    assert failed["status"] == "failed" and "passphrase is probably wrong" in failed["reason"]
    assert (failed["error"]["disk"], failed["error"]["path"]) == ("vdb", str(lab.folder / "b.qcow2"))
    assert f"disk vdb ({lab.folder / 'b.qcow2'})" in done.stderr
    assert failed["xml_backup"] is None
    assert lab.inactive_xml(name) == before_xml
    assert lab.files() == before_files  # a.luks.qcow2 was written and verified, then removed again
    assert lab.qcrypt_secrets() == secrets
    assert not list((tmp_path / "backups").glob("*")) if (tmp_path / "backups").exists() else True


def test_replace_rolls_back_then_replaces_in_place(lab: Lab, tmp_path: Path) -> None:
    """--replace: a failure on the second disk puts the first disk's original back under its name; once the
    secret is right, both images are replaced in place (originals kept as *.qcrypt-orig) and the VM runs."""
    name, pw = _two_disk_domain(lab, b"not the passphrase")
    before_xml, before_files = lab.inactive_xml(name), lab.files()
    failed = qcrypt_domain(lab, tmp_path, name, "--replace")
    assert failed.returncode == 4, failed.stdout + failed.stderr
    assert lab.inactive_xml(name) == before_xml and lab.files() == before_files
    vdb_secret = disk_of(before_xml, "vdb").find("encryption/secret").get("uuid")  # type: ignore[union-attr]
    virsh("secret-set-value", "--secret", vdb_secret, "--file", "/dev/stdin", "--plain", stdin=PW)
    done = qcrypt_domain(lab, tmp_path, name, "--replace", "--start")
    assert done.returncode == 0, done.stdout + done.stderr
    after = lab.files()
    assert after["a.qcow2.qcrypt-orig"] == before_files["a.qcow2"] != after["a.qcow2"]
    assert after["b.qcow2.qcrypt-orig"] == before_files["b.qcow2"] != after["b.qcow2"]
    assert "once the VM is confirmed good" in done.stdout and "a.qcow2.qcrypt-orig" in done.stdout
    vda = disk_of(lab.inactive_xml(name), "vda")
    assert vda.find("source").get("file") == str(lab.folder / "a.qcow2")  # type: ignore[union-attr]
    assert vda.find("source/encryption").get("format") == "luks"  # type: ignore[union-attr]
    same_guest_data(
        lab,
        [f"driver=qcow2,file.filename={lab.folder / 'a.qcow2.qcrypt-orig'},encrypt.key-secret=s"],
        lab.folder / "a.qcow2",
        pw,
    )
    start_and_read(name, lab.folder / "a.qcow2", [(0x11, 0, MIB)])
    start_and_read(name, lab.folder / "b.qcow2", [(0x12, 0, MIB)])


def _root_only_file(lab: Lab) -> Path:
    """A root-only file on the images' filesystem (as /etc/passwd is on a one-disk host)."""
    vault = lab.folder / "etc"
    vault.mkdir(mode=0o700)
    target = vault / "passwd"
    target.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    return target


def _migrate_in_process(lab: Lab, tmp_path: Path, name: str) -> DomainOutcome:
    conn = open_connection("qemu:///system", "virsh")
    try:
        return migrate_domain(
            conn, name, DomainOptions(replace=True, iterations=1000, backup_dir=str(tmp_path / "backups"))
        )
    finally:
        conn.close()


def _swap_then_fail_disk_b(lab: Lab, monkeypatch: pytest.MonkeyPatch, swapped: Path, target: Path) -> None:
    """When migrate-domain reaches disk b, the tenant moves ``swapped`` away and puts a symlink to ``target`` in
    its place, then disk b fails (so the undo of disk a meets the swapped name)."""
    real_migrate = domain_migrate.migrate_image

    def migrate_image(source: str, opts: MigrateOptions) -> MigrateResult:
        if source.endswith("b.qcow2"):
            swapped.rename(lab.folder / "a-moved.qcow2")
            swapped.symlink_to(target)
            raise VerificationError(f"{source}: the output did not read back as the source")
        return real_migrate(source, opts)

    monkeypatch.setattr(domain_migrate, "migrate_image", migrate_image)


def test_replace_undo_never_follows_a_symlink_the_tenant_swapped_in(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--replace migrates disk a, then disk b fails (its verification, after every pre-check passed), so a's
    original goes back. Just before the failure the tenant puts a symlink to a root-only file under a.qcow2: the
    undo must put the original back under a.qcow2 in the image folder, never rename it over the symlink's
    target."""
    name, _pw = _two_disk_domain(lab, PW)
    target = _root_only_file(lab)
    target_before, target_inode = target.read_bytes(), target.stat().st_ino
    first = lab.folder / "a.qcow2"
    original = sha256(first)
    _swap_then_fail_disk_b(lab, monkeypatch, first, target)  # disk a is done: the tenant's move, then b fails
    outcome = _migrate_in_process(lab, tmp_path, name)
    assert outcome.status == "failed" and "did not read back" in str(outcome.reason)
    assert (outcome.error_disk, outcome.error_path) == ("vdb", str(lab.folder / "b.qcow2"))
    assert target.read_bytes() == target_before and target.stat().st_ino == target_inode
    assert not first.is_symlink() and sha256(first) == original  # the original is back under its name
    assert not (lab.folder / "a.qcow2.qcrypt-orig").exists()


def test_replace_undo_refuses_an_original_the_tenant_swapped(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tenant swaps a.qcow2.qcrypt-orig for a symlink to a root-only file before disk b fails: the undo must
    not move that symlink under a.qcow2 (the domain would open the root-only file), and it says what it could
    not undo."""
    name, _pw = _two_disk_domain(lab, PW)
    target = _root_only_file(lab)
    first, kept = lab.folder / "a.qcow2", lab.folder / "a.qcow2.qcrypt-orig"
    _swap_then_fail_disk_b(lab, monkeypatch, kept, target)
    outcome = _migrate_in_process(lab, tmp_path, name)
    assert outcome.status == "failed"
    assert not first.is_symlink() and first.read_bytes()[:4] == b"QFI\xfb"  # still qcrypt's new image
    assert target.read_bytes().startswith(b"root:")
    assert len(outcome.undo_errors) == 1 and "no longer the original" in outcome.undo_errors[0]
    printed = StringIO()
    with contextlib.redirect_stdout(printed):
        print_outcome(outcome)
    assert "NOT undone" in printed.getvalue()


def test_advice_never_names_an_original_the_tenant_swapped(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the originals were kept, the tenant swaps a.qcow2.qcrypt-orig for a symlink to a root-only file:
    the printed 'shred -u' names only b's original, and a's is reported as not checked."""
    name, _pw = _two_disk_domain(lab, PW)
    target = _root_only_file(lab)
    kept = lab.folder / "a.qcow2.qcrypt-orig"

    class SwappingConnection:
        def __init__(self, conn: Any) -> None:
            self.conn = conn

        def __getattr__(self, attr: str) -> Any:
            return getattr(self.conn, attr)

        def define_xml(self, xml: str) -> None:
            kept.rename(lab.folder / "a-moved.qcow2")
            kept.symlink_to(target)
            self.conn.define_xml(xml)

    conn = open_connection("qemu:///system", "virsh")
    try:
        outcome = migrate_domain(
            SwappingConnection(conn),
            name,  # type: ignore[arg-type]
            DomainOptions(replace=True, iterations=1000, backup_dir=str(tmp_path / "backups")),
        )
    finally:
        conn.close()
    assert outcome.status == "migrated", outcome.reason
    printed = StringIO()
    with contextlib.redirect_stdout(printed):
        print_outcome(outcome)
    shred = next(line for line in printed.getvalue().splitlines() if "shred -u" in line)
    assert str(kept) not in shred and str(lab.folder / "b.qcow2.qcrypt-orig") in shred
    assert "not checked" in printed.getvalue() and str(kept) in printed.getvalue()
    assert target.read_bytes().startswith(b"root:")


def test_wrong_passphrase_on_the_only_disk(lab: Lab, tmp_path: Path) -> None:
    pw = lab.passphrase_file("pw", PW)
    web = lab.legacy_image("web.qcow2", pw)
    lab.write(web, 0x33, 0, MIB, pw)
    name = f"{lab.prefix}-wrong"
    lab.define_as_after_upgrade(name, [disk_xml("vda", web, encryption="qcow", secret=lab.secret(b"wrong"))])
    before_xml, before_files = lab.inactive_xml(name), lab.files()
    done = qcrypt_domain(lab, tmp_path, name)
    assert done.returncode == 4 and "passphrase is probably wrong" in done.stdout
    assert lab.inactive_xml(name) == before_xml and lab.files() == before_files


def test_running_domain_is_skipped_with_exit_11(lab: Lab, tmp_path: Path) -> None:
    pw = lab.passphrase_file("pw", PW)
    plain = lab.plain_image("boot.qcow2")
    web = lab.legacy_image("web.qcow2", pw)
    lab.write(web, 0x4B, 0, MIB, pw)
    name = f"{lab.prefix}-busy"
    lab.define(name, [disk_xml("vda", plain)])
    virsh("start", name)
    lab.define(name, [disk_xml("vda", plain), disk_xml("vdb", web)])  # the next boot's config gets a legacy disk
    before_files = lab.files()
    done = qcrypt_domain(lab, tmp_path, name, "--passphrase-file", str(pw), "--format", "json")
    assert done.returncode == 11, done.stderr
    (skipped,) = as_json(done)["domains"]
    assert skipped["status"] == "skipped" and skipped["reason"] == "running: shut it down first"
    assert lab.files() == before_files
    virsh("suspend", name)
    paused = qcrypt_domain(lab, tmp_path, name, "--passphrase-file", str(pw))
    assert paused.returncode == 11 and "skipped (paused: shut it down first)" in paused.stdout
    assert lab.files() == before_files
    # the dry run previews it (every pre-check run, the state reported) and its exit code says the real run
    # would be refused until the domain is shut off
    virsh("resume", name)
    preview = qcrypt_domain(lab, tmp_path, name, "--dry-run", "--passphrase-file", str(pw), "--format", "json")
    assert preview.returncode == 11, preview.stdout + preview.stderr
    (planned,) = as_json(preview)["domains"]
    assert (planned["status"], planned["state"]) == ("planned", "running")
    assert planned["reason"] == "running: the real run needs it shut off"
    assert [d["target"] for d in planned["disks"]] == ["vdb"] and "+        <encryption" in planned["xml_diff"]
    assert f"domain {name}: planned: running: the real run needs it shut off" in preview.stderr
    table = qcrypt_domain(lab, tmp_path, name, "--dry-run", "--passphrase-file", str(pw))
    assert table.returncode == 11 and "image locks NOT checked (the domain is running" in table.stdout
    # a pre-check failure of a running domain says so with its own exit code (here: a wrong passphrase)
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"not the passphrase")
    bad = qcrypt_domain(lab, tmp_path, name, "--dry-run", "--passphrase-file", str(wrong), "--format", "json")
    assert bad.returncode == 4 and as_json(bad)["domains"][0]["error"]["code"] == "bad-passphrase"
    assert lab.files() == before_files


@pytest.mark.parametrize("backend", backends())
def test_usage_errors(lab: Lab, tmp_path: Path, backend: str) -> None:
    done = qcrypt_domain(lab, tmp_path, backend=backend)
    assert done.returncode == 2 and "name one or more domains, or give --all" in done.stderr
    missing = qcrypt_domain(lab, tmp_path, f"{lab.prefix}-absent", "--format", "json", backend=backend)
    assert missing.returncode == 13 and as_json(missing)["domains"][0]["status"] == "failed"


# -- the XML's driver type is the format ----------------------------------------------------------------------


def test_guest_written_header_on_a_raw_disk_is_guest_data(lab: Lab, tmp_path: Path) -> None:
    """A guest writes a legacy qcow2 header naming a root-only host file into sector 0 of its raw disk. The
    domain XML says raw: migrate-domain (and its dry run), the hook and scan --libvirt-xml treat the disk as the
    guest data it is, and nothing of the host file reaches anything. Declared qcow2 instead, the header is
    believed, and its backing file is refused everywhere."""
    from qcrypt.hook import check as hook

    host_file = tmp_path / "root-only"  # pytest's tmp folders are root-only
    marker = b"HOST-SECRET-" + os.urandom(8).hex().encode()
    host_file.write_bytes(marker * 4096)
    host_file.chmod(0o600)
    pw = lab.passphrase_file("pw", PW)
    fake = tmp_path / "fake.qcow2"
    run(
        "qemu-img",
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "--object",
        f"secret,id=s,file={pw}",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=s",
        "-b",
        host_file,
        "-F",
        "raw",
        fake,
        "1M",
    )
    disk = lab.folder / "guest.raw"
    with open(disk, "wb") as fh:
        fh.truncate(4 * MIB)
        fh.write(fake.read_bytes())  # what the guest wrote through its own disk
    name = f"{lab.prefix}-rawhdr"
    lab.define(name, [disk_xml("vda", disk, driver="raw")])
    before_xml, before_files = lab.inactive_xml(name), lab.files()

    for extra in (["--dry-run"], ["--start"]):
        done = qcrypt_domain(lab, tmp_path, name, "--format", "json", "--passphrase-file", str(pw), *extra)
        assert done.returncode == 0, done.stdout + done.stderr
        (outcome,) = as_json(done)["domains"]
        assert (outcome["status"], outcome["disks"]) == ("unchanged", []), outcome
        assert marker.decode() not in done.stdout + done.stderr
    assert lab.inactive_xml(name) == before_xml and lab.files() == before_files
    assert virsh("domstate", name).stdout.strip() == "shut off"

    check = hook.check_domain_xml(before_xml)
    assert (check.warnings, check.errors) == ([], [])

    xml_dir = tmp_path / "xml"
    xml_dir.mkdir()
    (xml_dir / f"{name}.xml").write_text(before_xml, encoding="utf-8")
    scanned = subprocess.run(
        [sys.executable, "-m", "qcrypt", "scan", "--libvirt-xml", str(xml_dir), "--format", "json", str(disk)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert scanned.returncode == 0, scanned.stdout + scanned.stderr
    (report,) = json.loads(scanned.stdout)["images"]
    assert (report["format"], report["encryption"], report["findings"]) == ("raw", "none", [])
    assert report["virtual_size"] == 4 * MIB and report["domains"] == [name]
    # without the XML, the auditor does say what the bytes look like (and still refuses the host file)
    probed = subprocess.run(
        [sys.executable, "-m", "qcrypt", "scan", "--format", "json", str(disk)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    (probed_report,) = json.loads(probed.stdout)["images"]
    assert probed_report["encryption"] == "aes-cbc-legacy" and probed_report["backing_chain"] == []
    assert "backing-outside-storage" in [f["code"] for f in probed_report["findings"]]

    # declared qcow2 (the administrator's word), the header is the image's: its backing file is refused
    lab.define(name, [disk_xml("vda", disk, driver="qcow2")])
    for extra in (["--dry-run"], []):
        done = qcrypt_domain(lab, tmp_path, name, "--format", "json", "--passphrase-file", str(pw), *extra)
        assert done.returncode == 8, done.stdout + done.stderr
        (outcome,) = as_json(done)["domains"]
        assert outcome["status"] == "failed" and "outside the image's storage" in outcome["reason"]
        assert f"--allow-backing-dir {tmp_path}" in outcome["reason"]
    assert lab.files() == before_files
    (warning,) = hook.check_domain_xml(lab.inactive_xml(name)).warnings
    assert "outside the image's storage" in warning.reason and warning.domain_command is None
    assert warning.command == f"qcrypt info {disk}" and "Check it: qcrypt info" in warning.message()
    advised = subprocess.run(
        [sys.executable, "-m", "qcrypt", *warning.command.split()[1:]],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert advised.returncode == 0 and "backing-outside-storage" in advised.stdout
    assert marker.decode() not in advised.stdout + warning.message()


def test_legacy_disk_without_data_needs_an_explicit_choice(lab: Lab, tmp_path: Path) -> None:
    """No data cluster, nothing to check a passphrase against: refused (exit 8, nothing changes) until the
    operator accepts it, and then reported as NOT verified."""
    pw = lab.passphrase_file("pw", PW)
    empty = lab.legacy_image("empty.qcow2", pw, size="1M")
    name = f"{lab.prefix}-empty"
    lab.define(name, [disk_xml("vda", empty)])
    before_xml, before_files = lab.inactive_xml(name), lab.files()
    wrong = b"not the passphrase\n"
    refused = qcrypt_domain(lab, tmp_path, name, "--passphrase-file", "-", "--format", "json", stdin=wrong)
    assert refused.returncode == 8, refused.stdout + refused.stderr
    reason = as_json(refused)["domains"][0]["reason"]
    assert "cannot be verified" in reason and "--accept-unverified-passphrase" in reason
    assert lab.inactive_xml(name) == before_xml and lab.files() == before_files and lab.qcrypt_secrets() == []

    done = qcrypt_domain(
        lab, tmp_path, name, "--passphrase-file", "-", "--accept-unverified-passphrase", stdin=PW + b"\n"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the legacy passphrase was NOT verified" in done.stdout
    again = as_json(qcrypt_domain(lab, tmp_path, name, "--format", "json"))
    assert again["domains"][0]["status"] == "unchanged"  # fixed: nothing legacy is left


# -- secrets proven to open the new disk, a secret per layer, pre-checks ---------------------------------------


def test_private_secret_that_does_not_match_gets_a_new_secret(lab: Lab, tmp_path: Path) -> None:
    """The disk's secret is private and holds another passphrase than the image's: qcrypt cannot check it, so the
    new disk gets a new secret holding the passphrase that opened the image (the old secret stays as it was), and
    the domain starts on it."""
    pw = lab.passphrase_file("pw", PW)
    web = lab.legacy_image("web.qcow2", pw)
    lab.write(web, 0x5C, 2 * MIB, MIB, pw)
    private = lab.secret(b"another passphrase", private=True)
    name = f"{lab.prefix}-private"
    lab.define_as_after_upgrade(name, [disk_xml("vda", web, encryption="qcow", secret=private)])
    dry = qcrypt_domain(lab, tmp_path, name, "--dry-run", "--passphrase-file", str(pw))
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "      new secret, passphrase from the passphrase file" in dry.stdout
    assert f"libvirt secret {private} is private" in dry.stdout and "new disk gets a new secret" in dry.stdout
    done = qcrypt_domain(lab, tmp_path, name, "--passphrase-file", str(pw), "--start", "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = as_json(done)["domains"]
    (disk,) = result["disks"]
    assert disk["secret_created"] is True and disk["old_secret_uuid"] == private and disk["secret_uuid"] != private
    assert result["started"] is True, result["start_error"]
    enc = disk_of(lab.inactive_xml(name), "vda").find("source/encryption")
    assert enc is not None and enc.find("secret").get("uuid") == disk["secret_uuid"]  # type: ignore[union-attr]
    assert private in virsh("secret-list").stdout  # the old secret is kept, for the way back
    start_and_read(name, lab.folder / "web.luks.qcow2", [(0x5C, 2 * MIB, MIB)])


def _chain_with_a_secret_per_layer(
    lab: Lab, base_secret_value: bytes, declared_base: Path | None = None
) -> tuple[str, Path, Path, Path, Path]:
    """A legacy overlay over a legacy base, each with its own passphrase and its own <encryption> (the XML's
    <backingStore> names ``declared_base`` instead of the base when given)."""
    top_pw = lab.passphrase_file("top-pw", b"the overlay's passphrase")
    base_pw = lab.passphrase_file("base-pw", b"the base's own passphrase")
    base = lab.legacy_image("base.qcow2", base_pw)
    lab.write(base, 0x2B, 0, 2 * MIB, base_pw)
    top = lab.folder / "top.qcow2"
    run(
        "qemu-img",
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "--object",
        f"secret,id=s,file={top_pw}",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=s",
        "-b",
        base,
        "-F",
        "qcow2",
        top,
        "16M",
    )
    run(
        "qemu-io",
        "--object",
        f"secret,id=s,file={top_pw}",
        "--object",
        f"secret,id=b,file={base_pw}",
        "--image-opts",
        f"driver=qcow2,file.filename={top},encrypt.key-secret=s,backing.encrypt.key-secret=b",
        "-c",
        f"write -P 0x2C {MIB} {64 * 1024}",
    )
    top_secret = lab.secret(top_pw.read_bytes())
    base_secret = lab.secret(base_secret_value)
    disk = (
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{top}'>"
        f"<encryption format='qcow'><secret type='passphrase' uuid='{top_secret}'/></encryption></source>"
        f"<backingStore type='file'><format type='qcow2'/><source file='{declared_base or base}'>"
        f"<encryption format='qcow'><secret type='passphrase' uuid='{base_secret}'/></encryption></source>"
        "<backingStore/></backingStore><target dev='vda' bus='virtio'/></disk>"
    )  # as libvirt keeps it
    name = f"{lab.prefix}-layers"
    lab.define_as_after_upgrade(name, [disk])
    return name, top, base, top_pw, base_secret  # type: ignore[return-value]


def test_chain_with_a_secret_per_layer(lab: Lab, tmp_path: Path) -> None:
    name, _top, base, _top_pw, base_secret = _chain_with_a_secret_per_layer(lab, b"the base's own passphrase")
    done = qcrypt_domain(lab, tmp_path, name, "--start", "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = as_json(done)["domains"]
    (disk,) = result["disks"]
    assert disk["flatten"] is True and disk["layer_secrets"] == {str(base): base_secret}
    assert result["started"] is True, result["start_error"]
    new = lab.folder / "top.luks.qcow2"
    start_and_read(name, new, [(0x2B, 0, MIB), (0x2C, MIB, 64 * 1024), (0x2B, MIB + 64 * 1024, 64 * 1024)])


def test_chain_whose_base_secret_is_wrong_is_refused_by_the_dry_run(lab: Lab, tmp_path: Path) -> None:
    """The base's own secret does not open the base: the dry run finds it (exit 4, naming the base's file and
    the disk), and the real run refuses before writing anything."""
    name, top, base, _top_pw, _base_secret = _chain_with_a_secret_per_layer(lab, b"not the base's passphrase")
    before_xml, before_files = lab.inactive_xml(name), lab.files()
    for extra in (["--dry-run"], []):
        done = qcrypt_domain(lab, tmp_path, name, "--format", "json", *extra)
        assert done.returncode == 4, done.stdout + done.stderr
        error = as_json(done)["domains"][0]["error"]
        assert error["code"] == "bad-passphrase" and error["message"].startswith(f"{base}: the passphrase is")
        assert (error["disk"], error["path"], error["exit_code"]) == ("vda", str(top), 4)
        assert f"disk vda ({top})" in done.stderr
    assert lab.inactive_xml(name) == before_xml and lab.files() == before_files


def test_backing_store_secret_for_a_file_outside_the_chain_is_refused(lab: Lab, tmp_path: Path) -> None:
    """The XML gives a secret to a <backingStore> file the image's chain does not reach (a stale XML): the dry
    run refuses it (exit 8), as the copy would, instead of silently using the disk's passphrase for the base."""
    elsewhere = lab.folder / "elsewhere.qcow2"
    name, _top, _base, _top_pw, _base_secret = _chain_with_a_secret_per_layer(
        lab, b"the base's own passphrase", declared_base=elsewhere
    )
    lab.plain_image("elsewhere.qcow2")
    before_files = lab.files()
    done = qcrypt_domain(lab, tmp_path, name, "--dry-run", "--format", "json")
    assert done.returncode == 8, done.stdout + done.stderr
    error = as_json(done)["domains"][0]["error"]
    assert error["code"] == "cannot-proceed" and f"names {elsewhere} with a secret of its own" in error["message"]
    assert lab.files() == before_files


def _one_legacy_domain(lab: Lab, secret: str | None = None, *, declared: bool = False) -> tuple[str, Path, Path]:
    pw = lab.passphrase_file("pw", PW)
    web = lab.legacy_image("web.qcow2", pw)
    lab.write(web, 0x3D, 0, MIB, pw)
    name = f"{lab.prefix}-one"
    disk = disk_xml("vda", web, encryption="qcow" if declared or secret else None, secret=secret)
    if declared or secret:
        lab.define_as_after_upgrade(name, [disk])
    else:
        lab.define(name, [disk])
    return name, web, pw


def test_dry_run_finds_what_the_real_run_would_refuse(lab: Lab, tmp_path: Path) -> None:
    """Each pre-check failure makes the dry run fail with the real run's exit code, naming the disk; nothing
    changes."""
    name, web, pw = _one_legacy_domain(lab)
    before_xml, before_files = lab.inactive_xml(name), lab.files()
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"not the passphrase")
    cases = [([], 2, "no-passphrase"), (["--passphrase-file", str(wrong)], 4, "bad-passphrase")]
    for extra, code, kind in cases:
        done = qcrypt_domain(lab, tmp_path, name, "--dry-run", "--format", "json", *extra)
        assert done.returncode == code, done.stdout + done.stderr
        (outcome,) = as_json(done)["domains"]
        assert (outcome["status"], outcome["error"]["code"], outcome["error"]["disk"]) == ("failed", kind, "vda")
        assert f"domain {name} disk vda ({web})" in done.stderr
    ok = qcrypt_domain(lab, tmp_path, name, "--dry-run", "--passphrase-file", str(pw))
    assert ok.returncode == 0 and "checked: each passphrase against its image" in ok.stdout
    assert lab.inactive_xml(name) == before_xml and lab.files() == before_files


def test_dry_run_of_a_private_secret_without_passphrase(lab: Lab, tmp_path: Path) -> None:
    name, _web, _pw = _one_legacy_domain(lab, lab.secret(PW, private=True))
    done = qcrypt_domain(lab, tmp_path, name, "--dry-run", "--format", "json")
    assert done.returncode == 2, done.stdout + done.stderr
    assert as_json(done)["domains"][0]["error"]["code"] == "no-passphrase" and "private" in done.stderr


@pytest.mark.parametrize("backend", backends())
def test_stale_secret_usage_is_found_before_the_copy(lab: Lab, tmp_path: Path, backend: str) -> None:
    """A secret (of an earlier run) already has the usage the new image's secret needs: the dry run and the real
    run refuse before writing anything (exit 13), the advice names the secret; following it, the run goes
    through."""
    name, _web, pw = _one_legacy_domain(lab)
    stale = lab.secret(b"old", usage=str(lab.folder / "web.luks.qcow2"))
    before_xml, before_files = lab.inactive_xml(name), lab.files()
    for extra in (["--dry-run"], []):
        done = qcrypt_domain(
            lab, tmp_path, name, "--passphrase-file", str(pw), "--format", "json", *extra, backend=backend
        )
        assert done.returncode == 13, done.stdout + done.stderr
        error = as_json(done)["domains"][0]["error"]
        assert error["code"] == "secret-usage-conflict" and f"virsh secret-undefine {stale}" in error["message"]
    assert lab.inactive_xml(name) == before_xml and lab.files() == before_files  # nothing was copied
    advice = error["message"].split("'")[1]
    assert advice == f"virsh secret-undefine {stale}"
    run(*advice.split()[:1], "-c", "qemu:///system", *advice.split()[1:])
    done = qcrypt_domain(lab, tmp_path, name, "--passphrase-file", str(pw), backend=backend)
    assert done.returncode == 0, done.stdout + done.stderr


def test_secret_usage_of_a_domain_is_named_not_removed(lab: Lab, tmp_path: Path) -> None:
    name, _web, pw = _one_legacy_domain(lab)
    used = lab.secret(b"other", usage=str(lab.folder / "web.luks.qcow2"))
    other = lab.plain_image("other.qcow2")
    lab.define(f"{lab.prefix}-other", [disk_xml("vda", other, encryption="luks", secret=used)])
    done = qcrypt_domain(lab, tmp_path, name, "--passphrase-file", str(pw), "--dry-run")
    assert done.returncode == 13 and f"domain {lab.prefix}-other uses it" in done.stderr
    assert "secret-undefine" not in done.stdout + done.stderr


def test_dry_run_reports_a_leftover_temp_file_and_the_run_removes_it(lab: Lab, tmp_path: Path) -> None:
    name, _web, pw = _one_legacy_domain(lab)
    leftover = lab.folder / ".web.luks.qcow2.qcrypt-4194000-0123456789abcdef.tmp"  # above pid_max: dead
    leftover.write_bytes(b"half a migration")
    leftover.chmod(0o600)
    dry = qcrypt_domain(lab, tmp_path, name, "--dry-run", "--passphrase-file", str(pw))
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert f"leftover temporary file {leftover} of a killed run (PID 4194000): the real run removes it" in dry.stdout
    assert leftover.exists()
    done = qcrypt_domain(lab, tmp_path, name, "--passphrase-file", str(pw))
    assert done.returncode == 0 and not leftover.exists()


def test_image_locked_by_another_qcrypt_run(lab: Lab, tmp_path: Path) -> None:
    """Another qcrypt run holds the image: the dry run and the run say so (exit 5), not that a QEMU uses it."""
    name, web, pw = _one_legacy_domain(lab)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys, time\n"
            "from qcrypt.plumbing.locking import hold_shared_locks\n"
            f"fd = os.open({str(web)!r}, os.O_RDONLY)\n"
            "hold_shared_locks(fd, writing=False)\nprint('held', flush=True)\ntime.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        for extra in (["--dry-run"], []):
            done = qcrypt_domain(lab, tmp_path, name, "--passphrase-file", str(pw), *extra)
            assert done.returncode == 5, done.stdout + done.stderr
            assert "locked by another qcrypt run" in done.stderr and "QEMU" not in done.stderr
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_random_guest_content_needs_the_option_the_advice_names(lab: Lab, tmp_path: Path) -> None:
    """A disk whose guest content really is random looks like a wrong passphrase: refused with advice naming
    an option migrate-domain has; with that option it migrates."""
    pw = lab.passphrase_file("pw", PW)
    noise = tmp_path / "noise.raw"
    noise.write_bytes(os.urandom(2 * MIB))
    web = lab.folder / "crypt.qcow2"
    run(
        "qemu-img",
        "convert",
        "-q",
        "-O",
        "qcow2",
        "--object",
        f"secret,id=s,file={pw}",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=s",
        noise,
        web,
    )
    name = f"{lab.prefix}-random"
    lab.define_as_after_upgrade(name, [disk_xml("vda", web, encryption="qcow", secret=lab.secret(PW))])
    refused = qcrypt_domain(lab, tmp_path, name)
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert "rerun with --accept-random-content" in refused.stderr and "--force" not in refused.stderr
    done = qcrypt_domain(lab, tmp_path, name, "--accept-random-content", "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    same_guest_data(
        lab, [f"driver=qcow2,file.filename={web},encrypt.key-secret=s"], lab.folder / "crypt.luks.qcow2", pw
    )


# -- failures that cannot be missed, progress off a terminal -----------------------------------------------------


def test_quiet_failure_reaches_stderr_naming_domain_disk_and_path(lab: Lab, tmp_path: Path) -> None:
    name, web, _pw = _one_legacy_domain(lab, lab.secret(b"wrong"))
    done = qcrypt_domain(lab, tmp_path, name, "-q")
    assert done.returncode == 4 and done.stdout == ""
    assert (
        f"qcrypt: error: domain {name} disk vda ({web}): failed: {web}: the passphrase is probably wrong" in done.stderr
    )
    table = qcrypt_domain(lab, tmp_path, name)
    assert f"domain {name} disk vda ({web})" in table.stderr and f"domain {name}: failed" in table.stdout


def test_missing_disk_file_exits_2_naming_it(lab: Lab, tmp_path: Path) -> None:
    gone = lab.folder / "gone.qcow2"
    name = f"{lab.prefix}-gone"
    lab.define_as_after_upgrade(name, [disk_xml("vda", gone, encryption="qcow", secret=lab.secret(PW))])
    done = qcrypt_domain(lab, tmp_path, name, "--format", "json")
    assert done.returncode == 2, done.stdout + done.stderr
    error = as_json(done)["domains"][0]["error"]
    assert (error["code"], error["disk"], error["path"]) == ("missing-path", "vda", str(gone))
    assert f"disk vda ({gone})" in done.stderr


def test_several_domains_end_with_a_summary_line(lab: Lab, tmp_path: Path) -> None:
    name, _web, pw = _one_legacy_domain(lab)
    plain = lab.plain_image("plain.qcow2")
    other = f"{lab.prefix}-plain"
    lab.define(other, [disk_xml("vda", plain)])
    done = qcrypt_domain(lab, tmp_path, name, other, "--dry-run", "--passphrase-file", str(pw))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "2 domains: 0 migrated, 1 unchanged, 1 planned, 0 skipped, 0 failed"


def test_progress_lines_when_stderr_is_not_a_terminal(lab: Lab, tmp_path: Path) -> None:
    name, web, _pw = _one_legacy_domain(lab)
    quiet = qcrypt_domain(lab, tmp_path, name, "--passphrase-file", "-", "--no-progress", "--dry-run", stdin=PW)
    assert "qcrypt: migrating" not in quiet.stderr
    done = qcrypt_domain(lab, tmp_path, name, "--passphrase-file", "-", "--progress-interval", "0", stdin=PW)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("qcrypt: migrating")]
    assert len(lines) >= 2, done.stderr
    assert all(line.startswith(f"qcrypt: migrating domain {name} disk vda ({web}): ") for line in lines)
    assert " of 1.0 MiB" in lines[0] and "/s, ETA" in lines[1] and lines[-1].endswith(" s") and "done in" in lines[-1]
    assert "passphrase from the standard input" in done.stdout


def test_passphrase_prompt_is_not_glued_to_the_progress_bar(lab: Lab, tmp_path: Path) -> None:
    """On a terminal, the hidden prompt for a disk without a secret clears the progress bar first (it starts a
    line of its own), and the summary says the passphrase came from the prompt."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    name, _web, _pw = _one_legacy_domain(lab)
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # tqdm draws in its width
    words = [
        sys.executable,
        "-m",
        "qcrypt",
        "migrate-domain",
        "-c",
        "qemu:///system",
        "--backend",
        "virsh",
        "--backup-dir",
        str(tmp_path / "backups"),
        *FAST,
        name,
    ]
    process = subprocess.Popen(words, stdin=terminal, stdout=subprocess.PIPE, stderr=terminal, text=False)
    os.close(terminal)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while b"Enter the" not in seen:
            assert time.monotonic() < deadline, seen
            ready, _, _ = select.select([main], [], [], 1)
            if ready:
                seen += os.read(main, 4096)
        os.write(main, PW + b"\n")
        out, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(main)
    before = seen.split(b"Enter the")[0].decode("utf-8", "replace")
    assert "migrating" in before, seen  # the bar was drawn before the prompt...
    assert before.split("\r")[-1].split("\n")[-1].strip() == ""  # ...and cleared: the prompt starts its line
    assert process.returncode == 0, out
    assert b"passphrase from the prompt" in out


def test_replace_with_a_private_secret_for_the_same_path_is_refused_before_the_copy(lab: Lab, tmp_path: Path) -> None:
    """--replace keeps the image's path, and the disk's private secret already has that path as its usage: a new
    secret cannot be defined for it, so the run refuses before writing (exit 13) and says to rerun without
    --replace, which then goes through."""
    pw = lab.passphrase_file("pw", PW)
    web = lab.legacy_image("web.qcow2", pw)
    lab.write(web, 0x3E, 0, MIB, pw)
    private = lab.secret(PW, private=True, usage=str(web))
    name = f"{lab.prefix}-samepath"
    lab.define_as_after_upgrade(name, [disk_xml("vda", web, encryption="qcow", secret=private)])
    before_xml, before_files = lab.inactive_xml(name), lab.files()
    for extra in (["--dry-run"], []):
        done = qcrypt_domain(lab, tmp_path, name, "--replace", "--passphrase-file", str(pw), "--format", "json", *extra)
        assert done.returncode == 13, done.stdout + done.stderr
        error = as_json(done)["domains"][0]["error"]
        assert error["code"] == "secret-usage-conflict" and "rerun without --replace" in error["message"]
    assert lab.inactive_xml(name) == before_xml and lab.files() == before_files
    done = qcrypt_domain(lab, tmp_path, name, "--passphrase-file", str(pw), "--start")
    assert done.returncode == 0, done.stdout + done.stderr
    start_and_read(name, lab.folder / "web.luks.qcow2", [(0x3E, 0, MIB)])


def _luks_image_declared_qcow(lab: Lab, secret_value: bytes, *, private: bool = False) -> tuple[str, Path]:
    image = lab.folder / "web.qcow2"
    image.write_bytes(gzip.decompress((FIXTURES / "luks-qcow2-v3-c64k.qcow2.gz").read_bytes()))
    name = f"{lab.prefix}-xmlonly"
    lab.define_as_after_upgrade(
        name, [disk_xml("vda", image, encryption="qcow", secret=lab.secret(secret_value, private=private))]
    )
    return name, image


def test_xml_only_fix_needs_a_secret_that_opens_the_image(lab: Lab, tmp_path: Path) -> None:
    """Only the XML would change, but the readable secret does not open the LUKS image: refused (exit 4) in the
    dry run and the run, the XML untouched."""
    name, _image = _luks_image_declared_qcow(lab, b"not the luks passphrase")
    before_xml = lab.inactive_xml(name)
    for extra in (["--dry-run"], []):
        done = qcrypt_domain(lab, tmp_path, name, "--format", "json", *extra)
        assert done.returncode == 4, done.stdout + done.stderr
        assert as_json(done)["domains"][0]["error"]["code"] == "bad-passphrase"
    assert lab.inactive_xml(name) == before_xml


def test_xml_only_fix_with_a_private_secret_says_it_is_unchecked(lab: Lab, tmp_path: Path) -> None:
    """A private secret of a LUKS image still declared qcow: nothing to copy and no new secret possible for the
    same path, so the XML is fixed with that secret and the plan says it could not be checked."""
    name, _image = _luks_image_declared_qcow(lab, b"qcrypt luks test passphrase", private=True)
    done = qcrypt_domain(lab, tmp_path, name, "--start")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is private: qcrypt cannot check that it opens this LUKS image" in done.stdout
    assert "started: the domain is running" in done.stdout
