"""A real libvirtd (QEMU, TCG) for tests: domains, secrets and images that are removed again, and QEMU reading
guest data through a running domain's disks (its qemu-io over HMP; results land in the domain's log).

Names start with ``qcrypt-test-`` and images live in /var/lib/libvirt/images/qcrypt-test-*/ (QEMU, running
as libvirt-qemu, must be able to reach them). Every subprocess has a timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qcrypt.libvirt.connection import binding_available
from tests._tools import IN_CI

URI = "qemu:///system"
REPO = Path(__file__).resolve().parents[1]
IMAGES_ROOT = Path("/var/lib/libvirt/images")
CONFIG_DIR = Path("/etc/libvirt/qemu")
LOG_DIR = Path("/var/log/libvirt/qemu")
TIMEOUT_S = 60


def run(
    *words: str | os.PathLike[str], stdin: bytes | None = None, check: bool = True, timeout: float = TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(w) for w in words],
        input=(stdin or b"").decode("latin-1"),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{words} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def virsh(
    *words: str | os.PathLike[str], stdin: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return run("virsh", "-c", URI, *words, stdin=stdin, check=check)


def libvirtd_answers() -> bool:
    if not shutil.which("virsh"):
        return False
    try:
        return virsh("list", "--all", check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def ensure_libvirtd() -> None:
    """Start libvirtd with scripts/libvirt-up when it does not answer. In CI a failure fails the test; outside
    CI the test is skipped when libvirt is not installed (the script would install it)."""
    if libvirtd_answers():
        return
    if not IN_CI and not (shutil.which("libvirtd") or shutil.which("libvirtd", path="/usr/sbin:/sbin")):
        pytest.skip("libvirt is not installed: run scripts/libvirt-up")
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "libvirt-up")], capture_output=True, text=True, timeout=900, check=False
    )
    if done.returncode != 0 or not libvirtd_answers():
        message = f"libvirtd could not be started: {done.stdout[-500:]} {done.stderr[-1500:]}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def disk_xml(
    target: str,
    path: Path | str,
    *,
    driver: str = "qcow2",
    encryption: str | None = None,
    secret: str | None = None,
    block: bool = False,
) -> str:
    enc = ""
    if encryption:
        enc = (
            f"<encryption format='{encryption}'>"
            + (f"<secret type='passphrase' uuid='{secret}'/>" if secret else "")
            + "</encryption>"
        )
    source = f"<source dev='{path}'/>" if block else f"<source file='{path}'/>"
    return (
        f"<disk type='{'block' if block else 'file'}' device='disk'><driver name='qemu' type='{driver}'/>{source}"
        f"<target dev='{target}' bus='virtio'/>{enc}</disk>"
    )


def domain_xml(name: str, disks: list[str], uuid: str | None = None) -> str:
    identity = f"<name>{name}</name>" + (f"<uuid>{uuid}</uuid>" if uuid else "")
    return (
        f"<domain type='qemu'>{identity}<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os><on_crash>destroy</on_crash>"
        f"<devices>{''.join(disks)}</devices></domain>"
    )


@dataclass
class Lab:
    """Images, secrets and domains of one test; :meth:`cleanup` removes all of them."""

    folder: Path
    prefix: str
    domains: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    loops: list[str] = field(default_factory=list)

    # -- images --------------------------------------------------------------------------------------------

    def passphrase_file(self, name: str, value: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(value)
        path.chmod(0o600)
        return path

    def legacy_image(self, name: str, pw: Path, size: str = "16M", fmt: str = "qcow2") -> Path:
        path = self.folder / name
        run(
            "qemu-img",
            "create",
            "-q",
            "-f",
            fmt,
            "--object",
            f"secret,id=s,file={pw}",
            "-o",
            "encrypt.format=aes,encrypt.key-secret=s",
            path,
            size,
        )
        return path

    def plain_image(self, name: str, size: str = "16M", backing: Path | None = None) -> Path:
        path = self.folder / name
        extra = ["-b", str(backing), "-F", "qcow2"] if backing else []
        run("qemu-img", "create", "-q", "-f", "qcow2", *extra, path, size)
        return path

    def write(
        self, path: Path, pattern: int, offset: int, length: int, pw: Path | None = None, backing_pw: Path | None = None
    ) -> None:
        """Write a byte pattern into the image with QEMU's own qemu-io."""
        run("qemu-io", *self.image_opts(path, pw, backing_pw), "-c", f"write -P {pattern:#x} {offset} {length}")

    @staticmethod
    def image_opts(
        path: Path, pw: Path | None = None, backing_pw: Path | None = None, driver: str = "qcow2"
    ) -> list[str]:
        secret = pw or backing_pw
        words = ["--object", f"secret,id=s,file={secret}"] if secret else []
        opts = f"driver={driver},file.filename={path}"
        if pw:
            opts += ",key-secret=s" if driver == "luks" else ",encrypt.key-secret=s"
        if backing_pw:
            opts += ",backing.encrypt.key-secret=s"
        return [*words, "--image-opts", opts]

    def loop_device(self, name: str, size_bytes: int) -> str:
        """A block device (loop) backed by a file of the lab folder."""
        backing = self.folder / name
        with open(backing, "wb") as fh:
            fh.truncate(size_bytes)
        device = run("losetup", "--find", "--show", backing).stdout.strip()
        self.loops.append(device)
        return device

    # -- secrets and domains ---------------------------------------------------------------------------------

    def secret(self, value: bytes, *, private: bool = False, usage: str | None = None) -> str:
        usage = usage or str(self.folder / f"secret-{len(self.secrets)}")
        xml = (
            f"<secret ephemeral='no' private='{'yes' if private else 'no'}'><usage type='volume'>"
            f"<volume>{usage}</volume></usage></secret>"
        )
        out = virsh("secret-define", "--file", "/dev/stdin", stdin=xml.encode()).stdout
        found = next(word for word in out.split() if len(word) == 36 and word.count("-") == 4)
        self.secrets.append(found)
        virsh("secret-set-value", "--secret", found, "--file", "/dev/stdin", "--plain", stdin=value)
        return found

    def define(self, name: str, disks: list[str]) -> None:
        """A domain libvirt accepts: ``virsh define`` (again: a new config for the next boot)."""
        uuid = None
        if name in self.domains:
            uuid = virsh("domuuid", name).stdout.strip()
        else:
            self.domains.append(name)
        virsh("define", "--file", "/dev/stdin", stdin=domain_xml(name, disks, uuid).encode())

    def define_as_after_upgrade(self, name: str, disks: list[str]) -> None:
        """A domain libvirt would refuse to define (format='qcow'), set up the way a host upgrade leaves it:
        its XML in /etc/libvirt/qemu, then libvirtd re-reads its configuration (SIGHUP)."""
        self.domains.append(name)
        (CONFIG_DIR / f"{name}.xml").write_text(domain_xml(name, disks), encoding="utf-8")
        reload_libvirtd()
        deadline = time.monotonic() + 30
        while virsh("domstate", name, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"libvirtd did not load {name} from {CONFIG_DIR}")
            time.sleep(0.2)

    def inactive_xml(self, name: str) -> str:
        return virsh("dumpxml", "--inactive", name).stdout

    def files(self) -> dict[str, str]:
        """Every file of the lab folder with its SHA-256: "nothing changed" compares two of these."""
        return {p.name: sha256(p) for p in sorted(self.folder.iterdir()) if p.is_file()}

    def qcrypt_secrets(self) -> list[str]:
        """Secrets whose usage points into the lab folder (those qcrypt created included)."""
        found = []
        for line in virsh("secret-list").stdout.splitlines():
            words = line.split(None, 2)
            if len(words) == 3 and words[1] == "volume" and words[2].startswith(str(self.folder)):
                found.append(words[0])
        return found

    def cleanup(self) -> None:
        for name in self.domains:
            virsh("destroy", name, check=False)
            virsh("undefine", name, "--snapshots-metadata", check=False)
            with contextlib.suppress(FileNotFoundError):
                (CONFIG_DIR / f"{name}.xml").unlink()
            with contextlib.suppress(FileNotFoundError):
                (LOG_DIR / f"{name}.log").unlink()
        for secret in dict.fromkeys([*self.secrets, *self.qcrypt_secrets()]):
            virsh("secret-undefine", secret, check=False)
        for device in self.loops:
            run("losetup", "--detach", device, check=False)
        shutil.rmtree(self.folder, ignore_errors=True)


