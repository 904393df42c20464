"""Memory and time bombs: headers that declare huge counts, sizes or costs (docs/SECURITY.md, "Limits").

Each image is made by qemu-img and then edited (sparse files: a few MiB on disk at most). qcrypt runs in a child
process whose CPU time and peak memory the test measures (tests/_bounded.py), with hard guards that stop a
runaway child in seconds: a bomb that goes off fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from qcrypt.plumbing import limits
from tests import _images as im
from tests._bounded import qcrypt_bounded
from tests._pbkdf import measured_rate
from tests._tools import require_tool

pytestmark = pytest.mark.interop

PASSPHRASE = "bomb test"
SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")  # 40 bytes (docs/FORMATS.md A.8)
LIMIT_EXCEEDED = "limit-exceeded"


def _put(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def _u32(path: Path, offset: int, value: int) -> None:
    _put(path, offset, value.to_bytes(4, "big"))


def _u64(path: Path, offset: int, value: int) -> None:
    _put(path, offset, value.to_bytes(8, "big"))


def _grow(path: Path, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(max(size, os.path.getsize(path)))


def _scan_json(path: Path) -> tuple[dict, object]:
    outcome = qcrypt_bounded("scan", "--format", "json", "--fail-on", "never", "-j", "1", str(path))
    outcome.assert_bounded()
    assert outcome.returncode == 0, outcome.stderr
    return json.loads(outcome.stdout)["images"][0], outcome


def _codes(report: dict) -> list[str]:
    return [f["code"] for f in report["findings"]]


def _set_snapshot_table(path: Path, table_offset: int, count: int) -> None:
    _u32(path, 60, count)
    _u64(path, 64, table_offset)


def test_snapshot_struct_format_matches_the_declaration() -> None:
    """The reader's struct format for snapshot entries and the construct declaration agree field by field."""
    from qcrypt.formats import qcow2 as fmt

    values = (
        0x1122334455667788,
        0x99AABBCC,
        0xDDEE,
        0x0102,
        0x03040506,
        0x0708090A,
        0x0B0C0D0E0F101112,
        0x13141516,
        0x1718191A,
    )
    raw = struct.pack(fmt.SNAPSHOT_HEADER_FORMAT, *values)
    assert len(raw) == fmt.SNAPSHOT_HEADER_SIZE == fmt.SnapshotHeader.sizeof()
    parsed = fmt.SnapshotHeader.parse(raw)
    assert tuple(v for k, v in parsed.items() if not k.startswith("_")) == values
    assert SNAPSHOT_ENTRY.format == fmt.SNAPSHOT_HEADER_FORMAT


# -- memory bombs ------------------------------------------------------------------------------------------------


def test_snapshot_table_bomb_is_a_finding(tmp_path: Path) -> None:
    """Snapshot entries with maximal id, name and extra data: 1536 of them declare 203 MB of table (names
    decode to as much again); reading stops at the 16 MiB table limit."""
    image = im.make_qcow2(tmp_path / "snaps.qcow2", 1 << 20)
    entry_bytes = 40 + 1024 + 0xFFFF + 0xFFFF
    entry_bytes += -entry_bytes % 8
    table = 1 << 20
    count = 1536
    with open(image.path, "r+b") as fh:
        fh.truncate(table + count * entry_bytes)
        for index in range(count):
            fh.seek(table + index * entry_bytes)
            fh.write(SNAPSHOT_ENTRY.pack(0, 0, 0xFFFF, 0xFFFF, 0, 0, 0, 0, 1024))
    _set_snapshot_table(image.path, table, count)
    report, _ = _scan_json(image.path)
    assert LIMIT_EXCEEDED in _codes(report)
    assert "16 MiB" in report["error"]
    info = qcrypt_bounded("info", str(image.path))
    info.assert_bounded()
    assert info.returncode == 3 and "snapshot table" in info.stderr
    xml = (
        f"<domain type='kvm'><name>web</name><devices><disk type='file' device='disk'>"
        f"<driver name='qemu' type='qcow2'/><source file='{image.path}'/><target dev='vda'/></disk>"
        "</devices></domain>"
    )
    hook = qcrypt_bounded("hook", "libvirt", "web", "prepare", "begin", "-", stdin=xml.encode())
    hook.assert_bounded()
    assert hook.returncode == 0


