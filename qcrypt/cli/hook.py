"""``qcrypt hook``: the warn-only libvirt hook and its installer.

``qcrypt hook libvirt OBJECT OPERATION SUBOPERATION EXTRA`` follows libvirt's qemu hook protocol: the domain
XML arrives on stdin; on ``prepare``/``start``/``migrate``/``restore`` every disk is checked and legacy AES
disks are reported to syslog and stderr. It never writes to stdout (for migrate/restore libvirt would take
it as replacement XML) and always exits 0 (a non-zero exit blocks a start, and on ``reconnect`` kills a
running VM).

The installed script runs ``python -m qcrypt.cli.hook libvirt ...``, which takes :func:`main` below and skips
click altogether for that path.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import click

from qcrypt.cli.exit_codes import EXIT_HOOK_REFUSED, handle_errors
from qcrypt.errors import QcryptError
from qcrypt.hook import check as hooklib
from qcrypt.libvirt.domainxml import MAX_XML_BYTES

_MAX_LISTED_UNSAFE = 5
HELP_ARGV = (["--help"], ["-h"])  # libvirt always passes four arguments: a lone --help is a person asking
LIBVIRT_HELP = """Usage: qcrypt hook libvirt DOMAIN OPERATION SUBOPERATION EXTRA  (domain XML on stdin)

  What the installed libvirt qemu hook script runs (libvirt's hook protocol). On 'prepare' (once before
  every QEMU start, restore or incoming migration) each disk of the domain is checked within a time budget;
  a disk with legacy QEMU AES encryption is reported to syslog (ident qcrypt-hook) and stderr, with the
  commands that fix it. Other operations do nothing. Never writes to stdout; always exits 0 (a failing hook
  would block the VM).

  Install it with 'qcrypt hook install'."""


def _stderr_line(line: str) -> None:
    try:
        click.echo(line, err=True)
    except (OSError, ValueError):  # stderr closed or broken: syslog still has the line
        return


def _stdin_binary() -> BinaryIO | None:
    """The binary stdin (None when fd 0 is closed)."""
    return getattr(sys.stdin, "buffer", None)


def _read_domain_xml(stdin: BinaryIO | None) -> bytes | None:
    """The domain XML libvirt writes on stdin (None when there is no usable stdin)."""
    if stdin is None:
        return None
    with contextlib.suppress(AttributeError, ValueError, OSError):
        if stdin.isatty():
            return None
    return stdin.read(MAX_XML_BYTES + 1)


def run_libvirt(
    argv: Sequence[str],
    stdin: BinaryIO | None,
    *,
    budget_s: float = hooklib.DEFAULT_BUDGET_S,
    syslog_to: hooklib.SyslogSink | None = None,
) -> int:
    """Run the hook for libvirt's ``argv`` (object, operation, sub-operation, extra). Always returns 0.

    Reading, parsing and checking end within ``hooklib.RUN_BUDGET_S`` of the call (image reads within
    ``budget_s``), and at most ``hooklib.MAX_LOG_LINES`` lines (plus one summary) are logged.
    Only the operations in ``HOOK_OPERATIONS`` read stdin; the others return at once. Anything printed to
    stdout by accident is swallowed; every exception, KeyboardInterrupt and SystemExit included, is logged.
    """
    started = time.monotonic()
    args = [str(a) for a in argv]
    domain_hint = args[0] if args and args[0] != "-" else None
    operation = args[1] if len(args) > 1 else ""
    if operation not in hooklib.HOOK_OPERATIONS:
        return 0
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            xml = _read_domain_xml(stdin)
            if xml is None:
                check = hooklib.DomainCheck(domain=domain_hint, errors=["no domain XML: stdin is a terminal or closed"])
            else:
                check = hooklib.check_domain_xml(xml, budget_s=budget_s, deadline=started + hooklib.RUN_BUDGET_S)
            hooklib.emit(check, domain_hint=domain_hint, syslog_to=syslog_to, stderr_to=_stderr_line)
    except BaseException as e:  # the hook must never fail a VM operation
        failure = hooklib.DomainCheck(domain=domain_hint, errors=[f"internal error: {type(e).__name__}: {e}"])
        with contextlib.suppress(BaseException):
            hooklib.emit(failure, domain_hint=domain_hint, syslog_to=syslog_to, stderr_to=_stderr_line)
    return 0


# -- installing the libvirt hook script -------------------------------------------------------------------

SCRIPT_MARKER = "# qcrypt-hook-script: written by 'qcrypt hook install'; 'qcrypt hook uninstall' removes it."
DEFAULT_HOOKS_DIR = "/etc/libvirt/hooks"
DEFAULT_SCRIPT_NAME = "50-qcrypt"
_MARKER_SEARCH_BYTES = 4096
_PROBE_TIMEOUT_S = 30
_BARE_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}


def package_root() -> Path:
    """The folder that holds this installation's ``qcrypt`` package."""
    return Path(__file__).resolve().parents[2]  # <root>/qcrypt/cli/hook.py


