"""Run qcrypt in a child process whose CPU time and memory the test bounds and measures.

The child gets RLIMIT_CPU and RLIMIT_AS as hard guards (so a bomb fails the test in seconds instead of running
for days or taking the machine's memory) and the parent reads its CPU seconds and peak RSS from wait4().
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# What inspecting one file may cost (docs/SECURITY.md, "Limits": about 2 s and 256 MiB). The CPU bound includes
# the interpreter's start-up (about 0.5 s here); the guards only stop a runaway child.
CPU_SECONDS = 3.0
RSS_MIB = 256
CPU_GUARD_SECONDS = 30
AS_GUARD_BYTES = 2 << 30


@dataclass
class Outcome:
    returncode: int
    cpu_seconds: float
    wall_seconds: float
    max_rss_mib: float
    stdout: str
    stderr: str

    def assert_bounded(self, cpu_seconds: float = CPU_SECONDS, rss_mib: float = RSS_MIB) -> None:
        assert self.returncode != -signal.SIGXCPU, f"ran into the {CPU_GUARD_SECONDS} s CPU guard"
        assert self.cpu_seconds <= cpu_seconds, f"{self.cpu_seconds:.2f} s of CPU > {cpu_seconds} s: {self.stderr}"
        assert self.max_rss_mib <= rss_mib, f"peak RSS {self.max_rss_mib:.0f} MiB > {rss_mib} MiB"
        assert "Traceback" not in self.stderr and "internal error" not in self.stderr, self.stderr


def _guards(cpu_seconds: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))
        resource.setrlimit(resource.RLIMIT_AS, (AS_GUARD_BYTES, AS_GUARD_BYTES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_bounded(
    argv: Sequence[str],
    *,
    wall_seconds: float = 120,
    stdin: bytes | None = None,
    while_running: Callable[[subprocess.Popen[bytes]], None] | None = None,
    cpu_guard_seconds: int = CPU_GUARD_SECONDS,
    env: dict[str, str] | None = None,
) -> Outcome:
    """Run ``argv`` (a child of this Python) under the guards; ``while_running`` may signal it."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as inp:
        inp.write(stdin or b"")
        inp.seek(0)
        started = time.monotonic()
        child = subprocess.Popen(
            [sys.executable, *argv],
            stdin=inp,
            stdout=out,
            stderr=err,
            preexec_fn=_guards(cpu_guard_seconds),
            env={**os.environ, **(env or {})},
        )
        timer = threading.Timer(wall_seconds, child.kill)
        timer.start()
        try:
            if while_running is not None:
                while_running(child)
            _, status, usage = os.wait4(child.pid, 0)
        except BaseException:  # e.g. the test's own alarm: never leave the child running
            child.kill()
            child.wait()
            raise
        finally:
            timer.cancel()
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        wall = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        return Outcome(
            child.returncode,
            usage.ru_utime + usage.ru_stime,
            wall,
            usage.ru_maxrss / 1024,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )


def qcrypt_bounded(*args: str, **kw: object) -> Outcome:
    return run_bounded(["-m", "qcrypt", *args], **kw)  # type: ignore[arg-type]
