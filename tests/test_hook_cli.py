"""``qcrypt hook``: the libvirt hook protocol (exit 0, silent stdout, warnings on stderr and syslog), the
``python -m qcrypt.cli.hook`` entry the installed script uses, and install/uninstall into a real hooks folder
whose script then runs with libvirt's bare environment."""

from __future__ import annotations

import io
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from qcrypt.cli import hook as hookcli
from qcrypt.hook import check as hooklib
from tests._hook_domains import domain_xml

BARE_ENV = {"PATH": "/usr/bin:/bin"}
QEMU_SCRIPT = "#!/bin/sh\n# the site's own hook\nexit 0\n"


@pytest.fixture
def syslog_lines(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """Collect what the hook sends to syslog (a real callable in place of the syslog(3) sink)."""
    lines: list[tuple[int, str]] = []
    monkeypatch.setattr(hooklib, "syslog_sink", lambda priority, line: lines.append((priority, line)))
    return lines


def run_hook(args: list[str], xml: str | bytes | None) -> tuple[int, str, str]:
    result = CliRunner().invoke(hookcli.hook, ["libvirt", *args], input=xml)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.interop
@pytest.mark.parametrize("operation", ["prepare"])
def test_warns_on_stderr_and_syslog_never_stdout(
    images: Path,
    syslog_lines: list[tuple[int, str]],
    operation: str,
) -> None:
    code, out, err = run_hook(["web", operation, "begin", "-"], domain_xml("legacy-file.xml", images))
    assert (code, out) == (0, "")
    vda = next(line for line in err.splitlines() if " disk vda " in line)
    assert vda.startswith("qcrypt-hook: warning: domain 'web' disk vda (")
    assert str(images / "legacy.qcow2") in vda
    assert f"qcrypt migrate {images / 'legacy.qcow2'} --to qcow2-luks" in vda
    assert len(err.splitlines()) == 2  # vda and vdc, nothing for the clean disk or the cdrom
    assert [line for _, line in syslog_lines] == [
        line.removeprefix("qcrypt-hook: warning: ") for line in err.splitlines()
    ]


@pytest.mark.interop
@pytest.mark.parametrize(
    "operation",
    [
        "start",
        "migrate",
        "restore",  # libvirt calls 'prepare' before these too
        "stopped",
        "release",
        "started",
        "reconnect",
        "attach",
        "",
        "bogus",
    ],
)
def test_other_operations_do_nothing(
    images: Path,
    syslog_lines: list[tuple[int, str]],
    operation: str,
) -> None:
    assert run_hook(["web", operation, "end", "-"], domain_xml("legacy-file.xml", images)) == (0, "", "")
    assert syslog_lines == []


@pytest.mark.interop
def test_other_operations_do_not_read_stdin(images: Path) -> None:
    stdin = io.BytesIO(domain_xml("legacy-file.xml", images).encode())
    assert hookcli.run_libvirt(["web", "release", "end", "shutdown"], stdin) == 0
    assert stdin.tell() == 0
    assert hookcli.run_libvirt(["web", "prepare", "begin", "-"], stdin, syslog_to=lambda *_: None) == 0
    assert stdin.tell() > 0


@pytest.mark.parametrize(
    ("xml", "expected"),
    [
        ("", "domain XML: empty"),
        (domain_xml("malformed.xml"), "domain XML: malformed"),
        (domain_xml("entity-bomb.xml"), "DOCTYPE/ENTITY declarations refused"),
        (b"\x00\x01garbage\xff", "domain XML"),
    ],
    ids=["empty-stdin", "malformed", "entity-bomb", "binary"],
)
def test_bad_input_is_logged_and_exit_is_zero(
    syslog_lines: list[tuple[int, str]], xml: str | bytes, expected: str
) -> None:
    code, out, err = run_hook(["vm1", "prepare", "begin", "-"], xml)
    assert (code, out) == (0, "")
    assert err.startswith("qcrypt-hook: error: domain 'vm1': ")
    assert expected in err
    assert len(syslog_lines) == 1
    assert expected in syslog_lines[0][1]


@pytest.mark.interop
def test_missing_files_are_fine(images: Path, syslog_lines: list[tuple[int, str]]) -> None:
    assert run_hook(["clean", "prepare", "begin", "-"], domain_xml("plain.xml", images / "gone")) == (0, "", "")
    code, out, err = run_hook(
        ["placements", "prepare", "begin", "-"], domain_xml("encryption-placements.xml", images / "gone")
    )
    assert (code, out) == (0, "")
    assert "disk vda (" in err  # declared <encryption format='qcow'> on a missing file still warns
    assert "qcrypt migrate" in err


@pytest.mark.interop
@pytest.mark.parametrize(
    "args",
    [
        [],
        ["web"],
        ["web", "prepare"],
        ["web", "prepare", "begin", "-", "extra", "more"],
        ["--help", "prepare"],
        ["web", "prepare", "--unknown-option", "-"],
        ["-", "-", "-", "-"],
    ],
    ids=["none", "object-only", "two", "too-many", "help-as-name", "option-like", "dashes"],
)
def test_lenient_argv(images: Path, syslog_lines: list[tuple[int, str]], args: list[str]) -> None:
    code, out, err = run_hook(args, domain_xml("legacy-file.xml", images))
    assert (code, out) == (0, "")
    if len(args) >= 2 and args[1] == "prepare":
        assert "qcrypt migrate" in err
    else:
        assert err == ""


@pytest.mark.interop
def test_internal_errors_never_escape(images: Path) -> None:
    def interrupted(_priority: int, _line: str) -> None:
        raise KeyboardInterrupt

    assert (
        hookcli.run_libvirt(
            ["web", "prepare", "begin", "-"],
            io.BytesIO(domain_xml("legacy-file.xml", images).encode()),
            syslog_to=interrupted,
        )
        == 0
    )
    closed = io.BytesIO(b"<domain/>")
    closed.close()  # reading raises ValueError: reported as an internal error, still exit 0
    lines: list[str] = []
    assert hookcli.run_libvirt(["web", "prepare"], closed, syslog_to=lambda _p, line: lines.append(line)) == 0
    assert lines == ["domain 'web': internal error: ValueError: I/O operation on closed file."]


@pytest.mark.interop
def test_module_entry_point_real_process(images: Path) -> None:
    """What the installed script runs: a real process, stdout checked at the file-descriptor level."""
    env = {**BARE_ENV, "PYTHONPATH": str(hookcli.package_root())}
    for operation in ("prepare",):
        done = subprocess.run(
            [sys.executable, "-m", "qcrypt.cli.hook", "libvirt", "web", operation, "begin", "-"],
            input=domain_xml("legacy-file.xml", images).encode(),
            capture_output=True,
            env=env,
            cwd="/",
            timeout=60,
            check=False,
        )
        assert (done.returncode, done.stdout) == (0, b"")
        assert b"qcrypt-hook: warning: domain 'web' disk vda" in done.stderr
        # vdc is declared nowhere: only reading its qcow v1 header finds the legacy encryption
        assert b"qcrypt-hook: warning: domain 'web' disk vdc" in done.stderr
        assert b"error" not in done.stderr and b"cut short" not in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "qcrypt.cli.hook", "libvirt", "web", "prepare", "begin", "-"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        cwd="/",
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, b"")
    assert b"domain XML: empty" in done.stderr


