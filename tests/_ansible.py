"""Running the qcrypt.qcrypt collection (ansible/) with a real ansible-core against localhost.

The collection is made visible to Ansible through a temporary ``ansible_collections/qcrypt/qcrypt`` symlink.
Every host of a test inventory is this machine (``ansible_connection=local``), with the test venv's Python as
module interpreter (fleet.md: discovery would pick a pyenv shim here) and the test venv's qcrypt. Every
subprocess has a timeout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests._tools import require_tool

REPO = Path(__file__).resolve().parents[1]
COLLECTION = REPO / "ansible"
VENV_BIN = Path(sys.executable).parent
PLAYBOOK_TIMEOUT_S = 600
RECAP = re.compile(
    r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=(\d+)"
    r"\s+rescued=(\d+)\s+ignored=(\d+)",
    re.MULTILINE,
)
RECAP_FIELDS = ("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored")


def ansible_tool(name: str) -> str:
    """An ansible-core command installed next to this Python (the test extra); missing fails in CI."""
    return require_tool(name, first_in=str(VENV_BIN), hint=" (pip install -e '.[test]' installs ansible-core)")


def qcrypt_command() -> str:
    found = shutil.which("qcrypt", path=str(VENV_BIN))
    assert found, "qcrypt is not installed in the test venv"
    return found


@dataclass
class Run:
    """One ansible-playbook run: exit status, output, and the PLAY RECAP counts per host."""

    rc: int
    stdout: str
    stderr: str

    @property
    def recap(self) -> dict[str, dict[str, int]]:
        return {m.group(1): dict(zip(RECAP_FIELDS, map(int, m.groups()[1:]))) for m in RECAP.finditer(self.stdout)}

    def total(self, field: str) -> int:
        return sum(counts[field] for counts in self.recap.values())

    def explain(self) -> str:
        return f"exit {self.rc}\n--- stdout (tail)\n{self.stdout[-6000:]}\n--- stderr (tail)\n{self.stderr[-3000:]}"


def run_bounded(argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a session of its own; on timeout kill the whole session (Ansible's module processes too)."""
    with subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=30)
            raise
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


class Ansible:
    """A private Ansible set-up in ``workdir``: collection path, config, temp folders, inventory."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        link = workdir / "collections" / "ansible_collections" / "qcrypt" / "qcrypt"
        link.parent.mkdir(parents=True)
        link.symlink_to(COLLECTION, target_is_directory=True)
        (workdir / "ansible.cfg").write_text("[defaults]\nretry_files_enabled = False\n")
        self.env = {
            **os.environ,
            "ANSIBLE_CONFIG": str(workdir / "ansible.cfg"),
            "ANSIBLE_COLLECTIONS_PATH": str(workdir / "collections"),
            "ANSIBLE_LOCAL_TEMP": str(workdir / "tmp-local"),
            "ANSIBLE_REMOTE_TEMP": str(workdir / "tmp-remote"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_DEPRECATION_WARNINGS": "0",
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}:/usr/sbin:/sbin",
        }

    def inventory(self, hosts: dict[str, dict[str, Any]], common: dict[str, Any] | None = None) -> Path:
        """A YAML inventory (JSON is YAML): group ``hypervisors`` with these hosts, all local."""
        group_vars = {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "qcrypt_executable": qcrypt_command(),
            **(common or {}),
        }
        document = {"all": {"children": {"hypervisors": {"hosts": hosts, "vars": group_vars}}}}
        path = self.workdir / "inventory.yml"
        path.write_text(json.dumps(document, indent=1))
        return path

    def vars_file(self, name: str, values: dict[str, Any]) -> Path:
        """Extra variables in a mode-0600 file (secrets go to ``-e @file``, never on the command line)."""
        path = self.workdir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(values, fh)
        return path

    def playbook(self, playbook: str, inventory: Path, *options: str, timeout: float = PLAYBOOK_TIMEOUT_S) -> Run:
        """``ansible-playbook -i INVENTORY PLAYBOOK OPTIONS`` (playbook: a path or e.g. ``qcrypt.qcrypt.audit``)."""
        argv = [ansible_tool("ansible-playbook"), "-i", str(inventory), playbook, *options]
        done = run_bounded(argv, cwd=self.workdir, env=self.env, timeout=timeout)
        return Run(done.returncode, done.stdout, done.stderr)

    def module(self, module: str, args: dict[str, Any], *options: str, timeout: float = 120) -> dict[str, Any]:
        """One module run on localhost (``ansible localhost -m MODULE``): its JSON result, ``failed`` set."""
        argv = [
            ansible_tool("ansible"),
            "localhost",
            "-c",
            "local",
            "-i",
            "localhost,",
            "-m",
            module,
            "-a",
            json.dumps(args),
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            *options,
        ]
        env = {**self.env, "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1", "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.oneline"}
        done = run_bounded(argv, cwd=self.workdir, env=env, timeout=timeout)
        match = re.search(r"^localhost \| ([A-Z!]+) => (\{.*\})\s*$", done.stdout, re.MULTILINE)
        assert match, f"no module result in:\n{done.stdout}\n{done.stderr}"
        result: dict[str, Any] = json.loads(match.group(2))
        result["failed"] = match.group(1) == "FAILED!"
        result["_stdout"] = done.stdout
        result["_stderr"] = done.stderr
        return result
