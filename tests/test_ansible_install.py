"""The install role (qcrypt.qcrypt.install): Debian packages, a venv, qcrypt from a wheel; a rerun changes nothing.

The wheel is the release artifact ``python -m build`` writes from this checkout, given to the role by the
relative path docs/GUIDE.md shows (``dist/...``, from ansible-playbook's working directory); pip installs qcrypt's
dependencies into the new venv from the configured index. The installed command is then used by the scan
module, through the role's default location lookup being overridden with ``qcrypt_venv``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import qcrypt
from tests._ansible import REPO, Ansible

pytestmark = [pytest.mark.interop, pytest.mark.ansible, pytest.mark.slow, pytest.mark.timeout(900)]


def build_wheel(dist: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    (wheel,) = dist.glob(f"qcow_crypt_migrate-{qcrypt.__version__}-*.whl")
    return wheel


def test_install_role_installs_a_working_qcrypt(tmp_path: Path) -> None:
    ansible = Ansible(tmp_path / "ansible")
    wheel = build_wheel(ansible.workdir / "dist")
    venv = tmp_path / "opt-qcrypt"
    link = tmp_path / "bin" / "qcrypt"
    link.parent.mkdir()
    man_dir = tmp_path / "share" / "man" / "man1"
    inventory = ansible.inventory({"hv1": {}})
    settings = ansible.vars_file(
        "install.json",
        {
            "qcrypt_venv": str(venv),
            "qcrypt_source": f"dist/{wheel.name}",
            "qcrypt_link": str(link),
            "qcrypt_man_dir": str(man_dir),
            # The Python that made this test's venv (a real interpreter, not a pyenv shim), and no apt-get update.
            "qcrypt_python": str(Path(sys.base_prefix) / "bin" / "python3"),
            "qcrypt_apt_cache_valid_time": 10**9,
        },
    )

    first = ansible.playbook("qcrypt.qcrypt.install", inventory, "-e", f"@{settings}")
    assert first.rc == 0, first.explain()
    assert first.recap["hv1"]["changed"] >= 3, first.explain()  # folder, copy, pip (+ link)
    version = subprocess.run([str(link), "--version"], capture_output=True, text=True, timeout=60, check=True)
    assert version.stdout.startswith(f"qcrypt {qcrypt.__version__} (qcow-crypt-migrate)\n")
    assert (venv / "bin" / "qcrypt").resolve() == link.resolve()
    assert (man_dir / "qcrypt.1").read_text() == (REPO / "man" / "qcrypt.1").read_text()

    again = ansible.playbook("qcrypt.qcrypt.install", inventory, "-e", f"@{settings}")
    assert again.rc == 0 and again.total("changed") == 0, again.explain()

    # The modules find and run the installed qcrypt.
    result = ansible.module(
        "qcrypt.qcrypt.qcrypt_scan",
        {"paths": [str(ansible.workdir / "dist")], "libvirt_xml": "", "executable": str(venv / "bin" / "qcrypt")},
    )
    assert not result["failed"] and result["summary"]["images"] == 1, result["_stdout"]


def test_install_role_refuses_to_guess_what_to_install(tmp_path: Path) -> None:
    """Neither qcrypt_source nor qcrypt_pip_spec: the role stops before changing anything (no index name guessed)."""
    ansible = Ansible(tmp_path / "ansible")
    inventory = ansible.inventory({"hv1": {}})
    venv = tmp_path / "opt-qcrypt"
    settings = ansible.vars_file(
        "install.json",
        {"qcrypt_venv": str(venv), "qcrypt_link": "", "qcrypt_man_dir": "", "qcrypt_install_packages": False},
    )
    run = ansible.playbook("qcrypt.qcrypt.install", inventory, "-e", f"@{settings}")
    assert run.rc != 0 and "Set qcrypt_source to the built artifact" in run.stdout, run.explain()
    assert run.total("changed") == 0 and not venv.exists()
