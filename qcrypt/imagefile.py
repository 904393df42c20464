"""The base of the qcow2 and qcow readers: an open file, its size, and bounds-aware raw reads."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator
from typing import BinaryIO, TypeVar

from qcrypt.errors import FormatError, UnsafePathError
from qcrypt.formats._parse import file_size_of

T = TypeVar("T", bound="ImageFile")
MAX_PREAD = 1 << 30  # Linux returns at most ~2 GiB per read: loop in bounded pieces


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``, or fewer only at the end of the file."""
    if length <= MAX_PREAD:
        first = os.pread(fd, length, offset)
        if len(first) == length or not first:
            return first
        pieces, done = [first], len(first)
    else:
        pieces, done = [], 0
    while done < length:
        piece = os.pread(fd, min(MAX_PREAD, length - done), offset + done)
        if not piece:
            break
        pieces.append(piece)
        done += len(piece)
    return b"".join(pieces)


_PINNED: dict[str, tuple[int, int]] = {}  # abspath -> (st_dev, st_ino) every open of it must reach


@contextlib.contextmanager
def pinned(path: str, fd: int) -> Iterator[None]:
    """While active, every :func:`open_image_file` of ``path`` must reach the file open as ``fd`` (a name that
    now leads elsewhere, e.g. a tenant's symlink swapped in, raises UnsafePathError): a path resolved once."""
    key = os.path.abspath(path)
    st = os.fstat(fd)
    previous = _PINNED.get(key)
    _PINNED[key] = (st.st_dev, st.st_ino)
    try:
        yield
    finally:
        if previous is None:
            _PINNED.pop(key, None)
        else:
            _PINNED[key] = previous


def open_image_file(path: str) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file or a block device.

    Opened non-blocking first, so a FIFO (or a device that would block) cannot hang a scan or the hook."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        mode = st.st_mode
        expected = _PINNED.get(os.path.abspath(path)) if _PINNED else None
        if expected is not None and (st.st_dev, st.st_ino) != expected:
            raise UnsafePathError(f"{path} is no longer the file qcrypt opened (another file was put under its "
                                  "name meanwhile); nothing was written")
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise FormatError("not a regular file or block device", path=path, field="file type")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        with contextlib.suppress(OSError):  # fdopen may already own (and have closed) fd when interrupted
            os.close(fd)
        raise


class ImageFile:
    """An image file opened read-only. Subclasses parse their header in ``_load``."""

    format_name = "?"

    def __init__(self, fh: BinaryIO, path: str) -> None:
        self.fh = fh
        self.path = path
        self.file_size = file_size_of(fh)
        self._load()

    def _load(self) -> None:
        raise NotImplementedError

    @classmethod
    def open(cls: type[T], path: str | os.PathLike[str]) -> T:
        fh = open_image_file(os.fspath(path))
        try:
            return cls(fh, os.fspath(path))
        except BaseException:
            fh.close()
            raise

    def close(self) -> None:
        self.fh.close()

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fail(self, field: str, message: str) -> FormatError:
        return FormatError(message, path=self.path, field=field)

    def read_host(self, host_offset: int, length: int) -> bytes:
        """Raw bytes of the file; the part past the end of the file reads as zeros (as in QEMU)."""
        if host_offset < 0 or length < 0:
            raise self._fail("host offset", f"negative offset or length ({host_offset}, {length})")
        available = max(0, min(length, self.file_size - host_offset))
        data = pread_full(self.fh.fileno(), available, host_offset) if available else b""
        return data + bytes(length - len(data))


class RawFile(ImageFile):
    """A file with no container (raw disk, raw LUKS): nothing to parse up front."""

    format_name = "raw"

    def _load(self) -> None:
        pass
