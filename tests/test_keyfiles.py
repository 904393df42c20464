"""Passphrase files read as the peers read keyfiles: cryptsetup's --key-file and QEMU's secret,file= use every
byte (up to cryptsetup's 8 MiB limit). qcrypt uses the exact bytes first and, when they open nothing and the
file ends in a newline, the content without it, and says so. cryptsetup and qemu-img are the oracles."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qcrypt.cli.passphrase import MAX_KEYFILE_BYTES, read_passphrase_file, without_line_ending
from qcrypt.errors import PassphraseInputError
from tests import _images as im
from tests._tools import require_tool

TIMEOUT = 120
FAST = ["--pbkdf-force-iterations", "1000"]


def qcrypt(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qcrypt", *args],
        input=stdin.decode() if stdin else None,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def keyfile(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def cryptsetup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("cryptsetup"), *args], capture_output=True, text=True, timeout=TIMEOUT)


def qemu_compare_with_raw(opts: str, key: Path, raw: Path) -> None:
    """qemu-img opens the image described by ``opts`` with ``key`` (secret id k; QEMU reads every byte of it)
    and compares its guest data with ``raw``."""
    done = subprocess.run(
        [
            require_tool("qemu-img"),
            "compare",
            "--object",
            f"secret,id=k,file={key}",
            "--image-opts",
            opts,
            f"driver=raw,file.filename={raw}",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0 and "identical" in done.stdout, done.stdout + done.stderr


def qemu_compare_luks_with_raw(luks: Path, key: Path, raw: Path) -> None:
    qemu_compare_with_raw(f"driver=luks,file.filename={luks},key-secret=k", key, raw)


def qemu_compare_legacy_with_raw(image: Path, key: Path, raw: Path) -> None:
    qemu_compare_with_raw(f"driver=qcow2,file.filename={image},encrypt.key-secret=k", key, raw)


def luks_format(path: Path, key: Path, payload_bytes: int = 1 << 20) -> Path:
    """A raw LUKS1 file formatted by cryptsetup with every byte of ``key``."""
    with open(path, "wb") as fh:
        fh.truncate((4 << 20) + payload_bytes)
    done = cryptsetup("luksFormat", "--batch-mode", "--type", "luks1", *FAST, "--key-file", str(key), str(path))
    assert done.returncode == 0, done.stderr
    return path


# -- reading ----------------------------------------------------------------------------------------------------


def test_read_keeps_every_byte(tmp_path: Path) -> None:
    assert read_passphrase_file(str(keyfile(tmp_path / "k", b"secret\n"))) == b"secret\n"
    assert read_passphrase_file(str(keyfile(tmp_path / "k2", b" pw \r\n"))) == b" pw \r\n"
    big = os.urandom(70_000)
    assert read_passphrase_file(str(keyfile(tmp_path / "big", big))) == big


def test_read_accepts_cryptsetups_limit_and_refuses_more(tmp_path: Path) -> None:
    at_limit = keyfile(tmp_path / "limit", b"k" * MAX_KEYFILE_BYTES)
    assert len(read_passphrase_file(str(at_limit))) == 8 * 1024 * 1024
    over = keyfile(tmp_path / "over", b"k" * (MAX_KEYFILE_BYTES + 1))
    with pytest.raises(PassphraseInputError, match="larger than 8 MiB"):
        read_passphrase_file(str(over))
    with pytest.raises(PassphraseInputError, match="is empty"):
        read_passphrase_file(str(keyfile(tmp_path / "empty", b"")))


@pytest.mark.parametrize(
    "data,expected",
    [
        (b"secret\n", b"secret"),
        (b"secret\r\n", b"secret"),
        (b"secret\n\n", b"secret\n"),
        (b"secret", None),
        (b"\n", None),
        (b"\r\n", None),
    ],
)
def test_the_fallback_candidate(data: bytes, expected: bytes | None) -> None:
    assert without_line_ending(data) == expected


# -- LUKS: cryptsetup made the keyslots ---------------------------------------------------------------------------


@pytest.mark.interop
def test_keyslot_added_with_echo_opens_with_the_same_file(tmp_path: Path) -> None:
    """`echo secret > key; cryptsetup luksAddKey DEV key`: that keyslot's passphrase ends in a newline."""
    first = keyfile(tmp_path / "first", b"first key, never a newline")
    luks = luks_format(tmp_path / "disk.luks", first)
    echoed = keyfile(tmp_path / "key", b"secret\n")
    added = cryptsetup("luksAddKey", "--batch-mode", *FAST, "--key-file", str(first), str(luks), str(echoed))
    assert added.returncode == 0, added.stderr
    done = qcrypt(
        "migrate", str(luks), "--to", "raw", "-o", str(tmp_path / "out.raw"), "--passphrase-file", str(echoed)
    )
    assert done.returncode == 0, done.stderr
    assert "WITHOUT its trailing newline" not in done.stderr  # the exact bytes opened it
    qemu_compare_luks_with_raw(luks, echoed, tmp_path / "out.raw")


