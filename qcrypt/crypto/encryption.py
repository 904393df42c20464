"""The encryption seam: how one layer's data sectors are encrypted, decided in one place.

qcrypt meets two schemes, as QEMU does behind its one crypto-block interface (a qcow driver and a LUKS driver):
legacy AES (qcow/qcow2 crypt_method 1) and LUKS1 (a raw LUKS file, or LUKS inside a qcow2 file). They differ in
the cipher and in the sector number each sector's IV is made of (docs/FORMATS.md, B.1 and C.5):

* legacy AES: the guest sector (guest offset / 512), wherever the cluster is stored;
* LUKS inside qcow2: the host sector (the data's offset in the qcow2 file / 512);
* raw LUKS: the payload sector (file offset minus the payload offset, / 512).

Readers (:mod:`qcrypt.guest.stream`) and writers (:mod:`qcrypt.migrate`, :mod:`qcrypt.images.qcow2_writer`)
ask a :class:`DataEncryption` which sector to use and never decide it themselves.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from qcrypt.crypto.sector import SectorCipher, legacy_cipher
from qcrypt.crypto.spot_check import SpotCheck
from qcrypt.errors import UnsupportedFeatureError
from qcrypt.model.units import SECTOR

Plaintext = bytes | bytearray | memoryview


class IvBase(enum.Enum):
    """Which sector number a sector's IV is made of."""

    GUEST = "guest sector"  # legacy AES
    HOST = "host sector"  # LUKS inside qcow2
    PAYLOAD = "payload sector"  # raw LUKS


@dataclass
class DataEncryption:
    """One layer's data encryption: its sector cipher and IV numbering (and, for raw LUKS, where the payload
    starts). ``spot_check``: on writes, sampled sectors are checked against OpenSSL's own implementation."""

    cipher: SectorCipher = field(repr=False)
    iv_base: IvBase
    payload_offset: int = 0  # bytes from the start of the file to the payload (IvBase.PAYLOAD only)
    spot_check: SpotCheck | None = field(default=None, repr=False)

    @classmethod
    def legacy(cls, passphrase: bytes | bytearray) -> DataEncryption:
        """qcow/qcow2 legacy AES: AES-128-CBC keyed by the passphrase, IVs from guest sectors."""
        return cls(legacy_cipher(passphrase), IvBase.GUEST)

    @classmethod
    def luks_in_qcow2(cls, cipher: SectorCipher, spot_check: SpotCheck | None = None) -> DataEncryption:
        """LUKS1 inside a qcow2 file: IVs from host sectors."""
        return cls(cipher, IvBase.HOST, spot_check=spot_check)

    @classmethod
    def raw_luks(cls, cipher: SectorCipher, payload_offset: int, spot_check: SpotCheck | None = None) -> DataEncryption:
        """A raw LUKS1 file whose payload starts ``payload_offset`` bytes in: IVs from payload sectors."""
        return cls(cipher, IvBase.PAYLOAD, payload_offset, spot_check)

    def iv_sector(self, *, guest_offset: int, host_offset: int) -> int:
        """The IV's sector number for data of guest offset ``guest_offset`` stored at ``host_offset`` (bytes,
        both at a sector boundary)."""
        if self.iv_base is IvBase.GUEST:
            return guest_offset // SECTOR
        return self._stored_sector(host_offset)

    def _stored_sector(self, host_offset: int) -> int:
        """The IV's sector number of LUKS data stored at ``host_offset``."""
        if self.iv_base is IvBase.HOST:
            return host_offset // SECTOR
        return (host_offset - self.payload_offset) // SECTOR

    def decrypt(self, data: Plaintext, *, guest_offset: int, host_offset: int) -> bytes:
        """Plaintext of whole sectors read at ``host_offset`` (guest offset ``guest_offset``)."""
        return self.cipher.decrypt(data, self.iv_sector(guest_offset=guest_offset, host_offset=host_offset))

    def decrypt_into(self, data: Plaintext, out: memoryview, *, guest_offset: int, host_offset: int) -> None:
        """Like :meth:`decrypt`, into ``out`` (as many bytes as ``data``)."""
        self.cipher.decrypt_into(data, self.iv_sector(guest_offset=guest_offset, host_offset=host_offset), out)

    def _write_sector(self, host_offset: int) -> int:
        if self.iv_base is IvBase.GUEST:
            raise UnsupportedFeatureError("qcrypt never writes legacy AES", field="crypt_method")
        return self._stored_sector(host_offset)

    def encrypt(self, plaintext: Plaintext, host_offset: int) -> bytes:
        """Ciphertext of whole sectors to be stored at ``host_offset`` (bytes) of a LUKS output."""
        sector = self._write_sector(host_offset)
        ciphertext = self.cipher.encrypt(plaintext, sector)
        if self.spot_check is not None:
            self.spot_check.check(plaintext, ciphertext, sector)
        return ciphertext

    def encrypt_into(self, plaintext: Plaintext, host_offset: int, out: memoryview) -> None:
        """Like :meth:`encrypt`, into ``out`` (as many bytes as ``plaintext``)."""
        sector = self._write_sector(host_offset)
        self.cipher.encrypt_into(plaintext, sector, out)
        if self.spot_check is not None:
            self.spot_check.check(plaintext, out, sector)

    def wipe(self) -> None:
        self.cipher.wipe()
        if self.spot_check is not None:
            self.spot_check.wipe()
