"""Passphrase input for the CLI: a file, standard input, or a hidden prompt; never an argv value.

Newline rule (the same for every passphrase qcrypt reads): ONE trailing line ending ("\\n" or "\\r\\n") is
removed from a file's or stdin's content, so ``echo secret > pw`` works; every other byte, trailing spaces
included, is part of the passphrase. Prompted passphrases never contain the Enter key.
"""

from __future__ import annotations

import sys

import click

from qcrypt.errors import PassphraseInputError


def strip_line_ending(data: bytes) -> bytes:
    if data.endswith(b"\r\n"):
        return data[:-2]
    if data.endswith(b"\n"):
        return data[:-1]
    return data


def read_passphrase_file(path: str) -> bytes:
    """The passphrase in ``path`` ('-' = stdin), with one trailing line ending removed."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read(64 * 1024 + 1)
        else:
            with open(path, "rb") as fh:
                data = fh.read(64 * 1024 + 1)
    except OSError as e:
        raise PassphraseInputError(f"cannot read the passphrase file {path}: {e.strerror}") from e
    if len(data) > 64 * 1024:
        raise PassphraseInputError(f"passphrase file {path} is larger than 64 KiB")
    passphrase = strip_line_ending(data)
    if not passphrase:
        raise PassphraseInputError(f"passphrase file {path} is empty")
    return passphrase


def get_passphrase(path: str | None, *, what: str, option: str = "--passphrase-file", confirm: bool = False) -> bytes:
    """From ``path`` if given, else a hidden prompt when stdin is a terminal, else an error."""
    if path is not None:
        return read_passphrase_file(path)
    if not sys.stdin.isatty():
        raise PassphraseInputError(f"no {what} given: use {option} FILE (or '-' for stdin)")
    text = click.prompt(f"Enter the {what}", hide_input=True, confirmation_prompt=confirm, err=True)
    if not text:
        raise PassphraseInputError(f"empty {what}")
    return text.encode("utf-8")
