"""Entry point: the ``qcrypt`` click group and the mapping of library errors to exit codes."""

from __future__ import annotations

import click

from qcrypt.cli.exit_codes import EXIT_CODE_MEANINGS, EXIT_NOTE

# The environment variables qcrypt reads: `qcrypt --help`, the man page and docs/REFERENCE.md show this table.
ENVIRONMENT: tuple[tuple[str, str], ...] = (
    ("QCRYPT_DEBUG=1", "an internal error (exit 10) shows its Python traceback, not one line"),
    ("QCRYPT_PURE_PYTHON=1", "the XTS accelerator stays off (the numpy path: same bytes, slower)"),
    ("_QCRYPT_COMPLETE", "shell completion, see README (Install): _QCRYPT_COMPLETE=bash_source qcrypt"),
)

DISTRIBUTION = "qcow-crypt-migrate"  # the name on package indexes (pyproject.toml); the command stays qcrypt


def _installed_version(package: str) -> str:
    """``package``'s installed version from its dist-info folder's name, found beside the package (a full
    importlib.metadata scan costs 50 ms of every --version); importlib.metadata when the layout is unusual."""
    from importlib import metadata, util
    from pathlib import Path

    spec = util.find_spec(package)
    if spec is None or not spec.origin:
        return "missing"
    for info in Path(spec.origin).parent.parent.glob(f"{package}-*.dist-info"):
        return info.name[len(package) + 1 : -len(".dist-info")]
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "missing"


def version_text() -> str:
    """``qcrypt --version``: the version, whether the XTS accelerator is active, Python's and cryptography's
    versions. Imports neither numpy nor cryptography (the accelerator is a small C module of its own)."""
    import importlib
    import os
    import platform

    from qcrypt import __version__

    try:
        importlib.import_module("qcrypt.crypto._xts")
        built = True
    except ImportError:
        built = False
    if built and not os.environ.get("QCRYPT_PURE_PYTHON"):
        accelerator = "active"
    elif built:
        accelerator = "built, off (QCRYPT_PURE_PYTHON is set): numpy path"
    else:
        accelerator = "not built (it needs gcc, Python's and OpenSSL's headers at install): numpy path"
    cryptography_version = _installed_version("cryptography")
    return (
        f"qcrypt {__version__} ({DISTRIBUTION})\n"
        f"XTS accelerator: {accelerator}\n"
        f"Python {platform.python_version()}, cryptography {cryptography_version}"
    )


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(version_text())
    ctx.exit()


def _help_epilog() -> str:
    r"""Exit codes and environment for ``qcrypt --help`` (``\b``: click keeps these lines as they are)."""
    lines = ["\b", "Exit codes:"]
    lines += [f"  {code:<4} {meaning}" for code, meaning in EXIT_CODE_MEANINGS]
    lines += [f"  {EXIT_NOTE}"]
    lines += ["", "\b", "Environment:"]
    lines += [f"  {name:<21} {meaning}" for name, meaning in ENVIRONMENT]
    lines += ["", "\b", "Manual: man qcrypt (see README, Install)."]
    return "\n".join(lines)


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use (see :data:`COMMANDS`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of ``qcrypt --help`` from :data:`SUMMARIES`, without importing any command."""
        stand_ins = click.Group(commands=[click.Command(name, help=SUMMARIES[name]) for name in COMMANDS])
        stand_ins.format_commands(ctx, formatter)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        import importlib

        module_name, attr = COMMANDS[cmd_name]
        command: click.Command = getattr(importlib.import_module(module_name), attr)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_help_epilog())
@click.option(
    "-V",
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version, whether the XTS accelerator is active, and exit.",
)
def cli() -> None:
    """Find and migrate QEMU legacy qcow/qcow2 AES-encrypted images to LUKS."""


# Command name -> (module, attribute). A command's module (and what it needs: numpy, cryptography, the
# readers) is imported only when that command runs, so `qcrypt --version`, `--help` of one command and the
# libvirt hook start fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "scan": ("qcrypt.cli.scan", "scan"),
    "info": ("qcrypt.cli.info", "info"),
    "migrate": ("qcrypt.cli.migrate", "migrate"),
    "migrate-domain": ("qcrypt.cli.domain", "migrate_domain"),
    "hook": ("qcrypt.cli.hook", "hook"),
}

# The first paragraph of each command's docstring: `qcrypt --help` lists the commands from these (a test keeps
# them equal to the docstrings).
SUMMARIES: dict[str, str] = {
    "scan": "Find legacy-encrypted images (also in backing chains) and grade LUKS settings.",
    "info": "Describe IMAGE: format, encryption, findings, layout, snapshots, backing chain, LUKS keyslots.",
    "migrate": "Decrypt SOURCE and write it as --to says, verified, atomically; SOURCE is never modified.",
    "migrate-domain": (
        "Migrate every legacy-AES disk of each DOMAIN (shut off) to LUKS and define the new XML, or change nothing."
    ),
    "hook": "Warn at VM start about disks with legacy QEMU AES encryption (libvirt hook).",
}


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="qcrypt")


if __name__ == "__main__":
    main()
