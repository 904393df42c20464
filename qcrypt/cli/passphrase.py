"""Passphrase input for the CLI: a file, standard input, or a hidden prompt; never an argv value.

Keyfile rule (the peers' rule first): a passphrase file's or stdin's content is used byte for byte, as
cryptsetup's ``--key-file`` and QEMU's ``--object secret,file=`` use it, up to cryptsetup's default keyfile
limit of 8 MiB. When those exact bytes open nothing and the content ends in a line ending ("\\n" or "\\r\\n"),
the content without that one line ending is tried next (so ``echo secret > pw`` still opens a keyslot made
with ``secret``), and qcrypt says which one worked (:func:`without_line_ending` makes that candidate; the
library tries it through ``MigrateOptions.passphrase_fallback``). A new keyslot's passphrase is the exact
bytes, as ``cryptsetup luksFormat --key-file`` would use them. Prompted passphrases never contain the Enter key.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from typing import cast

import click

from qcrypt.crypto.secret import disable_core_dumps, wipe, without_line_ending
from qcrypt.errors import PassphraseInputError

__all__ = ["MAX_KEYFILE_BYTES", "get_passphrase", "read_passphrase_file", "wipe", "without_line_ending"]

MAX_KEYFILE_BYTES = 8 * 1024 * 1024  # cryptsetup's default --keyfile-size limit (8192 kB)


def read_passphrase_file(path: str) -> bytearray:
    """Every byte of ``path`` ('-' = stdin), at most 8 MiB, as cryptsetup's --key-file reads it."""
    data = bytearray(MAX_KEYFILE_BYTES + 1)
    try:
        if path == "-":
            size = _read_all(cast(io.BufferedReader, sys.stdin.buffer).readinto, data)
        else:
            with open(path, "rb") as fh:
                size = _read_all(fh.readinto, data)
    except OSError as e:
        raise PassphraseInputError(f"cannot read the passphrase file {path}: {e.strerror}") from e
    if size > MAX_KEYFILE_BYTES:
        wipe(data)
        raise PassphraseInputError(f"passphrase file {path} is larger than 8 MiB (cryptsetup's keyfile limit)")
    del data[size:]
    if not data:
        raise PassphraseInputError(f"passphrase file {path} is empty")
    return data


def _read_all(readinto: Callable[[memoryview], int | None], data: bytearray) -> int:
    """Fill ``data`` from a reader until EOF or full (pipes return short reads); the byte count."""
    view = memoryview(data)
    size = 0
    while size < len(data):
        got = readinto(view[size:])
        if not got:
            break
        size += got
    view.release()
    return size


def get_passphrase(
    path: str | None, *, what: str, option: str = "--passphrase-file", confirm: bool = False
) -> bytearray:
    """From ``path`` if given (exact bytes), else a hidden prompt when stdin is a terminal, else an error.

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
