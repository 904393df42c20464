"""The committed fixtures still mean what tests/fixtures/manifest.json says (checked against the real tools)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from tests import _images as img

MANIFEST = img.manifest()
ENTRIES: dict[str, dict[str, Any]] = MANIFEST["fixtures"]
NAMES = sorted(ENTRIES)
QEMU_FORMAT = {("qcow2", None): "qcow2", ("qcow", None): "qcow", ("luks", 1): "luks", ("luks", 2): "raw"}
ENCRYPTIONS = {"none", "aes-cbc-legacy", "luks1", "luks2"}
# One per reading path: legacy AES v3 (compressed + zero clusters), chain with an encrypted base, qcow v1 AES,
# raw LUKS1 (cryptsetup, ESSIV) and qcow2-LUKS; snapshots are checked separately.
PLAINTEXT_SAMPLE = [
    "aes-qcow2-v3-c64k.qcow2",
    "chain-plain-over-aes.qcow2",
    "qcow1-aes.qcow",
    "luks1-cs-aes-cbc-essiv-sha256-128-sha512.luks",
    "luks-qcow2-v3-c64k.qcow2",
]
SNAPSHOT_FIXTURE = "aes-qcow2-v3-snapshots-c4k.qcow2"


def _qemu_format(entry: dict[str, Any]) -> str:
    if entry["format"] == "raw":
        return "raw"
    version = entry["format_version"] if entry["format"] == "luks" else None
    return QEMU_FORMAT[(entry["format"], version)]


def test_manifest_matches_directory() -> None:
    on_disk = {path.name for path in img.FIXTURES_DIR.glob("*.gz")}
    assert on_disk == {entry["file"] for entry in ENTRIES.values()}
    for name, entry in ENTRIES.items():
        assert entry["name"] == name and entry["file"] == f"{name}.gz"
        assert entry["encryption"] in ENCRYPTIONS
        assert entry["backing_file"] is None or entry["backing_file"] in ENTRIES
        assert (entry["encryption"] == "none") == (entry["passphrase"] is None)
        assert entry["made_by"], name


def test_fixture_set_covers_the_brief() -> None:
    kinds = {(e["format"], e["format_version"], e["encryption"]) for e in ENTRIES.values()}
    assert {("qcow2", 2, "none"), ("qcow2", 3, "none"), ("qcow2", 2, "aes-cbc-legacy")} <= kinds
    assert {("qcow2", 3, "aes-cbc-legacy"), ("qcow2", 3, "luks1"), ("qcow", 1, "none")} <= kinds
    assert {("qcow", 1, "aes-cbc-legacy"), ("luks", 1, "luks1"), ("luks", 2, "luks2"), ("raw", None, "none")} <= kinds
    plain_clusters = {(e["format_version"], e["cluster_size"]) for e in ENTRIES.values() if e["format"] == "qcow2"}
    assert {(v, c) for v in (2, 3) for c in (512, 4096, 65536, 2 << 20)} <= plain_clusters
    ciphers = {e["luks"]["cipher"] for e in ENTRIES.values() if e["format"] == "luks"}
    assert {"aes-xts-plain64", "aes-cbc-essiv:sha256", "aes-cbc-plain64", "aes-cbc-plain"} <= ciphers


@pytest.mark.parametrize("name", NAMES)
def test_unpacks_to_recorded_bytes(name: str, tmp_path: Path) -> None:
    path = img.fixture_path(name, tmp_path)
    entry = ENTRIES[name]
    assert path.stat().st_size == entry["file_size"]
    assert img.file_sha256(path) == entry["file_sha256"]


@pytest.mark.parametrize("name", [n for n in NAMES if ENTRIES[n]["plaintext_from_writes"]])
def test_writes_model_matches_plaintext(name: str) -> None:
    """The manifest's ``writes`` rebuild exactly the guest view qemu-img reported (no tool needed)."""
    entry = ENTRIES[name]
    expected = img.expected_plaintext(name)
    assert len(expected) == entry["virtual_size"]
    if entry["plaintext_sha256"] is not None:
        assert hashlib.sha256(expected).hexdigest() == entry["plaintext_sha256"]


@pytest.mark.interop
@pytest.mark.parametrize("name", NAMES)
def test_qemu_img_info_still_agrees(name: str, tmp_path: Path, qemu_img: str) -> None:
    entry = ENTRIES[name]
    path = img.fixture_path(name, tmp_path)
    if entry["qemu_img_info"] is None:
        with pytest.raises(img.ImageToolError) as failure:
            img.qemu_img_info(path)
        assert entry["qemu_img_error"] in failure.value.stderr.replace(f"Could not open '{path}': ", "")
        return
    info = img.normalized_info(img.qemu_img_info(path), name, entry["backing_file"])
    assert info == entry["qemu_img_info"]
    assert info["format"] == _qemu_format(entry)
    qemu_size = entry["file_size"] if entry["encryption"] == "luks2" else entry["virtual_size"]  # LUKS2 = raw
    assert info["virtual-size"] == qemu_size
    qemu_sees_encryption = entry["encryption"] in ("aes-cbc-legacy", "luks1")
    assert info.get("encrypted", False) is qemu_sees_encryption
    if entry["cluster_size"] is not None:
        assert info["cluster-size"] == entry["cluster_size"]


@pytest.mark.interop
@pytest.mark.parametrize("name", PLAINTEXT_SAMPLE)
def test_plaintext_matches_fresh_qemu_read(name: str, tmp_path: Path, qemu_img: str) -> None:
    image = img.fixture_image(name, tmp_path)
    assert img.plaintext_sha256(image) == ENTRIES[name]["plaintext_sha256"]


@pytest.mark.interop
def test_snapshots_differ_and_match(tmp_path: Path, qemu_img: str) -> None:
    entry = ENTRIES[SNAPSHOT_FIXTURE]
    image = img.fixture_image(SNAPSHOT_FIXTURE, tmp_path)
    digests = {name: img.plaintext_sha256(image, snapshot_name=name) for name in entry["snapshots"]}
    assert digests == entry["snapshot_sha256"]
    assert len({*digests.values(), entry["plaintext_sha256"]}) == len(entry["snapshots"]) + 1


@pytest.mark.interop
def test_wrong_passphrase_reads_garbage(tmp_path: Path, qemu_img: str) -> None:
    """Legacy AES has no key check: a wrong key opens fine and yields a different guest view."""
    name = "aes-qcow2-v3-c64k.qcow2"
    path = img.fixture_path(name, tmp_path)
    wrong = img.Image(path, "qcow2", "not the passphrase")
    assert img.plaintext_sha256(wrong) != ENTRIES[name]["plaintext_sha256"]


@pytest.mark.interop
@pytest.mark.parametrize("name", [n for n in NAMES if ENTRIES[n]["format"] == "luks"])
def test_luks_dump_agrees(name: str, tmp_path: Path, cryptsetup: str) -> None:
    path = img.fixture_path(name, tmp_path)
    assert img.luks_dump(path) == ENTRIES[name]["luks"]


@pytest.mark.interop
def test_legacy_key_is_first_16_passphrase_bytes(tmp_path: Path, qemu_img: str) -> None:
    """The 28-byte fixture passphrase and its first 16 bytes open the legacy image identically (Pitfall 3)."""
    name = "aes-qcow2-v3-c64k.qcow2"
    entry = ENTRIES[name]
    assert len(entry["passphrase"].encode()) > 16
    prefix = entry["passphrase"].encode()[:16].decode()
    image = img.Image(img.fixture_path(name, tmp_path), "qcow2", prefix)
    assert img.plaintext_sha256(image) == entry["plaintext_sha256"]
