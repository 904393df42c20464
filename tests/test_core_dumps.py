"""Secrets stay out of core dumps: a process holding a passphrase or a master key is not dumpable and has
RLIMIT_CORE 0, and so are the workers it forks."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import _images as im

PASSPHRASE = "core dump test passphrase, over 16 bytes"
WAIT_S = 20.0


def allow_cores() -> None:
    """In a child before exec: the soft core limit as high as the hard one (which must allow cores)."""
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))


@pytest.fixture(autouse=True)
def cores_allowed() -> None:
    """These tests need a hard core limit above 0 (qcrypt itself only ever lowers the soft one)."""
    assert resource.getrlimit(resource.RLIMIT_CORE)[1] != 0, "RLIMIT_CORE hard limit is 0: cannot test"


def _in_child(body: str) -> str:
    """Run ``body`` (Python) in a fresh interpreter whose soft core limit starts at the hard one; its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", body], capture_output=True, text=True, timeout=60, preexec_fn=allow_cores, check=True
    )
    return done.stdout.strip()


def test_helper_turns_dumps_off_for_the_process_and_its_forks() -> None:
    body = (
        "import os, resource\n"
        "from qcrypt.crypto.secret import core_dumps_disabled, disable_core_dumps\n"
        "before = core_dumps_disabled()\n"
        "disable_core_dumps(); disable_core_dumps()\n"
        "r, w = os.pipe()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.write(w, b'1' if core_dumps_disabled() else b'0'); os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_CORE)\n"
        "print(before, core_dumps_disabled(), soft, hard != 0, os.read(r, 1).decode())\n"
    )
    assert _in_child(body) == "False True 0 True 1"


def test_the_test_process_itself_is_untouched() -> None:
    """Importing qcrypt changes nothing: only the entry points that read secrets turn dumps off."""
    assert (
        _in_child(
            "import qcrypt.migrate.run, qcrypt.cli.passphrase; from qcrypt.crypto.secret import "
            "core_dumps_disabled; print(core_dumps_disabled())"
        )
        == "False"
    )


def _core_limit(pid: int) -> str:
    limits = Path(f"/proc/{pid}/limits").read_text()
    return next(line for line in limits.splitlines() if line.startswith("Max core file size"))


def _plain_core_pattern() -> bool:
    """True when the kernel writes core files as plain files (a pattern without '|' and without '/')."""
    try:
        pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    except OSError:
        return False
    return not pattern.startswith("|") and "/" not in pattern


@pytest.mark.interop
def test_killed_migrate_holding_a_passphrase_leaves_no_core(tmp_path: Path, qemu_img: str, qemu_io: str) -> None:
    """migrate reads the source passphrase, then waits on the new-passphrase FIFO: killed there with SIGABRT
    (core-dumping by default) while its soft core limit started at the hard one, it writes no core, and its
    limits say why. The old code left a core file (with the passphrase in it) behind."""
    image = im.make_qcow2(tmp_path / "legacy.qcow2", 1 << 20, encrypt="aes", passphrase=PASSPHRASE)
    im.write_pattern(image, 0, 64 << 10, 0x5A)
    pw = tmp_path / "pw"
    pw.write_bytes(PASSPHRASE.encode())
    fifo = tmp_path / "new-pw.fifo"
    os.mkfifo(fifo)
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qcrypt",
            "migrate",
            str(image.path),
            "--to",
            "luks",
            "-o",
            str(tmp_path / "out.luks"),
            "--passphrase-file",
            str(pw),
            "--new-passphrase-file",
            str(fifo),
            "--pbkdf-force-iterations",
            "1000",
        ],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=allow_cores,
    )
    try:
        deadline = time.monotonic() + WAIT_S
        while _core_limit(proc.pid).split()[4] != "0" and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        limit = _core_limit(proc.pid)
        time.sleep(0.2)  # past the read of the source passphrase, blocked in open() of the FIFO
        os.kill(proc.pid, signal.SIGABRT)
        proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=WAIT_S)
    assert proc.returncode == -signal.SIGABRT
    if _plain_core_pattern():  # the kernel would have written the core into cwd
        assert list(cwd.iterdir()) == []
    assert limit.split()[4] == "0", limit  # the soft limit: what the kernel applies
