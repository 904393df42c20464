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
import sys
from collections.abc import Sequence
from typing import BinaryIO

import click

from qcrypt import hook as hooklib
from qcrypt.cli.main import handle_errors

EXIT_FOREIGN = 1


def _stderr_line(line: str) -> None:
    try:
        click.echo(line, err=True)
    except (OSError, ValueError):  # stderr closed or broken: syslog still has the line
        return


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
                check = hooklib.DomainCheck(domain=domain_hint, errors=["no domain XML on stdin (not a tty)"])
            else:
                check = hooklib.check_domain_xml(xml, budget_s=budget_s)
            hooklib.emit(check, domain_hint=domain_hint, syslog_to=syslog_to, stderr_to=_stderr_line)
    except BaseException as e:  # the hook must never fail a VM operation
        failure = hooklib.DomainCheck(domain=domain_hint, errors=[f"internal error: {type(e).__name__}: {e}"])
        with contextlib.suppress(BaseException):
            hooklib.emit(failure, domain_hint=domain_hint, syslog_to=syslog_to, stderr_to=_stderr_line)
    return 0


@click.group(name="hook")
def hook() -> None:
    """Warn at VM start about disks with legacy QEMU AES encryption (libvirt hook).

    \b
    qcrypt hook install      install the libvirt qemu.d hook script (then restart libvirtd)
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
    run_libvirt(argv, click.get_binary_stream("stdin"))


def _hooks_dir_option(func: click.decorators.FC) -> click.decorators.FC:
    return click.option("--hooks-dir", default=hooklib.DEFAULT_HOOKS_DIR, show_default=True,
                        type=click.Path(file_okay=False), help="libvirt's hooks folder.")(func)


def _check_name(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if not value or "/" in value or value.startswith(".") or "\0" in value:
        raise click.BadParameter("must be a plain file name (no '/', not starting with '.')")
    return value


def _name_option(func: click.decorators.FC) -> click.decorators.FC:
    return click.option("--name", default=hooklib.DEFAULT_SCRIPT_NAME, show_default=True, callback=_check_name,
                        help="Script name inside qemu.d/ (scripts run in alphabetical order).")(func)


@hook.command(name="install")
@_hooks_dir_option
@_name_option
@handle_errors
def install(hooks_dir: str, name: str) -> None:
    """Install the warn-only hook as HOOKS_DIR/qemu.d/NAME (libvirt >= 6.5 runs every script there).

    An existing qemu script or any file not written by qcrypt is never touched. Re-running is harmless.
    """
    status, path = hooklib.install_script(hooks_dir, name)
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
    if os.path.exists(os.path.join(hooks_dir, "qemu")):
        click.echo(f"The existing {os.path.join(hooks_dir, 'qemu')} script is untouched and still runs first.")
    if status != "already-installed":
        click.echo("Restart the daemon so it sees the hook (hooks are read at start): "
                   "systemctl restart libvirtd  (or virtqemud with modular daemons).")
        click.echo("qemu.d/ scripts need libvirt >= 6.5; with an older libvirt, call this script from the "
                   "qemu hook instead.")
    click.echo("Warnings go to syslog/journal as 'qcrypt-hook' (journalctl -t qcrypt-hook).")


@hook.command(name="uninstall")
@_hooks_dir_option
@_name_option
@handle_errors
def uninstall(hooks_dir: str, name: str) -> None:
    """Remove HOOKS_DIR/qemu.d/NAME if (and only if) qcrypt wrote it."""
    status, path = hooklib.uninstall_script(hooks_dir, name)
    if status == "foreign":
        click.echo(f"qcrypt: error: {path} was not written by qcrypt; left untouched", err=True)
        sys.exit(EXIT_FOREIGN)
    if status == "absent":
        click.echo(f"qcrypt hook not installed: {path} does not exist")
        return
    click.echo(f"qcrypt hook removed: {path}")
    click.echo("Restart libvirtd (or virtqemud) so it forgets the hook.")


def main() -> None:
    """``python -m qcrypt.cli.hook``: ``libvirt ...`` bypasses click and always exits 0; else the group."""
    argv = sys.argv[1:]
    if argv[:1] == ["libvirt"]:
        stdin = getattr(sys.stdin, "buffer", None)
        run_libvirt(argv[1:], stdin)
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
        os._exit(0)  # no interpreter teardown: a read stuck in the inspection thread cannot delay us
    hook(prog_name="qcrypt hook")


if __name__ == "__main__":
    main()