# -- install / uninstall --------------------------------------------------------------------------------------


@pytest.fixture
def hooks_dir(tmp_path: Path) -> Path:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    qemu = hooks / "qemu"
    qemu.write_text(QEMU_SCRIPT)
    qemu.chmod(0o750)
    return hooks


def _qemu_untouched(hooks: Path) -> bool:
    qemu = hooks / "qemu"
    return qemu.read_text() == QEMU_SCRIPT and stat.S_IMODE(qemu.stat().st_mode) == 0o750


def run_script(script: Path, args: list[str], xml: str | None) -> subprocess.CompletedProcess[bytes]:
    """Run an installed hook the way libvirt does: env -i with a bare PATH, XML on stdin."""
    return subprocess.run(
        ["env", "-i", "PATH=/usr/bin:/bin", str(script), *args],
        input=xml.encode() if xml is not None else b"",
        capture_output=True,
        cwd="/",
        timeout=60,
        check=False,
    )


@pytest.mark.interop
def test_install_run_uninstall(hooks_dir: Path, images: Path) -> None:
    runner = CliRunner()
    first = runner.invoke(hookcli.hook, ["install", "--hooks-dir", str(hooks_dir)])
    assert first.exit_code == 0, first.output
    script = hooks_dir / "qemu.d" / "50-qcrypt"
    assert f"qcrypt hook installed: {script}" in first.stdout
    assert "systemctl reload libvirtd" in first.stdout and "restart" not in first.stdout
    assert "virtqemud" in first.stdout
    assert stat.S_IMODE(script.stat().st_mode) == 0o755
    content = script.read_bytes()
    assert hookcli.SCRIPT_MARKER.encode() in content.splitlines()

    again = runner.invoke(hookcli.hook, ["install", "--hooks-dir", str(hooks_dir)])
    assert again.exit_code == 0
    assert "already installed" in again.stdout
    assert script.read_bytes() == content

    warned = run_script(script, ["web", "prepare", "begin", "-"], domain_xml("legacy-file.xml", images))
    assert (warned.returncode, warned.stdout) == (0, b"")
    assert b"qcrypt-hook: warning: domain 'web' disk vda" in warned.stderr
    assert b"qcrypt-hook: warning: domain 'web' disk vdc" in warned.stderr  # found from the header alone
    assert b"error" not in warned.stderr
    assert f"qcrypt migrate {images / 'legacy.qcow2'}".encode() in warned.stderr
    restore = run_script(script, ["web", "restore", "begin", "-"], domain_xml("legacy-file.xml", images))
    assert (restore.returncode, restore.stdout) == (0, b"")
    quiet = run_script(script, ["web", "release", "end", "shutdown"], domain_xml("legacy-file.xml", images))
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, b"", b"")
    broken = run_script(script, ["web", "prepare", "begin", "-"], "<domain>")
    assert (broken.returncode, broken.stdout) == (0, b"")
    assert b"malformed" in broken.stderr

    removed = runner.invoke(hookcli.hook, ["uninstall", "--hooks-dir", str(hooks_dir)])
    assert removed.exit_code == 0
    assert "qcrypt hook removed" in removed.stdout
    assert not script.exists() and not script.parent.exists()  # the empty qemu.d/ install created
    assert f"empty folder removed: {script.parent}" in removed.stdout and "systemctl reload libvirtd" in removed.stdout
    assert _qemu_untouched(hooks_dir)  # the hooks folder holds the site's script: it stays
    absent = runner.invoke(hookcli.hook, ["uninstall", "--hooks-dir", str(hooks_dir)])
    assert (absent.exit_code, "not installed" in absent.stdout) == (0, True)


