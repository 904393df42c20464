"""Shared click options and output helpers."""

from __future__ import annotations

import sys

import click
from tqdm import tqdm

from qcrypt.images.backing import ChainRules

# tqdm's monitor is a thread: a migration forks workers while it runs, and a fork beside another thread can
# leave the child stuck on a lock that thread held (qcrypt.plumbing.parallel). Bars refresh on update() anyway.
tqdm.monitor_interval = 0


def progress_bar(**kwargs: object) -> tqdm:
    """A tqdm bar on stderr without tqdm's monitor thread (shown only on a terminal unless disabled)."""
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("disable", None)
    return tqdm(**kwargs)


format_opt = click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Output format.",
)


def human_size(n_bytes: int | None) -> str:
    """1536 -> '1.5 KiB' (binary units)."""
    if n_bytes is None:
        return "-"
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # unreachable


SEVERITY_COLOURS = {"ok": "green", "info": "cyan", "warning": "yellow", "critical": "red"}


allow_backing_dir_opt = click.option(
    "--allow-backing-dir",
    "allow_backing_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="A folder backing files may be in besides the image's own folder (repeatable). Backing files the "
    "image's owner cannot read, and special files, are refused anyway.",
)


def chain_rules(allow_backing_dirs: tuple[str, ...]) -> ChainRules:
    """The backing-chain rules of --allow-backing-dir (see docs/SECURITY.md)."""
    return ChainRules(allow_dirs=tuple(allow_backing_dirs))


def style_severity(severity: str) -> str:
    return click.style(f"{severity:<8}", fg=SEVERITY_COLOURS.get(severity), bold=severity == "critical")
