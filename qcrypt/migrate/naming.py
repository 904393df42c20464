"""What a migrated image is called: the new file name next to the old one (hook advice and migrate-domain agree)."""

from __future__ import annotations

import os


def suggested_output(path: str, target: str, *, local_dir: bool) -> str:
    """A new file name next to ``path`` (or in the current folder for block devices)."""
    name = os.path.basename(path.rstrip("/")) or "disk"
    for suffix in (".qcow2", ".qcow", ".img", ".raw"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    name += ".luks.qcow2" if target == "qcow2-luks" else ".luks"
    return name if local_dir else os.path.join(os.path.dirname(path), name)
