"""qcrypt: find QEMU legacy qcow/qcow2 AES-encrypted images and migrate them to LUKS.

Public API (docs/API.md)::

    qcrypt.inspect(path) -> dict                 # the scan report of one image (never raises)
    qcrypt.open_image(path, passphrase=None)     # read-only file object over the guest's plaintext
    qcrypt.warn_if_legacy(path) -> bool          # issues LegacyEncryptionWarning, never raises
    qcrypt.QcryptError and subclasses            # every error qcrypt raises on purpose
"""

from __future__ import annotations

import os
from typing import Any

from qcrypt.errors import (
    BadPassphraseError,
    FormatError,
    ImageInUseError,
    LimitExceededError,
    MigrationError,
    OutputExistsError,
    QcryptError,
    QcryptIOError,
    UnsupportedFeatureError,
    VerificationError,
    WorkerError,
)

__version__ = "0.1.0"

__all__ = [
    "BadPassphraseError",
    "FormatError",
    "ImageInUseError",
    "LegacyEncryptionWarning",
    "LimitExceededError",
    "MigrationError",
    "OutputExistsError",
    "QcryptError",
    "QcryptIOError",
    "UnsupportedFeatureError",
    "VerificationError",
    "WorkerError",
    "inspect",
    "open_image",
    "warn_if_legacy",
]

_LAZY = {
    "open_image": ("qcrypt.guest.stream", "open_image"),
    "warn_if_legacy": ("qcrypt.hook.check", "warn_if_legacy"),
    "LegacyEncryptionWarning": ("qcrypt.hook.check", "LegacyEncryptionWarning"),
}


def inspect(path: str | os.PathLike[str], **options: Any) -> dict[str, Any]:
    """The scan report of one image and its backing chain, in its JSON form (docs/REFERENCE.md, "Report
    fields"). Never raises for bad input. ``options``: ``rules`` (a ChainRules), ``declared_format``."""
    from qcrypt.audit.inspect import inspect_image

    return inspect_image(path, **options).to_json()


def __getattr__(name: str) -> Any:
    """Import the heavier modules only when their names are used (keeps the libvirt hook fast)."""
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qcrypt' has no attribute {name!r}")
