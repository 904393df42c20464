"""Bulk data past the page cache: O_DIRECT writes and reads through reused, page-aligned buffers.

Why: a migration writes every byte of the output once and reads it back once. Through the page cache, each
write copies into freshly allocated cache pages and the read-back copies out of them again. On a virtual
machine whose free memory is handed back to the host (free page reporting, ballooning), touching fresh pages
costs a fault on the host per page, and how many of them are fresh depends on what ran before: the same
migration's write phase was measured at 0.34 s and 1.55 s in consecutive runs (docs/BENCHMARKS.md). O_DIRECT
from a few buffers that stay mapped touches no new memory, so the time is the disk's and the CPU's, run after
run; and the read-back then checks what reached the disk rather than what sits in the cache.

The rules O_DIRECT brings, kept here so that callers need not know them:

* The file offset, the length and the buffer's address must be multiples of the device's logical block size.
  :data:`DIRECT_ALIGNMENT` (4 KiB) is a multiple of every common one (512 B, 4 KiB). Anything unaligned (a
  header, the last partial chunk of a disk whose size is not a multiple of 4 KiB) goes through the ordinary
  descriptor instead; Linux keeps the two coherent (a direct write drops the cached pages of its range, a
  direct read first writes back dirty ones).
* Some filesystems refuse O_DIRECT at open (EINVAL), or refuse a given request: then the ordinary
  descriptor is used, for that request or from then on. Direct I/O is a speed-up, never a requirement.
* The second descriptor is opened through ``/proc/self/fd``, so it reaches the very inode the first one
  has open, whatever happened to the file's name meanwhile.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading

DIRECT_ALIGNMENT = 4096
_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)

_buffers = threading.local()  # slot name -> mmap, per thread (in practice: per forked worker)


def aligned_buffer(length: int, slot: str) -> memoryview:
    """A writable, page-aligned buffer of ``length`` bytes that this thread reuses for ``slot`` (one buffer
    per slot: a write buffer and a read buffer can be used at once). Valid until the next call for ``slot``."""
    slots: dict[str, mmap.mmap] | None = getattr(_buffers, "slots", None)
    if slots is None:
        slots = _buffers.slots = {}
    buffer = slots.get(slot)
    if buffer is None or len(buffer) < length:
        # MAP_PRIVATE: a forked worker gets its own copy of a buffer its parent made (a shared anonymous
        # mapping, mmap's default, would have every worker encrypt into the same memory)
        size = max(DIRECT_ALIGNMENT, -(-length // mmap.PAGESIZE) * mmap.PAGESIZE)
        buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        slots[slot] = buffer  # a replaced mapping is unmapped once no view of it is left
    return memoryview(buffer)[:length]


def fill_zero(view: memoryview) -> None:
    """Zero a writable buffer in place (memset: no zero-filled bytes object is made to copy from)."""
    if len(view):
        address = _address(view)
        if address is None:
            raise TypeError("fill_zero needs a writable buffer")
        ctypes.memset(address, 0, len(view))


def is_aligned(offset: int, length: int) -> bool:
    return offset % DIRECT_ALIGNMENT == 0 and length % DIRECT_ALIGNMENT == 0 and length > 0


def _address(view: memoryview) -> int | None:
    """The buffer's address, or None for a read-only buffer (ctypes can only map writable ones)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return None


def buffer_is_aligned(view: memoryview) -> bool:
    address = _address(view) if len(view) else None
    return address is not None and address % DIRECT_ALIGNMENT == 0


def open_direct(fd: int, access: int) -> int | None:
    """A second descriptor of the file open as ``fd``, with O_DIRECT and ``access`` (os.O_RDONLY or
    os.O_WRONLY); None where the filesystem does not do direct I/O."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        direct_fd = os.open(f"/proc/self/fd/{fd}", access | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:  # EINVAL where the filesystem has no direct I/O; no /proc; out of descriptors
        return None
    first, second = os.fstat(fd), os.fstat(direct_fd)
    if (first.st_dev, first.st_ino) != (second.st_dev, second.st_ino):
        os.close(direct_fd)
        return None
    return direct_fd


class DirectWriter:
    """pwrite to a file open as ``fd``: aligned requests from aligned buffers bypass the page cache, the rest
    (and everything, where the filesystem refuses O_DIRECT) goes through ``fd``. Shared by forked workers."""

    def __init__(self, fd: int, *, enabled: bool = True) -> None:
        self.fd = fd
        self.direct_fd = open_direct(fd, os.O_WRONLY) if enabled else None

    @property
    def direct(self) -> bool:
        return self.direct_fd is not None

    def pwrite(self, host_offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``host_offset``."""
        view = memoryview(data).cast("B")
        if self.direct_fd is not None and is_aligned(host_offset, len(view)) and buffer_is_aligned(view):
            try:
                while len(view):
                    written = os.pwrite(self.direct_fd, view, host_offset)
                    view, host_offset = view[written:], host_offset + written
                return
            except OSError as e:
                if e.errno not in _REFUSED:
                    raise
                self.stop_direct()  # refused (or a short write left an unaligned rest): the rest buffered
        pwrite_all(self.fd, host_offset, view)

    def stop_direct(self) -> None:
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None

    def close(self) -> None:
        self.stop_direct()

    def __enter__(self) -> DirectWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DirectReader:
    """Aligned reads of a file open as ``fd`` past the page cache, into this thread's read buffer."""

    def __init__(self, fd: int) -> None:
        self.direct_fd = open_direct(fd, os.O_RDONLY)

    def read(self, host_offset: int, length: int) -> memoryview | None:
        """Up to ``length`` bytes at ``host_offset`` (fewer only at the end of the file), in a buffer valid
        until this thread's next direct read; None when the request is unaligned or direct reads are off."""
        if self.direct_fd is None or not is_aligned(host_offset, length):
            return None
        view = aligned_buffer(length, "direct read")
        done = 0
        try:
            while done < length:
                got = os.preadv(self.direct_fd, [view[done:]], host_offset + done)
                if got == 0:
                    break
                done += got
                if done % DIRECT_ALIGNMENT:  # a short read ends at the end of the file
                    break
        except OSError as e:
            if e.errno not in _REFUSED:
                raise
            self.close()
            return None
        return view[:done]

    def close(self) -> None:
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None


def pwrite_all(fd: int, offset: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data`` at ``offset`` (pwrite may write less than asked)."""
    view = memoryview(data)
    while len(view):
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