def reload_libvirtd() -> None:
    """Make libvirtd re-read /etc/libvirt/qemu (what a restart after an upgrade does)."""
    pids = run("pgrep", "-x", "libvirtd").stdout.split()
    assert pids, "libvirtd is not running"
    for pid in pids:
        os.kill(int(pid), signal.SIGHUP)


def new_lab() -> Lab:
    IMAGES_ROOT.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="qcrypt-test-", dir=IMAGES_ROOT))
    folder.chmod(0o755)
    return Lab(folder=folder, prefix=f"qcrypt-test-{uuid.uuid4().hex[:8]}")


# -- QEMU reads the guest data ----------------------------------------------------------------------------------


def node_of(name: str, path: Path) -> str:
    """The block node of the running domain that reads ``path`` (from HMP 'info block')."""
    out = virsh("qemu-monitor-command", name, "--hmp", "info block").stdout
    for line in out.splitlines():
        if ":" in line and str(path) in line and not line.startswith(" "):
            return line.split(":", 1)[0].strip()
    raise AssertionError(f"no block node of {name} reads {path}: {out}")


def qemu_reads(name: str, node: str, pattern: int, offset: int, length: int) -> bool:
    """True when QEMU, inside the running domain, reads ``length`` bytes of ``pattern`` at ``offset``."""
    log = LOG_DIR / f"{name}.log"
    start = log.stat().st_size if log.exists() else 0
    virsh("qemu-monitor-command", name, "--hmp", f'qemu-io {node} "read -P {pattern:#x} {offset} {length}"')
    deadline = time.monotonic() + 10
    while True:
        with open(log, "rb") as fh:
            fh.seek(start)
            text = fh.read().decode("utf-8", "replace")
        if "Pattern verification failed" in text or "read failed" in text:
            return False
        if f"read {length}/{length} bytes at offset {offset}" in text:
            return True
        if time.monotonic() > deadline:
            raise AssertionError(f"QEMU's qemu-io printed nothing for the read: {text[-500:]}")
        time.sleep(0.1)


