"""The install role (qcrypt.qcrypt.install): Debian packages, a venv, qcrypt from a wheel; a rerun changes nothing.

The wheel is built from this checkout with pip; pip installs qcrypt's dependencies into the new venv from the
configured index. The installed command is then used by the scan module, through the role's default location
lookup being overridden with ``qcrypt_venv``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests._ansible import REPO, Ansible

pytestmark = [pytest.mark.interop, pytest.mark.ansible, pytest.mark.slow, pytest.mark.timeout(900)]


def build_wheel(dist: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(REPO)],
                   capture_output=True, text=True, timeout=600, check=True)
    (wheel,) = dist.glob("qcrypt-*.whl")
    return wheel


def test_install_role_installs_a_working_qcrypt(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "dist")
    venv = tmp_path / "opt-qcrypt"
    link = tmp_path / "bin" / "qcrypt"
    link.parent.mkdir()
    ansible = Ansible(tmp_path / "ansible")
    inventory = ansible.inventory({"hv1": {}})
    settings = ansible.vars_file("install.json", {
        "qcrypt_venv": str(venv), "qcrypt_source": str(wheel), "qcrypt_link": str(link),
        # The Python that made this test's venv (a real interpreter, not a pyenv shim), and no apt-get update.
        "qcrypt_python": str(Path(sys.base_prefix) / "bin" / "python3"), "qcrypt_apt_cache_valid_time": 10**9,
    })

    first = ansible.playbook("qcrypt.qcrypt.install", inventory, "-e", f"@{settings}")
    assert first.rc == 0, first.explain()
    assert first.recap["hv1"]["changed"] >= 3, first.explain()  # folder, copy, pip (+ link)
    version = subprocess.run([str(link), "--version"], capture_output=True, text=True, timeout=60, check=True)
    assert version.stdout.startswith("qcrypt, version ")
    assert (venv / "bin" / "qcrypt").resolve() == link.resolve()

    again = ansible.playbook("qcrypt.qcrypt.install", inventory, "-e", f"@{settings}")
    assert again.rc == 0 and again.total("changed") == 0, again.explain()

    # The modules find and run the installed qcrypt.
    result = ansible.module("qcrypt.qcrypt.qcrypt_scan", {"paths": [str(tmp_path / "dist")], "libvirt_xml": "",
                                                          "executable": str(venv / "bin" / "qcrypt")})
    assert not result["failed"] and result["summary"]["images"] == 1, result["_stdout"]
