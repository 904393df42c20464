"""Passphrase input for the CLI: a file, standard input, or a hidden prompt; never an argv value.

Newline rule (the same for every passphrase qcrypt reads): ONE trailing line ending ("\\n" or "\\r\\n") is
removed from a file's or stdin's content, so ``echo secret > pw`` works; every other byte, trailing spaces
included, is part of the passphrase. Prompted passphrases never contain the Enter key.
"""

from __future__ import annotations

import sys

import click

from qcrypt.crypto.secret import disable_core_dumps
from qcrypt.errors import PassphraseInputError


def strip_line_ending(data: bytearray) -> bytearray:
    """Remove one trailing line ending, in place (the passphrase stays in one wipeable buffer)."""
    if data.endswith(b"\r\n"):
        del data[-2:]
    elif data.endswith(b"\n"):
        del data[-1:]
    return data


def read_passphrase_file(path: str) -> bytearray:
    """The passphrase in ``path`` ('-' = stdin), with one trailing line ending removed."""
    try:
        data = bytearray(64 * 1024 + 1)
        if path == "-":
            size = sys.stdin.buffer.readinto(data)
        else:
            with open(path, "rb") as fh:
                size = fh.readinto(data)
        del data[size:]
    except OSError as e:
        raise PassphraseInputError(f"cannot read the passphrase file {path}: {e.strerror}") from e
    if len(data) > 64 * 1024:
        raise PassphraseInputError(f"passphrase file {path} is larger than 64 KiB")
    passphrase = strip_line_ending(data)
    if not passphrase:
        raise PassphraseInputError(f"passphrase file {path} is empty")
    return passphrase


def get_passphrase(path: str | None, *, what: str, option: str = "--passphrase-file",
                   confirm: bool = False) -> bytearray:
    """From ``path`` if given, else a hidden prompt when stdin is a terminal, else an error.

    Core dumps are turned off for the process before the passphrase is read."""
    disable_core_dumps()
    if path is not None:
        return read_passphrase_file(path)
    if not sys.stdin.isatty():
        raise PassphraseInputError(f"no {what} given: use {option} FILE (or '-' for stdin)")
    text = click.prompt(f"Enter the {what}", hide_input=True, confirmation_prompt=confirm, err=True)
    if not text:
        raise PassphraseInputError(f"empty {what}")
    return bytearray(text.encode("utf-8"))


def wipe(*passphrases: bytearray | None) -> None:
    """Overwrite passphrase buffers once they are no longer needed (best effort)."""
    for passphrase in passphrases:
        if passphrase is not None:
            passphrase[:] = bytes(len(passphrase))