def needs_pythonpath(python: str) -> bool:
    """True unless ``python`` imports this very qcrypt with libvirt's bare environment and cwd ``/``."""
    expected = str(Path(__file__).resolve())
    probe = "import qcrypt.cli.hook as m, os; print(os.path.realpath(m.__file__))"
    try:
        done = subprocess.run(
            [python, "-c", probe],
            env=_BARE_ENV,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return True
    return done.returncode != 0 or done.stdout.strip() != expected


SELF_TEST_XML = b"<domain><name>qcrypt-hook-self-test</name><devices/></domain>"


def self_test(script: Path | str) -> str | None:
    """Run the installed script as libvirt would (env -i, bare PATH, cwd /) on an empty domain.

    The script always exits 0, so anything on stderr means it cannot work there; returns that text."""
    try:
        done = subprocess.run(
            ["/usr/bin/env", "-i", "PATH=/usr/bin:/bin", str(script), "qcrypt-hook-self-test", "prepare", "begin", "-"],
            input=SELF_TEST_XML,
            cwd="/",
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    problem = done.stderr.decode("utf-8", "replace").strip() or (
        f"exit status {done.returncode}" if done.returncode else ""
    )
    return problem or None


def render_script(python: str, pythonpath: str | None) -> str:
    """The ``qemu.d`` hook script: filters operations, runs the hook, never fails, never prints to stdout."""
    env = f"PYTHONPATH={shlex.quote(pythonpath)} " if pythonpath else ""
    operations = "|".join(hooklib.HOOK_OPERATIONS)
    return (
        "#!/bin/sh\n"
        f"{SCRIPT_MARKER}\n"
        "# libvirt qemu hook: warns (syslog + stderr) when a domain starts on a disk with legacy QEMU AES\n"
        "# encryption. Warn-only: never writes to stdout (migrate/restore would take it as XML), always exits 0.\n"
        f'case "$2" in\n    {operations}) ;;\n    *) exit 0 ;;\nesac\n'
        f"QCRYPT_PYTHON={shlex.quote(python)}\n"
        '[ -x "$QCRYPT_PYTHON" ] || exit 0\n'
        f'{env}"$QCRYPT_PYTHON" -m qcrypt.cli.hook libvirt "$@" >/dev/null || true\n'
        "exit 0\n"
    )


def script_parameters(python: str | None = None) -> tuple[str, str | None]:
    """(interpreter, PYTHONPATH or None) the script of this installation names (python = the running one)."""
    # sys.executable as is, not resolved: a venv's bin/python is a symlink whose target lacks the venv's packages
    interpreter = os.path.abspath(python or sys.executable or "")
    if not (python or sys.executable):
        raise QcryptError("cannot tell which Python runs qcrypt (sys.executable is empty)")
    return interpreter, str(package_root()) if needs_pythonpath(interpreter) else None


def current_script(python: str | None = None) -> str:
    """The script this installation writes (python = the running interpreter by default)."""
    return render_script(*script_parameters(python))


# -- who else could change what the root hook runs -------------------------------------------------------------

_MAX_TREE_ENTRIES = 10_000  # qcrypt's own package tree holds about a hundred


def _changeable_by_others(path: str, *, on_import_path: bool) -> str | None:
    """Why a user other than root could change ``path`` (not following a final symlink), or None.

    An owner other than root, a group other than root's with write permission, or write permission for
    everyone. A sticky world-writable folder (``/tmp``) is fine as an ancestor (nobody can rename a root-owned
    entry in it) but not as a folder Python imports from (anyone could add a module that shadows another)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None  # nothing there: nothing to take over (an import of it fails, it is not run)
    mode = st.st_mode
    if st.st_uid != 0:
        return f"{path} (owner uid {st.st_uid})"
    if stat.S_ISLNK(mode):
        return None  # a root-owned link cannot be changed; its target is checked on its own
    sticky_ancestor = stat.S_ISDIR(mode) and bool(mode & stat.S_ISVTX) and not on_import_path
    if mode & stat.S_IWOTH and not sticky_ancestor:
        return f"{path} (mode {stat.S_IMODE(mode):04o}: writable by every user)"
    if mode & stat.S_IWGRP and st.st_gid != 0 and not sticky_ancestor:
        return f"{path} (mode {stat.S_IMODE(mode):04o}: writable by group {st.st_gid})"
    return None


def _with_ancestors(path: str) -> list[str]:
    """``path`` (absolute, normalised) and every folder above it, up to ``/``."""
    chain = [os.path.normpath(os.path.abspath(path))]
    while chain[-1] != os.path.dirname(chain[-1]):
        chain.append(os.path.dirname(chain[-1]))
    return chain


def _package_tree(root: str) -> list[str]:
    """Every folder and file under ``root`` (qcrypt's own package), bounded."""
    entries = [root]
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        entries += [os.path.join(folder, name) for name in [*dirs, *files]]
        if len(entries) > _MAX_TREE_ENTRIES:
            break
    return entries


def hook_import_path(python: str, pythonpath: str | None) -> list[str]:
    """The folders the hook's Python imports from (its sys.path with libvirt's bare environment and cwd /)."""
    env = dict(_BARE_ENV, **({"PYTHONPATH": pythonpath} if pythonpath else {}))
    probe = "import sys, json; print(json.dumps([p for p in sys.path if p]))"
    try:
        done = subprocess.run(
            [python, "-c", probe],
            env=env,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT_S,
            check=False,
        )
        paths = json.loads(done.stdout) if done.returncode == 0 else []
    except (OSError, subprocess.SubprocessError, ValueError):
        paths = []
    return [str(p) for p in paths if isinstance(p, str)]


def unsafe_paths(python: str, pythonpath: str | None) -> list[str]:
    """Paths a user other than root could change to run code as root through the hook: the interpreter (as
    named and resolved) and every folder above it, every folder on the hook's import path and above it, and
    qcrypt's own package tree and the folders above it. Each as ``path (why)``; empty when none."""
    found: dict[str, str] = {}

    def check(paths: list[str], *, on_import_path: bool) -> None:
        for path in paths:
            if path not in found:
                why = _changeable_by_others(path, on_import_path=on_import_path)
                if why:
                    found[path] = why

    for interpreter in dict.fromkeys([python, os.path.realpath(python)]):
        check(_with_ancestors(interpreter), on_import_path=False)
    package = str(Path(__file__).resolve().parents[1])  # <root>/qcrypt
    imports = [*hook_import_path(python, pythonpath), *([pythonpath] if pythonpath else [])]
    for folder in dict.fromkeys([*imports, package]):
        check([folder], on_import_path=True)
        check(_with_ancestors(folder)[1:], on_import_path=False)
    check(_package_tree(package), on_import_path=True)
    return list(found.values())


def is_ours(path: Path) -> bool:
    """True if ``path`` is a regular file carrying qcrypt's marker line."""
    try:
        if not path.is_file():
            return False
        with path.open("rb") as fh:
            head = fh.read(_MARKER_SEARCH_BYTES)
    except OSError:
        return False
    return SCRIPT_MARKER.encode() in head.splitlines()


def _write_executable(path: Path, text: str) -> None:
    """Write ``text`` atomically (temporary file in the same folder, then rename), mode 0755."""
    fd, tmp = tempfile.mkstemp(prefix=".qcrypt-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install_script(
    hooks_dir: str | os.PathLike[str], name: str = DEFAULT_SCRIPT_NAME, script: str | None = None
) -> tuple[str, Path]:
    """Install the hook as ``hooks_dir/qemu.d/name``. Returns (status, path).

    status: ``installed``, ``updated`` (an older qcrypt script replaced), ``already-installed`` (same
    content), ``foreign`` (a file not written by qcrypt is there; left alone) or ``no-hooks-dir``
    (neither ``hooks_dir`` nor its parent exists). Never touches the ``qemu`` script.
    """
    hooks = Path(hooks_dir)
    if not hooks.is_dir() and not hooks.parent.is_dir():
        return "no-hooks-dir", hooks
    target = hooks / "qemu.d" / name
    text = script if script is not None else current_script()
    if target.exists() or target.is_symlink():
        if not is_ours(target):
            return "foreign", target
        if target.read_text(encoding="utf-8", errors="replace") == text:
            if os.stat(target).st_mode & 0o777 != 0o755:
                os.chmod(target, 0o755)
            return "already-installed", target
        _write_executable(target, text)
        return "updated", target
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    _write_executable(target, text)
    return "installed", target


def uninstall_script(hooks_dir: str | os.PathLike[str], name: str = DEFAULT_SCRIPT_NAME) -> tuple[str, Path]:
    """Remove ``hooks_dir/qemu.d/name`` if qcrypt wrote it. Returns (``removed``|``absent``|``foreign``, path)."""
    target = Path(hooks_dir) / "qemu.d" / name
    if not (target.exists() or target.is_symlink()):
        return "absent", target
    if not is_ours(target):
        return "foreign", target
    target.unlink()
    return "removed", target


def remove_empty_folders(hooks_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove ``hooks_dir/qemu.d`` and then ``hooks_dir`` when they are empty (as install may have created them;
    libvirt needs neither). Returns the folders removed."""
    removed = []
    for folder in (Path(hooks_dir) / "qemu.d", Path(hooks_dir)):
        try:
            folder.rmdir()  # only an empty folder, never a symlink's target
        except OSError:
            break
        removed.append(folder)
    return removed


# -- click commands ---------------------------------------------------------------------------------------


@click.group(name="hook")
def hook() -> None:
    """Warn at VM start about disks with legacy QEMU AES encryption (libvirt hook).

    \b
    qcrypt hook install      install the libvirt qemu.d hook script (then reload libvirtd)
    qcrypt hook uninstall    remove it
    qcrypt hook libvirt ...  what the script runs (libvirt's hook protocol; always exits 0)
    """


@hook.command(
    name="libvirt",
    add_help_option=False,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "allow_interspersed_args": False},
)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
def libvirt(argv: tuple[str, ...]) -> None:
    """libvirt qemu hook: OBJECT OPERATION SUBOPERATION EXTRA, domain XML on stdin. Always exits 0."""
    if list(argv) in HELP_ARGV:
        click.echo(LIBVIRT_HELP)
        return
    run_libvirt(argv, _stdin_binary())


def _hooks_dir_option(func: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--hooks-dir",
        default=DEFAULT_HOOKS_DIR,
        show_default=True,
        type=click.Path(file_okay=False),
        help="libvirt's hooks folder.",
    )(func)


def _check_name(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if not value or "/" in value or value.startswith(".") or "\0" in value:
        raise click.BadParameter("must be a plain file name (no '/', not starting with '.')")
    return value


def _name_option(func: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--name",
        default=DEFAULT_SCRIPT_NAME,
        show_default=True,
        callback=_check_name,
        help="Script name inside qemu.d/ (scripts run in alphabetical order).",
    )(func)


@hook.command(name="install")
@_hooks_dir_option
@_name_option
@click.option(
    "--allow-writable-paths",
    is_flag=True,
    help="Install even when users other than root can change the Python or qcrypt the hook runs "
    "(a warning instead of a refusal; those users can then run code as root).",
)
@handle_errors
def install(hooks_dir: str, name: str, allow_writable_paths: bool) -> None:
    """Install the warn-only hook as HOOKS_DIR/qemu.d/NAME (libvirt >= 6.5 runs every script there).

    An existing qemu script or any file not written by qcrypt is never touched. Re-running is harmless.
    Refused when a user other than root could change what the hook runs (the interpreter, the folders it
    imports from, qcrypt's own files), unless --allow-writable-paths.
    """
    python, pythonpath = script_parameters()
    unsafe = unsafe_paths(python, pythonpath)
    if unsafe:
        listed = ", ".join(unsafe[:_MAX_LISTED_UNSAFE]) + (
            f" and {len(unsafe) - _MAX_LISTED_UNSAFE} more" if len(unsafe) > _MAX_LISTED_UNSAFE else ""
        )
        what = (
            f"the hook runs as root, but users other than root can change what it runs: {listed}. Make "
            "them root's and not group/other-writable (or install qcrypt where only root can write)"
        )
        if not allow_writable_paths:
            click.echo(f"qcrypt: error: {what}; nothing installed (--allow-writable-paths overrides)", err=True)
            sys.exit(EXIT_HOOK_REFUSED)
        click.echo(f"qcrypt: warning: {what}; installing anyway (--allow-writable-paths)", err=True)
    status, path = install_script(hooks_dir, name, render_script(python, pythonpath))
    if status == "no-hooks-dir":
        click.echo(
            f"qcrypt: error: neither {hooks_dir} nor its parent exists (is libvirt installed? use --hooks-dir)",
            err=True,
        )
        sys.exit(EXIT_HOOK_REFUSED)
    if status == "foreign":
        click.echo(
            f"qcrypt: error: {path} exists and was not written by qcrypt; left untouched (choose another --name)",
            err=True,
        )
        sys.exit(EXIT_HOOK_REFUSED)
    verb = {"installed": "installed", "updated": "updated", "already-installed": "already installed"}[status]
    click.echo(f"qcrypt hook {verb}: {path}")
    problem = self_test(path)
    if problem:
        click.echo(
            f"qcrypt: error: the installed hook does not run in libvirt's environment: {problem.splitlines()[-1]}",
            err=True,
        )
        sys.exit(EXIT_HOOK_REFUSED)
    click.echo("Self-test passed: the hook runs with libvirt's minimal environment.")
    if os.path.exists(os.path.join(hooks_dir, "qemu")):
        click.echo(f"The existing {os.path.join(hooks_dir, 'qemu')} script is untouched and still runs first.")
    if status != "already-installed":
        click.echo(
            "Reload the daemon so it sees the hook (it reads the hooks at start and on reload; VMs keep "
            "running): systemctl reload libvirtd  (virtqemud with modular daemons; or kill -HUP its PID)."
        )
        click.echo(
            "qemu.d/ scripts need libvirt >= 6.5; with an older libvirt, call this script from the qemu hook instead."
        )
    click.echo(where_warnings_go())


def where_warnings_go() -> str:
    """Where the hook's warnings end up on this host."""
    if hooklib.syslog_listening():
        return "Warnings go to syslog/journal as 'qcrypt-hook' (journalctl -t qcrypt-hook)."
    return (
        f"No syslog socket at {hooklib.SYSLOG_SOCKET} on this host: the warnings reach no log (libvirt does not "
        "keep a hook's stderr at its default log level). Start a syslog daemon or journald so that they are "
        "kept; meanwhile 'qcrypt scan --libvirt-xml /etc/libvirt/qemu /var/lib/libvirt/images' lists the "
        "affected domains."
    )


@hook.command(name="uninstall")
@_hooks_dir_option
@_name_option
@handle_errors
def uninstall(hooks_dir: str, name: str) -> None:
    """Remove HOOKS_DIR/qemu.d/NAME if (and only if) qcrypt wrote it."""
    status, path = uninstall_script(hooks_dir, name)
    if status == "foreign":
        click.echo(f"qcrypt: error: {path} was not written by qcrypt; left untouched", err=True)
        sys.exit(EXIT_HOOK_REFUSED)
    if status == "absent":
        click.echo(f"qcrypt hook not installed: {path} does not exist")
        return
    click.echo(f"qcrypt hook removed: {path}")
    for folder in remove_empty_folders(hooks_dir):
        click.echo(f"empty folder removed: {folder}")
    click.echo(
        "Reload libvirtd so it forgets the hook: systemctl reload libvirtd  (virtqemud with modular "
        "daemons; or kill -HUP its PID)."
    )


HARD_LIMIT_S = hooklib.RUN_BUDGET_S + 1.0  # the whole hook process, reading stdin and logging included


def start_watchdog(argv: Sequence[str], limit_s: float = HARD_LIMIT_S) -> threading.Timer:
    """A timer that logs one line and ends the process (exit 0) if the hook still runs after ``limit_s``:
    whatever holds it (a stdin that never closes, a read stuck in the kernel), the VM operation goes on."""
    domain_hint = str(argv[0]) if argv and argv[0] != "-" else None

    def stop() -> None:
        with contextlib.suppress(BaseException):
            hooklib.emit(
                hooklib.DomainCheck(
                    domain=domain_hint,
                    errors=[f"hook stopped after {limit_s:g} s (its time limit); nothing was checked further"],
                ),
                stderr_to=_stderr_line,
            )
            sys.stderr.flush()
        os._exit(0)

    timer = threading.Timer(limit_s, stop)
    timer.daemon = True
    timer.start()
    return timer


def main() -> None:
    """``python -m qcrypt.cli.hook``: ``libvirt ...`` bypasses click and always exits 0; else the group."""
    argv = sys.argv[1:]
    if argv[:1] == ["libvirt"] and argv[1:] not in HELP_ARGV:
        start_watchdog(argv[1:])
        run_libvirt(argv[1:], _stdin_binary())
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
        os._exit(0)  # no interpreter teardown: a read stuck in the inspection thread cannot delay us
    hook(prog_name="qcrypt hook")


if __name__ == "__main__":
    main()
