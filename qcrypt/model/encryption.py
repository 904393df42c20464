"""The encryption an image's header declares, as reports name it (stable JSON values: never rename one)."""

from __future__ import annotations

import enum


class Encryption(str, enum.Enum):
    NONE = "none"
    LEGACY_AES = "aes-cbc-legacy"  # qcow/qcow2 crypt_method 1: AES-128-CBC, passphrase as key, sector number as IV
    LUKS1 = "luks1"
    LUKS2 = "luks2"

    @property
    def is_luks(self) -> bool:
        return self in (Encryption.LUKS1, Encryption.LUKS2)

    def __str__(self) -> str:
        return self.value
