"""The sample domains of tests/data/domains and the small images they point at (for the hook's tests)."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

from tests._images import CPU_USAGE_ATTEMPTS
from tests._tools import FIXTURES

DOMAINS = Path(__file__).parent / "data" / "domains"
DEV_LOG = "/dev/log"  # where syslog(3) sends its datagrams
PASSPHRASE = b"legacy-secret"
AES_OPTS = "encrypt.format=aes,encrypt.key-secret=s"
LUKS_OPTS = "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10"
LUKS_FIXTURE = FIXTURES / "luks-qcow2-v3-c64k.qcow2.gz"  # qemu-img made; creating one costs ~2.5 s


def _qemu_img(qemu_img: str, *args: str | os.PathLike[str], retries: int = 1) -> None:
    for attempt in range(retries):
        done = subprocess.run([qemu_img, *map(str, args)], capture_output=True, text=True, check=False, timeout=120)
        if done.returncode == 0:
            return
        if attempt == retries - 1:
            raise AssertionError(f"qemu-img {args} failed: {done.stderr}")


def build_images(qemu_img: str, folder: Path) -> None:
    """The images the sample domains point at (all 1 MiB, made by qemu-img)."""
    pw = folder / "pw"
    pw.write_bytes(PASSPHRASE)
    secret = ["--object", f"secret,id=s,file={pw}"]
    _qemu_img(qemu_img, "create", "-q", "-f", "qcow2", *secret, "-o", AES_OPTS, folder / "legacy.qcow2", "1M")
    for copy in ("legacy2.qcow2", "legacy-lv", "legacy-raw-driver.qcow2"):
        shutil.copyfile(folder / "legacy.qcow2", folder / copy)
    _qemu_img(qemu_img, "create", "-q", "-f", "qcow", *secret, "-o", AES_OPTS, folder / "legacy-v1.qcow", "1M")
    _qemu_img(qemu_img, "create", "-q", "-f", "qcow2", folder / "plain.qcow2", "1M")
    shutil.copyfile(folder / "plain.qcow2", folder / "standalone.qcow2")
    _qemu_img(qemu_img, "create", "-q", "-f", "raw", folder / "plain.raw", "1M")
    for name, backing in (("mid.qcow2", "legacy.qcow2"), ("top.qcow2", "mid.qcow2"), ("overlay.qcow2", "legacy.qcow2")):
        _qemu_img(qemu_img, "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", folder / name, "1M")
    if LUKS_FIXTURE.is_file():
        (folder / "luks.qcow2").write_bytes(gzip.decompress(LUKS_FIXTURE.read_bytes()))
    else:
        _qemu_img(
            qemu_img,
            "create",
            "-q",
            "-f",
            "qcow2",
            *secret,
            "-o",
            LUKS_OPTS,
            folder / "luks.qcow2",
            "1M",
            retries=CPU_USAGE_ATTEMPTS,
        )


def domain_xml(name: str, images_dir: Path | str = "/nonexistent") -> str:
    """A sample domain from tests/data/domains with its @IMAGES@ placeholder filled in."""
    return (DOMAINS / name).read_text(encoding="utf-8").replace("@IMAGES@", str(images_dir))