def test_snapshot_l1_bomb_is_refused(tmp_path: Path) -> None:
    """1024 snapshots of a legacy image, each with its own 32 MiB L1 (holes in a sparse file): ``info`` used to
    keep every table while counting compressed clusters (32 GiB). The snapshots' L1 tables together are
    limited to 256 MiB."""
    image = im.make_qcow2(tmp_path / "l1s.qcow2", 1 << 20, encrypt="aes", passphrase=PASSPHRASE)
    count, l1_entries = 1024, limits.MAX_L1_BYTES // 8
    table, first_l1 = 512 << 10, 1 << 20
    _grow(image.path, first_l1 + count * 65536 + limits.MAX_L1_BYTES)
    entries = b"".join(SNAPSHOT_ENTRY.pack(first_l1 + i * 65536, l1_entries, 0, 0, 0, 0, 0, 0, 0) for i in range(count))
    _put(image.path, table, entries)
    _set_snapshot_table(image.path, table, count)
    assert os.stat(image.path).st_blocks * 512 < 2 << 20  # sparse
    report, _ = _scan_json(image.path)
    assert {LIMIT_EXCEEDED, "legacy-aes"} <= set(_codes(report)) and "L1 tables" in report["error"]
    info = qcrypt_bounded("info", str(image.path))
    info.assert_bounded()
    assert info.returncode == 3 and "L1 tables" in info.stderr
    secret = tmp_path / "pw"
    secret.write_text(PASSPHRASE)
    out = tmp_path / "out.qcow2"
    migrate = qcrypt_bounded(
        "migrate", str(image.path), "--to", "qcow2", "-o", str(out), "--passphrase-file", str(secret), "-q"
    )
    migrate.assert_bounded()
    assert migrate.returncode == 3 and "L1 tables" in migrate.stderr and not out.exists()


def test_table_walk_of_info_stays_within_its_budget(tmp_path: Path) -> None:
    """An L1 of 131072 entries, each pointing at its own L2 table (holes of an 8 GiB sparse file): counting the
    allocated bytes would read 8 GiB. ``info`` stops at 256 MiB of tables and says so."""
    image = im.make_qcow2(tmp_path / "wide.qcow2", 1 << 20)
    l1_entries = 131072
    first_l2 = 4 << 20
    new_l1 = 2 << 20
    _grow(image.path, first_l2 + l1_entries * 65536)
    _put(image.path, new_l1, b"".join((first_l2 + i * 65536).to_bytes(8, "big") for i in range(l1_entries)))
    _u64(image.path, 24, l1_entries * 8192 * 65536)
    _u32(image.path, 36, l1_entries)
    _u64(image.path, 40, new_l1)
    assert os.stat(image.path).st_blocks * 512 < 4 << 20  # sparse
    outcome = qcrypt_bounded("info", "--format", "json", str(image.path))
    outcome.assert_bounded()
    assert outcome.returncode == 0, outcome.stderr
    report = json.loads(outcome.stdout)
    assert report["allocated_bytes"] is None and LIMIT_EXCEEDED in _codes(report)
    table = qcrypt_bounded("info", str(image.path))
    assert table.returncode == 0 and "unknown (see findings)" in table.stdout


# -- time bombs --------------------------------------------------------------------------------------------------


