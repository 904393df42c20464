"""Shared click options and output helpers."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from qcrypt.images.backing import ChainRules

if TYPE_CHECKING:
    from tqdm import tqdm


class NoProgressBar:
    """What :func:`progress_bar` returns when no bar is shown: tqdm is then not even imported (about 20 ms of
    every non-interactive run's start-up)."""

    def update(self, n: float = 1) -> None:
        return None

    def __enter__(self) -> NoProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def progress_bar(**kwargs: Any) -> tqdm | NoProgressBar:
    """A tqdm bar on stderr without tqdm's monitor thread, shown only on a terminal unless ``disable`` says
    otherwise (tqdm's meaning: True never, None on a terminal only)."""
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("disable", None)
    stream = kwargs["file"]
    if kwargs["disable"] is True or (kwargs["disable"] is None and not _is_terminal(stream)):
        return NoProgressBar()
    from tqdm import tqdm

    # tqdm's monitor is a thread: a migration forks workers while it runs, and a fork beside another thread can
    # leave the child stuck on a lock that thread held (qcrypt.plumbing.parallel). Bars refresh on update() anyway.
    tqdm.monitor_interval = 0
    return tqdm(**kwargs)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


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