@pytest.mark.interop
def test_script_with_source_tree_pythonpath_and_bare_env(hooks_dir: Path, images: Path) -> None:
    """The PYTHONPATH variant (qcrypt run from a source tree, not installed) works with env -i too."""
    script_text = hookcli.render_script(sys.executable, str(hookcli.package_root()))
    status, script = hookcli.install_script(hooks_dir, "60-qcrypt-src", script=script_text)
    assert status == "installed"
    done = run_script(script, ["overlay", "prepare", "begin", "-"], domain_xml("own-backing.xml", images))
    assert (done.returncode, done.stdout) == (0, b"")
    assert b"--flatten" in done.stderr


def test_script_never_fails_even_without_python(hooks_dir: Path) -> None:
    status, script = hookcli.install_script(hooks_dir, "70-gone", script=hookcli.render_script("/no/python", None))
    assert status == "installed"
    done = run_script(script, ["web", "prepare", "begin", "-"], "<domain/>")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    rotten = hookcli.render_script("/bin/false", None)  # an interpreter that fails: still exit 0
    hookcli.install_script(hooks_dir, "70-gone", script=rotten)
    assert run_script(script, ["web", "prepare", "begin", "-"], "<domain/>").returncode == 0


def test_install_refuses_a_foreign_file(hooks_dir: Path) -> None:
    foreign = hooks_dir / "qemu.d" / "50-qcrypt"
    foreign.parent.mkdir()
    foreign.write_text("#!/bin/sh\necho mine\n")
    runner = CliRunner()
    result = runner.invoke(hookcli.hook, ["install", "--hooks-dir", str(hooks_dir)])
    assert result.exit_code == 15  # EXIT_HOOK_REFUSED
    assert "was not written by qcrypt" in result.stderr
    assert result.stdout == ""
    result = runner.invoke(hookcli.hook, ["uninstall", "--hooks-dir", str(hooks_dir)])
    assert result.exit_code == 15  # EXIT_HOOK_REFUSED
    assert "left untouched" in result.stderr
    assert foreign.read_text() == "#!/bin/sh\necho mine\n"
    assert _qemu_untouched(hooks_dir)
    named = runner.invoke(hookcli.hook, ["install", "--hooks-dir", str(hooks_dir), "--name", "51-qcrypt"])
    assert named.exit_code == 0
    assert (hooks_dir / "qemu.d" / "51-qcrypt").is_file()


