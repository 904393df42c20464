"""Root over tenant images: backing files are followed only within rules the administrator can see, special
files are never read, and a legacy passphrase nothing could check is not "verified" (docs/SECURITY.md).

Run as root (as qcrypt runs on a hypervisor): the tests create an unprivileged tenant user, a root-only file,
and images whose headers name it, then check that scan/info report it and that migrate refuses it without one
byte of the file reaching any output. Oracles: the files themselves (the secret's bytes must appear nowhere) and
qemu-img, which writes the images."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qcrypt.hook import check as hook
from qcrypt.libvirt.domainxml import parse_domain_xml
from tests import _audit as scan
from tests._tools import IN_CI, require_tool

pytestmark = pytest.mark.interop

FAST = ["--pbkdf-force-iterations", "1000"]
MIB = 1024 * 1024
BOUND_S = 20  # a special file must cost nothing like this; without the fix /proc/kmsg blocks until a message


def qcrypt(*args: str | os.PathLike[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qcrypt", *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False
    )


def qemu_img(*args: str | os.PathLike[str]) -> None:
    subprocess.run([require_tool("qemu-img"), *map(str, args)], check=True, capture_output=True, timeout=60)


def codes(report: dict) -> list[str]:
    return [f["code"] for f in report["findings"]]


def require_root() -> None:
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("these tests run as root (qcrypt's own setting on a hypervisor)")
        pytest.skip("needs root")


@pytest.fixture
def tenant() -> Iterator[tuple[int, int]]:
    """An unprivileged user (uid, gid), removed again."""
    require_root()
    name = f"qct{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
        timeout=60,
    )
    try:
        import pwd

        entry = pwd.getpwnam(name)
        yield entry.pw_uid, entry.pw_gid
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True, timeout=60)


@pytest.fixture
def folder() -> Iterator[Path]:
    """A folder every user can search (pytest's own tmp folders are root-only, which would hide the rule
    under test behind an unsearchable parent)."""
    path = Path(tempfile.mkdtemp(prefix="qcrypt-trust-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def secret_file(path: Path, mode: int = 0o600) -> bytes:
    """A root-owned file of 64 KiB whose content is a marker that must never reach any output."""
    marker = b"ROOT-ONLY-" + secrets.token_hex(8).encode()
    path.write_bytes((marker * (65536 // len(marker) + 1))[:65536])
    path.chmod(mode)
    return marker


def overlay(path: Path, backing: str, *, fmt: str = "raw", size: str = "1M") -> Path:
    qemu_img("create", "-q", "-u", "-f", "qcow2", "-b", backing, "-F", fmt, path, size)
    return path


def overlay_domain_xml(image: Path, backing_store_open: str) -> str:
    """A domain whose one qcow2 disk is ``image`` over the one layer that ``backing_store_open`` (a
    ``<backingStore ...>`` start tag and its content, without the inner terminator) declares."""
    return (
        f"<domain type='qemu'><name>t</name><devices><disk type='file' device='disk'>"
        f"<driver name='qemu' type='qcow2'/><source file='{image}'/>{backing_store_open}<backingStore/>"
        "</backingStore><target dev='vda' bus='virtio'/></disk></devices></domain>"
    )


def inspect_as_declared(image: Path, xml: str) -> dict:
    """The scan report of ``image`` read as the domain XML declares it (format and backing layers)."""
    disk = parse_domain_xml(xml).disks[0]
    return scan.inspect(image, rules=disk.chain_rules(), declared_format="qcow2")


def nothing_leaked(marker: bytes, *places: Path | str) -> None:
    for place in places:
        if isinstance(place, Path):
            files = [place] if place.is_file() else [p for p in place.rglob("*") if p.is_file()]
            for file in files:
                if file.name.startswith("secret"):
                    continue
                assert marker not in file.read_bytes(), f"{file} holds the secret's bytes"
        else:
            assert marker.decode() not in place


def migrations(image: Path, out_dir: Path, pw: Path) -> list[list[str | os.PathLike[str]]]:
    """Every way migrate could copy the backing file: each target, flattened or not."""
    return [
        ["migrate", image, "--to", "raw", "-o", out_dir / "o.raw"],
        ["migrate", image, "--to", "qcow2", "-o", out_dir / "o.qcow2"],
        ["migrate", image, "--to", "qcow2", "--flatten", "-o", out_dir / "o-flat.qcow2"],
        ["migrate", image, "--to", "luks", "-o", out_dir / "o.luks", "--new-passphrase-file", pw, *FAST],
        [
            "migrate",
            image,
            "--to",
            "qcow2-luks",
            "--flatten",
            "-o",
            out_dir / "o.luks.qcow2",
            "--new-passphrase-file",
            pw,
            *FAST,
        ],
    ]


# -- a backing file the image's owner could not read ---------------------------------------------------------


def test_backing_file_the_owner_cannot_read(tenant: tuple[int, int], folder: Path) -> None:
    uid, gid = tenant
    marker = secret_file(folder / "secret.raw")  # root-only, in the image's own folder
    image = overlay(folder / "tenant.qcow2", "secret.raw")
    os.chown(image, uid, gid)
    out_dir = folder / "out"
    out_dir.mkdir()
    pw = folder / "new.pw"
    pw.write_bytes(b"new passphrase")

    done = qcrypt("scan", "--format", "json", image)
    assert done.returncode == 1, done.stderr  # critical
    report = json.loads(done.stdout)["images"][0]
    assert "backing-not-owner-readable" in codes(report)
    assert report["severity"] == "critical"
    assert report["backing_chain"] == []  # not opened for reading at all
    message = next(f["message"] for f in report["findings"] if f["code"] == "backing-not-owner-readable")
    assert str(folder / "secret.raw") in message and f"uid {uid}" in message
    for fmt in ("table", "prometheus"):
        shown = qcrypt("scan", "--format", fmt, image)
        assert "backing-not-owner-readable" in shown.stdout
        nothing_leaked(marker, shown.stdout + shown.stderr)
    info = qcrypt("info", image)
    assert "backing-not-owner-readable" in info.stdout, info.stderr
    nothing_leaked(marker, done.stdout + done.stderr, info.stdout + info.stderr)

    for words in migrations(image, out_dir, pw):
        done = qcrypt(*words)
        assert done.returncode == 8, (words, done.returncode, done.stderr)
        assert "not readable by the image's owner" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
        nothing_leaked(marker, done.stdout + done.stderr)
    assert list(out_dir.iterdir()) == []
    nothing_leaked(marker, folder)

    # the oracle can say yes: once the owner may read the base, the same migration copies its bytes
    (folder / "secret.raw").chmod(0o644)
    done = qcrypt("migrate", image, "--to", "raw", "-o", out_dir / "o.raw")
    assert done.returncode == 0, done.stderr
    assert marker in (out_dir / "o.raw").read_bytes()


def test_folder_on_the_way_the_owner_cannot_search(tenant: tuple[int, int], folder: Path) -> None:
    uid, gid = tenant
    private = folder / "private"
    private.mkdir(mode=0o700)
    secret_file(private / "base.raw", 0o644)  # readable, but behind a root-only folder
    image = overlay(folder / "tenant.qcow2", "private/base.raw")
    os.chown(image, uid, gid)
    report = scan.inspect(image)
    assert "backing-not-owner-readable" in codes(report)
    assert f"the folder {private} is not searchable" in report["findings"][0]["message"]
    private.chmod(0o755)
    assert codes(scan.inspect(image)) == []


# -- a backing file outside the image's storage --------------------------------------------------------------


@pytest.mark.parametrize("name", ["absolute", "dotdot", "parent"])
def test_backing_file_outside_the_images_folder(folder: Path, name: str) -> None:
    (folder / "vm").mkdir()
    (folder / "base").mkdir()
    marker = secret_file(folder / "base" / "base.raw", 0o644)
    shutil.copyfile(folder / "base" / "base.raw", folder / "parent.raw")
    backing = {"absolute": str(folder / "base" / "base.raw"), "dotdot": "../base/base.raw", "parent": "../parent.raw"}[
        name
    ]
    allowed = folder if name == "parent" else folder / "base"
    image = overlay(folder / "vm" / "ov.qcow2", backing)

    report = scan.inspect(image)
    assert codes(report) == ["backing-outside-storage"] and report["severity"] == "warning"
    done = qcrypt("migrate", image, "--to", "raw", "-o", folder / "vm" / "o.raw")
    assert done.returncode == 8, done.stderr
    advice = f"--allow-backing-dir {allowed}"
    assert advice in done.stderr
    assert not (folder / "vm" / "o.raw").exists()

    # the advice works: with the folder named, the chain is followed
    from qcrypt.images.backing import ChainRules

    assert codes(scan.inspect(image, rules=ChainRules(allow_dirs=(str(allowed),)))) == []
    assert qcrypt("scan", "--allow-backing-dir", allowed, image).returncode == 0
    done = qcrypt("migrate", image, "--to", "raw", "-o", folder / "vm" / "o.raw", *advice.split())
    assert done.returncode == 0, done.stderr
    assert marker in (folder / "vm" / "o.raw").read_bytes()


# -- special files: never read, whatever names them ------------------------------------------------------------


@pytest.fixture
def loop_device(folder: Path) -> Iterator[tuple[str, bytes]]:
    """A block device (loop) whose content is a secret marker."""
    require_root()
    losetup = require_tool("losetup")
    marker = secret_file(folder / "secret-device.img")
    device = subprocess.run(
        [losetup, "--find", "--show", folder / "secret-device.img"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    try:
        yield device, marker
    finally:
        subprocess.run([losetup, "--detach", device], check=False, capture_output=True, timeout=60)


@pytest.mark.parametrize("target", ["/proc/kmsg", "/dev/zero", "block", "symlink-to-kmsg"])
def test_special_backing_file_is_never_read(folder: Path, target: str, request: pytest.FixtureRequest) -> None:
    require_root()
    marker = None
    if target == "block":
        target, marker = request.getfixturevalue("loop_device")
    elif target == "symlink-to-kmsg":
        (folder / "innocent.raw").symlink_to("/proc/kmsg")
        target = "innocent.raw"
    image = overlay(folder / "ov.qcow2", target)
    started = time.monotonic()
    done = qcrypt("scan", "--format", "json", image, timeout=BOUND_S)
    report = json.loads(done.stdout)["images"][0]
    assert "backing-special-file" in codes(report), report
    assert report["backing_chain"] == []
    for words in (
        ["info", image],
        ["migrate", image, "--to", "raw", "-o", folder / "o.raw"],
        ["migrate", image, "--to", "qcow2", "--flatten", "-o", folder / "o.qcow2"],
    ):
        done = qcrypt(*words, timeout=BOUND_S)
        if words[0] == "info":
            assert "backing-special-file" in done.stdout, done.stderr
        else:
            assert done.returncode == 8, done.stderr
            assert "never read" in done.stderr
    assert time.monotonic() - started < BOUND_S
    assert not (folder / "o.raw").exists() and not (folder / "o.qcow2").exists()
    if marker:
        nothing_leaked(marker, folder)


def test_block_backing_declared_in_the_xml_is_followed(folder: Path, loop_device: tuple[str, bytes]) -> None:
    """A <backingStore type='block'> is the administrator's word: that device may be read."""
    device, _marker = loop_device
    image = overlay(folder / "ov.qcow2", device)
    xml = overlay_domain_xml(image, f"<backingStore type='block'><format type='raw'/><source dev='{device}'/>")
    report = inspect_as_declared(image, xml)
    assert codes(report) == []
    assert report["backing_chain"][0]["path"] == device and report["backing_chain"][0]["format"] == "raw"
    assert "backing-special-file" in codes(scan.inspect(image))  # not declared: refused


