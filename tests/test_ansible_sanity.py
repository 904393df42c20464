"""``ansible-test sanity`` on the qcrypt.qcrypt collection, for the Python running the tests.

ansible-test needs the collection at a path ending in ``ansible_collections/NAMESPACE/NAME``, so the collection
is copied into such a tree. It runs every sanity test with ``--local --requirements``: each test that needs
packages (pylint, yamllint, voluptuous, ...) gets a venv of its own. ansible-test puts pip into those venvs
with a bootstrap script it downloads from ci-files.testing.ansible.com; that host is not reachable everywhere
(it is not here), so the cache is seeded with tests/ansible/get_pip_offline.py, which installs the same pip
version from the configured index. ansible-test's HOME is a private folder (kept between runs, so the venvs are
reused) holding that cache and a copy of the user's pip configuration.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests._ansible import COLLECTION, ansible_tool, run_bounded

pytestmark = [pytest.mark.interop, pytest.mark.ansible, pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
GET_PIP = REPO / "tests" / "ansible" / "get_pip_offline.py"
SANITY_TIMEOUT_S = 1500


def ansible_test_home() -> Path:
    """HOME for ansible-test: $QCRYPT_ANSIBLE_TEST_HOME, else ~/.cache/qcrypt-ansible-test."""
    configured = os.environ.get("QCRYPT_ANSIBLE_TEST_HOME")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qcrypt-ansible-test"


def prepare_home(home: Path, pip_version: str) -> None:
    cache = home / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(GET_PIP, cache / f"get_pip_{pip_version.replace('.', '_')}.py")
    for relative in (".config/pip/pip.conf", ".pip/pip.conf"):
        user_config = Path.home() / relative
        if user_config.is_file():
            (home / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(user_config, home / relative)


def bootstrap_pip_version() -> str:
    """The pip version ansible-test bootstraps into its venvs (it names the cached script after it)."""
    from ansible_test._internal.python_requirements import get_venv_packages  # type: ignore[import-not-found]
    from ansible_test._internal.util import version_to_str  # type: ignore[import-not-found]

    class Python:
        version = version_to_str(sys.version_info[:2])

    return str(get_venv_packages(Python)["pip"])  # type: ignore[arg-type]


def test_ansible_test_sanity_is_clean(tmp_path: Path) -> None:
    ansible_test = ansible_tool("ansible-test")
    tree = tmp_path / "ansible_collections" / "qcrypt" / "qcrypt"
    shutil.copytree(COLLECTION, tree, ignore=shutil.ignore_patterns("__pycache__", "tests"))
    home = ansible_test_home()
    prepare_home(home, bootstrap_pip_version())
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = {**os.environ, "HOME": str(home)}
    done = run_bounded(
        [ansible_test, "sanity", "--local", "--requirements", "--python", python, "--color", "no"],
        cwd=tree,
        env=env,
        timeout=SANITY_TIMEOUT_S,
    )
    output = done.stdout + done.stderr
    problems = [line for line in output.splitlines() if line.startswith(("ERROR", "FATAL"))]
    assert done.returncode == 0, "\n".join(problems) or output[-8000:]
    ran = [line.split('"')[1] for line in output.splitlines() if line.startswith("Running sanity test")]
    # The tests that check the modules themselves must have run (not been skipped).
    for name in (
        "validate-modules",
        "pylint",
        "pep8",
        "yamllint",
        "import",
        "compile",
        "ansible-doc",
        "runtime-metadata",
    ):
        assert name in ran, f"sanity test {name} did not run:\n{output[-4000:]}"
