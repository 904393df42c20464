"""An independent check of the sector cipher: OpenSSL's own XTS or CBC, one sector at a time.

``migrate`` reads its output back through the same :class:`~qcrypt.crypto.sector.SectorCipher` that wrote it,
so a bug that made encryption and decryption wrong in the same way (a wrong tweak, a wrong IV base) would
pass that check and leave a disk that QEMU cannot read. :class:`SpotCheck` decrypts a sample of the sectors
just encrypted with ``cryptography``'s XTS or CBC mode (OpenSSL's implementation, none of our batching or
tweak arithmetic) and compares them with the plaintext. It checks the first and last sector of every call:
two sectors per chunk, about 20 microseconds each.

Secrets: one private ``bytearray`` copy of the key, zeroed by :meth:`SpotCheck.wipe`.
"""

from __future__ import annotations

import hashlib
from typing import TypeAlias

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qcrypt.crypto.secret import wipe as wipe_buffer
from qcrypt.errors import VerificationError
from qcrypt.model.units import SECTOR

Buffer: TypeAlias = "bytes | bytearray | memoryview"


class SpotCheck:
    """Checks ciphertext sectors against ``cryptography``'s own implementation of a LUKS cipher spec."""

    def __init__(self, cipher_name: str, cipher_mode: str, key: Buffer) -> None:
        chain, _, iv_spec = cipher_mode.partition("-")
        iv_name, _, iv_hash = iv_spec.partition(":")
        self._key = bytearray(key)
        self._chain = chain
        self._iv_name = iv_name
        self._essiv_key = bytearray(hashlib.new(iv_hash, self._key).digest()) if iv_name == "essiv" else None
        half = len(self._key) // 2
        # OpenSSL refuses XTS keys with equal halves (a random master key never has them): nothing to check
        self.enabled = cipher_name == "aes" and chain in ("xts", "cbc") and iv_name in ("plain64", "plain", "essiv")
        if chain == "xts" and self._key[:half] == self._key[half:]:
            self.enabled = False
        self.sectors_checked = 0

    def check(self, plaintext: Buffer, ciphertext: Buffer, first_sector: int) -> None:
        """Raise VerificationError unless the first and last sectors of ``ciphertext`` decrypt to ``plaintext``."""
        if not self.enabled:
            return
        plain, cipher = memoryview(plaintext).cast("B"), memoryview(ciphertext).cast("B")
        sectors = len(cipher) // SECTOR
        for index in sorted({0, sectors - 1}) if sectors else ():
            start = index * SECTOR
            got = self._decrypt_sector(cipher[start : start + SECTOR], first_sector + index)
            if got != plain[start : start + SECTOR]:
                raise VerificationError(
                    f"sector {first_sector + index}: the sector cipher disagrees with OpenSSL's "
                    f"own {self._chain.upper()}; the output was not kept"
                )
            self.sectors_checked += 1

    def wipe(self) -> None:
        wipe_buffer(self._key)
        if self._essiv_key is not None:
            wipe_buffer(self._essiv_key)
        self.enabled = False

    def _decrypt_sector(self, data: memoryview, sector: int) -> bytes:
        iv = self._iv(sector)
        mode = modes.XTS(iv) if self._chain == "xts" else modes.CBC(iv)
        context = Cipher(algorithms.AES(bytes(self._key)), mode).decryptor()
        return context.update(data) + context.finalize()

    def _iv(self, sector: int) -> bytes:
        if self._iv_name == "plain":
            return (sector & 0xFFFF_FFFF).to_bytes(16, "little")
        counter = sector.to_bytes(16, "little")
        if self._essiv_key is None:
            return counter
        context = Cipher(algorithms.AES(bytes(self._essiv_key)), modes.ECB()).encryptor()
        return context.update(counter) + context.finalize()

    def __repr__(self) -> str:
        return f"<SpotCheck aes-{self._chain}-{self._iv_name} enabled={self.enabled}>"