@pytest.mark.interop
def test_keyslot_without_newline_opens_with_an_echoed_file_and_says_so(tmp_path: Path) -> None:
    printed = keyfile(tmp_path / "printf", b"hunter2")
    luks = luks_format(tmp_path / "disk.luks", printed)
    echoed = keyfile(tmp_path / "echo", b"hunter2\n")
    assert cryptsetup("open", "--test-passphrase", "--key-file", str(echoed), str(luks)).returncode != 0
    done = qcrypt(
        "migrate", str(luks), "--to", "raw", "-o", str(tmp_path / "out.raw"), "--passphrase-file", str(echoed)
    )
    assert done.returncode == 0, done.stderr
    assert f"opened with {echoed} WITHOUT its trailing newline" in done.stderr
    assert "hunter2" not in done.stderr  # names the file, never the passphrase
    qemu_compare_luks_with_raw(luks, printed, tmp_path / "out.raw")


@pytest.mark.interop
def test_neither_candidate_opens(tmp_path: Path) -> None:
    luks = luks_format(tmp_path / "disk.luks", keyfile(tmp_path / "right", b"right"))
    wrong = keyfile(tmp_path / "wrong", b"wrong\n")
    done = qcrypt("migrate", str(luks), "--to", "raw", "-o", str(tmp_path / "out.raw"), "--passphrase-file", str(wrong))
    assert done.returncode == 4, done.stderr
    assert len(done.stderr.splitlines()) == 1 and "without the passphrase file's trailing newline" in done.stderr
    assert not (tmp_path / "out.raw").exists()


