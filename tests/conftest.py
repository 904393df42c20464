"""Shared test fixtures. Interop tests need the real peers; in CI (CI=true) a missing tool is a failure.

Guard: every process a test starts (``subprocess`` in any form, in the test, its fixtures or the helpers it
calls) is checked; a test that runs one of the external peers (:data:`INTEROP_TOOLS`) without the
``interop`` marker fails, so the marker is on every test that needs a tool (``-m "not interop"`` then
really runs without them).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import Phase, settings

from tests._hook_domains import build_images
from tests._libvirt import Lab, ensure_libvirtd, new_lab
from tests._tools import INTEROP_TOOLS, require_tool
from tests._tools import current_test as _current

# scripts/mutate runs with --hypothesis-profile=mutation: a failing example is enough, shrinking it (which can
# take minutes on MiB-sized examples) is not needed to kill a mutant
settings.register_profile("mutation", phases=[Phase.explicit, Phase.reuse, Phase.generate])

_fixture_tools: dict[str, set[str]] = {}  # fixture name -> tools its setup ran
_real_execute_child = subprocess.Popen._execute_child  # type: ignore[attr-defined]


def _tool_name(args: Any) -> str:
    first = args if isinstance(args, (str, bytes, os.PathLike)) else next(iter(args), "")
    return os.path.basename(os.fsdecode(first).split()[0] if isinstance(args, (str, bytes)) else os.fsdecode(first))


def _watching_execute_child(self: subprocess.Popen, args: Any, *rest: Any, **kw: Any) -> Any:
    name = _tool_name(args)
    if name in INTEROP_TOOLS and _current["item"] is not None:
        _current["tools"].add(name)
    return _real_execute_child(self, args, *rest, **kw)


def pytest_configure(config: pytest.Config) -> None:
    subprocess.Popen._execute_child = _watching_execute_child  # type: ignore[attr-defined,method-assign]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    _current["item"], _current["tools"] = item, set()
    yield
    _current["item"] = None


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> Iterator[None]:
    """Remember which fixtures run tools: every test using them needs the marker too (not only the first)."""
    before = set(_current["tools"])
    yield
    used = _current["tools"] - before
    if used:
        _fixture_tools.setdefault(fixturedef.argname, set()).update(used)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if call.when != "teardown" or report.failed or item.get_closest_marker("interop") is not None:
        return
    tools = set(_current["tools"])
    for name in getattr(item, "fixturenames", ()):
        tools |= _fixture_tools.get(name, set())
    if tools:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} ran {', '.join(sorted(tools))} (itself or through a fixture) without "
            "the interop marker (add @pytest.mark.interop)"
        )


@pytest.fixture
def qemu_img() -> str:
    return require_tool("qemu-img")


@pytest.fixture
def qemu_io() -> str:
    return require_tool("qemu-io")


@pytest.fixture
def cryptsetup() -> str:
    return require_tool("cryptsetup")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the images the sample domains of tests/data/domains point at (made by qemu-img)."""
    folder = tmp_path_factory.mktemp("hook-images")
    build_images(require_tool("qemu-img"), folder)
    return folder


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A scratch libvirt setup (images folder, domains, secrets) on the real libvirtd, removed afterwards."""
    ensure_libvirtd()
    lab = new_lab()
    try:
        yield lab
    finally:
        lab.cleanup()
