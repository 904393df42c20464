"""Units every layer counts in."""

from __future__ import annotations

SECTOR = 512  # bytes: LUKS offsets and IVs, legacy AES IVs, and the granularity of every sector cipher
