"""Test helpers for the external peers: where the test data lives, whether this is CI, and finding a tool.

In CI (CI=true) a missing tool fails the test instead of skipping it: interop tests must run there.
conftest.py's guard reads :data:`current_test` to check that a test running a peer carries the ``interop``
marker.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
INTEROP_TOOLS = frozenset({"qemu-img", "qemu-io", "qemu-nbd", "cryptsetup", "openssl", "virsh"})

current_test: dict[str, Any] = {"item": None, "tools": set()}  # the running test and the tools it looked up


def require_tool(name: str, *, first_in: str | None = None, hint: str = "") -> str:
    """Path of ``name`` (looked up in ``first_in`` first, then PATH and the sbin folders); skip outside CI when
    missing, fail in CI (interop tests must run there). ``hint`` says how to install it."""
    if current_test["item"] is not None:
        current_test["tools"].add(name)
    found = (
        (first_in and shutil.which(name, path=first_in))
        or shutil.which(name)
        or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")
    )
    if found:
        return found
    if IN_CI:
        pytest.fail(f"{name} is required in CI but was not found{hint}")
    pytest.skip(f"{name} not installed{hint}")
    raise AssertionError  # unreachable
