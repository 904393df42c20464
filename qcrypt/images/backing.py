"""Which backing files qcrypt follows: the rules an administrator can see (docs/SECURITY.md, "Backing files").

qcrypt runs as root over images their owners (tenants, guests) write, and a qcow/qcow2 header names its backing
file freely. Following it blindly copies any host file into the owner's disk (``migrate --to raw``, a flatten).
So a backing file is opened only when all of these hold, checked on the opened descriptor, never by resolving
the name a second time:

* it lies in the image's storage: the folder of the top image's real file and below, or a folder the
  administrator named (``--allow-backing-dir``), or it is a layer the domain XML declares (``<backingStore>``);
* the image's owner could read it (declared layers too): the file and every folder on the way are checked
  against the owner's uid, gid and supplementary groups (root-owned images pass);
* it is a regular file (not on a kernel pseudo filesystem such as /proc), or a block device the domain XML
  declares as a ``<backingStore type='block'>`` layer.

A backing file that breaks a rule is reported as a finding by ``scan``/``info``/the hook and refused by
``migrate`` (exit 8), with what to do.
"""

from __future__ import annotations

import functools
import os
import pwd
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from qcrypt.errors import MigrationError
from qcrypt.model import findings as F
from qcrypt.plumbing.files import open_path, reopen_for_reading, special_reason

READ, SEARCH = 4, 1  # permission bits (other-class positions)


@dataclass(frozen=True)
class DeclaredLayer:
    """A backing layer the domain XML declares (``<backingStore>``): the administrator's word for it."""

    path: str
    format: str | None = None  # its <format type>, None when the XML gives none
    block: bool = False  # type='block': a block device may be read


@dataclass(frozen=True)
class ChainRules:
    """What the administrator allows backing chains to reach, beyond the image's own folder."""

    allow_dirs: tuple[str, ...] = ()
    declared: tuple[DeclaredLayer, ...] = ()

    def declared_layer(self, real_path: str) -> DeclaredLayer | None:
        for layer in self.declared:
            if os.path.realpath(layer.path) == real_path:
                return layer
        return None

    def with_dirs(self, dirs: Iterable[str]) -> ChainRules:
        return ChainRules(allow_dirs=(*self.allow_dirs, *dirs), declared=self.declared)


class BackingRefusedError(MigrationError):
    """A backing file breaks the rules above: it is not followed (exit 8 from migrate)."""

    code = "backing-refused"

    def __init__(self, finding: F.Finding) -> None:
        self.finding = finding
        super().__init__(finding.message)


@dataclass(frozen=True)
class Owner:
    """The user an image belongs to: what they could read is all its chain may contain."""

    uid: int
    gid: int
    groups: frozenset[int]

    @classmethod
    def of(cls, st: os.stat_result) -> Owner:
        try:
            entry = pwd.getpwuid(st.st_uid)
            groups = frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))
            return cls(st.st_uid, entry.pw_gid, groups)
        except (KeyError, OSError):  # a uid without a passwd entry: its own file's group is all we know
            return cls(st.st_uid, st.st_gid, frozenset({st.st_gid}))

    def may(self, st: os.stat_result, want: int) -> bool:
        """Whether the mode bits of ``st`` grant this user ``want`` (READ or SEARCH); ACLs are not consulted,
        so a file shared only through an ACL is refused (stricter, never looser)."""
        if self.uid == 0:
            return True
        if st.st_uid == self.uid:
            return bool(st.st_mode >> 6 & want)
        if st.st_gid in self.groups:
            return bool(st.st_mode >> 3 & want)
        return bool(st.st_mode & want)

    def describe(self) -> str:
        try:
            name = pwd.getpwuid(self.uid).pw_name
            return f"{name} (uid {self.uid})"
        except KeyError:
            return f"uid {self.uid}"