def _shared_l2_image(tmp_path: Path) -> Path:
    """A 1 MiB image whose L1 (65536 entries, all pointing at one full L2 table) claims 5.4e8 data clusters."""
    image = im.make_qcow2(tmp_path / "shared.qcow2", 1 << 20)
    im.write_pattern(image, 0, 65536, 0x42)
    data = image.path.read_bytes()
    l1_offset = struct.unpack_from(">Q", data, 40)[0]
    l2_entry = struct.unpack_from(">Q", data, l1_offset)[0]
    l2_offset = l2_entry & 0x00FFFFFFFFFFFE00
    data_entry = struct.unpack_from(">Q", data, l2_offset)[0]
    l1_entries = 65536
    new_l1 = -(-len(data) // 65536) * 65536
    _put(image.path, l2_offset, data_entry.to_bytes(8, "big") * 8192)
    _put(image.path, new_l1, l2_entry.to_bytes(8, "big") * l1_entries)
    _u64(image.path, 24, l1_entries * 8192 * 65536)  # virtual size covered by the L1: 32 TiB
    _u32(image.path, 36, l1_entries)
    _u64(image.path, 40, new_l1)
    return image.path


def test_shared_l2_time_bomb_is_refused_quickly(tmp_path: Path) -> None:
    path = _shared_l2_image(tmp_path)
    report, _ = _scan_json(path)
    assert report["format"] == "qcow2"
    info = qcrypt_bounded("info", str(path))
    info.assert_bounded()
    assert info.returncode == 3 and "same L2 table" in info.stderr
    out = tmp_path / "out.qcow2"
    migrate = qcrypt_bounded("migrate", str(path), "--to", "qcow2", "-o", str(out), "-q")
    migrate.assert_bounded(cpu_seconds=6)
    assert migrate.returncode == 3 and "same L2 table" in migrate.stderr
    assert not out.exists()


def test_estimates_of_migrate_domain_stay_bounded(tmp_path: Path) -> None:
    """migrate-domain --dry-run (and migrate's progress bar) estimate the work from the allocated bytes of
    every layer: on the shared-L2 bomb that estimate used to walk 5.4e8 mappings."""
    from qcrypt.audit.describe import allocated_bytes_of, allocated_estimate
    from qcrypt.audit.inspect import inspect_image

    path = _shared_l2_image(tmp_path)
    started = time.process_time()
    assert allocated_estimate(inspect_image(path), flatten=True) is None
    assert allocated_bytes_of(str(path)) is None
    assert time.process_time() - started < 2


def test_vm_state_beyond_the_file_is_refused(tmp_path: Path) -> None:
    """A snapshot declaring 1 PiB of VM state: migrate used to copy it chunk by chunk in the main process."""
    image = im.make_qcow2(tmp_path / "vm.qcow2", 1 << 20)
    im.snapshot(image, "s1")
    data = image.path.read_bytes()
    table = struct.unpack_from(">Q", data, 64)[0]
    extra_size = struct.unpack_from(">I", data, table + 36)[0]
    assert extra_size >= 8
    _u64(image.path, table + 40, 1 << 50)  # vm_state_size_large
    report, _ = _scan_json(image.path)
    assert LIMIT_EXCEEDED in _codes(report) and "VM state" in report["error"]
    out = tmp_path / "out.qcow2"
    migrate = qcrypt_bounded("migrate", str(image.path), "--to", "qcow2", "-o", str(out), "-q")
    migrate.assert_bounded()
    assert migrate.returncode == 3 and "VM state" in migrate.stderr
    assert migrate.stderr.count("\n") == 1 and not out.exists()


def _nested_links(top: Path, image: Path, depth: int) -> None:
    """``top/img``, ``top/sub/img``, ... : hard links to one image whose backing file is ``sub/img``."""
    folder = top
    for _ in range(depth):
        folder.mkdir(parents=True, exist_ok=True)
        os.link(image, folder / "img")
        folder = folder / "sub"


def _nested_copies(top: Path, image: Path, depth: int, data_bytes: int) -> None:
    """``top/img``, ``top/sub/img``, ... : sparse copies of one image whose backing file is ``sub/img`` (copies,
    not hard links: one inode met twice is a backing loop). Only its first ``data_bytes`` hold anything."""
    head = image.read_bytes()[:data_bytes]
    size = image.stat().st_size
    folder = top
    for _ in range(depth):
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "img", "wb") as fh:
            fh.write(head)
            fh.truncate(size)
        folder = folder / "sub"


def _with_backing_name(path: Path, cluster_size: int, name: bytes) -> int:
    """Put the backing file name at the end of the first cluster; returns where the extension area ends."""
    offset = cluster_size - 16
    _put(path, offset, name)
    _u64(path, 8, offset)
    _u32(path, 16, len(name))
    return offset


