"""Outputs that appear under their final name only when complete: temp file, fsync, rename, cleanup.

Paths are resolved once: the output's folder is opened once (every component without following a symlink) and
every later step works relative to that descriptor (``openat``/``linkat``/``renameat``), with the file at each
name checked by its inode before it is renamed, linked or removed (docs/SECURITY.md, "Paths and races").

The temporary file lives in the output's folder as ``.NAME.qcrypt-PID-RANDOM.tmp`` (same filesystem, so the
final rename is atomic), created with O_EXCL|O_NOFOLLOW under an unpredictable name. Leftovers of killed runs
(their PID no longer alive; regular files that this user owns, with one link) are removed by the next run.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import re
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass

from qcrypt.errors import OutputExistsError, QcryptIOError, UnsafePathError
from qcrypt.plumbing.locking import hold_shared_locks
from qcrypt.plumbing.parallel import DEFAULT_STALL_SECONDS, Background
from qcrypt.plumbing.signals import signals_deferred

BACKUP_SUFFIX = ".qcrypt-orig"
TEMP_ATTEMPTS = 16  # O_EXCL collisions of 64-bit random names: one means someone guessed, 16 mean a bug
_PENDING: dict[int, tuple[int, str]] = {}  # id(AtomicOutput) -> (folder fd, temp name) not yet committed/removed

FileId = tuple[int, int]  # (st_dev, st_ino)


def file_id(st: os.stat_result) -> FileId:
    return st.st_dev, st.st_ino


def remove_pending() -> None:
    """Remove every temp file this process created and has not committed (the CLI calls it on any exit,
    so an interrupt that lands between two statements still leaves no debris)."""
    for key, (folder_fd, name) in list(_PENDING.items()):
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=folder_fd)
        _PENDING.pop(key, None)


def temp_name_for(final_name: str, pid: int, token: str) -> str:
    """``.NAME.qcrypt-PID-TOKEN.tmp``: the PID tells a later run whether its maker is alive; the random token
    makes the name unpredictable."""
    return f".{final_name}.qcrypt-{pid}-{token}.tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- folders: opened once, checked on the descriptor ---------------------------------------------------------------


def open_folder(path: str) -> int:
    """A descriptor of the folder ``path`` (resolved once with realpath, then opened component by component
    with O_NOFOLLOW, so a symlink swapped in meanwhile makes it fail instead of leading elsewhere)."""
    real = os.path.realpath(path)
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parts = [part for part in real.split("/") if part]
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            flags = (os.O_RDONLY if last else os.O_PATH) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            next_fd = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        if not parts:
            os.close(fd)
            fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return fd
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePathError(
                f"{path}: a folder on its path changed while qcrypt opened it (now a symlink "
                "or not a folder); nothing was written"
            ) from e
        raise io_error(e, f"opening the folder {path}") from e


def _group_members(gid: int) -> set[int] | None:
    """Every uid in group ``gid`` (listed members and users whose primary group it is); None if unknown."""
    try:
        group = grp.getgrgid(gid)
    except KeyError:
        return None
    members = set()
    for name in group.gr_mem:
        try:
            members.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            return None
    members.update(user.pw_uid for user in pwd.getpwall() if user.pw_gid == gid)
    return members


def _has_acl(folder_fd: int) -> bool:
    try:
        os.getxattr(folder_fd, "system.posix_acl_access")
    except OSError:
        return False
    return True


def other_writers(st: os.stat_result, owner_uid: int, *, folder_fd: int | None = None) -> str | None:
    """Who besides root, ``owner_uid`` and the user running qcrypt could rename or remove another user's entries
    in a folder with this stat (None: nobody). A sticky folder lets a writer touch only their own entries (and
    its owner all)."""
    allowed = {0, owner_uid, os.geteuid()}
    if st.st_uid not in allowed:
        return f"its owner (uid {st.st_uid})"
    if st.st_mode & stat.S_ISVTX:
        return None
    if st.st_mode & stat.S_IWOTH:
        return "every user"
    if st.st_mode & stat.S_IWGRP:
        if folder_fd is not None and _has_acl(folder_fd):
            return "the users and groups its ACL names"
        members = _group_members(st.st_gid)
        if members is None:
            return f"group {st.st_gid} (its members are unknown)"
        extra = sorted(members - allowed)
        if extra:
            names = ", ".join(_user_name(uid) for uid in extra[:5]) + (", ..." if len(extra) > 5 else "")
            return f"group {_group_name(st.st_gid)} ({names})"
    return None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def refuse_shared_folder(folder_fd: int, folder: str, owner_uid: int) -> None:
    """UnsafePathError when users other than root and the image's owner could swap names in the folder while
    qcrypt renames and links there."""
    who = other_writers(os.fstat(folder_fd), owner_uid, folder_fd=folder_fd)
    if who:
        raise UnsafePathError(
            f"{folder} is writable by {who}, not only by root and the image's owner ({_user_name(owner_uid)}): "
            "names there could be swapped while qcrypt renames and links them. Remove the others' write access "
            "(or set the sticky bit), or write the output to a private folder"
        )


def _lstat_at(folder_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def is_file_at(folder_fd: int, name: str, expected: FileId) -> bool:
    """``name`` in the folder is (not a symlink to) the file ``expected``."""
    st = _lstat_at(folder_fd, name)
    return st is not None and not stat.S_ISLNK(st.st_mode) and file_id(st) == expected


def remove_stale_temps(folder_fd: int, folder: str, final_name: str) -> list[str]:
    """Delete temp files a killed earlier run left for ``final_name``; returns what was removed.

    Only regular files (never a symlink's target), owned by this user, with one link, whose PID is dead."""
    pattern = re.compile(rf"^\.{re.escape(final_name)}\.qcrypt-(\d+)-[0-9a-f]{{16}}\.tmp$")
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.listdir(folder_fd):
            match = pattern.match(entry)
            if not match or _pid_alive(int(match.group(1))):
                continue
            st = _lstat_at(folder_fd, entry)
            if st is None or not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry, dir_fd=folder_fd)
                removed.append(os.path.join(folder, entry))
    return removed