def test_scan_of_a_folder_with_a_symlink_to_kmsg_reports_every_other_image(folder: Path) -> None:
    """Two batches in two worker processes: one special file costs nothing of the others' report."""
    require_root()
    for index in range(70):
        (folder / f"disk{index:02}.raw").write_bytes(bytes(512))
    (folder / "evil.img").symlink_to("/proc/kmsg")
    started = time.monotonic()
    done = qcrypt("scan", "-j", "2", "--format", "json", folder, timeout=60)
    assert time.monotonic() - started < 60
    assert done.returncode == 0, done.stderr
    reports = {Path(r["path"]).name: r for r in json.loads(done.stdout)["images"]}
    assert len(reports) == 71
    assert reports["evil.img"]["format"] == "special"
    assert codes(reports["evil.img"]) == ["special-file"]
    assert all(r["format"] == "raw" and r["severity"] == "ok" for name, r in reports.items() if name != "evil.img")


def test_block_device_met_in_a_folder_is_not_read_unless_named(folder: Path, loop_device: tuple[str, bytes]) -> None:
    device, _marker = loop_device
    (folder / "lv").symlink_to(device)
    walked = {Path(r["path"]).name: r for r in scan.scan([str(folder)])}
    assert walked["lv"]["format"] == "special" and codes(walked["lv"]) == ["special-file"]
    named = scan.scan([device])[0]
    assert named["format"] == "raw" and named["virtual_size"] == 65536  # named explicitly: read