def test_header_extension_bomb_in_a_deep_chain(tmp_path: Path) -> None:
    """64 layers, each with 32,000 empty header extensions: beyond 128 the image is a finding at once."""
    cs = 256 << 10
    image = im.make_qcow2(tmp_path / "ext.qcow2", 1 << 20, cluster_size=cs)
    end = _with_backing_name(image.path, cs, b"sub/img")
    header_length = struct.unpack_from(">I", image.path.read_bytes(), 100)[0]
    count = (end - header_length) // 8
    _put(image.path, header_length, b"".join(struct.pack(">II", 0x1000 + i, 0) for i in range(count)))
    _nested_links(tmp_path / "chain", image.path, 64)
    report, _ = _scan_json(tmp_path / "chain" / "img")
    assert LIMIT_EXCEEDED in _codes(report) and "header extensions" in report["error"]


def test_deep_chain_of_layers_at_the_limits_stays_bounded(tmp_path: Path) -> None:
    """64 layers, each at the per-image limits (65536 snapshots, 128 extensions): the layers below the top are
    read by their headers only, so the chain costs about what one image does."""
    cs = 65536
    image = im.make_qcow2(tmp_path / "full.qcow2", 1 << 20, cluster_size=cs)
    end = _with_backing_name(image.path, cs, b"sub/img")
    header_length = struct.unpack_from(">I", image.path.read_bytes(), 100)[0]
    extensions = b"".join(struct.pack(">II", 0x1000 + i, 0) for i in range(limits.MAX_HEADER_EXTENSIONS))
    assert header_length + len(extensions) + 8 <= end
    _put(image.path, header_length, extensions + bytes(8))
    table = 1 << 20
    _grow(image.path, table + limits.MAX_SNAPSHOTS * 40)  # all-zero entries: valid, and holes on disk
    _set_snapshot_table(image.path, table, limits.MAX_SNAPSHOTS)
    assert not image.path.read_bytes()[table:].strip(b"\0")  # the copies below keep only what comes before
    _nested_copies(tmp_path / "chain", image.path, 70, table)
    report, _ = _scan_json(tmp_path / "chain" / "img")
    assert "backing-too-deep" in _codes(report), report
    assert len(report["backing_chain"]) == limits.MAX_CHAIN_DEPTH
    assert "error" not in report


# -- LUKS keyslot iterations -------------------------------------------------------------------------------------


def _luks_with_iterations(tmp_path: Path, iterations: int, *, digest: int | None = None) -> tuple[Path, Path]:
    require_tool("qemu-img")
    image = im.make_luks_qemu(tmp_path / "slots.luks", 1 << 20, passphrase=PASSPHRASE)
    _u32(image.path, 208 + 4, iterations)  # keyslot 0 (the only active one)
    if digest is not None:
        _u32(image.path, 164, digest)
    secret = tmp_path / "pw"
    secret.write_text(PASSPHRASE)
    return image.path, secret


def _migrate_args(source: Path, secret: Path, out: Path, *extra: str) -> list[str]:
    return ["migrate", str(source), "--to", "qcow2", "-o", str(out), "--passphrase-file", str(secret), "-q", *extra]


def test_luks1_key_material_far_away_is_refused(tmp_path: Path) -> None:
    """A detached-header LUKS1 (payload offset 0) whose disabled slot 7 keeps its key material 2 TiB away in a
    sparse file: migrate --to luks copied the key-material area, all 2 TiB of it, into memory."""
    source, secret = _luks_with_iterations(tmp_path, 1000)
    _u32(source, 104, 0)  # payload offset
    _u32(source, 208 + 7 * 48 + 40, 0xFFFF0000)  # slot 7 key_material_offset (sectors)
    _grow(source, (0xFFFF0000 + 2048) * 512)
    report, _ = _scan_json(source)
    assert LIMIT_EXCEEDED in _codes(report) and "keyslot 7" in report["error"]
    out = tmp_path / "out.luks"
    outcome = qcrypt_bounded(
        "migrate",
        str(source),
        "--to",
        "luks",
        "-o",
        str(out),
        "--passphrase-file",
        str(secret),
        "--new-passphrase-file",
        str(secret),
        "-q",
    )
    outcome.assert_bounded()
    assert outcome.returncode == 3 and "key material" in outcome.stderr and not out.exists()