PW = b"old legacy passphrase"  # the legacy passphrase of the domains the tests set up
FAST = ["--pbkdf-force-iterations", "1000"]  # migrate-domain's keyslots: cheap PBKDF2 in tests
MIB = 1024 * 1024


def backends() -> list[Any]:
    api = pytest.param(
        "api",
        marks=pytest.mark.skipif(not binding_available() and not IN_CI, reason="libvirt Python binding not installed"),
    )
    return ["virsh", api]


def qcrypt_domain(
    lab: Lab, tmp_path: Path, *args: str, stdin: bytes | None = None, backend: str = "virsh"
) -> subprocess.CompletedProcess[str]:
    words = [
        sys.executable,
        "-m",
        "qcrypt",
        "migrate-domain",
        "-c",
        "qemu:///system",
        "--backend",
        backend,
        "--backup-dir",
        str(tmp_path / "backups"),
        *FAST,
        *args,
    ]
    return subprocess.run(
        words, input=(stdin or b"").decode(), capture_output=True, text=True, timeout=300, check=False
    )


def as_json(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(f"not JSON ({done.returncode}): {done.stdout!r} {done.stderr!r}") from e


def disk_of(xml: str, target: str) -> ET.Element:
    root = ET.fromstring(xml)
    return next(d for d in root.iterfind("devices/disk") if d.find("target").get("dev") == target)  # type: ignore[union-attr]


def same_guest_data(lab: Lab, old: list[str], new: Path, pw: Path, driver: str = "qcow2") -> None:
    """qemu-img compare: the new LUKS image shows the guest what the old one did."""
    opened = (
        f"driver=luks,file.filename={new},key-secret=s"
        if driver == "luks"
        else f"driver=qcow2,file.filename={new},encrypt.key-secret=s"
    )
    done = run(
        "qemu-img", "compare", "-U", "--object", f"secret,id=s,file={pw}", "--image-opts", *old, opened, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
