"""QEMU lock bytes: qcrypt sees QEMU's locks, and QEMU sees qcrypt's (docs/FORMATS.md section F)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qcrypt.errors import ImageInUseError, OutputExistsError
from qcrypt.plumbing import locking
from qcrypt.plumbing.outputs import AtomicOutput, remove_stale_temps, temp_name_for


@pytest.mark.interop
def test_qemu_cannot_open_a_file_we_hold_for_writing(tmp_path: Path, qemu_io: str) -> None:
    path = tmp_path / "out.raw"
    path.write_bytes(bytes(1 << 20))
    fd = os.open(path, os.O_RDWR)
    try:
        locking.hold_shared_locks(fd, writing=True)
        result = subprocess.run(
            [qemu_io, "-f", "raw", str(path), "-c", "write 0 512"], capture_output=True, text=True, timeout=120
        )
        assert result.returncode != 0 and 'Failed to get "write" lock' in result.stderr
    finally:
        os.close(fd)
    free = subprocess.run(
        [qemu_io, "-f", "raw", str(path), "-c", "write 0 512"], capture_output=True, text=True, timeout=120
    )
    assert free.returncode == 0, free.stderr


@pytest.mark.interop
def test_we_see_qemu_locks(tmp_path: Path, qemu_io: str) -> None:
    path = tmp_path / "img.raw"
    path.write_bytes(bytes(1 << 20))
    locking.refuse_if_in_use(str(path))  # nobody holds it
    holder = subprocess.Popen(
        [qemu_io, "-f", "raw", str(path), "-c", "sleep 20000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(path, "rb") as fh:
                if locking.held_lock_bytes(fh.fileno()):
                    break
            time.sleep(0.05)
        with pytest.raises(ImageInUseError, match=r"open in a QEMU process.*uses write"):
            locking.refuse_if_in_use(str(path))
    finally:
        holder.kill()
        holder.wait(timeout=120)


def test_another_qcrypt_run_is_named_as_such(tmp_path: Path) -> None:
    """qcrypt's locks carry a byte of its own: a second run says another qcrypt holds the image, not QEMU."""
    path = tmp_path / "img.raw"
    path.write_bytes(bytes(1 << 20))
    script = (
        "import os, sys, time\nfrom qcrypt.plumbing.locking import hold_shared_locks\n"
        f"fd = os.open({str(path)!r}, os.O_RDONLY)\nhold_shared_locks(fd, writing=False)\n"
        "print('held', flush=True)\ntime.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(ImageInUseError, match="locked by another qcrypt run") as refused:
            locking.refuse_if_in_use(str(path))
        assert "QEMU" not in str(refused.value)
    finally:
        holder.kill()
        holder.wait(timeout=120)


def test_atomic_output_commit_and_cleanup(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.write_bytes(b"source")
    os.chmod(source, 0o604)
    final = tmp_path / "out"
    with AtomicOutput(str(final), overwrite=False, replace_source=False) as out:
        out.copy_ownership_from(source.stat())
        out.file.write(b"data")
        out.sync()
        assert not final.exists()
        done = out.commit()
        assert done.placement is not None
        done.placement.close()
    assert final.read_bytes() == b"data" and final.stat().st_mode & 0o777 == 0o604
    with pytest.raises(OutputExistsError):
        AtomicOutput(str(final), overwrite=False, replace_source=False)
    with AtomicOutput(str(tmp_path / "never"), overwrite=False, replace_source=False) as out:
        temp = out.temp_path
        assert Path(temp).exists()
    assert not Path(temp).exists() and not (tmp_path / "never").exists()


def test_stale_temp_files_of_dead_runs_are_removed(tmp_path: Path) -> None:
    final = tmp_path / "out.luks"
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=120)
    stale = tmp_path / temp_name_for(final.name, dead.pid, "0123456789abcdef")
    stale.write_bytes(b"debris")
    alive = tmp_path / temp_name_for(final.name, os.getpid(), "0123456789abcdef")
    alive.write_bytes(b"in progress")
    folder_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert remove_stale_temps(folder_fd, str(tmp_path), final.name) == [str(stale)]
    finally:
        os.close(folder_fd)
    assert alive.exists() and not stale.exists()
