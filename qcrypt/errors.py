"""The one exception hierarchy of qcrypt.

Every error the library raises on purpose derives from :class:`QcryptError`; the CLI maps each class to
a documented exit code (see ``qcrypt.cli.exit_codes``). Messages never contain passphrases or keys.
"""

from __future__ import annotations


class QcryptError(Exception):
    """Root of every qcrypt error. ``code`` is a stable, machine-readable name of the kind of problem (JSON
    reports carry it beside the message)."""

    code = "error"


class FormatError(QcryptError, ValueError):
    """A file is not what it claims to be, or one of its fields is out of range.

    ``path`` names the file and ``field`` the on-disk field that was wrong, when known.
    """

    code = "format-error"

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

    code = "unsupported-feature"


class LimitExceededError(FormatError):
    """A header declares a count, size or cost beyond one of qcrypt's limits (``qcrypt.plumbing.limits``)."""


class BadPassphraseError(QcryptError):
    """The passphrase opens no keyslot, or (legacy AES) the plaintext does not look like a disk."""

    code = "bad-passphrase"
    fallback_tried = False  # True when the passphrase without its trailing newline was tried as well


class ImageInUseError(QcryptError):
    """A QEMU process holds the image's lock bytes."""

    code = "image-in-use"


class OutputExistsError(QcryptError, FileExistsError):
    """The output exists and neither --force nor --replace allows replacing it."""

    code = "output-exists"


class VerificationError(QcryptError):
    """A written output did not read back as the source's plaintext."""

    code = "verification-failed"


class MigrationError(QcryptError):
    """A migration cannot proceed as asked (e.g. an encrypted backing layer without --flatten)."""

    code = "cannot-proceed"


class WorkerError(QcryptError):
    """A worker process died, or no work completed for the stall timeout: the operation was stopped."""

    code = "worker-failed"


class QcryptIOError(QcryptError, OSError):
    """An operating-system error while reading or writing (ENOSPC, EIO, permissions)."""

    code = "io-error"


class PassphraseInputError(QcryptError):
    """A passphrase could not be obtained (no file and no terminal, unreadable or empty file)."""

    code = "no-passphrase"


class LibvirtError(QcryptError):
    """libvirt refused or failed a request (no such domain, define refused, daemon unreachable, timeout)."""

    code = "libvirt-error"


class SecretPrivateError(LibvirtError):
    """A libvirt secret exists but its value cannot be read back (``private='yes'``)."""

    code = "secret-private"


class DomainActiveError(QcryptError):
    """The domain is running or paused: its disks cannot be migrated until it is shut down."""

    code = "domain-active"


class UnsafePathError(QcryptError):
    """A folder qcrypt would rename or link in is writable by users other than root and the image's owner, or
    a file changed under its name while qcrypt worked: nothing was renamed, linked or replaced."""

    code = "unsafe-path"


class MissingPathError(QcryptError):
    """A file or device that a domain's XML (or the caller) names does not exist."""

    code = "missing-path"


class SecretConflictError(LibvirtError):
    """A libvirt secret already has the usage a new secret needs (a volume path): libvirt would refuse it."""

    code = "secret-usage-conflict"