def leftover_temps(final_path: str) -> list[tuple[str, int, bool]]:
    """Temporary files of other runs for ``final_path``, as (path, PID, that PID is alive): a dry run reports
    them (remove_stale_temps deletes the dead ones when the real run starts). Only names are looked at."""
    folder, final_name = os.path.split(final_path)
    pattern = re.compile(rf"^\.{re.escape(final_name)}\.qcrypt-(\d+)-[0-9a-f]{{16}}\.tmp$")
    try:
        entries = sorted(os.listdir(folder or "."))
    except OSError:
        return []
    found = []
    for entry in entries:
        match = pattern.match(entry)
        if match:
            pid = int(match.group(1))
            found.append((os.path.join(folder, entry), pid, pid != os.getpid() and _pid_alive(pid)))
    return found


def io_error(e: OSError, what: str) -> QcryptIOError:
    """A one-line error for an OS failure while ``what`` (ENOSPC gets a plain-words message)."""
    if e.errno == errno.ENOSPC:
        return QcryptIOError(f"no space left on the device while {what}")
    if e.errno == errno.EFBIG:
        return QcryptIOError(f"file size limit exceeded while {what}")
    return QcryptIOError(f"{what}: {e.strerror or e}")


FSYNC_STALL_FACTOR = 12  # flushing a huge image to slow storage reports no progress: allow an hour


@dataclass
class Placement:
    """Where a committed output lives, by descriptor: the owner of this object can undo the commit (or check
    the kept original) without resolving a path again. :meth:`close` releases the folder descriptor."""

    folder_fd: int
    folder: str
    name: str
    output: FileId
    original_name: str | None = None  # --replace: the original's new name (NAME.qcrypt-orig)
    original: FileId | None = None  # the source file qcrypt read

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def original_intact(self) -> bool:
        """The kept original is still the file qcrypt read, under the name qcrypt gave it."""
        return (
            self.original_name is not None
            and self.original is not None
            and is_file_at(self.folder_fd, self.original_name, self.original)
        )

    def undo(self) -> None:
        """Put the original back under its name (--replace), or remove the output. Works on the folder opened
        before the migration and on names checked by inode: never on a path resolved again. Raises
        UnsafePathError (doing nothing) when a name no longer holds the file qcrypt put there."""
        if self.original_name is not None:
            if not self.original_intact():
                raise UnsafePathError(
                    f"{self.path(self.original_name)} is no longer the original qcrypt kept; "
                    f"it was not put back as {self.path(self.name)}"
                )
            os.rename(self.original_name, self.name, src_dir_fd=self.folder_fd, dst_dir_fd=self.folder_fd)
        elif is_file_at(self.folder_fd, self.name, self.output):
            os.unlink(self.name, dir_fd=self.folder_fd)
        else:
            raise UnsafePathError(f"{self.path(self.name)} is no longer the file qcrypt wrote; it was not removed")
        os.fsync(self.folder_fd)

    def close(self) -> None:
        if self.folder_fd >= 0:
            folder_fd, self.folder_fd = self.folder_fd, -1
            os.close(folder_fd)


