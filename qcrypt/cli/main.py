"""Entry point: the ``qcrypt`` click group and the mapping of library errors to exit codes."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from qcrypt import errors

# Documented in README ("Exit codes"). 1 is reserved for "scan found images at/above --fail-on".
EXIT_OK = 0
EXIT_FINDINGS = 1
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
EXIT_INTERRUPTED = 130

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
            from qcrypt.outputs import remove_pending

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
        click.echo(f"qcrypt: internal error: {type(e).__name__}: {e} (this is a bug in qcrypt; set "
                   "QCRYPT_DEBUG=1 for the traceback and report it)", err=True)
        sys.exit(EXIT_OTHER)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qcrypt")
def cli() -> None:
    """Find and migrate QEMU legacy qcow/qcow2 AES-encrypted images to LUKS."""


COMMANDS = (("scan", "scan"), ("info", "info"), ("migrate", "migrate"), ("domain", "migrate_domain"), ("hook", "hook"))


def _register() -> None:
    import importlib

    for module_name, attr in COMMANDS:
        module = importlib.import_module(f"qcrypt.cli.{module_name}")
        cli.add_command(getattr(module, attr))


def main() -> None:
    """Console-script entry point."""
    _register()
    cli(prog_name="qcrypt")


if __name__ == "__main__":
    main()
