"""QEMU image locks: detect them (is a VM using this image?) and hold them (keep QEMU off our files).

QEMU takes shared open-file-description (OFD) read locks on bytes 100+i ("holds permission i") and 200+i
("refuses to share permission i") of every image file it opens (docs/FORMATS.md section F). We probe with an
exclusive F_OFD_GETLK, which sees every holder, and never take classic POSIX locks (closing any descriptor of
the file would drop them all).
"""

from __future__ import annotations

import fcntl
import os
import struct

from qcrypt.errors import ImageInUseError
from qcrypt.plumbing.files import open_image_file

F_OFD_GETLK = 36  # Linux; Python's fcntl module lacks the OFD names
F_OFD_SETLK = 37
PERMISSIONS = ("consistent-read", "write", "write-unchanged", "resize", "graph-mod")
PERM_BYTES = tuple(range(100, 105))
SHARE_BYTES = tuple(range(200, 205))
WRITE_PERMISSION_BYTE = 101
NO_SHARED_WRITE_BYTE = 201
QCRYPT_LOCK_BYTE = 0x71637279  # "qcry": qcrypt also locks this byte, which QEMU never uses, to be told apart
_FLOCK = "hhqqi4x"  # struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid


def _flock(lock_type: int, start: int, length: int = 1) -> bytes:
    return struct.pack(_FLOCK, lock_type, os.SEEK_SET, start, length, 0)


def held_lock_bytes(fd: int) -> list[int]:
    """The QEMU lock bytes some other open file description holds on ``fd``'s file."""
    held = []
    for byte in PERM_BYTES + SHARE_BYTES:
        try:
            result = fcntl.fcntl(fd, F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
        except OSError:
            result = fcntl.fcntl(fd, fcntl.F_GETLK, _flock(fcntl.F_WRLCK, byte))
        if struct.unpack(_FLOCK, result)[0] != fcntl.F_UNLCK:
            held.append(byte)
    return held


def held_by_qcrypt(fd: int) -> bool:
    """True when another open file description (another qcrypt run) holds qcrypt's own lock byte."""
    try:
        result = fcntl.fcntl(fd, F_OFD_GETLK, _flock(fcntl.F_WRLCK, QCRYPT_LOCK_BYTE))
    except OSError:
        return False
    return struct.unpack(_FLOCK, result)[0] != fcntl.F_UNLCK


def describe_locks(held: list[int]) -> str:
    names = []
    for byte in held:
        base, prefix = (100, "uses") if byte < 200 else (200, "forbids sharing")
        names.append(f"{prefix} {PERMISSIONS[byte - base]}")
    return ", ".join(names)


def refuse_if_in_use(path: str, *, fd: int | None = None) -> None:
    """Raise ImageInUseError if a QEMU process (VM, qemu-img, qemu-nbd...) has ``path`` open.

    With ``fd`` (an open description that may already hold our own locks), probe through it: OFD locks
    of one open file description never conflict with each other, so only other holders show up."""
    if fd is not None:
        held, ours = held_lock_bytes(fd), held_by_qcrypt(fd)
    else:
        with open_image_file(path) as fh:
            held, ours = held_lock_bytes(fh.fileno()), held_by_qcrypt(fh.fileno())
    if ours:
        raise ImageInUseError(
            f"{path} is locked by another qcrypt run (it is migrating this image, or writing "
            "it): wait for that run to finish and try again"
        )
    if held:
        raise ImageInUseError(
            f"{path} is open in a QEMU process ({describe_locks(held)}); shut the VM down (or stop the "
            "qemu-img/qemu-nbd using it) and try again"
        )


def hold_shared_locks(fd: int, *, writing: bool) -> None:
    """Take QEMU-style OFD read locks on ``fd``: QEMU then cannot open the file for writing.

    Reading: we hold "consistent read" and refuse shared writers. Writing: we also hold "write".
    The locks live as long as the open file description (they survive a rename of the file).
    """
    wanted = [100, NO_SHARED_WRITE_BYTE] + ([WRITE_PERMISSION_BYTE] if writing else []) + [QCRYPT_LOCK_BYTE]
    for byte in wanted:
        try:
            fcntl.fcntl(fd, F_OFD_SETLK, _flock(fcntl.F_RDLCK, byte))
        except OSError as e:
            who = "another qcrypt run" if held_by_qcrypt(fd) else "a QEMU process"
            raise ImageInUseError(f"cannot lock byte {byte}: {e.strerror} (is the image in use by {who}?)") from e
