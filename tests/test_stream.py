"""open_image reads every fixture byte-for-byte as QEMU does (the manifest's plaintext_sha256 came from
``qemu-img convert -O raw``), at unaligned offsets too; interop with images written by qemu-io right now."""

from __future__ import annotations

import hashlib
import io
import random
import struct
from pathlib import Path

import pytest

import qcrypt
from qcrypt.guest.stream import PassphraseRequiredError
from tests import _images as im
from tests._compare import assert_same_bytes

MANIFEST = im.manifest()["fixtures"]
READABLE = sorted(
    name
    for name, e in MANIFEST.items()
    if e["plaintext_sha256"] and not e["qemu_img_error"] and "truncated" not in name
)


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fixtures")
    return {name: im.fixture_path(name, base) for name in MANIFEST}


def chain_passphrases(name: str, unpacked: dict[str, Path]) -> dict[Path, str]:
    """Each encrypted backing layer's own passphrase, from the manifest."""
    found = {}
    backing = MANIFEST[name]["backing_file"]
    while backing:
        if MANIFEST[backing]["passphrase"]:
            found[unpacked[backing]] = MANIFEST[backing]["passphrase"]
        backing = MANIFEST[backing]["backing_file"]
    return found


@pytest.mark.parametrize("name", READABLE)
def test_plaintext_matches_qemu(name: str, unpacked: dict[str, Path]) -> None:
    entry = MANIFEST[name]
    layers = chain_passphrases(name, unpacked)
    with qcrypt.open_image(unpacked[name], entry["passphrase"], passphrases=layers) as stream:
        assert stream.size == entry["virtual_size"]
        digest = hashlib.sha256()
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == entry["plaintext_sha256"]


@pytest.mark.parametrize("name", [n for n in READABLE if MANIFEST[n]["plaintext_from_writes"]])
def test_unaligned_reads(name: str, unpacked: dict[str, Path]) -> None:
    entry = MANIFEST[name]
    expected = im.expected_plaintext(name)
    rng = random.Random(name)
    layers = chain_passphrases(name, unpacked)
    with qcrypt.open_image(unpacked[name], entry["passphrase"], passphrases=layers) as stream:
        for write in entry["writes"][:8]:
            start = max(0, write["offset"] - rng.randrange(700))
            length = write["length"] + rng.randrange(1500)
            stream.seek(start)
            assert_same_bytes(stream.read(length), expected[start : start + length], f"read at {start}")
        buffer = bytearray(777)
        stream.seek(stream.size - 300)
        assert stream.readinto(buffer) == 300
        assert bytes(buffer[:300]) == expected[-300:]
        assert stream.read(10) == b""


@pytest.mark.parametrize("name", READABLE)
def test_read_into_reads_what_read_does(name: str, unpacked: dict[str, Path]) -> None:
    """read_into (the migration's workers read into reused buffers) gives the bytes read gives, for every kind
    of cluster and layer the fixtures hold, at unaligned offsets too, with zeros past the end of the disk."""
    entry = MANIFEST[name]
    rng = random.Random(name)
    layers = chain_passphrases(name, unpacked)
    with qcrypt.open_image(unpacked[name], entry["passphrase"], passphrases=layers) as stream:
        starts = [0, stream.size - 4096] + [rng.randrange(stream.size) for _ in range(6)]
        for start in starts:
            length = rng.choice([4096, 65536, 1 << 20]) + rng.choice([0, rng.randrange(1, 1500)])
            out = memoryview(bytearray(b"\xa5" * length))
            stream.read_into(start, out)
            expected = stream.read_at(start, length)
            assert_same_bytes(bytes(out[: len(expected)]), expected, f"read_into at {start}")
            assert out[len(expected) :].tobytes() == bytes(length - len(expected))  # past the end: zeros


@pytest.mark.parametrize("name", sorted(n for n, e in MANIFEST.items() if e["snapshot_sha256"]))
def test_snapshots_read_as_qemu(name: str, unpacked: dict[str, Path]) -> None:
    entry = MANIFEST[name]
    for snapshot, expected in entry["snapshot_sha256"].items():
        with qcrypt.open_image(unpacked[name], entry["passphrase"], snapshot=snapshot) as stream:
            assert hashlib.sha256(stream.read()).hexdigest() == expected


def test_stream_is_a_raw_io(unpacked: dict[str, Path]) -> None:
    name = "aes-qcow2-v3-c64k.qcow2"
    with qcrypt.open_image(unpacked[name], MANIFEST[name]["passphrase"].encode()) as stream:
        assert isinstance(stream, io.RawIOBase)
        assert stream.readable() and stream.seekable() and not stream.writable()
        assert stream.seek(0, io.SEEK_END) == stream.size
        assert stream.seek(-512, io.SEEK_CUR) == stream.size - 512
        assert stream.tell() == stream.size - 512
        buffered = io.BufferedReader(stream)
        assert len(buffered.read()) == 512
    assert stream.closed


