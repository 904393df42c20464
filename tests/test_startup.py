"""Start-up cost: ``qcrypt --version`` and the libvirt hook load neither numpy nor cryptography (together a
third of a second per process, and the hook runs at every VM start). The command modules load on first use
(qcrypt/cli/main.py), the image readers import numpy only to walk tables, and which sector ciphers exist is
decided without building one. Timings belong to scripts/bench; this checks which modules a process loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from qcrypt.cli.main import COMMANDS, SUMMARIES, cli
from tests._hook_domains import domain_xml

HEAVY = ("numpy", "cryptography")


# Runs a module as ``python -m`` does and writes the names in sys.modules to a file when the process ends, by
# sys.exit or by os._exit (the hook's way out).
_WRAPPER = """
import os, runpy, sys
out, module = sys.argv[1], sys.argv[2]
sys.argv = [module, *sys.argv[3:]]
def dump():
    with open(out, "w") as fh:
        fh.write("\\n".join(sorted(sys.modules)))
real_exit = os._exit
def exiting(code):
    dump()
    real_exit(code)
os._exit = exiting
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit:
    pass
dump()
"""


def imported(tmp_path: Path, module: str, *args: str, stdin: bytes | None = None) -> set[str]:
    """The modules a ``python -m MODULE ARGS`` process had loaded when it ended."""
    out = tmp_path / "modules"
    subprocess.run(
        [sys.executable, "-c", _WRAPPER, str(out), module, *args], input=stdin, capture_output=True, timeout=60
    )
    return set(out.read_text().split())


def heavy(modules: set[str]) -> list[str]:
    return sorted(name for name in modules if name.split(".")[0] in HEAVY)


def test_version_loads_neither_numpy_nor_cryptography(tmp_path: Path) -> None:
    modules = imported(tmp_path, "qcrypt", "--version")
    assert "qcrypt.cli.main" in modules  # the right process was looked at
    assert heavy(modules) == []


def test_one_command_loads_only_its_own_module(tmp_path: Path) -> None:
    modules = imported(tmp_path, "qcrypt", "info", "--help")
    assert "qcrypt.cli.info" in modules
    assert not {"qcrypt.cli.migrate", "qcrypt.cli.domain", "qcrypt.cli.scan"} & modules


@pytest.mark.interop
def test_the_hook_reads_legacy_and_luks_images_without_numpy_or_cryptography(images: Path, tmp_path: Path) -> None:
    xml = domain_xml("encryption-placements.xml", images).encode()
    modules = imported(tmp_path, "qcrypt.cli.hook", "libvirt", "web", "prepare", "begin", "-", stdin=xml)
    assert {"qcrypt.audit.inspect", "qcrypt.images.qcow2_reader", "qcrypt.luks.header"} <= modules  # it read both
    assert heavy(modules) == []


def test_the_check_sees_a_heavy_import(tmp_path: Path) -> None:
    """The oracle itself: a process that does load them is caught."""
    assert heavy(imported(tmp_path, "qcrypt", "info", "--help")) != []  # info's own module needs numpy


def test_help_lists_the_commands_without_loading_them(tmp_path: Path) -> None:
    modules = imported(tmp_path, "qcrypt", "--help")
    assert "qcrypt.cli.main" in modules
    assert heavy(modules) == [] and not any(name in modules for name, _attr in COMMANDS.values())


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_listed_summary_is_the_command_s_own(name: str) -> None:
    """``qcrypt --help`` lists SUMMARIES; each must say what the command's docstring says."""
    command = cli.get_command(click.Context(cli), name)
    assert command is not None and command.help is not None
    assert SUMMARIES[name] == command.help.split("\n\n", 1)[0].replace("\n", " ")
    assert click.Command(name, help=SUMMARIES[name]).get_short_help_str(45) == command.get_short_help_str(45)
