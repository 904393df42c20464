"""qcrypt scan / qcrypt info against every committed fixture (made by qemu-img, qemu-io and cryptsetup).

The manifest records what the real tools said about each fixture; scan and info must agree with it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from qcrypt import scan
from qcrypt.cli.main import _register, cli
from tests import _images as im

MANIFEST = im.manifest()["fixtures"]
UNPARSEABLE = {"qcow2-truncated-header.qcow2"}
UNKNOWN_FEATURE = {"aes-qcow2-v3-unknown-incompat-c4k.qcow2"}
_register()


def _entry(name: str) -> dict[str, Any]:
    return MANIFEST[name]


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fixtures")
    return {name: im.fixture_path(name, base) for name in MANIFEST}


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_inspect_matches_manifest(name: str, unpacked: dict[str, Path]) -> None:
    entry = _entry(name)
    report = scan.inspect(unpacked[name])
    assert report["format"] == entry["format"]
    if name in UNPARSEABLE:
        assert report["severity"] == "warning"
        assert [f["code"] for f in report["findings"]] == ["unparseable"]
        assert "header" in report["error"]
        return
    assert report["encryption"] == entry["encryption"]
    assert report["format_version"] == entry["format_version"]
    if entry["encryption"] == "luks2":  # the data segment (qemu-img calls LUKS2 raw: it cannot open it)
        assert 0 < report["virtual_size"] <= entry["file_size"] - (1 << 20)
    else:
        assert report["virtual_size"] == entry["virtual_size"]
    assert (report["backing_file"] or None) == entry["backing_file"]
    codes = {f["code"] for f in report["findings"]}
    if entry["encryption"] == "aes-cbc-legacy":
        assert report["severity"] == "critical" and "legacy-aes" in codes
    if name in UNKNOWN_FEATURE:
        assert "qcow2-unknown-incompatible-features" in codes


def test_chain_with_legacy_base_is_critical(unpacked: dict[str, Path]) -> None:
    report = scan.inspect(unpacked["chain-plain-over-aes.qcow2"])
    assert report["encryption"] == "none"
    assert report["severity"] == "critical"
    assert [f["code"] for f in report["findings"]] == ["legacy-aes-backing"]
    assert report["backing_chain"][0]["encryption"] == "aes-cbc-legacy"
    assert scan.has_legacy(report)


def test_grading_of_luks_weaknesses(unpacked: dict[str, Path]) -> None:
    def codes(name: str) -> set[str]:
        return {f["code"] for f in scan.inspect(unpacked[name])["findings"]}

    assert "luks-plain-iv-wraps" in codes("luks1-cs-aes-cbc-plain-128-sha1.luks")
    assert "luks-predictable-iv" in codes("luks1-cs-aes-cbc-plain64-256-sha512.luks")
    assert "luks-sha1" in codes("luks1-cs-aes-xts-plain64-512-sha1.luks")
    assert "luks1-unaligned-payload" in codes("luks1-qemu-aes-xts-plain64-512.luks")
    assert codes("luks1-cs-aes-xts-plain64-256-sha256.luks") == set()
    assert "luks2-not-qemu" in codes("luks2-argon2id.luks")


@pytest.mark.parametrize("name", sorted(n for n in MANIFEST if n not in UNPARSEABLE))
def test_describe_matches_manifest(name: str, unpacked: dict[str, Path]) -> None:
    entry = _entry(name)
    details = scan.describe(unpacked[name])
    if entry["format"] in ("qcow", "qcow2"):
        assert details["cluster_size"] == entry["cluster_size"]
        assert [s["name"] for s in details["snapshots"]] == entry["snapshots"]
        assert 0 < details["allocated_bytes"] <= entry["virtual_size"]
    if entry.get("luks") and entry["encryption"] == "luks1":
        luks, expected = details["luks"], entry["luks"]
        for key in ("uuid", "cipher", "hash", "key_bits", "payload_offset", "mk_iterations"):
            assert luks[key] == expected[key], key
        active = [s for s in luks["keyslots"] if s["active"]]
        assert active and all(s["stripes"] == 4000 for s in luks["keyslots"])


def test_allocated_bytes_counts_only_data_clusters(unpacked: dict[str, Path]) -> None:
    """qemu-img map reports data extents; zero and unallocated clusters are not allocated."""
    details = scan.describe(unpacked["qcow2-v3-c64k.qcow2"])
    writes = [w for w in _entry("qcow2-v3-c64k.qcow2")["writes"] if w["kind"] in ("data", "compressed")]
    cs = details["cluster_size"]
    clusters = {off // cs for w in writes for off in range(w["offset"], w["offset"] + w["length"], 512)}
    zero_clusters = {w["offset"] // cs for w in _entry("qcow2-v3-c64k.qcow2")["writes"] if w["kind"] == "zero"}
    assert details["allocated_bytes"] == len(clusters - zero_clusters) * cs


def test_describe_refuses_garbage(unpacked: dict[str, Path]) -> None:
    with pytest.raises(scan.FormatError) as raised:
        scan.describe(unpacked["qcow2-truncated-header.qcow2"])
    assert "qcow2-truncated-header.qcow2" in str(raised.value)


def test_inspect_never_raises(tmp_path: Path) -> None:
    assert scan.inspect(tmp_path / "missing")["format"] == "missing"
    assert scan.inspect(tmp_path)["format"] == "directory"
    assert scan.inspect("bad\0path")["error"]


# -- the CLI ---------------------------------------------------------------------------------------------------


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_scan_json_and_exit_codes(unpacked: dict[str, Path]) -> None:
    folder = str(unpacked["qcow2-v3-c64k.qcow2"].parent)
    result = _run("scan", "--format", "json", folder)
    assert result.exit_code == 1  # legacy images are critical
    document = json.loads(result.stdout)
    by_path = {os.path.basename(r["path"]): r for r in document["images"]}
    assert set(by_path) >= set(MANIFEST)
    for image in document["images"]:
        for key in ("path", "format", "format_version", "virtual_size", "encryption", "severity", "findings",
                    "backing_file"):
            assert key in image
    assert document["summary"]["images"] == len(document["images"])
    assert document["summary"]["by_encryption"]["aes-cbc-legacy"] >= 8
    assert _run("scan", "--fail-on", "never", folder).exit_code == 0
    plain = str(unpacked["qcow2-v3-c4k.qcow2"])
    assert _run("scan", plain).exit_code == 0
    assert _run("scan", "--fail-on", "info", str(unpacked["luks1-cs-aes-cbc-plain-128-sha1.luks"])).exit_code == 1
    assert _run("scan", str(unpacked["qcow2-v3-c4k.qcow2"].parent / "nope")).exit_code == 2


def test_scan_table_quiet_and_prometheus(unpacked: dict[str, Path]) -> None:
    legacy = str(unpacked["aes-qcow2-v3-c64k.qcow2"])
    plain = str(unpacked["qcow2-v3-c4k.qcow2"])
    table = _run("scan", legacy, plain)
    assert "critical" in table.stdout and "aes-cbc-legacy" in table.stdout and plain in table.stdout
    quiet = _run("scan", "--quiet", "--fail-on", "never", legacy, plain)
    assert quiet.stdout.splitlines() == [line for line in quiet.stdout.splitlines() if line.startswith(legacy)]
    assert "legacy-aes" in quiet.stdout
    metrics = _run("scan", "--format", "prometheus", legacy, plain).stdout
    assert 'qcrypt_images{encryption="aes-cbc-legacy",severity="critical"} 1' in metrics
    assert "qcrypt_legacy_images 1" in metrics
    assert f'qcrypt_image_info{{path="{legacy}"' in metrics


def test_scan_each_file_once_and_symlink_loops(tmp_path: Path, unpacked: dict[str, Path]) -> None:
    target = unpacked["aes-qcow2-v2-c4k.qcow2"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "again.qcow2").symlink_to(target)
    (tmp_path / "sub" / "loop").symlink_to(tmp_path)
    (tmp_path / "direct.qcow2").symlink_to(target)
    document = json.loads(_run("scan", "--format", "json", "--jobs", "2", str(tmp_path)).stdout)
    assert len(document["images"]) == 1


def test_info_json_and_table(unpacked: dict[str, Path]) -> None:
    path = str(unpacked["luks-qcow2-v3-c64k.qcow2"])
    details = json.loads(_run("info", "--format", "json", path).stdout)
    assert details["encryption"] == "luks1" and details["luks"]["cipher"] == "aes-xts-plain64"
    table = _run("info", path).stdout
    assert "luks cipher:" in table and "aes-xts-plain64" in table
    broken = _run("info", str(unpacked["qcow2-truncated-header.qcow2"]))
    assert broken.exit_code == 3
    assert broken.stderr.startswith("qcrypt: error:") and len(broken.stderr.splitlines()) == 1


def test_scan_libvirt_xml(tmp_path: Path, unpacked: dict[str, Path]) -> None:
    legacy = unpacked["aes-qcow2-v3-c64k.qcow2"]
    (tmp_path / "vm1.xml").write_text(
        "<domain><name>vm1</name><devices>"
        f"<disk type='file' device='disk'><driver type='qcow2'/><source file='{legacy}'/>"
        "<encryption format='qcow'/><target dev='vda'/></disk>"
        f"<disk type='file' device='disk'><source file='{tmp_path}/gone.qcow2'><encryption format='qcow'/>"
        "</source><target dev='vdb'/></disk></devices></domain>"
    )
    (tmp_path / "broken.xml").write_text("<domain>")
    document = json.loads(_run("scan", "--format", "json", "--libvirt-xml", str(tmp_path), str(legacy)).stdout)
    assert document["images"][0]["domains"] == ["vm1"]
    assert document["domains_with_missing_images"][0]["target"] == "vdb"


def test_refcounts_of_shared_snapshot_clusters(unpacked: dict[str, Path]) -> None:
    """Clusters shared by a snapshot and the active layer have refcount 2, private ones 1 (qemu-img check)."""
    from qcrypt.qcow2 import QCow2Image

    with QCow2Image.open(unpacked["aes-qcow2-v3-snapshots-c4k.qcow2"]) as image:
        active = {m.host_offset for _, m in image.iter_mappings() if m.kind.value == "normal"}
        snapshots = image.snapshots()
        in_snap = {m.host_offset for s in snapshots for _, m in image.iter_mappings(s) if m.kind.value == "normal"}
        assert active & in_snap and active - in_snap
        for offset in active & in_snap:
            assert image.refcount(offset) >= 2
        for offset in active - in_snap:
            assert image.refcount(offset) == 1
        assert image.refcount(0) == 1  # the header cluster
        assert image.refcount(image.file_size + (1 << 30)) == 0


def test_info_reports_unencrypted_compressed_clusters(unpacked: dict[str, Path]) -> None:
    """qemu-io wrote one compressed cluster into these legacy images: QEMU stores it in plaintext."""
    for name in ("aes-qcow2-v3-c64k.qcow2", "qcow1-aes.qcow", "aes-qcow2-v3-extl2-c64k.qcow2"):
        findings = {f["code"]: f for f in scan.describe(unpacked[name])["findings"]}
        assert findings["legacy-aes-compressed-plaintext"]["severity"] == "critical"
        assert findings["legacy-aes-compressed-plaintext"]["message"].startswith("1 compressed cluster")
    for name in ("qcow2-v3-c64k.qcow2", "chain-aes-over-plain-c4k.qcow2"):  # plain; legacy without compression
        codes = {f["code"] for f in scan.describe(unpacked[name])["findings"]}
        assert "legacy-aes-compressed-plaintext" not in codes


def test_luks1_layout_that_qemu_refuses(tmp_path: Path, qemu_img: str, cryptsetup: str) -> None:
    """A payload right after the key material: cryptsetup accepts it, QEMU does not; scan says so."""
    import subprocess

    from qcrypt import luks

    master_key = luks.new_master_key(16)
    params = luks.LuksParams(cipher="aes-cbc-plain64", key_bits=128, iterations=1000, payload_align_sectors=1)
    header, area = luks.create(master_key, b"pw", params)
    assert header.payload_offset == 1032  # create() itself keeps QEMU's 4 KiB rounding
    import dataclasses

    tight = dataclasses.replace(header, payload_offset=1029)  # last key material ends at sector 904 + 125
    path = tmp_path / "tight.luks"
    path.write_bytes(tight.to_bytes() + bytes(area[luks.fmt.PHDR_SIZE : 1029 * 512]) + bytes(1 << 20))
    (tmp_path / "pw").write_bytes(b"pw")
    assert subprocess.run([cryptsetup, "open", "--test-passphrase", "--key-file", str(tmp_path / "pw"),
                           str(path)], capture_output=True, timeout=120).returncode == 0
    refused = subprocess.run([qemu_img, "info", "--object", f"secret,id=s,file={tmp_path / 'pw'}", "--image-opts",
                              f"driver=luks,file.filename={path},key-secret=s"], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode != 0 and "overlapping" in refused.stderr
    codes = {f["code"] for f in scan.inspect(path)["findings"]}
    assert "luks1-qemu-refuses-layout" in codes
    assert "luks1-qemu-refuses-layout" not in {
        f["code"] for f in scan.inspect(im.fixture_path("luks1-qemu-aes-xts-plain64-512.luks", tmp_path))["findings"]}
