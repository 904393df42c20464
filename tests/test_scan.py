"""qcrypt scan / qcrypt info against every committed fixture (made by qemu-img, qemu-io and cryptsetup).

The manifest records what the real tools said about each fixture; scan and info must agree with it.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import qcrypt
from qcrypt.cli.main import cli
from qcrypt.errors import FormatError
from qcrypt.images.probe import probe
from tests import _audit as scan
from tests import _images as im

MANIFEST = im.manifest()["fixtures"]
UNPARSEABLE = {"qcow2-truncated-header.qcow2"}
UNKNOWN_FEATURE = {"aes-qcow2-v3-unknown-incompat-c4k.qcow2"}


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
        assert report["virtual_size"] == entry["file_size"] - entry["luks"]["payload_offset"] * 512
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
    # XTS splits its key in two: 256 bits are two AES-128 keys, under cryptsetup's default AES-256
    assert codes("luks1-cs-aes-xts-plain64-256-sha256.luks") == {"luks-short-key"}
    assert "luks-short-key" in codes("luks1-cs-aes-cbc-essiv-sha256-128-sha512.luks")
    assert codes("luks1-cs-aes-cbc-essiv-sha256-256-sha256.luks") == set()
    assert codes("luks1-cs-aes-xts-plain64-512-sha1.luks") == {"luks-sha1"}
    assert "luks2-not-qemu" in codes("luks2-argon2id.luks")


@pytest.mark.parametrize("name", sorted(n for n in MANIFEST if n not in UNPARSEABLE))
def test_describe_matches_manifest(name: str, unpacked: dict[str, Path]) -> None:
    entry = _entry(name)
    details = scan.describe(unpacked[name])
    if entry["format"] in ("qcow", "qcow2"):
        assert details["cluster_size"] == entry["cluster_size"]
        assert [s["name"] for s in details["snapshots"]] == entry["snapshots"]
        assert 0 < details["allocated_bytes"] <= entry["virtual_size"]  # exact values: test_allocated_bytes_*
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
    with pytest.raises(FormatError) as raised:
        scan.describe(unpacked["qcow2-truncated-header.qcow2"])
    assert "qcow2-truncated-header.qcow2" in str(raised.value)


def test_inspect_never_raises(tmp_path: Path) -> None:
    assert scan.inspect(tmp_path / "missing")["format"] == "missing"
    assert scan.inspect(tmp_path)["format"] == "directory"
    assert scan.inspect("bad\0path")["error"]


# -- the CLI ---------------------------------------------------------------------------------------------------


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.interop
@pytest.mark.parametrize(
    "name",
    sorted(
        n for n in MANIFEST if MANIFEST[n]["format"] == "qcow2" and n not in UNPARSEABLE and n not in UNKNOWN_FEATURE
    ),
)
def test_allocated_bytes_match_qemu_img_map(
    name: str, unpacked: dict[str, Path], qemu_img: str, tmp_path: Path
) -> None:
    """Data clusters of the image itself (not its backing file), as qemu-img map reports them."""
    image = im.fixture_image(name, unpacked[name].parent)
    pw = tmp_path / "pw"
    pw.write_text(image.passphrase or "")
    opts = f"driver=qcow2,file.filename={image.path}"
    if image.passphrase:
        opts += ",encrypt.key-secret=s"
    layer = image.backing
    prefix = "backing."
    while layer is not None:  # an encrypted backing file must be opened too
        if layer.passphrase:
            opts += f",{prefix}encrypt.key-secret=s"
        layer, prefix = layer.backing, prefix + "backing."
    mapped = subprocess.run(
        [qemu_img, "map", "--output=json", "--object", f"secret,id=s,file={pw}", "--image-opts", opts],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert mapped.returncode == 0, mapped.stderr
    unit = _entry(name)["cluster_size"] // (32 if "extl2" in name else 1)  # extended L2: 32 subclusters
    units = {
        offset // unit
        for extent in json.loads(mapped.stdout)
        if extent["depth"] == 0 and extent["data"]
        for offset in range(extent["start"], extent["start"] + extent["length"], unit)
    }
    assert scan.describe(unpacked[name])["allocated_bytes"] == len(units) * unit


def test_scan_json_and_exit_codes(unpacked: dict[str, Path]) -> None:
    folder = str(unpacked["qcow2-v3-c64k.qcow2"].parent)
    result = _run("scan", "--format", "json", folder)
    assert result.exit_code == 1  # legacy images are critical
    document = json.loads(result.stdout)
    by_path = {os.path.basename(r["path"]): r for r in document["images"]}
    assert set(by_path) == set(MANIFEST)
    for image in document["images"]:
        for key in (
            "path",
            "format",
            "format_version",
            "virtual_size",
            "encryption",
            "severity",
            "findings",
            "backing_file",
        ):
            assert key in image
    assert document["summary"]["images"] == len(document["images"])
    legacy = [n for n, e in MANIFEST.items() if e["encryption"] == "aes-cbc-legacy" and n not in UNPARSEABLE]
    assert document["summary"]["by_encryption"]["aes-cbc-legacy"] == len(legacy)
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


@pytest.mark.interop
def test_refcounts_of_shared_snapshot_clusters(unpacked: dict[str, Path], qemu_img: str, tmp_path: Path) -> None:
    """qemu-img check finds the stored refcounts right; ours must read them exactly as a plain struct decoder
    does, for every cluster of the file: shared clusters 2 or more, private ones 1."""
    from qcrypt.images.qcow2_reader import QCow2Image

    path = unpacked["aes-qcow2-v3-snapshots-c4k.qcow2"]
    pw = tmp_path / "pw"
    pw.write_text(_entry("aes-qcow2-v3-snapshots-c4k.qcow2")["passphrase"])
    check = subprocess.run(
        [
            qemu_img,
            "check",
            "--output=json",
            "--object",
            f"secret,id=s,file={pw}",
            "--image-opts",
            f"driver=qcow2,file.filename={path},encrypt.key-secret=s",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    report = json.loads(check.stdout)
    assert (report.get("corruptions", 0), report.get("leaks", 0), report["check-errors"]) == (0, 0, 0)
    stored = _refcounts_by_struct(path)
    with QCow2Image.open(path) as image:
        cs = image.cluster_size
        wrong = [c for c in range(len(stored)) if image.refcount(c * cs) != stored[c]]
        assert not wrong, f"refcounts differ from the struct decoder at clusters {wrong[:10]}"
        active = {m.host_offset for _, m in image.iter_mappings() if m.kind.value == "normal"}
        in_snap = {
            m.host_offset for s in image.snapshots() for _, m in image.iter_mappings(s) if m.kind.value == "normal"
        }
        assert active & in_snap and active - in_snap
        references = _data_references_by_struct(path)  # distinct L2 tables pointing at each data cluster
        assert {offset: image.refcount(offset) for offset in active | in_snap} == {
            offset: references[offset] for offset in active | in_snap
        }
        assert all(image.refcount(offset) >= 2 for offset in active & in_snap)
        assert all(image.refcount(offset) == 1 for offset in active - in_snap)
        assert image.refcount(image.file_size + (1 << 30)) == 0


@pytest.mark.interop
def test_refcounts_across_refcount_blocks(tmp_path: Path, qemu_img: str) -> None:
    """4 KiB clusters hold 2048 16-bit refcounts per block: 9 MiB of data needs a second refcount block."""
    from qcrypt.images.qcow2_reader import QCow2Image

    image = im.make_qcow2(tmp_path / "many.qcow2", 12 << 20, cluster_size=4096)
    im.write_pattern(image, 0, 9 << 20, 0x3C)
    stored = _refcounts_by_struct(image.path)
    assert len(stored) > 2048 and stored[2100] == 1
    with QCow2Image.open(image.path) as opened:
        ours = [opened.refcount(c * 4096) for c in range(len(stored))]
    wrong = [c for c in range(len(stored)) if ours[c] != stored[c]]
    assert not wrong, (
        f"{len(wrong)} refcounts differ, first at cluster {wrong[0]}: {ours[wrong[0]]} vs {stored[wrong[0]]}"
    )


def _data_references_by_struct(path: Path) -> dict[int, int]:
    """host offset -> number of distinct L2 tables (active and snapshots) mapping it, decoded with struct."""
    with open(path, "rb") as fh:
        data = fh.read()
    mask = 0x00FF_FFFF_FFFF_FE00
    cs = 1 << struct.unpack_from(">I", data, 20)[0]
    l1_size, l1_offset = struct.unpack_from(">IQ", data, 36)
    snapshot_count, snapshots_offset = struct.unpack_from(">IQ", data, 60)
    l1_tables = [(l1_offset, l1_size)]
    position = snapshots_offset
    for _ in range(snapshot_count):
        snap_l1_offset, snap_l1_size, id_len, name_len, _date, _nsec, _vm_clock, _vm_state, extra_len = (
            struct.unpack_from(">QIHHIIQII", data, position)
        )
        l1_tables.append((snap_l1_offset, snap_l1_size))
        position += -(-(40 + extra_len + id_len + name_len) // 8) * 8
    l2_tables = {
        struct.unpack_from(">Q", data, offset + 8 * i)[0] & mask for offset, size in l1_tables for i in range(size)
    } - {0}
    references: dict[int, int] = {}
    for l2 in l2_tables:
        for i in range(cs // 8):
            entry = struct.unpack_from(">Q", data, l2 + 8 * i)[0]
            if entry & (1 << 62) == 0 and entry & mask:  # standard (not compressed) and allocated
                references[entry & mask] = references.get(entry & mask, 0) + 1
    return references


def _refcounts_by_struct(path: Path) -> list[int]:
    """Refcount of every cluster of a qcow2 file, decoded with struct only (16-bit refcounts)."""
    with open(path, "rb") as fh:
        data = fh.read()
    (cluster_bits,) = struct.unpack_from(">I", data, 20)
    table_offset, table_clusters = struct.unpack_from(">QI", data, 48)
    (refcount_order,) = struct.unpack_from(">I", data, 96)
    assert refcount_order == 4
    cs = 1 << cluster_bits
    per_block = cs // 2
    clusters = -(-len(data) // cs)
    counts = []
    for index in range(table_clusters * cs // 8):
        (block,) = struct.unpack_from(">Q", data, table_offset + 8 * index)
        for slot in range(per_block):
            if len(counts) == clusters:
                return counts
            counts.append(struct.unpack_from(">H", data, block + 2 * slot)[0] if block else 0)
    return counts


def test_info_reports_unencrypted_compressed_clusters(unpacked: dict[str, Path]) -> None:
    """qemu-io wrote one compressed cluster into these legacy images: QEMU stores it in plaintext."""
    for name in ("aes-qcow2-v3-c64k.qcow2", "qcow1-aes.qcow", "aes-qcow2-v3-extl2-c64k.qcow2"):
        findings = {f["code"]: f for f in scan.describe(unpacked[name])["findings"]}
        assert findings["legacy-aes-compressed-plaintext"]["severity"] == "critical"
        assert findings["legacy-aes-compressed-plaintext"]["message"].startswith("1 compressed cluster")
    for name in ("qcow2-v3-c64k.qcow2", "chain-aes-over-plain-c4k.qcow2"):  # plain; legacy without compression
        codes = {f["code"] for f in scan.describe(unpacked[name])["findings"]}
        assert "legacy-aes-compressed-plaintext" not in codes


@pytest.mark.interop
def test_luks1_layout_that_qemu_refuses(tmp_path: Path, qemu_img: str, cryptsetup: str) -> None:
    """A payload right after the key material: cryptsetup accepts it, QEMU does not; scan says so."""
    import subprocess

    from qcrypt.luks import create as luks_create

    master_key = luks_create.new_master_key(16)
    params = luks_create.LuksParams(cipher="aes-cbc-plain64", key_bits=128, iterations=1000, payload_align_sectors=1)
    header, area = luks_create.create(master_key, b"pw", params)
    assert header.payload_offset == 1032  # create() itself keeps QEMU's 4 KiB rounding
    import dataclasses

    tight = dataclasses.replace(header, payload_offset=1029)  # last key material ends at sector 904 + 125
    path = tmp_path / "tight.luks"
    path.write_bytes(tight.to_bytes() + bytes(area[592 : 1029 * 512]) + bytes(1 << 20))
    (tmp_path / "pw").write_bytes(b"pw")
    assert (
        subprocess.run(
            [cryptsetup, "open", "--test-passphrase", "--key-file", str(tmp_path / "pw"), str(path)],
            capture_output=True,
            timeout=120,
        ).returncode
        == 0
    )
    refused = subprocess.run(
        [
            qemu_img,
            "info",
            "--object",
            f"secret,id=s,file={tmp_path / 'pw'}",
            "--image-opts",
            f"driver=luks,file.filename={path},key-secret=s",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0 and "overlapping" in refused.stderr
    codes = {f["code"] for f in scan.inspect(path)["findings"]}
    assert "luks1-qemu-refuses-layout" in codes
    assert "luks1-qemu-refuses-layout" not in {
        f["code"] for f in scan.inspect(im.fixture_path("luks1-qemu-aes-xts-plain64-512.luks", tmp_path))["findings"]
    }


def test_vectorized_l2_count_agrees_with_entry_by_entry_decoding(
    unpacked: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """info counts a dense L2 table with numpy and a sparse one entry by entry: on every L2 table of every
    fixture (snapshots included) both ways give the same counts, the same compressed offsets, the same errors."""
    from qcrypt.images import qcow2_reader as qcow2

    checked = 0
    for name, path in sorted(unpacked.items()):
        if probe(str(path)).format != "qcow2":
            continue
        try:
            image = qcow2.QCow2Image.open(path)
        except qcrypt.FormatError:
            continue
        with image:
            tables = [None, *image.snapshots()]
            results = []
            for sparse_limit in (-1, 1 << 30):  # always vectorized, always entry by entry
                monkeypatch.setattr(qcow2, "SPARSE_L2_ENTRIES", sparse_limit)
                try:
                    usages = [image.table_usage(table) for table in tables]
                    results.append([(u.allocated_bytes, u.compressed_offsets.tolist()) for u in usages])
                except qcrypt.FormatError as e:
                    results.append(str(e))
            assert results[0] == results[1], name
            checked += 1
    assert checked >= 10
