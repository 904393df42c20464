"""The curated mutants of scripts/mutate still apply: each one's text occurs exactly once in its file.

(A refactor that moves the code a mutant targets must update the list, or the mutation run would stop.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_mutant_applies() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "mutate"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    listing = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "mutate"), "--list"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    ).stdout.splitlines()
    areas = {line.split()[0] for line in listing}
    assert areas == {"sector", "af", "luks", "qcow2", "qcow2_writer", "migrate"}
    assert len(listing) >= 60
