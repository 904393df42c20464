"""A new LUKS container is never made with settings qcrypt's own scanner grades as weak, unless --allow-weak:
the refusal and the scanner use the same rules (findings.grade_new_luks beside grade_luks1), and the scanner
itself and cryptsetup judge what --allow-weak creates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qcrypt.audit import grading as findings
from qcrypt.errors import MigrationError
from qcrypt.migrate import run as mig
from qcrypt.model import findings as F
from tests import _audit as scan
from tests import _images as im
from tests._tools import require_tool

PASSPHRASE = "weak settings test passphrase"
FAST = ["--pbkdf-force-iterations", "1000"]
TIMEOUT = 120
LAYOUT_CODES = {F.LUKS1_UNALIGNED_PAYLOAD, F.LUKS1_QEMU_REFUSES_LAYOUT, F.LUKS_NO_ACTIVE_KEYSLOT}
MANIFEST = im.manifest()["fixtures"]
LUKS1_FIXTURES = sorted(n for n, e in MANIFEST.items() if e["encryption"] == "luks1" and e["format"] == "luks")


def qcrypt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qcrypt", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("name", LUKS1_FIXTURES)
def test_the_refusal_grades_as_the_scanner_does(name: str, tmp_path: Path) -> None:
    """For every LUKS1 header in the fixtures (cryptsetup and QEMU made them), the settings' grade equals
    the scanner's grade of the header, apart from layout findings that settings cannot have."""
    luks = MANIFEST[name]["luks"]
    scanned = {f["code"] for f in scan.inspect(im.fixture_path(name, tmp_path))["findings"]} - LAYOUT_CODES
    graded = {f.code for f in findings.grade_new_luks(luks["cipher"], luks["hash"], luks["key_bits"], None)}
    assert graded == scanned


@pytest.mark.parametrize(
    "cipher,key_bits,hash_name,codes",
    [
        ("aes-xts-plain64", 512, "sha256", set()),
        ("aes-cbc-essiv:sha256", 256, "sha512", set()),
        ("aes-cbc-plain64", 256, "sha256", {"luks-predictable-iv"}),
        ("aes-cbc-plain", 256, "sha256", {"luks-predictable-iv", "luks-plain-iv-wraps"}),
        ("aes-xts-plain64", 512, "sha1", {"luks-sha1"}),
        ("aes-xts-plain64", 256, "sha256", {"luks-short-key"}),
        ("aes-cbc-essiv:sha256", 128, "sha256", {"luks-short-key"}),
    ],
)
def test_grade_new_luks(cipher: str, key_bits: int, hash_name: str, codes: set[str]) -> None:
    assert {f.code for f in findings.grade_new_luks(cipher, hash_name, key_bits, None)} == codes
    assert {f.code for f in findings.grade_new_luks(cipher, hash_name, key_bits, 999)} == codes | {
        "luks-low-iterations"
    }
    assert {f.code for f in findings.grade_new_luks(cipher, hash_name, key_bits, 1000)} == codes


@pytest.fixture
def legacy(tmp_path: Path, qemu_img: str, qemu_io: str) -> tuple[Path, Path]:
    image = im.make_qcow2(tmp_path / "legacy.qcow2", 1 << 20, encrypt="aes", passphrase=PASSPHRASE)
    im.write_pattern(image, 0, 128 << 10, 0x5A)
    pw = tmp_path / "pw"
    pw.write_bytes(PASSPHRASE.encode())
    return image.path, pw


@pytest.mark.interop
@pytest.mark.parametrize(
    "options,codes",
    [
        (["--cipher", "aes-cbc-plain64"], ["luks-predictable-iv"]),
        (["--hash", "sha1"], ["luks-sha1"]),
        (["--key-size", "256"], ["luks-short-key"]),  # XTS: two AES-128 keys
        (
            ["--cipher", "aes-cbc-plain64", "--key-size", "128", "--hash", "sha1"],
            ["luks-predictable-iv", "luks-sha1", "luks-short-key"],
        ),
    ],
)
@pytest.mark.parametrize("target", ["luks", "qcow2-luks"])
def test_weak_settings_refused_then_allowed(
    legacy: tuple[Path, Path], tmp_path: Path, options: list[str], codes: list[str], target: str
) -> None:
    source, pw = legacy
    out = tmp_path / "out"
    # refused before any passphrase is asked for (stdin is not a terminal and no file is given)
    refused = qcrypt("migrate", str(source), "--to", target, "-o", str(out), *options, *FAST)
    assert refused.returncode == 8, refused.stderr
    assert len(refused.stderr.splitlines()) == 1 and "--allow-weak" in refused.stderr
    assert all(code in refused.stderr for code in codes)
    assert not out.exists()
    allowed = qcrypt(
        "migrate",
        str(source),
        "--to",
        target,
        "-o",
        str(out),
        "--passphrase-file",
        str(pw),
        *options,
        *FAST,
        "--allow-weak",
    )
    assert allowed.returncode == 0, allowed.stderr
    assert f"grades as weak: {', '.join(sorted(codes))}" in allowed.stderr
    # the scanner grades the result exactly as the refusal did
    report = scan.inspect(out)
    assert sorted({f["code"] for f in report["findings"]} - LAYOUT_CODES) == sorted(codes)
    if target == "luks":  # cryptsetup reads the settings we were asked for
        dump = subprocess.run(
            [require_tool("cryptsetup"), "luksDump", str(out)], capture_output=True, text=True, timeout=TIMEOUT
        ).stdout
        if "--hash" in options:
            assert "Hash spec:     \tsha1" in dump
        if "--cipher" in options:
            assert "Cipher mode:   \tcbc-plain64" in dump


@pytest.mark.interop
def test_defaults_are_not_weak(legacy: tuple[Path, Path], tmp_path: Path) -> None:
    source, pw = legacy
    done = qcrypt(
        "migrate", str(source), "--to", "luks", "-o", str(tmp_path / "out.luks"), "--passphrase-file", str(pw), *FAST
    )
    assert done.returncode == 0 and "weak" not in done.stderr, done.stderr
    assert {f["code"] for f in scan.inspect(tmp_path / "out.luks")["findings"]} - LAYOUT_CODES == set()


def test_a_carried_over_header_is_not_a_new_container(tmp_path: Path) -> None:
    """A LUKS source keeps its header and keyslots (no new settings): its weaknesses are the scanner's to
    report, not a reason to refuse; the cipher options do not apply to it."""
    name = "luks1-cs-aes-cbc-plain64-256-sha512.luks"
    source = im.fixture_path(name, tmp_path)
    opts = mig.MigrateOptions(
        target="qcow2-luks", output=str(tmp_path / "out.qcow2"), passphrase=MANIFEST[name]["passphrase"].encode()
    )
    result = mig.migrate(str(source), opts)
    assert result.luks_carried_over and result.weak_findings == []
    assert "luks-predictable-iv" in {f["code"] for f in scan.inspect(tmp_path / "out.qcow2")["findings"]}


def test_library_refuses_forced_iterations_below_the_minimum(tmp_path: Path) -> None:
    name = "qcow2-v3-c4k.qcow2"
    source = im.fixture_path(name, tmp_path)
    opts = mig.MigrateOptions(
        target="luks", output=str(tmp_path / "out.luks"), new_passphrase=b"new passphrase", iterations=500
    )
    with pytest.raises(MigrationError, match="luks-low-iterations"):
        mig.migrate(str(source), opts)
    assert not (tmp_path / "out.luks").exists()
