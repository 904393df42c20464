"""The base of the qcow2 and qcow readers: an open file, its size, and bounds-aware raw reads."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import io
import os
import stat
import sys
from collections.abc import Iterator
from typing import BinaryIO, TypeVar

from qcrypt.errors import FormatError, UnsafePathError
from qcrypt.plumbing.direct_io import DirectReader, fill_zero

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


def pread_into(fd: int, out: memoryview, offset: int) -> int:
    """Fill ``out`` from ``offset``; returns the bytes read (fewer only at the end of the file)."""
    done = 0
    while done < len(out):
        got = os.preadv(fd, [out[done : done + MAX_PREAD]], offset + done)
        if not got:
            break
        done += got
    return done


def read_at_offset(fh: BinaryIO, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset`` of an open file (fewer only at its end), through its descriptor: no shared
    file position, so threads and forked workers may read one file at once. In-memory file objects (no
    descriptor) are read with seek and read."""
    try:
        fd = fh.fileno()
    except (AttributeError, io.UnsupportedOperation, ValueError):
        fh.seek(offset)
        return fh.read(length)
    return pread_full(fd, length, offset)


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


def _check_pinned(path: str, st: os.stat_result) -> None:
    expected = _PINNED.get(os.path.abspath(path)) if _PINNED else None
    if expected is not None and (st.st_dev, st.st_ino) != expected:
        raise UnsafePathError(
            f"{path} is no longer the file qcrypt opened (another file was put under its "
            "name meanwhile); nothing was written"
        )


# Kernel pseudo filesystems (statfs f_type): their "regular" files (/proc/kmsg, sysfs attributes) can block on
# read or have side effects, and are never a disk image.
PSEUDO_FILESYSTEMS = {
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0x62656570: "configfs",
    0xCAFE4A11: "bpf",
    0x6165676C: "pstore",
    0xDE5E81E4: "efivarfs",
    0x42494E4D: "binfmt_misc",
    0x65735543: "fusectl",
    0xF97CFF8C: "selinuxfs",
    0x43415D53: "smackfs",
    0x1CD1: "devpts",
}


class SpecialFileError(FormatError):
    """A path names something that is not a disk image file (FIFO, socket, device, a /proc or /sys file):
    it is never opened for reading."""


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def filesystem_type(fd: int) -> int | None:
    """statfs ``f_type`` of the filesystem holding ``fd`` (works on O_PATH descriptors), or None."""
    try:
        libc = _libc()
        buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
        if libc.fstatfs(fd, buf) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], sys.byteorder) & 0xFFFFFFFF


def special_reason(fd: int, st: os.stat_result, *, allow_block: bool) -> str | None:
    """Why the file behind ``fd`` must not be read, or None for a regular file (or an allowed block device)."""
    mode = st.st_mode
    if stat.S_ISBLK(mode):
        return None if allow_block else "a block device"
    if not stat.S_ISREG(mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "a character device"
            if stat.S_ISCHR(mode)
            else "a directory"
            if stat.S_ISDIR(mode)
            else "not a regular file"
        )
        return kind
    fs = PSEUDO_FILESYSTEMS.get(filesystem_type(fd) or 0)
    return f"a file of the kernel's {fs} filesystem" if fs else None


def open_path(path: str) -> int:
    """An O_PATH descriptor of ``path`` (symlinks followed): it names the file without opening it, so a
    device's open routine (a tape rewinding, a watchdog arming) or a FIFO never runs."""
    return os.open(path, os.O_PATH | os.O_CLOEXEC)


def reopen_for_reading(path_fd: int, path: str, *, allow_block: bool = True) -> BinaryIO:
    """Open the file that the O_PATH descriptor ``path_fd`` names for reading, if it is a regular file (not on
    a kernel pseudo filesystem) or, with ``allow_block``, a block device. Refused files are never opened.

    The file is reopened through /proc/self/fd, so it is the very inode that was checked, whatever happens to
    the name meanwhile; it is opened non-blocking, and checked again before the first read."""
    reason = special_reason(path_fd, os.fstat(path_fd), allow_block=allow_block)
    if reason:
        raise SpecialFileError(f"{reason}: never read", path=path, field="file type")
    checked = os.fstat(path_fd)
    fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (checked.st_dev, checked.st_ino):
            raise SpecialFileError("changed while it was being opened", path=path, field="file type")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        with contextlib.suppress(OSError):  # fdopen may already own (and have closed) fd when interrupted
            os.close(fd)
        raise


def open_image_file(path: str, *, allow_block: bool = True) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file or (``allow_block``) a block device.

    FIFOs, sockets, character devices and files of kernel pseudo filesystems (/proc/kmsg blocks on read) are
    refused without being opened for reading, so none of them can hang a scan or the hook."""
    path_fd = open_path(path)
    try:
        _check_pinned(path, os.fstat(path_fd))
        return reopen_for_reading(path_fd, path, allow_block=allow_block)
    finally:
        os.close(path_fd)


def file_size_of(fh: BinaryIO) -> int:
    """The size of an open file (regular file or block device)."""
    try:
        return os.fstat(fh.fileno()).st_size or fh.seek(0, os.SEEK_END)
    except (AttributeError, OSError, ValueError):
        return fh.seek(0, os.SEEK_END)


class ImageFile:
    """An image file opened read-only. Subclasses parse their header in ``_load``."""

    format_name = "?"

    def __init__(self, fh: BinaryIO, path: str) -> None:
        self.fh = fh
        self.path = path
        self.file_size = file_size_of(fh)
        self.direct: DirectReader | None = None
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
        if self.direct is not None:
            self.direct.close()
        self.fh.close()

    def use_direct_reads(self) -> None:
        """From now on, :meth:`read_host_transient` reads aligned ranges past the page cache (O_DIRECT), where
        the filesystem allows: for reading back what was just written with O_DIRECT."""
        if self.direct is None:
            self.direct = DirectReader(self.fh.fileno())

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

    def read_host_into(self, host_offset: int, out: memoryview) -> None:
        """Like :meth:`read_host`, into ``out`` (``len(out)`` bytes; zeros past the end of the file): no fresh
        buffer per read. With :meth:`use_direct_reads`, an aligned range comes past the page cache."""
        if host_offset < 0:
            raise self._fail("host offset", f"negative offset ({host_offset})")
        length = len(out)
        view = self._direct_read(host_offset, length)
        if view is not None:
            out[:] = view
            return
        available = max(0, min(length, self.file_size - host_offset))
        done = pread_into(self.fh.fileno(), out[:available], host_offset) if available else 0
        fill_zero(out[done:])

    def read_host_transient(self, host_offset: int, length: int) -> bytes | memoryview:
        """Like :meth:`read_host`, for a caller that is done with the data before it reads again (it decrypts
        it into a buffer of its own): with :meth:`use_direct_reads`, an aligned range comes past the page cache
        in a buffer that this thread reuses."""
        view = self._direct_read(host_offset, length)
        return view if view is not None else self.read_host(host_offset, length)

    def _direct_read(self, host_offset: int, length: int) -> memoryview | None:
        """``length`` bytes at ``host_offset`` past the page cache, in this thread's reused read buffer; None
        unless direct reads are on, the range is aligned and whole inside the file."""
        if self.direct is None or host_offset < 0 or host_offset + length > self.file_size:
            return None
        view = self.direct.read(host_offset, length)
        return view if view is not None and len(view) == length else None


class RawFile(ImageFile):
    """A file with no container (raw disk, raw LUKS): nothing to parse up front."""

    format_name = "raw"

    def _load(self) -> None:
        pass