@pytest.mark.parametrize("iterations", [0xFFFFFFFF, 0x7FFFFFFF])
def test_keyslot_iterations_beyond_the_limits_are_a_clean_error(tmp_path: Path, iterations: int) -> None:
    source, secret = _luks_with_iterations(tmp_path, iterations)
    report, _ = _scan_json(source)
    assert report["encryption"] == "luks1"
    out = tmp_path / "out.qcow2"
    outcome = qcrypt_bounded(*_migrate_args(source, secret, out))
    outcome.assert_bounded()
    assert outcome.returncode == 3, outcome.stderr
    assert f"{iterations} PBKDF2 iterations" in outcome.stderr and "keyslot 0" in outcome.stderr
    assert not out.exists()


def test_max_pbkdf2_seconds_sets_the_keyslot_limit(tmp_path: Path) -> None:
    """A keyslot costing about 3 s: refused under --max-pbkdf2-seconds 1 (the error says how to allow it),
    unlocked under the default limit."""
    require_tool("cryptsetup")
    iterations = int(measured_rate("sha256", 64) * 3)
    source = tmp_path / "slow.luks"
    im._cryptsetup_format(
        source,
        PASSPHRASE,
        1 << 20,
        ["--type", "luks1", "--pbkdf-force-iterations", str(iterations), "--hash", "sha256"],
    )
    secret = tmp_path / "pw"
    secret.write_text(PASSPHRASE)
    out = tmp_path / "out.qcow2"
    refused = qcrypt_bounded(*_migrate_args(source, secret, out, "--max-pbkdf2-seconds", "1"))
    refused.assert_bounded()
    assert refused.returncode == 3 and "--max-pbkdf2-seconds" in refused.stderr and not out.exists()
    migrated = qcrypt_bounded(*_migrate_args(source, secret, out), wall_seconds=120)
    assert migrated.returncode == 0, migrated.stderr
    assert out.exists()


def test_master_key_digest_iterations_are_bounded(tmp_path: Path) -> None:
    source, secret = _luks_with_iterations(tmp_path, 1000, digest=0x7FFFFFFF)
    outcome = qcrypt_bounded(*_migrate_args(source, secret, tmp_path / "out.qcow2"))
    outcome.assert_bounded()
    assert outcome.returncode == 3 and "mk_digest_iter" in outcome.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_long_pbkdf2_is_interrupted_at_once(tmp_path: Path, signum: int) -> None:
    """A keyslot that costs ~15 s of PBKDF2 (allowed): Ctrl-C or SIGTERM ends migrate within a second."""
    rate = measured_rate("sha256", 64)
    source, secret = _luks_with_iterations(tmp_path, int(rate * 15))
    signalled: list[float] = []

    def interrupt(child: subprocess.Popen[bytes]) -> None:
        # numpy's BLAS threads are turned off, so a second thread is the PBKDF2 helper: the derivation is running
        # (or, where PBKDF2 runs in the main thread, signal after 5 s: start-up and the rate measurement are over)
        deadline = time.monotonic() + 5
        while len(os.listdir(f"/proc/{child.pid}/task")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        signalled.append(time.monotonic())
        os.kill(child.pid, signum)  # not Popen.send_signal: it may reap the child before wait4 can measure it

    started = time.monotonic()
    outcome = qcrypt_bounded(
        *_migrate_args(source, secret, tmp_path / "out.qcow2", "--max-pbkdf2-seconds", "600"),
        wall_seconds=90,
        while_running=interrupt,
        env={"OPENBLAS_NUM_THREADS": "1"},
    )
    assert outcome.returncode == 130, outcome.stderr
    assert "interrupted" in outcome.stderr
    stopped_after = started + outcome.wall_seconds - signalled[0]
    assert stopped_after < 1.5, f"took {stopped_after:.1f} s to stop"
