"""Direct I/O (qcrypt.plumbing.direct_io): ciphertext written and read back past the page cache.

Each test can fail: the spies record which descriptor every pwrite/preadv went to, so a writer that silently
stopped using O_DIRECT (or used it for an unaligned request, which the kernel refuses) is caught, and the
fallbacks are made to fire by refusing O_DIRECT the way a filesystem does (EINVAL).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from qcrypt.plumbing import direct_io
from qcrypt.plumbing.direct_io import DIRECT_ALIGNMENT, DirectReader, DirectWriter, aligned_buffer
from qcrypt.plumbing.files import RawFile

BLOCK = DIRECT_ALIGNMENT


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


@pytest.fixture
def target(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "out.img", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def pwrites(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The descriptor of every os.pwrite made through direct_io."""
    seen: list[int] = []
    real = os.pwrite

    def spy(fd: int, data: object, offset: int) -> int:
        seen.append(fd)
        return real(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(direct_io.os, "pwrite", spy)
    return seen


def _filled(length: int, seed: int) -> memoryview:
    view = aligned_buffer(length, f"test {seed}")
    view[:] = bytes((seed + i) % 251 for i in range(length))
    return view


def test_aligned_buffers_are_page_aligned_reused_and_one_per_slot() -> None:
    first = aligned_buffer(3 * BLOCK, "test a")
    assert _address(first) % BLOCK == 0
    assert _address(aligned_buffer(BLOCK, "test a")) == _address(first)  # reused, not reallocated
    other = aligned_buffer(BLOCK, "test b")
    assert _address(other) % BLOCK == 0 and _address(other) != _address(first)
    assert _address(aligned_buffer(64 * BLOCK, "test a")) % BLOCK == 0  # grown: still aligned


def test_a_forked_worker_writes_its_own_copy_of_a_buffer_its_parent_made() -> None:
    """Workers are forked after the parent may have used a buffer: each must encrypt into memory of its own."""
    view = aligned_buffer(BLOCK, "test fork")
    view[:] = bytes(BLOCK)
    pid = os.fork()
    if pid == 0:
        try:
            aligned_buffer(BLOCK, "test fork")[:] = b"\xff" * BLOCK
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert bytes(aligned_buffer(BLOCK, "test fork")) == bytes(BLOCK)


def test_aligned_writes_bypass_the_page_cache_and_the_rest_goes_through_it(target: int, pwrites: list[int]) -> None:
    writer = DirectWriter(target)
    assert writer.direct, "this filesystem refused O_DIRECT: the direct path is not tested here"
    direct_fd = writer.direct_fd
    data = _filled(4 * BLOCK, 1)
    writer.pwrite(2 * BLOCK, data)  # aligned offset, length and buffer
    writer.pwrite(0, b"header")  # bytes: not an aligned buffer
    writer.pwrite(8 * BLOCK + 512, _filled(BLOCK, 2))  # unaligned offset
    writer.pwrite(16 * BLOCK, _filled(BLOCK, 3)[:1000])  # unaligned length
    writer.close()
    assert pwrites == [direct_fd, target, target, target]
    assert os.pread(target, 4 * BLOCK, 2 * BLOCK) == bytes(data)
    assert os.pread(target, 6, 0) == b"header"
    assert os.pread(target, BLOCK, 8 * BLOCK + 512) == bytes(_filled(BLOCK, 2))


def test_a_filesystem_that_refuses_o_direct_at_open_gets_ordinary_writes(
    target: int, pwrites: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def no_direct(path: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_io.os, "open", no_direct)
    writer = DirectWriter(target)
    assert not writer.direct
    data = _filled(2 * BLOCK, 4)
    writer.pwrite(0, data)
    assert pwrites == [target]
    assert os.pread(target, 2 * BLOCK, 0) == bytes(data)
    assert DirectReader(target).read(0, 2 * BLOCK) is None  # the reader falls back too


def test_a_refused_request_is_written_through_the_page_cache_and_direct_io_stops(
    target: int, pwrites: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = DirectWriter(target)
    assert writer.direct
    direct_fd = writer.direct_fd
    real = direct_io.os.pwrite

    def refuse_direct(fd: int, data: object, offset: int) -> int:
        if fd == direct_fd:
            pwrites.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(direct_io.os, "pwrite", refuse_direct)
    first, second = _filled(BLOCK, 5), _filled(BLOCK, 6)
    writer.pwrite(0, first)
    writer.pwrite(BLOCK, second)
    assert pwrites == [direct_fd, target, target]  # one refusal, then never tried again
    assert not writer.direct
    assert os.pread(target, 2 * BLOCK, 0) == bytes(first) + bytes(second)


def test_a_full_disk_is_an_error_not_a_fallback(target: int, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = DirectWriter(target)

    def full(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_io.os, "pwrite", full)
    with pytest.raises(OSError) as caught:
        writer.pwrite(0, _filled(BLOCK, 7))
    assert caught.value.errno == errno.ENOSPC


def test_direct_reads_see_what_was_written_through_the_page_cache_and_stop_at_the_end(target: int) -> None:
    """The kernel writes dirty cached pages back before a direct read of their range: the qcow2 writer's
    metadata (written through the page cache) reads back correctly past it."""
    content = bytes(range(256)) * (3 * BLOCK // 256) + b"tail"
    os.pwrite(target, content, 0)  # no fsync
    reader = DirectReader(target)
    assert reader.direct_fd is not None
    whole = reader.read(0, 4 * BLOCK)
    assert whole is not None and bytes(whole) == content  # short: the file ends inside the last block
    assert reader.read(BLOCK, BLOCK) == content[BLOCK : 2 * BLOCK]
    assert reader.read(100, BLOCK) is None  # unaligned: the caller reads through the page cache
    reader.close()


def test_image_files_read_transiently_past_the_cache_only_where_aligned(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    content = os.urandom(8 * BLOCK)
    path.write_bytes(content)
    image = RawFile.open(str(path))
    try:
        assert isinstance(image.read_host_transient(0, BLOCK), bytes)  # direct reads not asked for
        image.use_direct_reads()
        view = image.read_host_transient(2 * BLOCK, 4 * BLOCK)
        assert isinstance(view, memoryview) and bytes(view) == content[2 * BLOCK : 6 * BLOCK]
        assert image.read_host_transient(7 * BLOCK, 2 * BLOCK) == content[7 * BLOCK :] + bytes(BLOCK)  # past EOF
        assert image.read_host_transient(10, 100) == content[10:110]
    finally:
        image.close()


# -- a whole migration ----------------------------------------------------------------------------------------

ODD_SIZE = 3 * (1 << 20) + 1536  # the last chunk ends inside a 4 KiB block: it cannot be written directly


@pytest.fixture
def io_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[bool]]:
    """For every pwrite and preadv of the migration: whether its descriptor had O_DIRECT."""
    import fcntl

    calls: dict[str, list[bool]] = {"pwrite": [], "preadv": []}
    for name in calls:
        real = getattr(os, name)

        def spy(fd: int, *args: object, _name: str = name, _real: object = real) -> int:
            calls[_name].append(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT))
            return _real(fd, *args)  # type: ignore[operator,no-any-return]

        monkeypatch.setattr(direct_io.os, name, spy)
    return calls


@pytest.mark.interop
@pytest.mark.parametrize("target, fmt", [("luks", "luks"), ("qcow2-luks", "qcow2")])
@pytest.mark.parametrize("direct", [True, False])
def test_migration_writes_and_verifies_ciphertext_past_the_page_cache(
    tmp_path: Path,
    io_calls: dict[str, list[bool]],
    target: str,
    fmt: str,
    direct: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In process (one worker, so the spies see every call): with direct I/O the ciphertext goes out and comes
    back through O_DIRECT descriptors; without it none is used; either way QEMU reads the source's data."""
    from qcrypt.migrate import run as mig
    from qcrypt.plumbing import parallel

    monkeypatch.setattr(parallel, "default_workers", lambda: 1)  # the verification's workers too
    from tests import _images as im
    from tests._cli import qemu_compare, secret_file

    passphrase = "direct io passphrase"
    source = im.make_qcow2(tmp_path / "legacy.qcow2", ODD_SIZE, encrypt="aes", passphrase=passphrase)
    im.write_pattern(source, 0, ODD_SIZE, 0x5A)
    out = tmp_path / f"out.{fmt}"
    opts = mig.MigrateOptions(
        target=target,
        output=str(out),
        passphrase=passphrase.encode(),
        iterations=1000,
        workers=1,
        chunk_bytes=1 << 20,
        direct_io=direct,
    )
    mig.migrate(str(source.path), opts)
    if direct:
        assert any(io_calls["pwrite"]) and any(io_calls["preadv"])
        if target == "luks":  # the unaligned tail and the header went through the page cache
            assert not all(io_calls["pwrite"])
    else:
        assert not any(io_calls["pwrite"]) and not any(io_calls["preadv"])  # (the source is read with preadv)
    qemu_compare((out, fmt, True), (source.path, "qcow2", True), secret_file(tmp_path, "pw", passphrase))