def test_legacy_key_is_first_16_bytes(unpacked: dict[str, Path]) -> None:
    name = "aes-qcow2-v3-c64k.qcow2"
    passphrase = MANIFEST[name]["passphrase"]
    with qcrypt.open_image(unpacked[name], passphrase[:16] + "ignored tail") as stream:
        assert hashlib.sha256(stream.read()).hexdigest() == MANIFEST[name]["plaintext_sha256"]


def test_wrong_and_missing_luks_passphrase(unpacked: dict[str, Path]) -> None:
    for name in ("luks-qcow2-v3-c64k.qcow2", "luks1-cs-aes-xts-plain64-256-sha256.luks"):
        with pytest.raises(qcrypt.BadPassphraseError, match="opens no keyslot") as raised:
            qcrypt.open_image(unpacked[name], "not the passphrase")
        assert "not the passphrase" not in str(raised.value)
        with pytest.raises(PassphraseRequiredError):
            qcrypt.open_image(unpacked[name])


def test_truncated_encrypted_image_is_refused(unpacked: dict[str, Path]) -> None:
    name = "aes-qcow2-v3-truncated-c4k.qcow2"
    with (
        qcrypt.open_image(unpacked[name], MANIFEST[name]["passphrase"]) as stream,
        pytest.raises(qcrypt.FormatError, match="truncated"),
    ):
        stream.read()
    with (
        qcrypt.open_image(unpacked[name], MANIFEST[name]["passphrase"]) as stream,
        pytest.raises(qcrypt.FormatError, match="truncated"),
    ):
        stream.read_into(0, memoryview(bytearray(stream.size)))


def test_unknown_incompatible_feature_is_refused(unpacked: dict[str, Path]) -> None:
    with pytest.raises(qcrypt.UnsupportedFeatureError, match="incompatible"):
        qcrypt.open_image(unpacked["aes-qcow2-v3-unknown-incompat-c4k.qcow2"], "x")


def test_luks2_unlock_is_refused_clearly(unpacked: dict[str, Path]) -> None:
    with pytest.raises(qcrypt.UnsupportedFeatureError, match="LUKS2"):
        qcrypt.open_image(unpacked["luks2-pbkdf2.luks"], MANIFEST["luks2-pbkdf2.luks"]["passphrase"])


@pytest.mark.interop
@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 << 20])
def test_fresh_legacy_images_at_nonzero_offsets(tmp_path: Path, qemu_img: str, cluster_size: int) -> None:
    """qemu-io writes into a fresh legacy image; the passphrase is longer than 16 bytes."""
    passphrase = "a passphrase longer than sixteen bytes"
    size = 8 << 20
    image = im.make_qcow2(tmp_path / "l.qcow2", size, cluster_size=cluster_size, encrypt="aes", passphrase=passphrase)
    writes = im.fill_image(image, size, cluster_size)
    with qcrypt.open_image(image.path, passphrase) as stream:
        assert hashlib.sha256(stream.read()).hexdigest() == im.plaintext_sha256(image)
        expected = im.render_writes(writes, bytes(size))
        stream.seek(0)
        assert_same_bytes(stream.read(), expected, "guest view")


@pytest.mark.interop
def test_chain_with_separate_passphrases(tmp_path: Path, qemu_img: str) -> None:
    base = im.make_qcow2(tmp_path / "base.qcow2", 4 << 20, encrypt="aes", passphrase="base secret")
    im.write_pattern(base, 65536 * 3 + 512, 4096, 0x61)
    top = im.make_qcow2(tmp_path / "top.qcow2", 4 << 20, encrypt="aes", passphrase="top secret", backing=base)
    im.write_pattern(top, 65536 * 5 + 1024, 4096, 0x62)
    with qcrypt.open_image(top.path, "top secret", passphrases={base.path: "base secret"}) as stream:
        assert hashlib.sha256(stream.read()).hexdigest() == im.plaintext_sha256(top)


