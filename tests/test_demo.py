"""scripts/demo deletes and remakes its three folders (DIR, DIR-passphrases, DIR-out) only when they are missing,
empty, or made by an earlier run of it; anything else makes it refuse before it does anything (exit 2)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "scripts" / "demo"


def run_demo(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(DEMO), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PATH": f"{os.environ['PATH']}:/usr/sbin:/sbin"},
    )


def test_help_says_which_folders_it_deletes() -> None:
    result = run_demo("--help")
    assert result.returncode == 0
    assert "DIR-passphrases and DIR-out" in result.stdout and "refuses to start, and deletes nothing" in result.stdout


@pytest.mark.parametrize("which", ["", "-passphrases", "-out"])
def test_refuses_a_folder_it_did_not_make(tmp_path: Path, which: str) -> None:
    demo = tmp_path / "demo"
    folder = Path(f"{demo}{which}")
    folder.mkdir()
    precious = folder / "precious.qcow2"
    precious.write_bytes(b"tenant data")
    result = run_demo(str(demo))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"demo: {folder} exists and was not made by scripts/demo: refusing to delete it" in result.stderr
    assert precious.read_bytes() == b"tenant data"
    assert "== 1. tools" not in result.stdout  # refused before installing or unpacking anything
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def test_refuses_a_symlink_and_a_forged_marker(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("x")
    (tmp_path / "demo").symlink_to(target)
    assert run_demo(str(tmp_path / "demo")).returncode == 2
    assert (target / "keep").exists()

    # A marker naming the folder, but not this very folder (another inode), does not make it the demo's.
    demo = tmp_path / "demo2"
    demo.mkdir()
    (demo / "keep").write_text("x")
    secrets = tmp_path / "demo2-passphrases"
    secrets.mkdir()
    (secrets / ".qcrypt-demo").write_text(f"0:1 {demo}\n")
    result = run_demo(str(demo))
    assert result.returncode == 2 and f"{demo} exists and was not made by scripts/demo" in result.stderr
    assert (demo / "keep").exists()


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_runs_and_reruns_over_its_own_folders(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    first = run_demo(str(demo), timeout=500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "cryptsetup: the passphrase opens web.luks" in first.stdout
    leftover = demo / "leftover"
    leftover.write_text("from the first run")
    second = run_demo(str(demo), timeout=500)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert not leftover.exists()  # its own folder, replaced
    assert (tmp_path / "demo-out" / "web.luks").exists()
