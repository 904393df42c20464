"""Sector crypto judged by the real tools: containers made by cryptsetup, payload written by QEMU.

cryptsetup formats LUKS1 containers with every IV generator we support (``plain``, ``plain64``,
``essiv:md5``, ``essiv:sha256``; CBC and XTS); qemu-io writes the payload through QEMU's luks driver.
Then our reader must decrypt exactly what QEMU wrote, and our writer (``qcrypt migrate``, which keeps the
master key and cipher of a LUKS source) must produce byte for byte the ciphertext QEMU produced, which
qemu-img also decrypts. The payloads cross the 1024-sector chunk boundary of ``qcrypt.crypto.sector``;
a sparse container with its payload past 2 TiB puts data across the 2^32-sector wrap of ``plain`` IVs.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import qcrypt
from qcrypt.crypto.sector import CHUNK_SECTORS, make_sector_cipher
from tests import _images as im
from tests._compare import assert_same_bytes

PASSPHRASE = "oracle passphrase, not a secret"
SECTOR = 512
PAYLOAD_BYTES = (2 * CHUNK_SECTORS + 5) * SECTOR  # three sector-cipher chunks
WRAP_SECTOR = 1 << 32  # where a 32-bit plain IV wraps to 0
TIMEOUT_S = 120

SPECS = [
    ("aes-cbc-plain", 128),
    ("aes-cbc-plain", 256),
    ("aes-cbc-plain64", 256),
    ("aes-cbc-essiv:md5", 128),
    ("aes-cbc-essiv:sha256", 128),
    ("aes-cbc-essiv:sha256", 256),
    ("aes-xts-plain", 256),
    ("aes-xts-plain64", 512),
]


def _payload_start(path: Path) -> int:
    """Payload offset in bytes, read from the LUKS1 header with struct (not with qcrypt)."""
    with open(path, "rb") as fh:
        header = fh.read(108)
    return struct.unpack_from(">I", header, 104)[0] * SECTOR


def _payload(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(_payload_start(path) + offset)
        return fh.read(length)


def _container(tmp_path: Path, cipher: str, key_bits: int, payload_bytes: int) -> im.Image:
    return im.make_luks_cryptsetup(
        tmp_path / "cs.luks", payload_bytes, cipher=cipher, key_bits=key_bits, hash_name="sha256", passphrase=PASSPHRASE
    )


@pytest.mark.interop
@pytest.mark.parametrize("cipher,key_bits", SPECS, ids=[f"{c}-{b}" for c, b in SPECS])
def test_reader_and_writer_match_qemu_on_a_cryptsetup_container(
    tmp_path: Path, cipher: str, key_bits: int, qemu_img: str, cryptsetup: str
) -> None:
    image = _container(tmp_path, cipher, key_bits, PAYLOAD_BYTES)
    plaintext = im.sector_pattern(0, PAYLOAD_BYTES, cipher)
    im.write_data(image, 0, plaintext)  # QEMU encrypts every payload sector
    # reader: our decryption of QEMU's ciphertext, across both chunk boundaries
    with qcrypt.open_image(image.path, PASSPHRASE.encode()) as stream:
        assert_same_bytes(stream.read_at(0, PAYLOAD_BYTES), plaintext, "our reader on QEMU's payload")
        start = (CHUNK_SECTORS - 1) * SECTOR + 100
        assert_same_bytes(stream.read_at(start, 3 * SECTOR), plaintext[start : start + 3 * SECTOR], "unaligned")
    # writer: qcrypt keeps master key and cipher of a LUKS source; its ciphertext must be QEMU's, byte for byte
    pw = tmp_path / "pw"
    pw.write_text(PASSPHRASE)
    out = tmp_path / "out.luks"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "qcrypt",
            "migrate",
            str(image.path),
            "--to",
            "luks",
            "-o",
            str(out),
            "--passphrase-file",
            str(pw),
            "-q",
        ],
        check=True,
        capture_output=True,
        timeout=TIMEOUT_S,
    )
    assert_same_bytes(
        _payload(out, 0, PAYLOAD_BYTES), _payload(image.path, 0, PAYLOAD_BYTES), "our ciphertext vs QEMU's"
    )
    assert im.plaintext_sha256(im.Image(out, "luks", PASSPHRASE)) == hashlib.sha256(plaintext).hexdigest()
    assert im.luks_master_key(out, PASSPHRASE) == im.luks_master_key(image.path, PASSPHRASE)


@pytest.mark.interop
@pytest.mark.parametrize(
    "cipher,key_bits",
    [("aes-cbc-plain", 128), ("aes-xts-plain", 256), ("aes-cbc-plain64", 128), ("aes-xts-plain64", 256)],
)
def test_iv_wrap_at_2_pow_32_sectors(tmp_path: Path, cipher: str, key_bits: int, qemu_io: str, cryptsetup: str) -> None:
    """A sparse container whose payload passes 2 TiB: QEMU writes across sector 2^32, where ``plain``
    IVs wrap to 0 and ``plain64`` IVs do not; our reader and our sector cipher must agree with it."""
    payload_bytes = WRAP_SECTOR * SECTOR + (1 << 20)
    image = _container(tmp_path, cipher, key_bits, payload_bytes)
    first = WRAP_SECTOR - 3
    plaintext = im.sector_pattern(first * SECTOR, 6 * SECTOR, "wrap")
    im.write_data(image, first * SECTOR, plaintext)
    assert os.stat(image.path).st_blocks * 512 < 16 << 20  # sparse: only header and the written sectors
    with qcrypt.open_image(image.path, PASSPHRASE.encode()) as stream:
        assert_same_bytes(stream.read_at(first * SECTOR, len(plaintext)), plaintext, "our reader across the wrap")
        assert_same_bytes(
            stream.read_at(first * SECTOR + 700, 2 * SECTOR),
            plaintext[700 : 700 + 2 * SECTOR],
            "unaligned read across the wrap",
        )
    # writer side: our sector cipher, keyed with the master key cryptsetup reports, encrypts as QEMU did
    name, mode = cipher.split("-", 1)
    sector_cipher = make_sector_cipher(name, mode, bytearray(im.luks_master_key(image.path, PASSPHRASE)))
    theirs = _payload(image.path, first * SECTOR, len(plaintext))
    assert_same_bytes(sector_cipher.encrypt(plaintext, first), theirs, "our ciphertext across the wrap")
    if mode.endswith("plain"):  # the wrap is real: sector 2^32 is encrypted as sector 0
        assert_same_bytes(
            sector_cipher.encrypt(plaintext[3 * SECTOR : 4 * SECTOR], 0),
            theirs[3 * SECTOR : 4 * SECTOR],
            "sector 2^32 as sector 0",
        )
