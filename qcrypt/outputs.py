"""Outputs that appear under their final name only when complete: temp file, fsync, rename, cleanup.

The temporary file lives in the output's folder as ``.NAME.qcrypt-PID.tmp`` (same filesystem, so the final
rename is atomic). Leftovers of killed runs (their PID no longer alive) are removed by the next run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass

from qcrypt._signals import signals_deferred
from qcrypt.errors import OutputExistsError, QcryptIOError
from qcrypt.locking import hold_shared_locks
from qcrypt.parallel import DEFAULT_STALL_SECONDS, Background

BACKUP_SUFFIX = ".qcrypt-orig"
_PENDING: set[str] = set()  # temp files of this process not yet committed or removed


def remove_pending() -> None:
    """Remove every temp file this process created and has not committed (the CLI calls it on any exit,
    so an interrupt that lands between two statements still leaves no debris)."""
    for path in list(_PENDING):
        with contextlib.suppress(OSError):
            os.unlink(path)
        _PENDING.discard(path)


def temp_name_for(final_path: str, pid: int) -> str:
    folder, name = os.path.split(os.path.abspath(final_path))
    return os.path.join(folder, f".{name}.qcrypt-{pid}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(final_path: str) -> list[str]:
    """Delete temp files a killed earlier run left for ``final_path``; returns what was removed."""
    folder, name = os.path.split(os.path.abspath(final_path))
    pattern = re.compile(rf"^\.{re.escape(name)}\.qcrypt-(\d+)\.tmp$")
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.listdir(folder):
            match = pattern.match(entry)
            if match and not _pid_alive(int(match.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, entry))
                    removed.append(os.path.join(folder, entry))
    return removed


def io_error(e: OSError, what: str) -> QcryptIOError:
    """A one-line error for an OS failure while ``what`` (ENOSPC gets a plain-words message)."""
    if e.errno == errno.ENOSPC:
        return QcryptIOError(f"no space left on the device while {what}")
    if e.errno == errno.EFBIG:
        return QcryptIOError(f"file size limit exceeded while {what}")
    return QcryptIOError(f"{what}: {e.strerror or e}")


def fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


FSYNC_STALL_FACTOR = 12  # flushing a huge image to slow storage reports no progress: allow an hour


@dataclass
class Finalized:
    path: str
    original_kept: str | None = None


class AtomicOutput:
    """A temporary output file, locked against QEMU while written, renamed into place by :meth:`commit`."""

    def __init__(self, final_path: str, *, overwrite: bool, replace_source: bool) -> None:
        self.final_path = os.path.abspath(final_path)
        self.overwrite = overwrite
        self.replace_source = replace_source
        if not replace_source and os.path.lexists(self.final_path) and not overwrite:
            raise OutputExistsError(f"{final_path} exists (use --force to overwrite it)")
        self.backup_path = self.final_path + BACKUP_SUFFIX if replace_source else None
        if self.backup_path and os.path.lexists(self.backup_path):
            raise OutputExistsError(f"{self.backup_path} exists (a previous --replace kept the original there); "
                                    "move it away first")
        remove_stale_temps(self.final_path)
        self.temp_path = temp_name_for(self.final_path, os.getpid())
        self.committed = False
        fd = self._create_registered()
        self.file = os.fdopen(fd, "w+b")
        try:
            hold_shared_locks(self.file.fileno(), writing=True)
        except BaseException:
            self.close()
            raise

    def _create_registered(self) -> int:
        """Create the temp file (O_EXCL: never another run's) and register it for cleanup, with SIGINT and
        SIGTERM held back in between, so an interrupt cannot land after the creation and before the
        registration."""
        with signals_deferred():
            try:
                fd = os.open(self.temp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise io_error(e, f"creating {self.temp_path}") from e
            _PENDING.add(self.temp_path)
        return fd

    def copy_ownership_from(self, source_path: str, *, plaintext_from_encrypted: bool = False) -> None:
        """Permission bits never wider than the source's (and owner-only for a decrypted copy of an encrypted
        image); owner and group kept when we may."""
        st = os.stat(source_path)
        mode = stat.S_IMODE(st.st_mode) & 0o777
        os.fchmod(self.file.fileno(), mode & 0o600 if plaintext_from_encrypted else mode)
        with contextlib.suppress(PermissionError):
            os.fchown(self.file.fileno(), st.st_uid, st.st_gid)

    def sync(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as e:
            raise io_error(e, f"writing {self.temp_path}") from e

    def start_sync(self) -> Callable[[], None]:
        """fsync in a background process (it shares the open file; a thread would make the read-back check's
        forks unsafe), so a read-back check can run meanwhile; returns the function that waits for it and
        raises its error."""
        self.file.flush()
        background = Background(self.sync, what=f"the fsync of {self.temp_path}",
                                stall_seconds=FSYNC_STALL_FACTOR * DEFAULT_STALL_SECONDS)
        return background.result

    def commit(self, source_path: str) -> Finalized:
        """Rename the verified temp file into place (keeping the original beside it with --replace)."""
        folder = os.path.dirname(self.final_path)
        try:
            if self.replace_source:
                assert self.backup_path is not None
                os.link(os.path.realpath(source_path), self.backup_path)  # link() would not follow a symlink
                os.replace(self.temp_path, self.final_path)
            elif self.overwrite:
                os.replace(self.temp_path, self.final_path)
            else:
                self._rename_no_replace()
            fsync_dir(folder)
        except FileExistsError as e:
            raise OutputExistsError(f"{e.filename} appeared while migrating; nothing was replaced") from e
        except OSError as e:
            raise io_error(e, f"renaming {self.temp_path} into place") from e
        self.committed = True
        _PENDING.discard(self.temp_path)
        return Finalized(self.final_path, self.backup_path)

    def _rename_no_replace(self) -> None:
        try:
            os.link(self.temp_path, self.final_path)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            if os.path.lexists(self.final_path):
                raise FileExistsError(errno.EEXIST, "exists", self.final_path) from e
            os.rename(self.temp_path, self.final_path)
            return
        os.unlink(self.temp_path)

    def close(self) -> None:
        """Close (releasing our locks) and remove the temp file unless it was committed."""
        with contextlib.suppress(OSError):
            self.file.close()
        if not self.committed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp_path)
        _PENDING.discard(self.temp_path)

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
