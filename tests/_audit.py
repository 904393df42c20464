"""The auditor as its JSON edge gives it: reports as ``scan --format json`` and ``info --json`` print them.

Tests that check report fields read this form (the one operators and tools see); tests that hand a report to
another layer use :func:`qcrypt.audit.inspect.inspect_image` directly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from qcrypt.audit import describe as _describe
from qcrypt.audit import walk
from qcrypt.audit.inspect import inspect_image
from qcrypt.audit.report import ImageReport
from qcrypt.model.findings import Severity

SEVERITIES = tuple(s.value for s in Severity)


def inspect(path: str | os.PathLike[str], **options: Any) -> dict[str, Any]:
    return inspect_image(path, **options).to_json()


def describe(path: str | os.PathLike[str], **options: Any) -> dict[str, Any]:
    return _describe.describe(path, **options).to_json()


def scan(paths: Iterable[str], **options: Any) -> list[dict[str, Any]]:
    return [report.to_json() for report in walk.scan(paths, **options)]


def has_legacy(report: dict[str, Any]) -> bool:
    """The JSON report's view of :attr:`ImageReport.has_legacy`: a legacy finding on the image or its chain."""
    return any(f["code"] in ("legacy-aes", "legacy-aes-backing") for f in report["findings"])


__all__ = ["SEVERITIES", "ImageReport", "describe", "has_legacy", "inspect", "scan"]
