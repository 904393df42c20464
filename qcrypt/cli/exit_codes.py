"""Exit codes: one meaning each, the mapping of library errors to them, and the guard every command runs in.

The table :data:`EXIT_CODE_MEANINGS` is the single source: ``qcrypt --help``, the man page and
docs/REFERENCE.md ("Exit codes") show it, and a test keeps the document equal to it.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from qcrypt import errors

EXIT_OK = 0
EXIT_FINDINGS = 1  # only scan: an image at or above --fail-on
EXIT_USAGE = 2
EXIT_CODES: dict[type[errors.QcryptError], int] = {
    errors.FormatError: 3,
    errors.BadPassphraseError: 4,
    errors.ImageInUseError: 5,
    errors.OutputExistsError: 6,
    errors.VerificationError: 7,
    errors.MigrationError: 8,
    errors.QcryptIOError: 9,
    errors.PassphraseInputError: EXIT_USAGE,
    errors.DomainActiveError: 11,
    errors.WorkerError: 12,
    errors.LibvirtError: 13,
    errors.UnsafePathError: 14,
    errors.MissingPathError: EXIT_USAGE,
}
EXIT_OTHER = 10
EXIT_HOOK_REFUSED = 15  # hook install/uninstall refused to touch what it did not write, or an unsafe install
EXIT_INTERRUPTED = 130

# What each exit code means: `qcrypt --help`, the man page and docs/REFERENCE.md ("Exit codes") show this table.
EXIT_CODE_MEANINGS: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success (scan: nothing at or above --fail-on)"),
    (EXIT_FINDINGS, "scan: an image at or above --fail-on"),
    (
        EXIT_USAGE,
        "usage error, a path that does not exist (migrate-domain: a disk file the domain's XML names), no "
        "passphrase available",
    ),
    (
        EXIT_CODES[errors.FormatError],
        "an image could not be parsed (FormatError), its header is beyond one of the limits of docs/SECURITY.md "
        "(LimitExceededError, e.g. a keyslot whose PBKDF2 would exceed --max-pbkdf2-seconds), or it uses something "
        "qcrypt does not implement (a LUKS1 cipher, mode or hash; the message names the file and the part); scan "
        "shows the same text in its error field, and info and migrate exit 3 with it before asking for a passphrase",
    ),
    (
        EXIT_CODES[errors.BadPassphraseError],
        "wrong passphrase (LUKS: opens no keyslot; legacy: plaintext looks random)",
    ),
    (
        EXIT_CODES[errors.ImageInUseError],
        "the image is in use by a QEMU process, or locked by another qcrypt run (the message says which)",
    ),
    (EXIT_CODES[errors.OutputExistsError], "the output exists (use --force)"),
    (EXIT_CODES[errors.VerificationError], "verification failed (the output was not kept)"),
    (
        EXIT_CODES[errors.MigrationError],
        "the migration cannot proceed as asked (e.g. legacy backing layer without --flatten; a backing file "
        "outside the image's storage, not readable by its owner, or special; a legacy passphrase nothing can verify "
        "without --accept-unverified-passphrase; weak LUKS settings without --allow-weak)",
    ),
    (EXIT_CODES[errors.QcryptIOError], "I/O error (ENOSPC, EIO, file-size limit)"),
    (EXIT_OTHER, "any other error (an internal error: set QCRYPT_DEBUG=1 for its traceback)"),
    (
        EXIT_CODES[errors.DomainActiveError],
        "migrate-domain: a domain is running or paused (refused: shut it down first; --dry-run previews it and "
        "exits 11)",
    ),
    (
        EXIT_CODES[errors.WorkerError],
        "a worker died, or made no progress for --stall-timeout seconds (all stopped, nothing kept)",
    ),
    (
        EXIT_CODES[errors.LibvirtError],
        "migrate-domain: libvirt refused or failed a request (no such domain, define refused, no daemon), or a "
        "libvirt secret already has the usage a new secret needs",
    ),
    (
        EXIT_CODES[errors.UnsafePathError],
        "unsafe path: the output's folder is writable by users other than root and the image's owner, or a name "
        "qcrypt worked on was swapped meanwhile (nothing was replaced)",
    ),
    (
        EXIT_HOOK_REFUSED,
        "hook install/uninstall refused: a hook file qcrypt did not write, no libvirt hooks folder, a package "
        "others can write (without --allow-writable-paths), or a hook that cannot run in libvirt's environment",
    ),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C, SIGTERM)"),
)

EXIT_NOTE = "qcrypt hook libvirt always exits 0."

F = TypeVar("F", bound=Callable[..., Any])


def exit_code_for(error: errors.QcryptError) -> int:
    """The documented exit code of a library error (most specific class wins)."""
    for cls in type(error).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return EXIT_OTHER


def handle_errors(func: F) -> F:
    """Turn QcryptError / OSError / KeyboardInterrupt into a one-line message and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return _run_guarded(func, *args, **kwargs)
        finally:
            from qcrypt.plumbing.outputs import remove_pending

            remove_pending()

    return wrapper  # type: ignore[return-value]


def _run_guarded(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return func(*args, **kwargs)
    except click.ClickException:
        raise  # usage errors: click prints them and exits 2
    except errors.QcryptError as e:
        click.echo(f"qcrypt: error: {e}", err=True)
        sys.exit(exit_code_for(e))
    except KeyboardInterrupt:
        click.echo("qcrypt: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (e.g. `| head`): nothing more to say
        sys.exit(EXIT_OK)
    except OSError as e:
        name = f"{e.filename}: " if getattr(e, "filename", None) else ""
        click.echo(f"qcrypt: error: {name}{e.strerror or e}", err=True)
        sys.exit(EXIT_CODES[errors.QcryptIOError])
    except Exception as e:
        if os.environ.get("QCRYPT_DEBUG"):
            raise
        click.echo(
            f"qcrypt: internal error: {type(e).__name__}: {e} (this is a bug in qcrypt; set "
            "QCRYPT_DEBUG=1 for the traceback and report it)",
            err=True,
        )
        sys.exit(EXIT_OTHER)
