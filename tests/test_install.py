"""What an operator installing qcrypt meets: the distribution name, ``--version``, ``--help``'s exit codes, the
man page, shell completion, and the install instructions in the repository.

The build of the release artifacts themselves (sdist and wheel, installed outside the source tree, with and
without a compiler) runs in ``.ci/run`` through ``scripts/check-release``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import qcrypt
from qcrypt.cli import exit_codes
from qcrypt.cli import main as cli_main
from qcrypt.cli.manpage import render
from qcrypt.crypto import sector
from tests._tools import IN_CI, require_tool

REPO = Path(__file__).resolve().parent.parent
DISTRIBUTION = "qcow-crypt-migrate"
ALL_EXIT_CODES = {
    exit_codes.EXIT_OK,
    exit_codes.EXIT_FINDINGS,
    exit_codes.EXIT_USAGE,
    exit_codes.EXIT_OTHER,
    exit_codes.EXIT_HOOK_REFUSED,
    exit_codes.EXIT_INTERRUPTED,
    *exit_codes.EXIT_CODES.values(),
}


def run_qcrypt(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qcrypt", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


def command_paths(command: click.Command, path: str) -> list[str]:
    """Every command and subcommand, as typed ("qcrypt hook install")."""
    paths = [path]
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            paths += command_paths(sub, f"{path} {name}")
    return paths


def tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    files = []
    for name in names:
        path = REPO / name
        if path.is_file() and not name.startswith("tests/fixtures/") and not name.endswith((".gz", ".qcow2")):
            try:
                path.read_text()
            except UnicodeDecodeError:
                continue
            files.append(path)
    return files


# --- the name ---------------------------------------------------------------------------------------------------


def test_distribution_name_is_ours_and_version_has_one_source() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(rf'^name = "{DISTRIBUTION}"$', pyproject, re.MULTILINE)
    assert DISTRIBUTION == cli_main.DISTRIBUTION
    assert re.search(r'^dynamic = \["version"\]$', pyproject, re.MULTILINE)  # from qcrypt.__version__
    project = pyproject.split("\n[project]\n", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"^version =", project, re.MULTILINE)
    assert metadata.metadata(DISTRIBUTION)["Name"] == DISTRIBUTION
    assert metadata.version(DISTRIBUTION) == qcrypt.__version__
    assert metadata.distribution(DISTRIBUTION).entry_points.select(name="qcrypt")  # the command keeps its name
    # ansible-galaxy reads only a literal version: the collection's must be the package's (qcrypt/__init__.py)
    galaxy = (REPO / "ansible" / "galaxy.yml").read_text()
    assert re.search(rf"^version: {re.escape(qcrypt.__version__)}$", galaxy, re.MULTILINE), "ansible/galaxy.yml"


# "qcrypt" on the package index is an unrelated project: no install command may name it.
FOREIGN_INSTALL = re.compile(r"\b(pip3?|pipx|uv pip)\s+install\b[^\n`]*?(?<![\w./-])['\"]?qcrypt(?![\w./-])")
# Release artifacts named in the docs: the sdist qcow_crypt_migrate-VERSION.tar.gz or a wheel of that name.
ARTIFACT = re.compile(r"[\w.*-]+-\d+\.\d+\.\d+[\w.*-]*\.(?:whl|tar\.gz)")


def test_nothing_tells_to_install_a_name_that_is_not_ours() -> None:
    offenders = []
    for path in tracked_text_files():
        if path == Path(__file__).resolve():  # this file names the forbidden forms on purpose
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FOREIGN_INSTALL.search(line) or re.search(r"qcrypt_pip_spec:\s*['\"]?qcrypt", line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_foreign_install_pattern_catches_the_forms_it_must() -> None:
    for line in (
        "pip install qcrypt",
        "pip install 'qcrypt[libvirt]'",
        "$ pipx install qcrypt==0.1.0",
        "(pip install 'qcrypt[zstd]')",
        "python -m pip install -q qcrypt",
    ):
        assert FOREIGN_INSTALL.search(line), line
    for line in (
        "pip install -e '.[test]'",
        "pip install ./qcow_crypt_migrate-0.1.0.tar.gz",
        "pip install ansible-core",
        "/opt/qcrypt/bin/pip install dist/x.whl",
        "pip install zstandard",
    ):
        assert not FOREIGN_INSTALL.search(line), line


def test_artifact_names_in_the_docs_are_the_ones_the_build_gives() -> None:
    prefix = f"qcow_crypt_migrate-{qcrypt.__version__}"
    wrong = []
    for path in tracked_text_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for name in ARTIFACT.findall(line):
                base = name.rsplit("/", 1)[-1]
                if base.startswith("qcrypt-qcrypt-"):  # the Ansible collection, built by ansible-galaxy
                    continue
                if not (base == f"{prefix}.tar.gz" or (base.startswith(f"{prefix}-") and base.endswith(".whl"))):
                    wrong.append(f"{path.relative_to(REPO)}:{number}: {name}")
    assert not wrong, "\n".join(wrong)


# --- --version, --help ------------------------------------------------------------------------------------------


def test_version_names_the_distribution_and_the_accelerator_state() -> None:
    long, short = run_qcrypt("--version"), run_qcrypt("-V")
    assert long.returncode == 0 and short.returncode == 0, long.stderr + short.stderr
    assert long.stdout == short.stdout
    lines = long.stdout.splitlines()
    assert lines[0] == f"qcrypt {qcrypt.__version__} ({DISTRIBUTION})"
    expected = "active" if sector.native_xts_available() else "not built"
    assert lines[1].startswith(f"XTS accelerator: {expected}")
    assert re.fullmatch(r"Python 3\.\d+\.\d+, cryptography \S+", lines[2])


def test_version_says_when_the_accelerator_is_turned_off() -> None:
    if not sector.native_xts_available():
        if IN_CI:
            pytest.fail("the XTS accelerator was not built: CI must build and test it")
        pytest.skip("the accelerator is not built here (CI builds it and checks that it is)")
    off = run_qcrypt("--version", env={"QCRYPT_PURE_PYTHON": "1"})
    assert off.returncode == 0 and "XTS accelerator: built, off (QCRYPT_PURE_PYTHON is set)" in off.stdout


def test_exit_code_table_covers_every_code() -> None:
    codes = [code for code, _meaning in exit_codes.EXIT_CODE_MEANINGS]
    assert sorted(codes) == sorted(ALL_EXIT_CODES) and len(codes) == len(set(codes))


def test_help_lists_exit_codes_and_environment() -> None:
    result = CliRunner().invoke(cli_main.cli, ["--help"], prog_name="qcrypt", terminal_width=80)
    assert result.exit_code == 0
    for code, meaning in exit_codes.EXIT_CODE_MEANINGS:
        assert re.search(rf"^ +{code} +{re.escape(meaning)}$", result.output, re.MULTILINE), (code, result.output)
    for name in ("QCRYPT_DEBUG=1", "QCRYPT_PURE_PYTHON=1", "_QCRYPT_COMPLETE"):
        assert name in result.output
    assert "-V, --version" in result.output


def test_reference_exit_code_table_is_the_code_s() -> None:
    reference = (REPO / "docs" / "REFERENCE.md").read_text()
    section = reference.split("### Exit codes", 1)[1].split("\n\n", 2)[1]
    rows = [re.match(r"\| (\d+) \| (.*) \|$", line) for line in section.splitlines()[2:]]
    assert all(rows), section
    table = [(int(row[1]), row[2].replace("`", "")) for row in rows if row]
    assert table == list(exit_codes.EXIT_CODE_MEANINGS)


# --- man page ---------------------------------------------------------------------------------------------------


def test_man_page_is_current() -> None:
    assert (REPO / "man" / "qcrypt.1").read_text() == render(), "run scripts/make-manpage"


def test_make_manpage_check_fails_on_a_stale_page(tmp_path: Path) -> None:
    check = [sys.executable, str(REPO / "scripts" / "make-manpage"), "--check"]
    assert subprocess.run(check, capture_output=True, text=True, timeout=60).returncode == 0
    page = REPO / "man" / "qcrypt.1"
    original = page.read_text()
    try:
        page.write_text(original.replace("qcrypt scan", "qcrypt skan"))
        stale = subprocess.run(check, capture_output=True, text=True, timeout=60)
        assert stale.returncode == 1 and "out of date" in stale.stderr
    finally:
        page.write_text(original)


@pytest.mark.interop
def test_man_page_renders_every_command_exit_code_and_variable() -> None:
    man = require_tool("man", hint=" (apt-get install man-db)")
    rendered = subprocess.run(
        [man, "--warnings", "-l", str(REPO / "man" / "qcrypt.1")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MANWIDTH": "200", "MAN_KEEP_FORMATTING": ""},
    )
    assert rendered.returncode == 0 and not rendered.stderr.strip(), rendered.stderr
    text = re.sub(r".\x08", "", rendered.stdout)  # no overstrike (bold) when the output is not a terminal
    assert text.startswith("QCRYPT(1)")
    for path in command_paths(cli_main.cli, "qcrypt")[1:]:
        assert re.search(rf"^   {re.escape(path)}$", text, re.MULTILINE), path  # a subsection per command
    for option in ("--passphrase-file", "--stall-timeout", "--hooks-dir", "--backend", "--fail-on", "--version"):
        assert option in text
    exit_status = text.split("EXIT STATUS", 1)[1].split("ENVIRONMENT", 1)[0]
    for code, meaning in exit_codes.EXIT_CODE_MEANINGS:
        words = r"\s+".join(map(re.escape, meaning.split(" (")[0].split()))  # man justifies: any run of spaces
        assert re.search(rf"^ +{code}\s+{words}", exit_status, re.MULTILINE), code
    assert "QCRYPT_DEBUG=1" in text.split("ENVIRONMENT", 1)[1]


def test_man_page_is_installed_with_the_package() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '[tool.setuptools.data-files]\n"share/man/man1" = ["man/qcrypt.1"]' in pyproject


# --- shell completion -------------------------------------------------------------------------------------------


@pytest.mark.interop
def test_bash_completion_as_the_readme_sets_it_up(tmp_path: Path) -> None:
    """README (Install): eval "$(_QCRYPT_COMPLETE=bash_source qcrypt)" in bash completes commands and options."""
    bash = require_tool("bash")
    command = tmp_path / "qcrypt"  # the console script's equivalent, on PATH
    command.write_text(f'#!/bin/sh\nexec {sys.executable} -m qcrypt "$@"\n')
    command.chmod(0o755)
    script = (
        'eval "$(_QCRYPT_COMPLETE=bash_source qcrypt)"\n'
        "complete -p qcrypt\n"
        'COMP_WORDS=(qcrypt mig); COMP_CWORD=1; _qcrypt_completion qcrypt; echo "commands: ${COMPREPLY[*]}"\n'
        "COMPREPLY=(); COMP_WORDS=(qcrypt scan --fail); COMP_CWORD=2; _qcrypt_completion qcrypt\n"
        'echo "options: ${COMPREPLY[*]}"\n'
    )
    result = subprocess.run(
        [bash, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0, result.stderr
    assert "complete -o nosort -F _qcrypt_completion qcrypt" in result.stdout
    assert "commands: migrate migrate-domain" in result.stdout
    assert "options: --fail-on" in result.stdout
