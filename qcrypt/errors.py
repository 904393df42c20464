"""The one exception hierarchy of qcrypt.

Every error the library raises on purpose derives from :class:`QcryptError`; the CLI maps each class to
a documented exit code (see ``qcrypt.cli.main.EXIT_CODES``). Messages never contain passphrases or keys.
"""

from __future__ import annotations


class QcryptError(Exception):
    """Root of every qcrypt error."""


class FormatError(QcryptError, ValueError):
    """A file is not what it claims to be, or one of its fields is out of range.

    ``path`` names the file and ``field`` the on-disk field that was wrong, when known.
    """

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None) -> None:
        self.path = path
        self.field = field
        parts = []
        if path:
            parts.append(f"{path}:")
        if field:
            parts.append(f"{field}:")
        parts.append(message)
        super().__init__(" ".join(parts))


class UnsupportedFeatureError(FormatError):
    """The file is valid but uses something qcrypt does not implement (e.g. an unknown feature bit)."""


class LimitExceededError(FormatError):
    """A header declares a count, size or cost beyond one of qcrypt's limits (``qcrypt.limits``)."""


class BadPassphraseError(QcryptError):
    """The passphrase opens no keyslot, or (legacy AES) the plaintext does not look like a disk."""


class ImageInUseError(QcryptError):
    """A QEMU process holds the image's lock bytes."""


class OutputExistsError(QcryptError, FileExistsError):
    """The output exists and neither --force nor --replace allows replacing it."""


class VerificationError(QcryptError):
    """A written output did not read back as the source's plaintext."""


class MigrationError(QcryptError):
    """A migration cannot proceed as asked (e.g. an encrypted backing layer without --flatten)."""


class WorkerError(QcryptError):
    """A worker process died, or no work completed for the stall timeout: the operation was stopped."""


class QcryptIOError(QcryptError, OSError):
    """An operating-system error while reading or writing (ENOSPC, EIO, permissions)."""


class PassphraseInputError(QcryptError):
    """A passphrase could not be obtained (no file and no terminal, unreadable or empty file)."""


class LibvirtError(QcryptError):
    """libvirt refused or failed a request (no such domain, define refused, daemon unreachable, timeout)."""


class SecretPrivateError(LibvirtError):
    """A libvirt secret exists but its value cannot be read back (``private='yes'``)."""


class DomainActiveError(QcryptError):
    """The domain is running or paused: its disks cannot be migrated until it is shut down."""


class UnsafePathError(QcryptError):
    """A folder qcrypt would rename or link in is writable by users other than root and the image's owner, or
    a file changed under its name while qcrypt worked: nothing was renamed, linked or replaced."""
