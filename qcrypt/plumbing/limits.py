"""Limits on every quantity an image header controls (documented in docs/SECURITY.md, "Limits").

An image is hostile input: its header may declare any count, size or iteration number. Each value below is
checked (against the limit and, where it applies, against the file's real size) before it costs time or
memory, so that inspecting one file (``scan``, ``info``, the hook) ends within about 2 s and 256 MiB whatever
its header says. A header beyond a limit is reported (finding ``limit-exceeded`` in ``scan``; a one-line
error from ``info`` and ``migrate``), never a crash or a hang.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB

# -- qcow2 / qcow tables ---------------------------------------------------------------------------------------
MAX_L1_BYTES = 32 * MiB
"""One L1 table (active or snapshot): QEMU's own maximum (QCOW_MAX_L1_SIZE); it must also lie in the file."""

MAX_REFTABLE_BYTES = 8 * MiB
"""The refcount table: QEMU's own maximum (QCOW_MAX_REFTABLE_SIZE)."""

MAX_SNAPSHOTS = 65536
"""Internal snapshots per image: QEMU's own maximum (QCOW_MAX_SNAPSHOTS)."""

MAX_SNAPSHOT_EXTRA = 1024
"""Extra data of one snapshot table entry: QEMU's own maximum."""

MAX_SNAPSHOT_TABLE_BYTES = 16 * MiB
"""The whole snapshot table (entries with their id, name and extra data). QEMU allows 64 MiB; a real table is a
few KiB (about 100 bytes per snapshot), and 16 MiB keeps the parsed table, its names and their JSON well inside
the memory budget."""

MAX_SNAPSHOT_L1_TOTAL_BYTES = 256 * MiB
"""The L1 tables of all snapshots together. Each may be 32 MiB, but on a sparse file a thousand of them cost
nothing to declare; migrate holds them all while it verifies the snapshots it copied. 256 MiB of L1 tables
describe petabytes of snapshot disks (a 1 TiB disk has a 16 KiB L1 with 64 KiB clusters)."""

MAX_HEADER_EXTENSIONS = 128
"""qcow2 header extensions. QEMU knows six types and each may appear once; unknown types are kept, but a header
listing thousands of them only costs time (their total size is bounded by the first cluster)."""

MAX_CHAIN_DEPTH = 64
"""Backing-chain layers followed below an image. Each layer below the top is inspected with its header only
(snapshot entries and LUKS2 metadata are not parsed), so the whole chain costs what one image does."""

MAX_WALK_TABLE_BYTES = 256 * MiB
"""L1 and L2 table bytes one ``info`` may read to count allocated data and compressed clusters (snapshots
included). 256 MiB of L2 tables maps 32 TiB of data with 64 KiB clusters. Beyond it the count is reported as
unknown (finding ``limit-exceeded``); ``migrate`` is not limited by it (its work follows the data)."""

MAX_WALK_TABLES = 32768
"""L1 and L2 tables one ``info`` may read for those counts (bounds the per-table cost of tiny clusters)."""

# -- LUKS ------------------------------------------------------------------------------------------------------
MAX_PBKDF2_SECONDS = 30.0
"""PBKDF2 time one keyslot (or the master-key digest) may cost at this machine's measured rate. cryptsetup and
qcrypt calibrate a keyslot to about 2 s when it is created; 30 s leaves room for a much slower machine. A
keyslot above it is skipped (and named in the error); ``migrate --max-pbkdf2-seconds`` raises it."""

MAX_PBKDF2_ITERATIONS = 2**31 - 1
"""The most PBKDF2 iterations this Python can run in one call (the header field is a u32)."""

MAX_LUKS1_KEY_MATERIAL_END = 16 * MiB
"""Where the key material of any LUKS1 keyslot may end, from the start of the LUKS header. cryptsetup and QEMU
lay the eight slots out one after the other from 4 KiB on (about 2 MiB for 512-bit keys); migrate copies this
area, so a slot placed terabytes away in a sparse file must not make it read terabytes."""

MAX_LUKS2_KEYSLOTS = 32
"""LUKS2 keyslots described: cryptsetup's own maximum (LUKS2_KEYSLOTS_MAX)."""

MAX_LUKS2_SEGMENTS = 32
"""LUKS2 data segments: cryptsetup's own maximum (LUKS2_SEGMENT_MAX)."""

# -- snapshots' VM state ---------------------------------------------------------------------------------------
# A snapshot's saved VM state is stored in the image's own clusters (never compressed): a declared size larger
# than the file is refused (see qcow2.QCow2Image._read_snapshot).