@dataclass(frozen=True)
class ChainContext:
    """The top image's facts every layer below is judged against."""

    image: str  # the top image, as given
    storage: tuple[str, ...]  # real folders the chain may reach
    owner_stat: os.stat_result = field(repr=False)
    rules: ChainRules = field(default_factory=ChainRules)

    @classmethod
    def for_top(cls, image: str, fh: BinaryIO, rules: ChainRules | None = None) -> ChainContext:
        """The context of the top image open as ``fh``. Its storage is the folder of its real file (not for a
        block device: /dev is nobody's image folder) plus ``rules.allow_dirs``."""
        rules = rules or ChainRules()
        st = os.fstat(fh.fileno())
        own: list[str] = []
        if not stat.S_ISBLK(st.st_mode):
            real = fd_path(fh.fileno())
            own.append(os.path.dirname(real) if real else os.path.dirname(os.path.realpath(image)))
        storage = tuple(dict.fromkeys([*own, *(os.path.realpath(d) for d in rules.allow_dirs)]))
        return cls(image, storage, st, rules)

    @functools.cached_property
    def owner(self) -> Owner:
        """Looked up only when a backing file is to be judged (a user database may be slow: the hook has a
        budget)."""
        return Owner.of(self.owner_stat)

    def in_storage(self, real: str) -> bool:
        return any(real == d or real.startswith(d.rstrip("/") + "/") for d in self.storage)


def fd_path(fd: int) -> str | None:
    """The path the kernel records for an open descriptor (not re-resolved from any name we were given)."""
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return real if real.startswith("/") and not real.endswith(" (deleted)") else None


def open_backing(layer: str, backing_path: str, ctx: ChainContext) -> tuple[BinaryIO, DeclaredLayer | None]:
    """Open the backing file ``backing_path`` named by ``layer`` for reading if the rules allow it.

    Raises FileNotFoundError when it does not exist, BackingRefusedError when a rule forbids it."""
    path_fd = open_path(backing_path)
    try:
        st = os.fstat(path_fd)
        real = fd_path(path_fd)
        if real is None:
            raise BackingRefusedError(F.backing_outside(layer, backing_path, backing_path, ctx.storage))
        declared = ctx.rules.declared_layer(real)
        reason = special_reason(path_fd, st, allow_block=bool(declared and declared.block))
        if reason:
            raise BackingRefusedError(F.backing_special(layer, real, reason))
        if declared is None and not ctx.in_storage(real):  # a layer the XML declares may be anywhere
            raise BackingRefusedError(F.backing_outside(layer, backing_path, real, ctx.storage))
        # Even a declared layer: its path may cross a folder the tenant writes (a swapped symlink), and what the
        # owner could not read must not end up in their disk.
        problem = owner_cannot_read(real, st, ctx.owner)
        if problem:
            raise BackingRefusedError(F.backing_not_owner_readable(layer, real, ctx.owner.describe(), problem))
        return reopen_for_reading(path_fd, backing_path, allow_block=bool(declared and declared.block)), declared
    finally:
        os.close(path_fd)


def owner_cannot_read(real: str, st: os.stat_result, owner: Owner) -> str | None:
    """Why ``owner`` could not open ``real`` (the file whose fstat is ``st``) for reading, or None.

    Walks every folder from / with O_PATH|O_NOFOLLOW descriptors and checks the search bit on each, then
    checks that the name still leads to the inode ``st`` describes."""
    if owner.uid == 0:
        return None
    names = [part for part in real.split("/") if part]
    if not names:
        return "it is the root folder"
    dir_fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    walked = ""
    try:
        for name in names[:-1]:
            if not owner.may(os.fstat(dir_fd), SEARCH):
                return f"the folder {walked or '/'} is not searchable by them"
            try:
                next_fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError:
                return "its path changed while it was checked"
            os.close(dir_fd)
            dir_fd = next_fd
            walked += "/" + name
        if not owner.may(os.fstat(dir_fd), SEARCH):
            return f"the folder {walked or '/'} is not searchable by them"
        try:
            leaf_fd = os.open(names[-1], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            return "its path changed while it was checked"
        try:
            leaf = os.fstat(leaf_fd)
        finally:
            os.close(leaf_fd)
        if (leaf.st_dev, leaf.st_ino) != (st.st_dev, st.st_ino):
            return "its path changed while it was checked"
        if not owner.may(st, READ):
            return (
                f"the file (mode {stat.filemode(st.st_mode)}, uid {st.st_uid}, gid {st.st_gid}) is not readable by them"
            )
        return None
    finally:
        os.close(dir_fd)


def resolve_backing(image_path: str, backing_file: str) -> str | None:
    """The local path QEMU would open for ``backing_file`` (relative to the image's folder), or None."""
    if backing_file.startswith("json:") or "://" in backing_file:
        return None
    if os.path.isabs(backing_file):
        return backing_file
    return os.path.join(os.path.dirname(image_path) or ".", backing_file)