@pytest.mark.parametrize("name", ["../qemu", ".hidden", "a/b", ""])
def test_install_rejects_bad_names(hooks_dir: Path, name: str) -> None:
    result = CliRunner().invoke(hookcli.hook, ["install", "--hooks-dir", str(hooks_dir), "--name", name])
    assert result.exit_code == 2
    assert not (hooks_dir / "qemu.d").exists()
    assert _qemu_untouched(hooks_dir)


def test_install_without_libvirt(tmp_path: Path) -> None:
    result = CliRunner().invoke(hookcli.hook, ["install", "--hooks-dir", str(tmp_path / "etc" / "libvirt" / "hooks")])
    assert result.exit_code == 15  # EXIT_HOOK_REFUSED
    assert "is libvirt installed?" in result.stderr


# -- install helpers -------------------------------------------------------------------------------------------


def test_rendered_script_shape() -> None:
    script = hookcli.render_script("/opt/py/bin/python3", "/opt/src")
    lines = script.splitlines()
    assert lines[0] == "#!/bin/sh"
    assert lines[1] == hookcli.SCRIPT_MARKER
    assert "    prepare) ;;" in lines
    assert "QCRYPT_PYTHON=/opt/py/bin/python3" in lines
    assert 'PYTHONPATH=/opt/src "$QCRYPT_PYTHON" -m qcrypt.cli.hook libvirt "$@" >/dev/null || true' in lines
    assert lines[-1] == "exit 0"
    assert "PYTHONPATH" not in hookcli.render_script("/usr/bin/python3", None)


def test_install_script_lifecycle(tmp_path: Path) -> None:
    (tmp_path / "qemu").write_text("#!/bin/sh\nexit 0\n")
    script = hookcli.render_script("/usr/bin/python3", None)
    status, path = hookcli.install_script(tmp_path, "50-qcrypt", script=script)
    assert (status, path) == ("installed", tmp_path / "qemu.d" / "50-qcrypt")
    assert path.read_text() == script
    assert path.stat().st_mode & 0o777 == 0o755
    assert hookcli.install_script(tmp_path, "50-qcrypt", script=script)[0] == "already-installed"
    newer = hookcli.render_script("/usr/local/bin/python3", None)
    assert hookcli.install_script(tmp_path, "50-qcrypt", script=newer)[0] == "updated"
    assert path.read_text() == newer
    assert sorted(p.name for p in path.parent.iterdir()) == ["50-qcrypt"]  # no temporary left over
    assert hookcli.uninstall_script(tmp_path, "50-qcrypt") == ("removed", path)
    assert hookcli.uninstall_script(tmp_path, "50-qcrypt") == ("absent", path)
    assert (tmp_path / "qemu").read_text() == "#!/bin/sh\nexit 0\n"