@dataclass
class Finalized:
    path: str
    original_kept: str | None = None
    placement: Placement | None = None


class AtomicOutput:
    """A temporary output file, locked against QEMU while written, renamed into place by :meth:`commit`.

    ``source_fd`` is the open source: its owner decides who may write the folder, and with ``replace_source``
    the final name must be that very file (checked now and at commit) and it is that file, by descriptor,
    that is kept as NAME.qcrypt-orig."""

    def __init__(self, final_path: str, *, overwrite: bool, replace_source: bool, source_fd: int | None = None) -> None:
        self.final_path = os.path.abspath(final_path)
        self.folder, self.name = os.path.split(self.final_path)
        self.overwrite = overwrite
        self.replace_source = replace_source
        self.committed = False
        self._ownership: tuple[int, int, int] | None = None  # (mode, uid, gid) the output gets at the commit
        self.source_fd = source_fd
        self.source_st = os.fstat(source_fd) if source_fd is not None else None
        if replace_source and self.source_st is None:
            raise ValueError("replace_source needs the open source (source_fd)")
        self.folder_fd = open_folder(self.folder)
        try:
            self._check_folder()
            self.backup_name = self.name + BACKUP_SUFFIX if replace_source else None
            self.backup_path = os.path.join(self.folder, self.backup_name) if self.backup_name else None
            remove_stale_temps(self.folder_fd, self.folder, self.name)
            fd = self._create_registered()
        except BaseException:
            os.close(self.folder_fd)
            raise
        self.file = os.fdopen(fd, "w+b")
        self.temp_id = file_id(os.fstat(fd))
        try:
            hold_shared_locks(self.file.fileno(), writing=True)
        except BaseException:
            self.close()
            raise

    def _check_folder(self) -> None:
        owner = self.source_st.st_uid if self.source_st is not None else os.geteuid()
        refuse_shared_folder(self.folder_fd, self.folder, owner)
        if self.replace_source:
            assert self.source_st is not None
            if not is_file_at(self.folder_fd, self.name, file_id(self.source_st)):
                raise UnsafePathError(
                    f"{self.final_path} is not the file qcrypt opened as the source (it changed "
                    "meanwhile); nothing was written"
                )
            if _lstat_at(self.folder_fd, self.name + BACKUP_SUFFIX) is not None:
                raise OutputExistsError(
                    f"{self.final_path}{BACKUP_SUFFIX} exists (a previous --replace kept the "
                    "original there); move it away first"
                )
        elif _lstat_at(self.folder_fd, self.name) is not None and not self.overwrite:
            raise OutputExistsError(f"{self.final_path} exists (use --force to overwrite it)")

    def _create_registered(self) -> int:
        """Create the temp file (O_EXCL|O_NOFOLLOW under a random name, relative to the folder descriptor) and
        register it for cleanup, with SIGINT and SIGTERM held back in between, so an interrupt cannot land
        after the creation and before the registration."""
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for _attempt in range(TEMP_ATTEMPTS):
            self.temp_name = temp_name_for(self.name, os.getpid(), secrets.token_hex(8))
            self.temp_path = os.path.join(self.folder, self.temp_name)
            with signals_deferred():
                try:
                    fd = os.open(self.temp_name, flags, 0o600, dir_fd=self.folder_fd)
                except FileExistsError:
                    continue
                except OSError as e:
                    raise io_error(e, f"creating {self.temp_path}") from e
                _PENDING[id(self)] = (self.folder_fd, self.temp_name)
            return fd
        raise QcryptIOError(
            f"cannot create a temporary file in {self.folder}: {TEMP_ATTEMPTS} random names were all taken"
        )

    def copy_ownership_from(self, st: os.stat_result, *, plaintext_from_encrypted: bool = False) -> None:
        """Permission bits never wider than the source's (``st``: its fstat), and owner-only for a decrypted copy
        of an encrypted image; owner and group kept when we may. Applied by :meth:`commit`: until then the
        temporary file stays ours and 0600, so nobody else can open it while it is written and verified (and
        the debris of a killed run is recognisably ours)."""
        mode = stat.S_IMODE(st.st_mode) & 0o777
        self._ownership = (mode & 0o600 if plaintext_from_encrypted else mode, st.st_uid, st.st_gid)

    def _apply_ownership(self) -> None:
        if self._ownership is None:
            return
        mode, uid, gid = self._ownership
        fd = self.file.fileno()
        with contextlib.suppress(PermissionError):
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)  # after the chown, which may clear set-id bits
        os.fsync(fd)

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
        background = Background(
            self.sync, what=f"the fsync of {self.temp_path}", stall_seconds=FSYNC_STALL_FACTOR * DEFAULT_STALL_SECONDS
        )
        return background.result

    def commit(self) -> Finalized:
        """Rename the verified temp file into place (keeping the original beside it with --replace).

        Every name is checked by inode first: the temp name must still be the file we wrote, and with
        --replace the final name must still be the source we read; the original is linked from its open
        descriptor, never from a name."""
        try:
            if not is_file_at(self.folder_fd, self.temp_name, self.temp_id):
                raise UnsafePathError(
                    f"{self.temp_path} is no longer the file qcrypt wrote (it was renamed or "
                    "replaced meanwhile); nothing was replaced"
                )
            self._apply_ownership()
            if self.replace_source:
                self._keep_original()
                os.rename(self.temp_name, self.name, src_dir_fd=self.folder_fd, dst_dir_fd=self.folder_fd)
            elif self.overwrite:
                os.rename(self.temp_name, self.name, src_dir_fd=self.folder_fd, dst_dir_fd=self.folder_fd)
            else:
                self._rename_no_replace()
            os.fsync(self.folder_fd)
        except FileExistsError as e:
            taken = e.filename2 or e.filename
            name = os.path.join(self.folder, taken) if taken else self.final_path
            raise OutputExistsError(f"{name} appeared while migrating; nothing was replaced") from e
        except UnsafePathError:
            raise
        except OSError as e:
            raise io_error(e, f"renaming {self.temp_path} into place") from e
        self.committed = True
        _PENDING.pop(id(self), None)
        placement = Placement(
            os.dup(self.folder_fd),
            self.folder,
            self.name,
            self.temp_id,
            self.backup_name,
            file_id(self.source_st) if self.replace_source and self.source_st else None,
        )
        return Finalized(self.final_path, self.backup_path, placement)

    def _keep_original(self) -> None:
        """Hard-link the source file qcrypt opened (by its descriptor) as NAME.qcrypt-orig, and check that the
        final name still holds it before and after (else the link is removed again and nothing replaced)."""
        assert self.source_fd is not None and self.source_st is not None and self.backup_name is not None
        source = file_id(self.source_st)
        if not is_file_at(self.folder_fd, self.name, source):
            raise UnsafePathError(
                f"{self.final_path} is no longer the source qcrypt read (it was renamed or "
                "replaced meanwhile); nothing was replaced"
            )
        try:  # linkat of the open file through its /proc magic link: the inode we read, whatever the names
            os.link(
                f"/proc/self/fd/{self.source_fd}", self.backup_name, dst_dir_fd=self.folder_fd, follow_symlinks=True
            )
        except FileExistsError:
            raise
        except OSError:  # no /proc: link the name without following it, then check what was linked
            os.link(
                self.name, self.backup_name, src_dir_fd=self.folder_fd, dst_dir_fd=self.folder_fd, follow_symlinks=False
            )
        if is_file_at(self.folder_fd, self.backup_name, source) and is_file_at(self.folder_fd, self.name, source):
            return
        if is_file_at(self.folder_fd, self.backup_name, source):  # only our own link goes again
            with contextlib.suppress(OSError):
                os.unlink(self.backup_name, dir_fd=self.folder_fd)
        raise UnsafePathError(f"{self.final_path} changed while qcrypt kept the original; nothing was replaced")

    def _rename_no_replace(self) -> None:
        try:
            os.link(
                self.temp_name, self.name, src_dir_fd=self.folder_fd, dst_dir_fd=self.folder_fd, follow_symlinks=False
            )
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            if _lstat_at(self.folder_fd, self.name) is not None:
                raise FileExistsError(errno.EEXIST, "exists", self.name) from e
            os.rename(self.temp_name, self.name, src_dir_fd=self.folder_fd, dst_dir_fd=self.folder_fd)
            return
        if is_file_at(self.folder_fd, self.temp_name, self.temp_id):
            os.unlink(self.temp_name, dir_fd=self.folder_fd)

    def close(self) -> None:
        """Close (releasing our locks) and remove the temp file unless it was committed."""
        with contextlib.suppress(OSError):
            self.file.close()
        if not self.committed and id(self) in _PENDING:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp_name, dir_fd=self.folder_fd)
        _PENDING.pop(id(self), None)
        if self.folder_fd >= 0:
            folder_fd, self.folder_fd = self.folder_fd, -1
            os.close(folder_fd)

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
