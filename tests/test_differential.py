"""Differential tests, live: `qcrypt info` against `qemu-img info --output=json` and `cryptsetup luksDump`,
run now on every committed fixture the tool can open (the manifest holds what they said when it was made)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests import _audit as scan
from tests import _images as im

MANIFEST = im.manifest()["fixtures"]
QEMU_READABLE = sorted(n for n, e in MANIFEST.items() if not e["qemu_img_error"] and e["encryption"] != "luks2")
LUKS_FILES = sorted(n for n, e in MANIFEST.items() if e["format"] == "luks")


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("diff")
    return {name: im.fixture_path(name, base) for name in MANIFEST}


def _qemu_info(qemu_img: str, path: Path) -> dict[str, Any]:
    out = subprocess.run(
        [qemu_img, "info", "--output=json", str(path)], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout)


@pytest.mark.interop
@pytest.mark.parametrize("name", QEMU_READABLE)
def test_info_matches_qemu_img(name: str, unpacked: dict[str, Path], qemu_img: str) -> None:
    theirs = _qemu_info(qemu_img, unpacked[name])
    mine = scan.describe(unpacked[name])
    assert mine["virtual_size"] == theirs["virtual-size"]
    assert mine["format"] == theirs["format"]
    if "cluster-size" in theirs:
        assert mine["cluster_size"] == theirs["cluster-size"]
    assert (mine["encryption"] != "none") == bool(theirs.get("encrypted", False))
    assert mine["backing_file"] == theirs.get("backing-filename")
    assert [s["name"] for s in mine["snapshots"]] == [s["name"] for s in theirs.get("snapshots", [])]
    for snap, their_snap in zip(mine["snapshots"], theirs.get("snapshots", []), strict=True):
        assert snap["id"] == their_snap["id"]
        assert snap["date_sec"] == their_snap["date-sec"]
        assert snap["vm_state_size"] == their_snap["vm-state-size"]
    data = theirs.get("format-specific", {}).get("data", {})
    if mine["format"] == "qcow2":
        assert mine["format_version"] == (3 if data["compat"] == "1.1" else 2)
        assert ("extended L2 entries" in mine["features"]["incompatible"]) == bool(data.get("extended-l2"))
    encrypt = data.get("encrypt") or (data if theirs["format"] == "luks" else None)
    if mine["encryption"] == "aes-cbc-legacy":
        assert theirs["encrypted"] is True
        if mine["format"] == "qcow2":  # qemu-img shows no format-specific block for qcow (v1)
            assert encrypt == {"format": "aes"}
    if mine["encryption"] == "luks1":
        assert encrypt is not None
        _compare_luks_with_qemu(mine["luks"], encrypt)


def _compare_luks_with_qemu(mine: dict[str, Any], theirs: dict[str, Any]) -> None:
    expected = im.luks_from_qemu_info(theirs)
    assert mine["uuid"] == theirs["uuid"]
    assert (mine["cipher"], mine["key_bits"]) == (expected["cipher"], expected["key_bits"])
    assert mine["hash"] == theirs["hash-alg"]
    assert mine["payload_offset"] * 512 == theirs["payload-offset"]
    assert mine["mk_iterations"] == theirs["master-key-iters"]
    for slot, their_slot in zip(mine["keyslots"], theirs["slots"], strict=True):
        assert slot["active"] == their_slot["active"]
        assert slot["key_material_offset"] * 512 == their_slot["key-offset"]
        if slot["active"]:
            assert slot["iterations"] == their_slot["iters"]


def _dump_field(dump: str, name: str) -> str:
    match = re.search(rf"^{re.escape(name)}:\s*(.+)$", dump, re.MULTILINE)
    assert match, name
    return match.group(1).strip()


@pytest.mark.interop
@pytest.mark.parametrize("name", LUKS_FILES)
def test_info_matches_luksdump(name: str, unpacked: dict[str, Path], cryptsetup: str) -> None:
    dump = subprocess.run(
        [cryptsetup, "luksDump", str(unpacked[name])], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    mine = scan.describe(unpacked[name])["luks"]
    assert mine["uuid"] == _dump_field(dump, "UUID")
    assert mine["version"] == int(_dump_field(dump, "Version"))
    if mine["version"] == 1:
        cipher = f"{_dump_field(dump, 'Cipher name')}-{_dump_field(dump, 'Cipher mode')}"
        assert mine["cipher"] == cipher
        assert mine["hash"] == _dump_field(dump, "Hash spec")
        assert mine["payload_offset"] == int(_dump_field(dump, "Payload offset"))
        assert mine["key_bits"] == int(_dump_field(dump, "MK bits"))
        assert mine["mk_iterations"] == int(_dump_field(dump, "MK iterations"))
        enabled = re.findall(r"^Key Slot (\d): ENABLED", dump, re.MULTILINE)
        assert [s["index"] for s in mine["keyslots"] if s["active"]] == [int(i) for i in enabled]
        iterations = [int(i) for i in re.findall(r"^\s+Iterations:\s+(\d+)", dump, re.MULTILINE)]
        assert [s["iterations"] for s in mine["keyslots"] if s["active"]] == iterations
    else:
        assert mine["cipher"] == re.search(r"cipher:\s+(\S+)", dump).group(1)  # type: ignore[union-attr]
        kdfs = re.findall(r"PBKDF:\s+(\S+)", dump)
        assert [s["kdf"]["type"] for s in mine["keyslots"]] == kdfs