def test_install_script_leaves_foreign_files_alone(tmp_path: Path) -> None:
    foreign = tmp_path / "qemu.d" / "50-qcrypt"
    foreign.parent.mkdir()
    foreign.write_text("#!/bin/sh\n# somebody else's hook\n")
    assert hookcli.install_script(tmp_path, script="x")[0] == "foreign"
    assert hookcli.uninstall_script(tmp_path)[0] == "foreign"
    assert foreign.read_text() == "#!/bin/sh\n# somebody else's hook\n"
    assert hookcli.install_script(tmp_path / "no" / "such" / "hooks", script="x")[0] == "no-hooks-dir"


def test_current_script_points_at_this_installation() -> None:
    script = hookcli.current_script()
    assert f"QCRYPT_PYTHON={os.path.abspath(sys.executable)}" in script.splitlines()  # a venv stays a venv
    if "PYTHONPATH=" in script:  # not importable from a bare environment: the source folder is named
        assert str(hookcli.package_root()) in script


def test_install_self_test(hooks_dir: Path, tmp_path: Path) -> None:
    """install runs the script as libvirt would; a script that cannot work there is reported, not hidden."""
    result = CliRunner().invoke(hookcli.hook, ["install", "--hooks-dir", str(hooks_dir)])
    assert result.exit_code == 0 and "Self-test passed" in result.stdout
    broken = tmp_path / "broken-hook"
    broken.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named qcrypt' >&2\nexit 0\n")
    broken.chmod(0o755)
    assert "ModuleNotFoundError" in (hookcli.self_test(broken) or "")
    assert hookcli.self_test(hooks_dir / "qemu.d" / "50-qcrypt") is None


