"""The independent cipher check: sampled sectors decrypted by OpenSSL's own XTS/CBC (cryptography)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qcrypt.crypto.sector import make_sector_cipher
from qcrypt.crypto.spot_check import SpotCheck
from qcrypt.errors import VerificationError
from tests import _images as im

MODES = [
    ("xts-plain64", 64),
    ("xts-plain64", 32),
    ("xts-plain", 64),
    ("cbc-essiv:sha256", 32),
    ("cbc-plain64", 32),
    ("cbc-plain", 16),
]


@pytest.mark.parametrize("mode,key_bytes", MODES)
def test_our_ciphertext_passes_and_a_wrong_sector_number_fails(mode: str, key_bytes: int) -> None:
    key = os.urandom(key_bytes)
    plaintext = os.urandom(16 * 512)
    first = (1 << 32) - 5  # crosses 2^32, where plain and plain64 IVs part
    ciphertext = make_sector_cipher("aes", mode, key).encrypt(plaintext, first)
    check = SpotCheck("aes", mode, key)
    check.check(plaintext, ciphertext, first)
    assert check.sectors_checked == 2
    # the same mistake on both sides (here: an IV base off by one) passes our own read-back, not this check
    with pytest.raises(VerificationError, match="disagrees with OpenSSL"):
        check.check(plaintext, ciphertext, first + 1)


def test_a_flipped_byte_in_the_last_sector_fails() -> None:
    key = os.urandom(64)
    plaintext = bytes(8 * 512)
    ciphertext = bytearray(make_sector_cipher("aes", "xts-plain64", key).encrypt(plaintext, 7))
    ciphertext[-1] ^= 0x80
    with pytest.raises(VerificationError, match="sector 14"):
        SpotCheck("aes", "xts-plain64", key).check(plaintext, ciphertext, 7)


def test_wiped_or_equal_halves_check_nothing() -> None:
    check = SpotCheck("aes", "xts-plain64", bytes(64))  # OpenSSL refuses equal XTS key halves
    check.check(bytes(512), bytes(512), 0)
    assert not check.enabled and check.sectors_checked == 0
    key = os.urandom(64)
    check = SpotCheck("aes", "xts-plain64", key)
    check.wipe()
    check.check(bytes(512), bytes(512), 0)
    assert check.sectors_checked == 0


@pytest.mark.interop
@pytest.mark.parametrize("target", ["luks", "qcow2-luks"])
def test_migrate_refuses_a_self_consistent_cipher_bug(
    tmp_path: Path, qemu_img: str, target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sector cipher that is wrong in the same way when writing and reading back (IV base off by one)
    passes the digest read-back; the spot check against OpenSSL catches it and nothing is kept."""
    from qcrypt.crypto import sector
    from qcrypt.migrate import run as mig

    passphrase = "spot-check passphrase"
    image = im.make_qcow2(tmp_path / "legacy.qcow2", 4 << 20, encrypt="aes", passphrase=passphrase)
    im.fill_image(image, 4 << 20, 65536)
    real_run = sector.SectorCipher._run

    def off_by_one(self: sector.SectorCipher, step: object, data: object, first_sector: int, out: object) -> None:
        shift = 1 if self.cipher_mode == "xts-plain64" else 0
        real_run(self, step, data, first_sector + shift, out)  # type: ignore[arg-type]

    monkeypatch.setattr(sector.SectorCipher, "_run", off_by_one)
    out = tmp_path / "out"
    opts = mig.MigrateOptions(
        target=target, output=str(out), passphrase=passphrase.encode(), iterations=1000, workers=1
    )
    with pytest.raises(VerificationError, match="disagrees with OpenSSL"):
        mig.migrate(str(image.path), opts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["legacy.qcow2"]
    monkeypatch.setattr(sector.SectorCipher, "_run", real_run)
    mig.migrate(str(image.path), opts)  # the same migration with the real cipher passes
    assert out.exists()