def test_long_reads_loop_over_short_preads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux returns at most ~2 GiB per read(): long reads must loop, never pad the rest with zeros."""
    from qcrypt.plumbing import files as imagefile

    data = bytes(range(256)) * 40
    path = tmp_path / "raw.img"
    path.write_bytes(data)
    monkeypatch.setattr(imagefile, "MAX_PREAD", 1000)
    with qcrypt.open_image(path, container="raw") as stream:
        assert_same_bytes(stream.read_at(0, len(data)), data, "read_at(0)")
        assert_same_bytes(stream.read_at(999, 5003), data[999:6002], "read_at(999)")
        out = memoryview(bytearray(len(data) + 100))
        stream.read_into(0, out)
        assert_same_bytes(bytes(out), data + bytes(100), "read_into(0)")


@pytest.mark.interop
def test_odd_virtual_size_is_rounded_down_like_qemu(tmp_path: Path, qemu_img: str) -> None:
    import json
    import subprocess

    image = im.make_qcow2(tmp_path / "odd.qcow2", 1 << 20)
    im.write_pattern(image, 0, 4096, 0x33)
    with open(image.path, "r+b") as fh:
        fh.seek(24)
        fh.write((197608).to_bytes(8, "big"))
    info = json.loads(
        subprocess.run(
            [qemu_img, "info", "--output=json", str(image.path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
    )
    with qcrypt.open_image(image.path) as stream:
        assert stream.size == info["virtual-size"] == 197120
        assert len(stream.read()) == 197120


def _first_l2_entry(path: Path) -> int:
    """File offset of the first allocated L2 entry of the active table (struct-decoded, not with qcrypt)."""
    with open(path, "rb") as fh:
        head = fh.read(104)
        l1_offset = struct.unpack_from(">Q", head, 40)[0]
        extended = bool(struct.unpack_from(">Q", head, 72)[0] & 0x10)
        fh.seek(l1_offset)
        l2_offset = struct.unpack(">Q", fh.read(8))[0] & 0x00FF_FFFF_FFFF_FE00
        width = 16 if extended else 8
        fh.seek(l2_offset)
        for index in range(1 << 16):
            (entry,) = struct.unpack(">Q", fh.read(8))
            fh.seek(width - 8, io.SEEK_CUR)
            if entry & 0x00FF_FFFF_FFFF_FE00:
                return l2_offset + index * width
    raise AssertionError(f"{path}: no allocated L2 entry")


@pytest.mark.parametrize(
    ("name", "patch", "message"),
    [
        ("qcow2-v3-c64k.qcow2", lambda e, b: (e | 0x2, b), "reserved bits"),
        ("qcow2-v3-c64k.qcow2", lambda e, b: (e | (1 << 56), b), "reserved bits"),
        ("qcow2-v3-extl2-c64k.qcow2", lambda e, b: (e, 0x1_0000_0001), "both allocated and zero"),
    ],
)
def test_corrupt_l2_entries_are_refused(
    unpacked: dict[str, Path], tmp_path: Path, name: str, patch: object, message: str
) -> None:
    """Reserved L2 bits, or a subcluster both allocated and zero: an error, never a silent guess."""
    copy = tmp_path / name
    copy.write_bytes(unpacked[name].read_bytes())
    where = _first_l2_entry(copy)
    with open(copy, "r+b") as fh:
        fh.seek(where)
        entry, bitmap = struct.unpack(">QQ", fh.read(16))
        entry, bitmap = patch(entry, bitmap)  # type: ignore[operator]
        fh.seek(where)
        fh.write(struct.pack(">Q", entry) + (struct.pack(">Q", bitmap) if "extl2" in name else b""))
    with pytest.raises(qcrypt.QcryptError, match=message), qcrypt.open_image(copy) as stream:
        stream.read_at(0, stream.size)


@pytest.mark.parametrize(
    "name", sorted(n for n, e in MANIFEST.items() if n.endswith(".qcow2") and e["qemu_img_error"] is None)
)
def test_plain_runs_say_what_map_cluster_says(name: str, unpacked: dict[str, Path]) -> None:
    """The vectorised run decoder agrees with the per-cluster one on every table of every qcow2 fixture (or
    declines, and the reader decodes cluster by cluster); a run never spans kinds or host gaps."""
    from qcrypt.images.qcow2_reader import QCow2Image
    from qcrypt.model.clusters import ClusterKind

    with QCow2Image.open(unpacked[name]) as image:
        try:
            tables = [image.l1_table()] + [image.l1_table(s) for s in image.snapshots()]
        except qcrypt.FormatError:
            return  # a fixture whose tables do not parse: nothing to decode
        cs = image.cluster_size
        windows = [(0, image.guest_clusters)] + [
            (first, size) for first in range(0, min(image.guest_clusters, 600), 5) for size in (1, 7)
        ]
        decoded = 0
        for l1 in tables:
            for first, count in windows:
                runs = image.plain_runs(l1, first, count)
                if runs is None:
                    continue  # declined: compressed, extended L2, reserved bits...
                decoded += 1
                assert sum(n for _, _, n, _ in runs) == count and runs[0][1] == first
                for kind, run_first, clusters, host_offset in runs:
                    for i in range(clusters):
                        mapping = image.map_cluster(run_first + i, l1)
                        assert mapping.kind is kind, (run_first + i, mapping, kind)
                        if kind is ClusterKind.NORMAL:
                            assert mapping.host_offset == host_offset + i * cs
        extended = image.header.extended_l2
        assert decoded or extended, "no window of plain entries to compare"


@pytest.mark.parametrize(
    "name", sorted(n for n, e in MANIFEST.items() if n.endswith(".qcow2") and e["qemu_img_error"] is None)
)
def test_iter_mappings_decodes_plain_tables_at_once_alike(
    name: str, unpacked: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """iter_mappings decodes a table of plain entries with numpy: the same mappings, in the same order, as the
    per-entry decoder gives (forced here by declining every table), for every table of every qcow2 fixture."""
    from qcrypt.images.qcow2_reader import QCow2Image

    with QCow2Image.open(unpacked[name]) as image:
        try:
            snapshots = [None, *image.snapshots()]
            fast = [list(image.iter_mappings(s)) for s in snapshots]
        except qcrypt.FormatError:
            return  # a fixture whose tables do not parse: nothing to compare
    monkeypatch.setattr(QCow2Image, "_plain_kinds", lambda self, entries: None)
    with QCow2Image.open(unpacked[name]) as image:
        assert [list(image.iter_mappings(s)) for s in snapshots] == fast
