"""Seeded, field-aware header fuzzing of qcow2, qcow, LUKS1 and LUKS2 images (run by test_robustness in a child).

``python -m tests._fuzz SPEC.json`` reads the base images and the seed, and for each case: copies a base image,
sets one to three header quantities (counts, sizes, offsets, iterations, LUKS2 metadata) to hostile values,
sometimes makes the file sparse-huge so that big offsets fit inside it, then runs ``scan`` (inspect), ``info``
(describe) and, where it is cheap, ``migrate --to qcow2``. Per case it measures the CPU seconds of this process
and its peak RSS (reset before each case through /proc/self/clear_refs), and prints one JSON line. The parent
test judges the lines (tests/test_robustness.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HUGE_SIZES = (64 << 20, 1 << 30, 64 << 30)  # sparse growth: holes cost no disk
MIGRATE_MAX_VIRTUAL = 64 << 20

QCOW2_FIELDS = [
    (8, 8),
    (16, 4),
    (20, 4),
    (24, 8),
    (32, 4),
    (36, 4),
    (40, 8),
    (48, 8),
    (56, 4),
    (60, 4),
    (64, 8),
    (72, 8),
    (96, 4),
    (100, 4),
]
QCOW1_FIELDS = [(8, 8), (16, 4), (24, 8), (32, 1), (33, 1), (36, 4), (40, 8)]
LUKS1_ITERATIONS = [(164, 4)] + [(208 + 48 * i + 4, 4) for i in range(8)]  # weighted: PBKDF2 costs
LUKS1_FIELDS = [(104, 4), (108, 4)] + [(208 + 48 * i + f, 4) for i in range(8) for f in (0, 40, 44)]
LUKS1_FIELDS += LUKS1_ITERATIONS * 3
CRYPTO_HEADER_EXTENSION = 0x0537BE77
SNAPSHOT_FIELDS = [(0, 8), (8, 4), (12, 2), (14, 2), (32, 4), (36, 4), (40, 8)]


def _u(data: bytes | bytearray, offset: int, width: int) -> int:
    return int.from_bytes(data[offset : offset + width], "big") if offset + width <= len(data) else 0


def _value(rng: random.Random, width: int, file_size: int) -> int:
    top = (1 << (8 * width)) - 1
    choices = [
        0,
        1,
        2,
        7,
        top,
        top - 1,
        top >> 1,
        (top >> 1) + 1,
        file_size,
        file_size - 8,
        1 << 16,
        1 << 20,
        1 << 25,
        0x7FFFFFFF,
        0xFFFFFFFF,
        0x00AC71F3,
        rng.getrandbits(8 * width),
        1 << rng.randrange(8 * width),
    ]
    return rng.choice(choices) & top


def _tables(data: bytearray) -> list[tuple[int, int]]:
    """qcow2 places whose contents are counts and offsets too: snapshot entry, extension headers, L1, L2."""
    places: list[tuple[int, int]] = []
    snapshots = _u(data, 64, 8)
    if _u(data, 60, 4) and snapshots + 48 <= len(data):
        places += [(snapshots + off, width) for off, width in SNAPSHOT_FIELDS]
    header_length = _u(data, 100, 4) if _u(data, 4, 4) == 3 else 72
    if header_length + 8 <= len(data):
        places += [(header_length, 4), (header_length + 4, 4)]
    offset = header_length
    while offset + 8 <= min(len(data), 65536):  # the LUKS header of a qcow2-luks image: its fields too
        ext_type, ext_length = _u(data, offset, 4), _u(data, offset + 4, 4)
        if ext_type == 0:
            break
        if ext_type == CRYPTO_HEADER_EXTENSION:
            luks = _u(data, offset + 8, 8)
            places += [(luks + off, width) for off, width in LUKS1_FIELDS if luks + off + width <= len(data)]
            break
        offset += 8 + (ext_length + 7) // 8 * 8
    l1 = _u(data, 40, 8)
    if l1 and l1 + 32 <= len(data):
        places += [(l1 + 8 * i, 8) for i in range(4)]
        l2 = _u(data, l1, 8) & 0x00FFFFFFFFFFFE00
        if l2 and l2 + 32 <= len(data):
            places += [(l2 + 8 * i, 8) for i in range(4)]
    return places


def _hostile_json(rng: random.Random, room: int) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        slots = {
            str(i): {"type": "luks2", "kdf": {"type": "pbkdf2", "iterations": 0xFFFFFFFF, "hash": "sha256"}}
            for i in range(rng.choice([33, 1000, 40000]))
        }
        text = json.dumps({"keyslots": slots, "segments": {}})
    elif kind == 1:
        text = "[" * (room // 2)
    elif kind == 2:
        text = json.dumps(
            {
                "segments": {
                    str(i): {"type": "crypt", "offset": "1" * 20, "size": "dynamic"}
                    for i in range(rng.choice([33, 20000]))
                }
            }
        )
    elif kind == 3:
        text = json.dumps({"keyslots": {"0": {"kdf": {"iterations": 10**400}}}, "config": "x" * (room // 2)})
    else:
        text = json.dumps({"keyslots": [], "segments": {"0": {"sector_size": -1, "offset": "-1"}}})
    return text.encode()[: room - 1] + b"\0"


def _compound(data: bytearray, rng: random.Random, file_size: int) -> list[tuple[int, bytes]]:
    """Several qcow2 fields set together, as a bomb would: many snapshots, a huge L1, one L2 shared by many L1
    entries (the file is grown sparse so that the tables lie inside it)."""
    far = (file_size // 2) & ~0xFFFF
    style = rng.randrange(3)
    if style == 0:  # a flood of (all-zero, valid) snapshot entries in the sparse part
        return [(60, rng.choice([1000, 65536, 65537]).to_bytes(4, "big")), (64, far.to_bytes(8, "big"))]
    if style == 1:  # a huge L1 of holes, and a virtual size that needs it all
        entries = rng.choice([1 << 20, 4 << 20])
        span = 1 << (_u(data, 20, 4) * 2 - 3) if 9 <= _u(data, 20, 4) <= 21 else 1 << 29
        return [
            (36, entries.to_bytes(4, "big")),
            (40, far.to_bytes(8, "big")),
            (24, min(entries * span, 1 << 62).to_bytes(8, "big")),
        ]
    l1, size = _u(data, 40, 8), _u(data, 24, 8)  # every L1 entry pointing at the first L2 table
    count = max(1, min(_u(data, 36, 4), (len(data) - l1) // 8 if l1 < len(data) else 0))
    return [(l1, data[l1 : l1 + 8] * count), (24, max(size, 1).to_bytes(8, "big"))]


def mutate(path: Path, kind: str, rng: random.Random) -> bool:
    """Mutate ``path`` in place; True if it was grown sparse-huge."""
    data = bytearray(path.read_bytes()[: 8 << 20])
    grown = rng.random() < 0.3
    file_size = rng.choice(HUGE_SIZES) if grown else os.path.getsize(path)
    fields = {
        "qcow2": QCOW2_FIELDS,
        "qcow2-luks": QCOW2_FIELDS,
        "qcow": QCOW1_FIELDS,
        "luks1": LUKS1_FIELDS,
        "luks2": [(8, 8)],
    }[kind]
    places = list(fields) + (_tables(data) if kind.startswith("qcow2") else [])
    if kind == "qcow" and _u(data, 40, 8) + 16 <= len(data):
        places += [(_u(data, 40, 8), 8), (_u(data, 40, 8) + 8, 8)]
    writes: list[tuple[int, bytes]] = []
    for _ in range(rng.randint(1, 3)):
        offset, width = rng.choice(places)
        writes.append((offset, _value(rng, width, file_size).to_bytes(width, "big")))
    if kind.startswith("qcow2") and rng.random() < 0.25:
        grown, file_size = True, max(file_size, 1 << 30)
        writes += _compound(data, rng, file_size)
    if kind == "luks2" and rng.random() < 0.7:
        hdr_size = rng.choice([0x4000, 0x400000])
        writes = [(8, hdr_size.to_bytes(8, "big")), (4096, _hostile_json(rng, hdr_size - 4096))]
        file_size = max(file_size, 2 * hdr_size)
        grown = True
    with open(path, "r+b") as fh:
        for offset, raw in writes:
            fh.seek(offset)
            fh.write(raw)
        if grown:
            fh.truncate(max(file_size, os.path.getsize(path)))
    return grown


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _outcome(action: Any) -> str:
    import qcrypt

    try:
        action()
    except qcrypt.QcryptError as e:
        return f"error: {type(e).__name__}: {e}"
    except OSError as e:
        return f"os-error: {e}"
    except Exception as e:  # reported to the parent, which fails the test
        return f"CRASH: {type(e).__name__}: {e}"
    return "ok"


def run_case(path: Path, passphrase: str | None, grown: bool, work: Path) -> dict[str, Any]:
    from qcrypt.migrate.options import MigrateOptions
    from qcrypt.migrate.run import migrate
    from tests import _audit as scan

    result: dict[str, Any] = {}
    _reset_peak_rss()
    started = time.process_time()
    report = scan.inspect(path)
    result["scan_error"] = report.get("error")
    result["scan_codes"] = [f["code"] for f in report["findings"]]
    result["info"] = _outcome(lambda: scan.describe(path))
    result["inspect_cpu"] = time.process_time() - started
    result["inspect_rss_mib"] = _peak_rss_mib()
    small = (report.get("virtual_size") or 0) <= MIGRATE_MAX_VIRTUAL
    if not grown and small and "error" not in report and report["format"] != "raw":
        out = work / "out.qcow2"
        opts = MigrateOptions(
            target="qcow2",
            output=str(out),
            passphrase=passphrase.encode() if passphrase else None,
            workers=1,
            force=True,
        )
        wall = time.monotonic()
        result["migrate"] = _outcome(lambda: migrate(str(path), opts))
        result["migrate_wall"] = time.monotonic() - wall
        if out.exists():
            out.unlink()
    return result


def main(spec_path: str) -> None:
    from qcrypt.crypto import kdf

    spec = json.loads(Path(spec_path).read_text())
    kdf.set_max_pbkdf2_seconds(0.5)  # a mutated keyslot may ask for any number of iterations: keep cases short
    rng = random.Random(spec["seed"])
    work = Path(spec["work"])
    target = work / "case"
    for base in spec["bases"]:
        for number in range(spec["cases_per_base"]):
            shutil.copyfile(base["path"], target)
            grown = mutate(target, base["kind"], rng)
            case = {"base": Path(base["path"]).name, "case": number, "grown": grown}
            case.update(run_case(target, base["passphrase"], grown, work))
            print(json.dumps(case), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
