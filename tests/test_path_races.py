"""Paths a tenant can write are raced (docs/SECURITY.md, "Paths and races"): qcrypt runs as root over a folder the
image's owner writes, and every rename, link and removal must hit the file qcrypt opened, never whatever a name leads to
later. The tenant's moves are made deterministic by running them at the exact point between qcrypt's checks and
its commit (wrapping the read-back verification, the last step before the commit)."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from qcrypt.cli.migrate import migrate as migrate_command
from qcrypt.migrate import passphrase_check
from qcrypt.migrate import run as migration
from qcrypt.migrate.options import MigrateOptions
from qcrypt.plumbing import outputs
from qcrypt.plumbing.outputs import remove_stale_temps, temp_name_for
from tests import _images as im
from tests._tools import IN_CI

PASSPHRASE = "correct horse battery staple, longer than 16 bytes"
SIZE = 1 << 20
FAST = ["--pbkdf-force-iterations", "1000"]
EXIT_UNSAFE_PATH = 14


@pytest.fixture(autouse=True)
def _as_root() -> None:
    """These tests need root (qcrypt's setting: root over tenant files) to make users and chown to them; in CI
    their absence is a failure, not a skip."""
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("the path race tests must run as root in CI")
        pytest.skip("needs root")


@dataclass
class Users:
    tenant: int  # owns the image and its folder
    tenant_gid: int  # the tenant's own group (nobody else in it)
    other: int  # another user, in group ``group``
    group: int
    group_name: str


@pytest.fixture
def users() -> Iterator[Users]:
    """Two unprivileged users and a group holding the second one (removed again)."""
    tag = secrets.token_hex(3)
    tenant, other, group = f"qct{tag}a", f"qct{tag}b", f"qct{tag}g"
    made: list[list[str]] = []
    try:
        for words in (
            ["groupadd", group],
            ["useradd", "-M", "-U", "-s", "/usr/sbin/nologin", tenant],
            ["useradd", "-M", "-N", "-G", group, "-s", "/usr/sbin/nologin", other],
        ):
            _user_db(words)
            made.append(words)
        yield Users(
            pwd.getpwnam(tenant).pw_uid, pwd.getpwnam(tenant).pw_gid, pwd.getpwnam(other).pw_uid, _gid(group), group
        )
    finally:
        for words in reversed(made):
            undo = ["groupdel", words[1]] if words[0] == "groupadd" else ["userdel", words[-1]]
            subprocess.run(undo, capture_output=True, timeout=60, check=False)


def _user_db(words: list[str]) -> None:
    """Run a useradd/groupadd, again while another process holds the user database's lock (exit 1 or 10)."""
    deadline = time.monotonic() + 30
    while True:
        done = subprocess.run(words, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode == 0:
            return
        if done.returncode not in (1, 10) or time.monotonic() > deadline:
            raise AssertionError(f"{words}: exit {done.returncode}: {done.stderr.strip()}")
        time.sleep(0.2)


def _gid(name: str) -> int:
    import grp

    return grp.getgrnam(name).gr_gid


def tenant_image(folder: Path, users: Users) -> tuple[Path, Path]:
    """A small legacy image and its folder, both the tenant's; the passphrase file is root's, elsewhere."""
    folder.mkdir(mode=0o755)
    image = im.make_qcow2(folder / "disk.qcow2", SIZE, encrypt="aes", passphrase=PASSPHRASE)
    im.write_pattern(image, 0, 65536, 0x5A)
    os.chown(folder, users.tenant, users.tenant_gid)
    os.chown(image.path, users.tenant, users.tenant_gid)
    pw = folder.parent / "pw"
    pw.write_text(PASSPHRASE)
    return image.path, pw


def root_only_file(tmp_path: Path) -> Path:
    """A root-only file on the same filesystem as the tenant's folder (as /etc/shadow is on a one-disk host)."""
    vault = tmp_path / "etc"
    vault.mkdir(mode=0o700)
    secret = vault / "shadow"
    secret.write_bytes(b"root:$6$secret-hash:19000::::::\n")
    secret.chmod(0o600)
    return secret


def run_migrate(*args: str) -> Any:
    """``qcrypt migrate ARGS`` in this process (so the tenant's move can run at the right point)."""
    return CliRunner().invoke(migrate_command, list(args), catch_exceptions=False)


def _after_verify(monkeypatch: pytest.MonkeyPatch, action: Any) -> None:
    """Run ``action`` (the tenant's move) right after the read-back verification, before the commit."""
    original = migration.verify

    def verify(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        action()
        return result

    monkeypatch.setattr(migration, "verify", verify)


def entries_with_inode(folder: Path, inode: int) -> list[str]:
    return [p.name for p in folder.iterdir() if not p.is_symlink() and p.stat().st_ino == inode]


@pytest.mark.interop
def test_replace_never_hard_links_a_file_the_tenant_swapped_in(
    tmp_path: Path, users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between verification and commit, the tenant moves the image away and puts a symlink to a root-only file
    under its name: root must not hard-link that file as disk.qcow2.qcrypt-orig, must not advise shredding it,
    and must not replace anything."""
    folder = tmp_path / "tenant"
    source, pw = tenant_image(folder, users)
    secret = root_only_file(tmp_path)
    secret_before = secret.read_bytes()

    def swap() -> None:
        source.rename(folder / "moved.qcow2")
        source.symlink_to(secret)

    _after_verify(monkeypatch, swap)
    done = run_migrate(str(source), "--to", "qcow2-luks", "--replace", "--passphrase-file", str(pw), *FAST)
    assert secret.stat().st_nlink == 1 and entries_with_inode(folder, secret.stat().st_ino) == []
    assert secret.read_bytes() == secret_before and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "shred" not in done.output
    assert done.exit_code == EXIT_UNSAFE_PATH, done.output
    assert "no longer the source qcrypt read" in done.output and "nothing was replaced" in done.output
    assert source.is_symlink() and not (folder / "disk.qcow2.qcrypt-orig").exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.interop
def test_replace_in_the_tenants_own_folder_names_the_checked_original(tmp_path: Path, users: Users) -> None:
    """Without a swap, --replace in the tenant's own folder works and the advice names NAME.qcrypt-orig, the
    file qcrypt read."""
    folder = tmp_path / "tenant"
    source, pw = tenant_image(folder, users)
    before = source.read_bytes()
    done = run_migrate(str(source), "--to", "qcow2-luks", "--replace", "--passphrase-file", str(pw), *FAST)
    assert done.exit_code == 0, done.output
    kept = folder / "disk.qcow2.qcrypt-orig"
    assert kept.read_bytes() == before and f"shred -u {kept}" in done.output
    assert source.stat().st_uid == users.tenant  # the output keeps the image's owner


@pytest.mark.interop
def test_advice_never_names_an_original_swapped_after_the_commit(
    tmp_path: Path, users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right after the commit the tenant swaps disk.qcow2.qcrypt-orig for a symlink to a root-only file: the
    printed summary gives no 'shred -u' and says why."""
    folder = tmp_path / "tenant"
    source, pw = tenant_image(folder, users)
    secret = root_only_file(tmp_path)
    kept = folder / "disk.qcow2.qcrypt-orig"

    class Swapping(outputs.AtomicOutput):
        def commit(self, *args: Any) -> outputs.Finalized:
            done = super().commit(*args)
            kept.rename(folder / "moved.qcow2")
            kept.symlink_to(secret)
            return done

    monkeypatch.setattr(migration, "AtomicOutput", Swapping)
    done = run_migrate(str(source), "--to", "qcow2-luks", "--replace", "--passphrase-file", str(pw), *FAST)
    assert done.exit_code == 0, done.output
    assert "shred" not in done.output and "no longer holds the file qcrypt read" in done.output
    assert secret.read_bytes().startswith(b"root:")


@pytest.mark.interop
def test_source_swapped_after_it_was_opened_is_never_read(
    tmp_path: Path, users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After qcrypt opened the source (and checked the passphrase), the tenant puts a symlink to a root-only file
    under its name: the migration must not read that file into the tenant's output."""
    folder = tmp_path / "tenant"
    source, pw = tenant_image(folder, users)
    secret = root_only_file(tmp_path)
    secret.write_bytes(b"ROOT-ONLY-SECRET" * 4096)
    out = folder / "out.raw"
    original = passphrase_check.check_legacy_passphrase

    def check_then_swap(*args: Any, **kwargs: Any) -> Any:
        verdict = original(*args, **kwargs)
        source.rename(folder / "moved.qcow2")
        source.symlink_to(secret)
        return verdict

    monkeypatch.setattr(passphrase_check, "check_legacy_passphrase", check_then_swap)
    done = run_migrate(str(source), "--to", "raw", "-o", str(out), "--passphrase-file", str(pw))
    assert not out.exists() or b"ROOT-ONLY-SECRET" not in out.read_bytes()
    assert done.exit_code == EXIT_UNSAFE_PATH, done.output
    assert "is no longer the file qcrypt opened" in done.output
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.interop
def test_the_tenant_cannot_open_the_output_before_it_is_committed(
    tmp_path: Path, users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While written and verified, the temporary output is root's and 0600 (the tenant could otherwise change it
    between verification and commit); at the commit it gets the image owner's ownership and mode."""
    folder = tmp_path / "tenant"
    source, pw = tenant_image(folder, users)
    source.chmod(0o640)
    seen: list[os.stat_result] = []
    _after_verify(monkeypatch, lambda: seen.extend(p.stat() for p in folder.iterdir() if p.name.endswith(".tmp")))
    done = run_migrate(str(source), "--to", "luks", "-o", str(folder / "out.luks"), "--passphrase-file", str(pw), *FAST)
    assert done.exit_code == 0, done.output
    (temp,) = seen
    assert temp.st_uid == 0 and stat.S_IMODE(temp.st_mode) == 0o600
    out = (folder / "out.luks").stat()
    assert (out.st_uid, out.st_gid, stat.S_IMODE(out.st_mode)) == (users.tenant, users.tenant_gid, 0o640)


@pytest.mark.interop
def test_thousands_of_precreated_temp_names_do_not_stop_migrate(tmp_path: Path, users: Users) -> None:
    """A tenant pre-creates 3,000 temp names (among them the one this very process would have used): migrate
    still works, and none of the tenant's files is removed by root."""
    folder = tmp_path / "tenant"
    source, _pw = tenant_image(folder, users)
    out = folder / "disk.luks"
    pids = [os.getpid(), *[p for p in range(300, 400_000, 101) if p != os.getpid()][:2999]]
    planted = []
    for pid in pids:
        name = folder / f".{out.name}.qcrypt-{pid}.tmp"
        name.write_bytes(b"tenant")
        os.chown(name, users.tenant, users.tenant_gid)
        planted.append(name)
    result = migration.migrate(
        str(source), MigrateOptions(target="luks", output=str(out), passphrase=PASSPHRASE.encode(), iterations=1000)
    )
    assert result.verified and out.exists()
    assert all(p.read_bytes() == b"tenant" for p in planted)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp") and p not in planted]


def _writable_by_other(folder: Path, users: Users, how: str) -> None:
    if how == "group":
        os.chown(folder, 0, users.group)
        folder.chmod(0o775)
    elif how == "world":
        folder.chmod(0o777)
    elif how == "owner":
        os.chown(folder, users.other, users.other)


@pytest.mark.interop
@pytest.mark.parametrize("how", ["group", "world", "owner"])
def test_folder_writable_by_another_user_is_refused(tmp_path: Path, users: Users, how: str) -> None:
    """Another user who can rename entries in the folder could swap names under root: refused before anything
    is written (exit 14), with a message naming who can write it."""
    folder = tmp_path / "tenant"
    source, pw = tenant_image(folder, users)
    _writable_by_other(folder, users, how)
    before = sorted(p.name for p in folder.iterdir())
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "qcrypt",
            "migrate",
            str(source),
            "--to",
            "qcow2-luks",
            "--replace",
            "--passphrase-file",
            str(pw),
            *FAST,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == EXIT_UNSAFE_PATH, done.stdout + done.stderr
    assert len(done.stderr.splitlines()) == 1 and "is writable by" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.interop
@pytest.mark.parametrize("mode", [0o1777, 0o755, 0o775])
def test_folders_only_root_and_the_owner_can_swap_in_are_accepted(tmp_path: Path, users: Users, mode: int) -> None:
    """Sticky (others cannot rename what is not theirs), the owner's own folder, and a group holding nobody
    else: the migration goes through."""
    folder = tmp_path / "tenant"
    source, pw = tenant_image(folder, users)
    folder.chmod(mode)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "qcrypt",
            "migrate",
            str(source),
            "--to",
            "qcow2-luks",
            "--replace",
            "--passphrase-file",
            str(pw),
            *FAST,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_stale_temp_cleanup_touches_only_its_own_debris(tmp_path: Path, users: Users) -> None:
    """Names that look like a dead run's temp file are removed only when they are regular files of this user
    with one link: never a symlink's target, a tenant's file, or a hard link to another file."""
    secret = root_only_file(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=60)

    def name(token: str) -> Path:
        return tmp_path / temp_name_for("out.luks", dead.pid, token)

    ours = name("0" * 16)
    ours.write_bytes(b"debris")
    symlink = name("1" * 16)
    symlink.symlink_to(secret)
    tenants = name("2" * 16)
    tenants.write_bytes(b"tenant")
    os.chown(tenants, users.tenant, users.tenant_gid)
    hard_link = name("3" * 16)
    os.link(secret, hard_link)
    folder_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert remove_stale_temps(folder_fd, str(tmp_path), "out.luks") == [str(ours)]
    finally:
        os.close(folder_fd)
    assert symlink.is_symlink() and tenants.read_bytes() == b"tenant" and hard_link.exists()
    assert secret.read_bytes().startswith(b"root:")
    with contextlib.suppress(FileNotFoundError):
        hard_link.unlink()


def _folder_stat(uid: int, gid: int, mode: int) -> os.stat_result:
    return os.stat_result((stat.S_IFDIR | mode, 1, 1, 2, uid, gid, 4096, 0, 0, 0))


def test_who_else_can_write_a_folder(users: Users) -> None:
    """The rule behind the refusal, case by case (root runs qcrypt; the tenant owns the image)."""
    from qcrypt.plumbing.outputs import other_writers

    t = users.tenant
    assert other_writers(_folder_stat(0, 0, 0o755), t) is None
    assert other_writers(_folder_stat(t, users.tenant_gid, 0o775), t) is None  # the tenant's own group
    assert other_writers(_folder_stat(0, 0, 0o1777), t) is None  # sticky: others touch only their own entries
    assert other_writers(_folder_stat(0, 0, 0o777), t) == "every user"
    assert users.group_name in str(other_writers(_folder_stat(0, users.group, 0o770), t))
    assert other_writers(_folder_stat(users.other, users.other, 0o700), t) == f"its owner (uid {users.other})"
    assert other_writers(_folder_stat(users.other, users.other, 0o1777), t) is not None  # its owner renames all
