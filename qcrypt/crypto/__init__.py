"""Cryptographic building blocks: sector ciphers (:mod:`.sector`), AF splitter (:mod:`.af`), key derivation
(:mod:`.kdf`) and secret hygiene (:mod:`.secret`).

The sector-cipher API is re-exported here lazily, so importing a sibling module (e.g. ``qcrypt.crypto.kdf``)
does not pay for numpy.
"""

from __future__ import annotations

import importlib
from typing import Any

_SECTOR_EXPORTS = ("SectorCipher", "legacy_aes_key", "legacy_cipher", "make_sector_cipher")

__all__ = list(_SECTOR_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _SECTOR_EXPORTS:
        return getattr(importlib.import_module("qcrypt.crypto.sector"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