# -- refusing a hook that others could change ---------------------------------------------------------------------


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    """A copy of this qcrypt package in its own folder (root-owned, 0755): what a source checkout looks like."""
    root = tmp_path / "src"
    root.mkdir(mode=0o755)
    shutil.copytree(hookcli.package_root() / "qcrypt", root / "qcrypt", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def install_from(package: Path, hooks: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``qcrypt hook install`` run from the copy (PYTHONPATH, as from a source tree), cwd /."""
    return subprocess.run(
        [sys.executable, "-m", "qcrypt.cli.hook", "install", "--hooks-dir", str(hooks), *args],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(package)},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "spoil,why",
    [
        (lambda root: root.chmod(0o777), "mode 0777: writable by every user"),
        (lambda root: root.chmod(0o1777), "mode 1777: writable by every user"),  # sticky: still a place to add modules
        (lambda root: (root / "qcrypt" / "hook" / "check.py").chmod(0o666), "mode 0666: writable by every user"),
        (
            lambda root: os.chown(root / "qcrypt" / "cli", 0, 4242) or (root / "qcrypt" / "cli").chmod(0o775),
            "writable by group 4242",
        ),
        (lambda root: os.chown(root / "qcrypt" / "crypto" / "kdf.py", 4242, 0), "owner uid 4242"),
    ],
)
def test_install_refuses_a_package_others_can_change(package_copy: Path, hooks_dir: Path, spoil: Any, why: str) -> None:
    spoil(package_copy)
    refused = install_from(package_copy, hooks_dir)
    assert refused.returncode == 15, refused.stdout + refused.stderr
    assert refused.stderr.startswith("qcrypt: error: the hook runs as root, but users other than root can change")
    assert why in refused.stderr and "nothing installed" in refused.stderr
    assert not (hooks_dir / "qemu.d").exists() and _qemu_untouched(hooks_dir)
    forced = install_from(package_copy, hooks_dir, "--allow-writable-paths")
    assert forced.returncode == 0, forced.stderr
    assert "warning" in forced.stderr and why in forced.stderr and "installing anyway" in forced.stderr
    assert f"PYTHONPATH={package_copy} " in (hooks_dir / "qemu.d" / "50-qcrypt").read_text()


def test_install_from_a_root_owned_copy_is_accepted(package_copy: Path, hooks_dir: Path) -> None:
    done = install_from(package_copy, hooks_dir)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and "Self-test passed" in done.stdout
    assert f"PYTHONPATH={package_copy} " in (hooks_dir / "qemu.d" / "50-qcrypt").read_text()


def test_a_sticky_ancestor_is_fine_but_not_an_import_folder(tmp_path: Path) -> None:
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    assert hookcli._changeable_by_others(str(sticky), on_import_path=False) is None
    assert "writable by every user" in (hookcli._changeable_by_others(str(sticky), on_import_path=True) or "")
    assert hookcli._changeable_by_others(str(tmp_path / "missing"), on_import_path=True) is None


def test_uninstall_removes_the_folders_install_created(tmp_path: Path) -> None:
    hooks = tmp_path / "libvirt" / "hooks"
    hooks.parent.mkdir()
    runner = CliRunner()
    status, script = hookcli.install_script(hooks, "50-qcrypt", script=hookcli.render_script("/no/python", None))
    assert status == "installed" and script.is_file()
    removed = runner.invoke(hookcli.hook, ["uninstall", "--hooks-dir", str(hooks)])
    assert removed.exit_code == 0, removed.output
    assert not hooks.exists() and hooks.parent.is_dir()
    assert f"empty folder removed: {hooks / 'qemu.d'}" in removed.stdout
    assert f"empty folder removed: {hooks}" in removed.stdout
    other = hooks / "qemu.d" / "10-site"  # a folder holding another script is left alone
    other.parent.mkdir(parents=True)
    other.write_text(QEMU_SCRIPT)
    hookcli.install_script(hooks, "50-qcrypt", script=hookcli.render_script("/no/python", None))
    kept = runner.invoke(hookcli.hook, ["uninstall", "--hooks-dir", str(hooks)])
    assert kept.exit_code == 0 and "empty folder" not in kept.stdout and other.read_text() == QEMU_SCRIPT


def test_install_says_where_warnings_go(hooks_dir: Path) -> None:
    """With no syslog socket the warnings reach no log: install says so instead of pointing at syslog."""
    if os.path.exists(hooklib.SYSLOG_SOCKET):
        pytest.skip(f"{hooklib.SYSLOG_SOCKET} exists here")

    def install() -> str:
        done = CliRunner().invoke(hookcli.hook, ["install", "--hooks-dir", str(hooks_dir)])
        assert done.exit_code == 0, done.output
        return done.stdout

    nothing = install()
    assert "Warnings go to syslog" not in nothing
    assert f"No syslog socket at {hooklib.SYSLOG_SOCKET} on this host: the warnings reach no log" in nothing
    assert "qcrypt scan --libvirt-xml /etc/libvirt/qemu" in nothing
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        listener.bind(hooklib.SYSLOG_SOCKET)
    except OSError as e:
        listener.close()
        pytest.skip(f"cannot bind {hooklib.SYSLOG_SOCKET}: {e}")
    try:
        assert "Warnings go to syslog/journal as 'qcrypt-hook'" in install()
        listener.close()  # the socket file stays, nobody listens: a daemon that is gone
        assert f"No syslog socket at {hooklib.SYSLOG_SOCKET}" in install()
    finally:
        listener.close()
        os.unlink(hooklib.SYSLOG_SOCKET)


@pytest.mark.parametrize("entry", ["click", "module"])
def test_hook_libvirt_help(entry: str) -> None:
    if entry == "click":
        result = CliRunner().invoke(hookcli.hook, ["libvirt", "--help"])
        code, out = result.exit_code, result.stdout
    else:
        done = subprocess.run(
            [sys.executable, "-m", "qcrypt.cli.hook", "libvirt", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        code, out = done.returncode, done.stdout
    assert code == 0 and out.startswith("Usage: qcrypt hook libvirt DOMAIN OPERATION SUBOPERATION EXTRA")
    assert "prepare" in out and "qcrypt hook install" in out
