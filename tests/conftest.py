"""Shared test fixtures. Interop tests need the real peers; in CI (CI=true) a missing tool is a failure."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """Path of ``name``; skip outside CI when missing, fail in CI (interop tests must run there)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")
    if found:
        return found
    if IN_CI:
        pytest.fail(f"{name} is required in CI but was not found")
    pytest.skip(f"{name} not installed")
    raise AssertionError  # unreachable


@pytest.fixture
def qemu_img() -> str:
    return require_tool("qemu-img")


@pytest.fixture
def qemu_io() -> str:
    return require_tool("qemu-io")


@pytest.fixture
def cryptsetup() -> str:
    return require_tool("cryptsetup")
