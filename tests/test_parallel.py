"""Worker processes: never forked beside another thread, and a dead or stuck worker is an error, never a hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qcrypt.errors import WorkerError
from qcrypt.migrate.options import MigrateOptions
from qcrypt.migrate.run import migrate
from qcrypt.plumbing import parallel
from tests import _images as im

PASSPHRASE = "correct horse battery staple, longer than 16 bytes"
SIZE = 8 << 20


def _square(x: int) -> int:
    return x * x


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def legacy(tmp_path: Path, qemu_img: str) -> tuple[Path, Path]:
    image = im.make_qcow2(tmp_path / "legacy.qcow2", SIZE, encrypt="aes", passphrase=PASSPHRASE)
    im.fill_image(image, SIZE, 65536)
    pw = tmp_path / "pw"
    pw.write_text(PASSPHRASE)
    return image.path, pw


@pytest.mark.interop
@pytest.mark.parametrize("target", ["luks", "qcow2-luks", "qcow2"])
def test_no_fork_while_another_thread_runs(
    legacy: tuple[Path, Path],
    tmp_path: Path,
    target: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The root cause of the fork hang (docs/HANGS.md): a fork while another thread holds a lock (OpenSSL,
    malloc, an import lock) leaves the child blocked forever on that lock. Every fork of a migration must see
    this thread alone."""
    real_fork = os.fork
    seen: list[list[str]] = []
    parent = os.getpid()

    def recording_fork() -> int:
        if os.getpid() == parent:
            seen.append(parallel.other_threads())
        return real_fork()

    monkeypatch.setattr(os, "fork", recording_fork)
    source, _pw = legacy
    out = tmp_path / f"out.{target}"
    opts = MigrateOptions(
        target=target, output=str(out), passphrase=PASSPHRASE.encode(), iter_time_ms=50, workers=2
    )  # iter-time: the keyslot PBKDF2 runs while the payload workers start
    result = migrate(str(source), opts)
    assert result.verified and out.exists()
    # two workers write, one process fsyncs, two read back; a new keyslot's PBKDF2 runs in one more (a raw LUKS
    # output is read back by the writing workers, and its final sample is read here). Fewer forks mean work fell
    # back into this process because another thread was running.
    assert len(seen) == {"luks": 4, "qcow2-luks": 6, "qcow2": 5}[target], seen
    assert seen == [[]] * len(seen), f"forked beside other threads: {seen}"
    assert "other threads run" not in caplog.text


def test_results_in_order_from_workers() -> None:
    pids = set(parallel.ordered_map(lambda _i: os.getpid(), ((i,) for i in range(40)), workers=2))
    assert os.getpid() not in pids and len(pids) == 2
    assert list(parallel.ordered_map(_square, ((i,) for i in range(100)), workers=2, in_flight=3)) == [
        i * i for i in range(100)
    ]


def test_worker_errors_are_raised_in_the_parent() -> None:
    def task(i: int) -> int:
        if i == 7:
            raise ValueError("seven")
        return i

    with pytest.raises(ValueError, match="seven"):
        list(parallel.ordered_map(task, ((i,) for i in range(20)), workers=2))


def test_with_another_thread_the_work_stays_in_this_process() -> None:
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="embedder-thread", daemon=True)
    thread.start()
    try:
        pids = set(parallel.ordered_map(lambda _i: os.getpid(), ((i,) for i in range(8)), workers=2))
        assert pids == {os.getpid()}
        with pytest.raises(WorkerError, match="embedder-thread"):
            parallel.ForkPool(_square, 2)
        assert parallel.Background(lambda: os.getpid(), what="x").result() == os.getpid()
    finally:
        release.set()
        thread.join()


def test_a_dead_worker_is_an_error_naming_its_task() -> None:
    def task(i: int) -> int:
        if i == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return i

    started = time.monotonic()
    with pytest.raises(WorkerError, match=r"killed by signal 9 while processing item 5"):
        list(parallel.ordered_map(task, ((i,) for i in range(20)), workers=2, describe=lambda a: f"item {a[0]}"))
    assert time.monotonic() - started < 30


def test_a_stuck_worker_is_an_error_and_every_worker_is_killed() -> None:
    pids: list[int] = []

    def task(i: int) -> int:
        if i == 3:
            time.sleep(3600)
        return os.getpid()

    results = parallel.ordered_map(
        task, ((i,) for i in range(10)), workers=2, stall_seconds=1, describe=lambda a: f"item {a[0]}"
    )
    started = time.monotonic()
    with pytest.raises(WorkerError, match=r"no progress for 1 s: worker process \d+ is stuck on item 3"):
        pids.extend(results)
    assert time.monotonic() - started < 30
    assert pids and not any(_alive(pid) for pid in set(pids))


def test_background_stall_and_death() -> None:
    stuck = parallel.Background(lambda: time.sleep(3600), what="a stuck job", stall_seconds=1)
    with pytest.raises(WorkerError, match="stuck on a stuck job"):
        stuck.result()
    dead = parallel.Background(lambda: os._exit(3), what="a dying job")
    with pytest.raises(WorkerError, match="exited with status 3 while processing a dying job"):
        dead.result()
    assert parallel.Background(lambda: 6 * 7, what="an answer").result() == 42


def _children(pid: int) -> set[int]:
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


@pytest.mark.interop
def test_cli_stalled_worker_fails_fast_and_leaves_nothing(legacy: tuple[Path, Path], tmp_path: Path) -> None:
    """Freeze every process migrate forks (SIGSTOP): it must stop them, say what stalled, exit 12, and leave
    neither the output nor its temporary file."""
    source, pw = legacy
    out = tmp_path / "out.luks"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qcrypt",
            "migrate",
            str(source),
            "--to",
            "luks",
            "-o",
            str(out),
            "--passphrase-file",
            str(pw),
            "--iter-time",
            "4000",
            "--stall-timeout",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    frozen: set[int] = set()
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        for child in _children(proc.pid) - frozen:
            os.kill(child, signal.SIGSTOP)
            frozen.add(child)
        time.sleep(0.005)
    try:
        _stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert frozen, "migrate forked no process"
    assert proc.returncode == 12, stderr
    message = stderr.decode().strip()
    assert message.startswith("qcrypt: error: no progress for 2 s: worker process"), message
    assert len(message.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["legacy.qcow2", "pw"]
    assert not any(_alive(pid) for pid in frozen)
