"""The old domain XML, saved before anything is defined: the way back (docs/GUIDE.md, "Undoing migrate-domain")."""

from __future__ import annotations

import os
import time

from qcrypt.errors import QcryptIOError


def save_backup(xml: str, name: str, backup_dir: str) -> str:
    """Write the old XML to ``backup_dir/NAME-<UTC time>.xml`` (owner-only: it may hold passwords)."""
    os.makedirs(backup_dir, mode=0o700, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    for attempt in range(100):
        path = os.path.join(backup_dir, f"{safe}-{stamp}{f'-{attempt}' if attempt else ''}.xml")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(xml)
            fh.flush()
            os.fsync(fh.fileno())
        return path
    raise QcryptIOError(f"cannot name a backup file in {backup_dir}")