def test_special_file_rules_on_the_descriptor() -> None:
    from qcrypt.plumbing.files import SpecialFileError, open_image_file

    for path in ("/proc/kmsg", "/proc/self/status", "/sys/kernel/mm/transparent_hugepage/enabled", "/dev/zero"):
        if not os.path.exists(path):
            continue
        with pytest.raises(SpecialFileError, match="never read"):
            open_image_file(path)
    assert stat.S_ISREG(os.fstat(open_image_file(__file__).fileno()).st_mode)


# -- a legacy passphrase nothing could check ---------------------------------------------------------------------


def test_legacy_image_without_data_needs_an_explicit_choice(folder: Path) -> None:
    right, wrong, new = folder / "right.pw", folder / "wrong.pw", folder / "new.pw"
    right.write_bytes(b"the right one")
    wrong.write_bytes(b"not the right one")
    new.write_bytes(b"new passphrase")
    image = folder / "empty-legacy.qcow2"
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        f"secret,id=s,file={right}",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=s",
        image,
        "1M",
    )
    out = folder / "out.luks.qcow2"
    done = qcrypt("migrate", image, "--to", "qcow2-luks", "-o", out, "--passphrase-file", wrong, *FAST)
    assert done.returncode == 8, done.stderr
    assert "cannot be verified" in done.stderr and "--accept-unverified-passphrase" in done.stderr
    assert not out.exists()
    done = qcrypt(
        "migrate",
        image,
        "--to",
        "qcow2-luks",
        "-o",
        out,
        "--passphrase-file",
        wrong,
        *FAST,
        "--accept-unverified-passphrase",
    )
    assert done.returncode == 0, done.stderr
    assert "passphrase was NOT verified" in done.stdout
    # with data to judge, the flag is not needed and the summary does not say unverified
    require_tool("qemu-io")
    subprocess.run(
        [
            require_tool("qemu-io"),
            "--object",
            f"secret,id=s,file={right}",
            "--image-opts",
            f"driver=qcow2,file.filename={image},encrypt.key-secret=s",
            "-c",
            "write -P 0 0 64k",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    done = qcrypt("migrate", image, "--to", "qcow2-luks", "-o", folder / "o2.qcow2", "--passphrase-file", right, *FAST)
    assert done.returncode == 0, done.stderr
    assert "NOT verified" not in done.stdout


def test_the_reader_itself_refuses_what_the_scan_reports(tenant: tuple[int, int], folder: Path) -> None:
    """Defence in depth: qcrypt.open_image (what migrate reads through) applies the rules on its own, so a name
    swapped after the scan cannot slip a file past them."""
    import qcrypt
    from qcrypt.images.backing import BackingRefusedError, ChainRules

    uid, gid = tenant
    vm, elsewhere = folder / "vm", folder / "elsewhere"
    vm.mkdir()
    elsewhere.mkdir()
    marker = secret_file(vm / "secret.raw")
    image = overlay(vm / "tenant.qcow2", "secret.raw")
    os.chown(image, uid, gid)
    with pytest.raises(BackingRefusedError, match="not readable by the image's owner"):
        qcrypt.open_image(image)
    shutil.move(vm / "secret.raw", elsewhere / "secret.raw")
    (elsewhere / "secret.raw").chmod(0o644)
    (vm / "secret.raw").symlink_to(elsewhere / "secret.raw")  # readable now, but outside the image's folder
    with pytest.raises(BackingRefusedError, match="outside the image's storage"):
        qcrypt.open_image(image)
    with qcrypt.open_image(image, rules=ChainRules(allow_dirs=(str(elsewhere),))) as disk:
        assert disk.read(len(marker)) == marker


def test_a_declared_layer_still_needs_the_owners_permission(tenant: tuple[int, int], folder: Path) -> None:
    """The XML declares the base, but its path crosses the tenant's folder, where a symlink now leads to a
    root-only file: declared or not, the owner could not read it, so it is not followed."""
    uid, gid = tenant
    vm, hidden = folder / "vm", folder / "hidden"
    vm.mkdir()
    hidden.mkdir()
    marker = secret_file(hidden / "shadow")
    (vm / "base.raw").symlink_to(hidden / "shadow")  # the tenant swapped the declared base for a symlink
    image = overlay(vm / "tenant.qcow2", "base.raw")
    os.chown(image, uid, gid)
    xml = overlay_domain_xml(image, f"<backingStore type='file'><format type='raw'/><source file='{vm / 'base.raw'}'/>")
    report = inspect_as_declared(image, xml)
    assert codes(report) == ["backing-not-owner-readable"] and report["backing_chain"] == []
    (warning,) = hook.check_domain_xml(xml).warnings
    assert "not readable by the image's owner" in warning.reason and marker.decode() not in warning.message()