@pytest.mark.interop
def test_a_70000_byte_keyfile(tmp_path: Path) -> None:
    # random printable bytes: QEMU wants a LUKS secret to be valid UTF-8
    big = keyfile(tmp_path / "big.key", bytes(33 + b % 94 for b in os.urandom(70_000)))
    luks = luks_format(tmp_path / "disk.luks", big)
    done = qcrypt(
        "migrate", str(luks), "--to", "qcow2-luks", "-o", str(tmp_path / "out.qcow2"), "--passphrase-file", str(big)
    )
    assert done.returncode == 0, done.stderr
    # the keyslots carried over: the same 70,000 bytes open the output in QEMU
    raw = tmp_path / "plain.raw"
    assert qcrypt("migrate", str(luks), "--to", "raw", "-o", str(raw), "--passphrase-file", str(big)).returncode == 0
    converted = subprocess.run(
        [
            require_tool("qemu-img"),
            "compare",
            "--object",
            f"secret,id=k,file={big}",
            "--image-opts",
            f"driver=qcow2,file.filename={tmp_path / 'out.qcow2'},encrypt.key-secret=k",
            f"driver=raw,file.filename={raw}",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert converted.returncode == 0 and "identical" in converted.stdout, converted.stdout + converted.stderr
    over = keyfile(tmp_path / "over.key", b"k" * (MAX_KEYFILE_BYTES + 1))
    refused = qcrypt("migrate", str(luks), "--to", "raw", "-o", str(tmp_path / "x.raw"), "--passphrase-file", str(over))
    assert refused.returncode == 2 and "larger than 8 MiB" in refused.stderr


# -- legacy AES: QEMU's secret,file= keeps the newline in the key ---------------------------------------------------


def _legacy(tmp_path: Path, passphrase: str) -> Path:
    image = im.make_qcow2(tmp_path / "legacy.qcow2", 1 << 20, encrypt="aes", passphrase=passphrase)
    im.write_pattern(image, 0, 256 << 10, 0x5A)
    return image.path


@pytest.mark.interop
def test_legacy_key_made_from_a_file_with_a_newline(tmp_path: Path) -> None:
    """qemu-img made the image with secret,file= of "pw\\n": the newline is part of the AES key."""
    image = _legacy(tmp_path, "legacy pw\n")
    key = keyfile(tmp_path / "key", b"legacy pw\n")
    done = qcrypt("migrate", str(image), "--to", "raw", "-o", str(tmp_path / "out.raw"), "--passphrase-file", str(key))
    assert done.returncode == 0, done.stderr
    assert "WITHOUT" not in done.stderr
    qemu_compare_legacy_with_raw(image, key, tmp_path / "out.raw")
    # a new keyslot defaults to the source passphrase: the same bytes, and qcrypt says the newline is in it
    done = qcrypt(
        "migrate", str(image), "--to", "luks", "-o", str(tmp_path / "out.luks"), "--passphrase-file", str(key), *FAST
    )
    assert done.returncode == 0 and "its trailing newline included" in done.stderr, done.stderr
    qemu_compare_luks_with_raw(tmp_path / "out.luks", key, tmp_path / "out.raw")


@pytest.mark.interop
def test_legacy_key_without_newline_given_an_echoed_file(tmp_path: Path) -> None:
    image = _legacy(tmp_path, "legacy pw")
    echoed = keyfile(tmp_path / "echo", b"legacy pw\n")
    done = qcrypt(
        "migrate", str(image), "--to", "luks", "-o", str(tmp_path / "out.luks"), "--passphrase-file", str(echoed), *FAST
    )
    assert done.returncode == 0, done.stderr
    assert f"opened with {echoed} WITHOUT its trailing newline" in done.stderr
    # the new keyslot takes the passphrase that worked (the source's, without the newline)
    printed = keyfile(tmp_path / "printf", b"legacy pw")
    assert (
        cryptsetup("open", "--test-passphrase", "--key-file", str(printed), str(tmp_path / "out.luks")).returncode == 0
    )
    raw = tmp_path / "plain.raw"
    assert (
        qcrypt("migrate", str(image), "--to", "raw", "-o", str(raw), "--passphrase-file", str(printed)).returncode == 0
    )
    qemu_compare_legacy_with_raw(image, printed, raw)
    qemu_compare_luks_with_raw(tmp_path / "out.luks", printed, raw)


@pytest.mark.interop
def test_new_passphrase_file_is_used_byte_for_byte(tmp_path: Path) -> None:
    image = _legacy(tmp_path, "legacy pw")
    source_key = keyfile(tmp_path / "src", b"legacy pw")
    new_key = keyfile(tmp_path / "new", b"new passphrase\n")
    done = qcrypt(
        "migrate",
        str(image),
        "--to",
        "luks",
        "-o",
        str(tmp_path / "out.luks"),
        "--passphrase-file",
        str(source_key),
        "--new-passphrase-file",
        str(new_key),
        *FAST,
    )
    assert done.returncode == 0, done.stderr
    assert "its trailing newline included" in done.stderr
    assert (
        cryptsetup("open", "--test-passphrase", "--key-file", str(new_key), str(tmp_path / "out.luks")).returncode == 0
    )
    stripped = keyfile(tmp_path / "stripped", b"new passphrase")
    assert (
        cryptsetup("open", "--test-passphrase", "--key-file", str(stripped), str(tmp_path / "out.luks")).returncode != 0
    )
