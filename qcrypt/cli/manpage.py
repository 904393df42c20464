"""The man page qcrypt(1), in roff, from the click commands themselves (scripts/make-manpage writes man/qcrypt.1).

Every command and subcommand gets its usage, its help text and its options; the exit codes and the environment
come from the tables in :mod:`qcrypt.cli.main`, so the page says what ``qcrypt --help`` says. The output depends
on nothing but the code (no date, no terminal width), so a test can check that the committed page is current.
"""

from __future__ import annotations

import inspect
import re

import click

from qcrypt import __version__
from qcrypt.cli.exit_codes import EXIT_CODE_MEANINGS, EXIT_NOTE
from qcrypt.cli.main import DISTRIBUTION, ENVIRONMENT, cli

SEE_ALSO = r"\fBqemu\-img\fR(1), \fBcryptsetup\fR(8), \fBvirsh\fR(1)"


def escape(text: str) -> str:
    r"""Text as roff shows it literally: backslashes, hyphens (``\-``, so options copy and paste) and dots."""
    text = text.replace("\\", r"\e").replace("-", r"\-")
    return "\n".join(rf"\&{line}" if line.startswith((".", "'")) else line for line in text.split("\n"))


def _paragraphs(help_text: str) -> list[str]:
    r"""Click help text as roff: paragraphs reflow, a ``\b`` paragraph keeps its lines (``.nf``)."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(help_text)):
        if block.startswith("\b"):
            lines = block.split("\n")[1:]
            out += [".PP", ".nf", *(escape(line) for line in lines), ".fi"]
        else:
            out += [".PP", escape(" ".join(line.strip() for line in block.split("\n")))]
    return out


def _options(command: click.Command, ctx: click.Context) -> list[str]:
    out: list[str] = []
    for param in command.get_params(ctx):
        if not isinstance(param, click.Option):
            continue
        if "--help" in param.opts:  # click caches this option per command: its names come from the context
            names, help_text = ", ".join(ctx.help_option_names), param.help
        else:
            record = param.get_help_record(ctx)
            if record is None:
                continue
            names, help_text = record
        out += [".TP", rf"\fB{escape(names)}\fR", escape(help_text or "")]
    return out


def _context(command: click.Command, name: str, parent: click.Context | None) -> click.Context:
    """The context click itself makes for ``command`` (settings inherited from the group), parsing nothing."""
    return command.make_context(name, [], parent=parent, resilient_parsing=True)


def _command(command: click.Command, ctx: click.Context, path: str) -> list[str]:
    usage = " ".join(command.collect_usage_pieces(ctx))
    out = [f'.SS "{escape(path)}"', ".PP", rf"\fB{escape(path)}\fR {escape(usage)}"]
    if command.help:
        out += _paragraphs(command.help)
    options = _options(command, ctx)
    if options:
        out += [".PP", "Options:", *options]
    if isinstance(command, click.Group):
        for name in sorted(command.list_commands(ctx)):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                out += _command(sub, _context(sub, name, ctx), f"{path} {name}")
    return out


def render() -> str:
    """The whole page, in roff."""
    root = _context(cli, "qcrypt", None)
    out = [
        f'.TH QCRYPT 1 "" "qcrypt {__version__}" "User Commands"',
        ".SH NAME",
        r"qcrypt \- find and migrate QEMU legacy qcow/qcow2 AES\-encrypted images to LUKS",
        ".SH SYNOPSIS",
        r"\fBqcrypt\fR [\fB\-h\fR] [\fB\-V\fR] \fICOMMAND\fR [\fIARGS\fR]...",
        ".SH DESCRIPTION",
        *_paragraphs(cli.help or ""),
        ".PP",
        escape(
            f"The command comes with the Python distribution {DISTRIBUTION}. docs/GUIDE.md, in its source, "
            "describes every command at length, with examples."
        ),
        ".SH OPTIONS",
        *_options(cli, root),
        ".SH COMMANDS",
    ]
    for name in sorted(cli.list_commands(root)):
        command = cli.get_command(root, name)
        if command is not None and not command.hidden:
            out += _command(command, _context(command, name, root), f"qcrypt {name}")
    out.append(".SH EXIT STATUS")
    for code, meaning in EXIT_CODE_MEANINGS:
        out += [".TP", rf"\fB{code}\fR", escape(meaning)]
    out += [".PP", escape(EXIT_NOTE)]
    out.append(".SH ENVIRONMENT")
    for name, meaning in ENVIRONMENT:
        out += [".TP", rf"\fB{escape(name)}\fR", escape(meaning)]
    out += [".SH SEE ALSO", SEE_ALSO]
    return "\n".join(out) + "\n"
