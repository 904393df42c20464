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
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import click

from qcrypt import hook as hooklib
from qcrypt.cli.main import handle_errors
from qcrypt.errors import QcryptError

EXIT_FOREIGN = 1
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
    return stdin.read(hooklib.MAX_XML_BYTES + 1)


def run_libvirt(argv: Sequence[str], stdin: BinaryIO | None, *, budget_s: float = hooklib.DEFAULT_BUDGET_S,
                syslog_to: hooklib.SyslogSink | None = None) -> int:
    """Run the hook for libvirt's ``argv`` (object, operation, sub-operation, extra). Always returns 0.

    Only the operations in ``HOOK_OPERATIONS`` read stdin; the others return at once. Anything printed to
    stdout by accident is swallowed; every exception, KeyboardInterrupt and SystemExit included, is logged.
    """
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
                check = hooklib.check_domain_xml(xml, budget_s=budget_s)
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
        done = subprocess.run([python, "-c", probe], env=_BARE_ENV, cwd="/", capture_output=True, text=True,
                              timeout=_PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return True
    return done.returncode != 0 or done.stdout.strip() != expected


SELF_TEST_XML = b"<domain><name>qcrypt-hook-self-test</name><devices/></domain>"


def self_test(script: Path | str) -> str | None:
    """Run the installed script as libvirt would (env -i, bare PATH, cwd /) on an empty domain.

    The script always exits 0, so anything on stderr means it cannot work there; returns that text."""
    try:
        done = subprocess.run(["/usr/bin/env", "-i", "PATH=/usr/bin:/bin", str(script), "qcrypt-hook-self-test",
                               "prepare", "begin", "-"], input=SELF_TEST_XML, cwd="/", capture_output=True,
                              timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    problem = (done.stderr.decode("utf-8", "replace").strip() or
               (f"exit status {done.returncode}" if done.returncode else ""))
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


def current_script(python: str | None = None) -> str:
    """The script this installation writes (python = the running interpreter by default)."""
    # sys.executable as is, not resolved: a venv's bin/python is a symlink whose target lacks the venv's packages
    interpreter = os.path.abspath(python or sys.executable or "")
    if not (python or sys.executable):
        raise QcryptError("cannot tell which Python runs qcrypt (sys.executable is empty)")
    pythonpath = str(package_root()) if needs_pythonpath(interpreter) else None
    return render_script(interpreter, pythonpath)


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


def install_script(hooks_dir: str | os.PathLike[str], name: str = DEFAULT_SCRIPT_NAME,
                   script: str | None = None) -> tuple[str, Path]:
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
    return click.option("--hooks-dir", default=DEFAULT_HOOKS_DIR, show_default=True,
                        type=click.Path(file_okay=False), help="libvirt's hooks folder.")(func)


def _check_name(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if not value or "/" in value or value.startswith(".") or "\0" in value:
        raise click.BadParameter("must be a plain file name (no '/', not starting with '.')")
    return value


def _name_option(func: click.decorators.FC) -> click.decorators.FC:
    return click.option("--name", default=DEFAULT_SCRIPT_NAME, show_default=True, callback=_check_name,
                        help="Script name inside qemu.d/ (scripts run in alphabetical order).")(func)


@hook.command(name="install")
@_hooks_dir_option
@_name_option
@handle_errors
def install(hooks_dir: str, name: str) -> None:
    """Install the warn-only hook as HOOKS_DIR/qemu.d/NAME (libvirt >= 6.5 runs every script there).

    An existing qemu script or any file not written by qcrypt is never touched. Re-running is harmless.
    """
    status, path = install_script(hooks_dir, name)
    if status == "no-hooks-dir":
        click.echo(f"qcrypt: error: neither {hooks_dir} nor its parent exists (is libvirt installed? "
                   "use --hooks-dir)", err=True)
        sys.exit(EXIT_FOREIGN)
    if status == "foreign":
        click.echo(f"qcrypt: error: {path} exists and was not written by qcrypt; left untouched "
                   "(choose another --name)", err=True)
        sys.exit(EXIT_FOREIGN)
    verb = {"installed": "installed", "updated": "updated", "already-installed": "already installed"}[status]
    click.echo(f"qcrypt hook {verb}: {path}")
    problem = self_test(path)
    if problem:
        click.echo(f"qcrypt: error: the installed hook does not run in libvirt's environment: "
                   f"{problem.splitlines()[-1]}", err=True)
        sys.exit(EXIT_FOREIGN)
    click.echo("Self-test passed: the hook runs with libvirt's minimal environment.")
    if os.path.exists(os.path.join(hooks_dir, "qemu")):
        click.echo(f"The existing {os.path.join(hooks_dir, 'qemu')} script is untouched and still runs first.")
    if status != "already-installed":
        click.echo("Reload the daemon so it sees the hook (it reads the hooks at start and on reload; VMs keep "
                   "running): systemctl reload libvirtd  (virtqemud with modular daemons; or kill -HUP its PID).")
        click.echo("qemu.d/ scripts need libvirt >= 6.5; with an older libvirt, call this script from the "
                   "qemu hook instead.")
    click.echo(where_warnings_go())


def where_warnings_go() -> str:
    """Where the hook's warnings end up on this host."""
    if hooklib.syslog_listening():
        return "Warnings go to syslog/journal as 'qcrypt-hook' (journalctl -t qcrypt-hook)."
    return (f"No syslog socket at {hooklib.SYSLOG_SOCKET} on this host: the warnings reach no log (libvirt does not "
            "keep a hook's stderr at its default log level). Start a syslog daemon or journald so that they are "
            "kept; meanwhile 'qcrypt scan --libvirt-xml /etc/libvirt/qemu /var/lib/libvirt/images' lists the "
            "affected domains.")


@hook.command(name="uninstall")
@_hooks_dir_option
@_name_option
@handle_errors
def uninstall(hooks_dir: str, name: str) -> None:
    """Remove HOOKS_DIR/qemu.d/NAME if (and only if) qcrypt wrote it."""
    status, path = uninstall_script(hooks_dir, name)
    if status == "foreign":
        click.echo(f"qcrypt: error: {path} was not written by qcrypt; left untouched", err=True)
        sys.exit(EXIT_FOREIGN)
    if status == "absent":
        click.echo(f"qcrypt hook not installed: {path} does not exist")
        return
    click.echo(f"qcrypt hook removed: {path}")
    for folder in remove_empty_folders(hooks_dir):
        click.echo(f"empty folder removed: {folder}")
    click.echo("Reload libvirtd so it forgets the hook: systemctl reload libvirtd  (virtqemud with modular "
               "daemons; or kill -HUP its PID).")


def main() -> None:
    """``python -m qcrypt.cli.hook``: ``libvirt ...`` bypasses click and always exits 0; else the group."""
    argv = sys.argv[1:]
    if argv[:1] == ["libvirt"] and argv[1:] not in HELP_ARGV:
        run_libvirt(argv[1:], _stdin_binary())
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
        os._exit(0)  # no interpreter teardown: a read stuck in the inspection thread cannot delay us
    hook(prog_name="qcrypt hook")


if __name__ == "__main__":
    main()
