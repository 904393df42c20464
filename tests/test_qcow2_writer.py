"""qcow2 v3 writer: images checked and read back by the real qemu-img / qemu-io (and cryptsetup for LUKS)."""

from __future__ import annotations

import io
import json
import random
import re
import subprocess
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qcrypt.errors import FormatError, MigrationError
from qcrypt.images import qcow2_writer
from qcrypt.images.qcow2_writer import ACTIVE, Qcow2Writer
from tests._compare import assert_same_bytes
from tests._tools import require_tool

interop = pytest.mark.interop

PASSPHRASE = b"writer test passphrase"


# -- helpers ------------------------------------------------------------------------------------------------


def _run(argv: Sequence[str | Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False, timeout=120)


def _pattern(tag: object, length: int) -> bytes:
    return random.Random(repr(tag)).randbytes(length)


def _check_clean(qemu_img: str, *args: str | Path) -> dict[str, object]:
    result = _run([qemu_img, "check", "--output=json", *args])
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    for key in ("corruptions", "leaks", "check-errors", "corruptions-fixed", "leaks-fixed"):
        assert report.get(key, 0) == 0, report
    return report


def _assert_identical(qemu_img: str, *args: str | Path) -> None:
    result = _run([qemu_img, "compare", *args])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Images are identical" in result.stdout


@dataclass
class Plan:
    """Calls for one writer, and the guest content each table should end with."""

    virtual_size: int
    cluster_bits: int
    snapshots: dict[str, int] = field(default_factory=dict)  # name -> disk size
    calls: list[tuple[str, object, int, object]] = field(default_factory=list)  # kind, table, first, payload
    content: dict[object, bytearray] = field(default_factory=dict)  # ACTIVE or snapshot name -> bytes

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def table_content(self, table: object) -> bytearray:
        if table not in self.content:
            size = self.virtual_size if table == ACTIVE else self.snapshots[str(table)]
            self.content[table] = bytearray(size)
        return self.content[table]

    def data(
        self, table: object, first: int, clusters: Sequence[bytes], keys: Sequence[Hashable] | None = None
    ) -> None:
        payload = b"".join(clusters)
        self.calls.append(("data", table, first, (payload, keys)))
        start = first * self.cluster_size
        self.table_content(table)[start : start + len(payload)] = payload

    def zero(self, table: object, first: int, count: int) -> None:
        self.calls.append(("zero", table, first, count))
        content = self.table_content(table)
        start = first * self.cluster_size
        end = min(len(content), start + count * self.cluster_size)
        content[start:end] = bytes(end - start)


def _build(path: Path, plan: Plan, **writer_args: object) -> Qcow2Writer:
    with path.open("w+b") as fh:
        writer = Qcow2Writer(fh, virtual_size=plan.virtual_size, cluster_bits=plan.cluster_bits, **writer_args)
        table_ids: dict[object, int] = {ACTIVE: ACTIVE}
        for index, (name, disk_size) in enumerate(plan.snapshots.items()):
            table_ids[name] = writer.add_snapshot_table(
                id=str(index + 1),
                name=name,
                date_sec=1_700_000_000 + index,
                date_nsec=index,
                vm_clock_nsec=10**9 * index,
                vm_state_size=0,
                disk_size=disk_size,
            )
        for kind, table, first, payload in plan.calls:
            if kind == "data":
                data, keys = payload  # type: ignore[misc]
                writer.write_clusters(table_ids[table], first, data, share_keys=keys)
            else:
                writer.write_zero_clusters(table_ids[table], first, payload)  # type: ignore[arg-type]
        writer.finish()
    return writer


def _raw(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _snapshot_raw(qemu_img: str, image_args: Sequence[str], name: str, disk_size: int, out: Path) -> bytes:
    """A snapshot's guest content (qemu-img reads it with the active virtual size: the tail must be zeros)."""
    result = _run(
        [qemu_img, "convert", *image_args[:-1], "-l", f"snapshot.name={name}", image_args[-1], "-O", "raw", out]
    )
    assert result.returncode == 0, result.stderr
    content = out.read_bytes()
    assert not content[disk_size:].strip(b"\0")
    return content[:disk_size]


# -- plain images -------------------------------------------------------------------------------------------


@interop
@pytest.mark.parametrize("cluster_bits", [9, 12, 16, 21])
def test_plain_image_reads_back(tmp_path: Path, qemu_img: str, cluster_bits: int) -> None:
    cs = 1 << cluster_bits
    plan = Plan(virtual_size=12 * cs + (cs // 2 if cs > 512 else 0), cluster_bits=cluster_bits)
    last = -(-plan.virtual_size // cs) - 1
    plan.data(ACTIVE, 1, [_pattern(("p", g), cs) for g in (1, 2, 3)])
    plan.zero(ACTIVE, 4, 2)
    plan.data(ACTIVE, 7, [_pattern(("p", 7), cs)])
    plan.zero(ACTIVE, 9, 1)
    plan.data(ACTIVE, last, [_pattern(("p", last), plan.virtual_size - last * cs)])  # short last cluster
    out = tmp_path / "out.qcow2"
    writer = _build(out, plan)

    report = _check_clean(qemu_img, out)
    assert report["allocated-clusters"] == 5
    assert report["image-end-offset"] == out.stat().st_size  # every allocated cluster written in full
    assert writer.bytes_written == 5 * cs
    expected = _raw(tmp_path / "expected.raw", plan.content[ACTIVE])
    _assert_identical(qemu_img, "-f", "qcow2", "-F", "raw", out, expected)
    info = json.loads(_run([qemu_img, "info", "--output=json", out]).stdout)
    assert info["virtual-size"] == plan.virtual_size
    assert info["format-specific"]["data"]["compat"] == "1.1"


@interop
@pytest.mark.parametrize("backing_format", ["raw", "qcow2"])
def test_backing_file_shows_through_holes_only(tmp_path: Path, qemu_img: str, backing_format: str) -> None:
    cs = 1 << 16
    base_content = _pattern("base", 16 * cs)
    base = _raw(tmp_path / "base.raw", base_content)
    if backing_format == "qcow2":
        converted = tmp_path / "base.qcow2"
        assert _run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", base, converted]).returncode == 0
        base = converted
    plan = Plan(virtual_size=16 * cs, cluster_bits=16)
    plan.content[ACTIVE] = bytearray(base_content)
    plan.data(ACTIVE, 2, [_pattern(("o", 2), cs), _pattern(("o", 3), cs)])
    plan.zero(ACTIVE, 5, 2)
    plan.data(ACTIVE, 9, [_pattern(("o", 9), cs)])
    plan.zero(ACTIVE, 15, 1)
    out = tmp_path / "overlay.qcow2"
    _build(out, plan, backing_file=str(base), backing_format=backing_format)

    _check_clean(qemu_img, out)
    info = json.loads(_run([qemu_img, "info", "--output=json", out]).stdout)
    assert info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == backing_format
    expected = _raw(tmp_path / "expected.raw", plan.content[ACTIVE])
    _assert_identical(qemu_img, "-f", "qcow2", "-F", "raw", out, expected)


def _snapshot_plan(cluster_bits: int) -> Plan:
    """Two snapshots and the active table sharing clusters, interleaved, across several L2 tables."""
    cs = 1 << cluster_bits
    per_l2 = cs // 8
    n = min(per_l2 + 40, 150)  # crosses an L2 boundary with 512-byte clusters
    plan = Plan(
        virtual_size=(n + 20) * cs,
        cluster_bits=cluster_bits,
        snapshots={"old": (n // 2 + 8) * cs, "mid": (n + 20) * cs},
    )
    base = {g: _pattern(("base", g), cs) for g in range(n)}

    def shared(table: str | int, first: int, end: int) -> None:
        plan.data(table, first, [base[g] for g in range(first, end)], [("base", g) for g in range(first, end)])

    shared("old", 0, n // 4)
    shared(ACTIVE, n // 4, n // 2)  # with a 1-table cache this evicts old's L2 table ...
    shared("old", n // 4, n // 2)  # ... which is re-read here; these clusters now have refcount 2
    plan.data("old", n // 2, [_pattern(("old", g), cs) for g in range(n // 2, n // 2 + 4)])  # own clusters
    plan.zero("old", n // 2 + 4, 4)
    shared(ACTIVE, n // 2, n - 10)  # 512-byte clusters: moves on to the next L2 table, the first is final
    plan.data(ACTIVE, n - 10, [_pattern(("act", g), cs) for g in range(n - 10, n)])
    shared("mid", 0, n)  # raises refcounts behind final L2 tables: their COPIED flags need the last pass
    twin = _pattern("twin", cs)  # two guest clusters of one call sharing a host cluster
    plan.data("mid", n + 3, [_pattern(("mid", n + 3), cs), twin, twin], [None, "twin", "twin"])
    plan.zero(ACTIVE, n + 2, 5)
    return plan


def _distinct_clusters(plan: Plan) -> int:
    """Host data clusters the plan needs: one per cluster without a share key, one per distinct key."""
    unkeyed = 0
    keys: set[Hashable] = set()
    for kind, _, _, payload in plan.calls:
        if kind == "data":
            data, call_keys = payload  # type: ignore[misc]
            if call_keys is None:
                unkeyed += -(-len(data) // plan.cluster_size)
            else:
                unkeyed += sum(key is None for key in call_keys)
                keys.update(key for key in call_keys if key is not None)
    return unkeyed + len(keys)


@interop
@pytest.mark.parametrize(("cluster_bits", "cache_tables"), [(9, 1), (16, 64)])
def test_snapshots_share_clusters(
    tmp_path: Path,
    qemu_img: str,
    qemu_io: str,
    monkeypatch: pytest.MonkeyPatch,
    cluster_bits: int,
    cache_tables: int,
) -> None:
    monkeypatch.setattr(qcow2_writer, "L2_CACHE_TABLES", cache_tables)  # 1: evict and re-read L2 tables
    plan = _snapshot_plan(cluster_bits)
    out = tmp_path / "snap.qcow2"
    writer = _build(out, plan)
    assert writer.bytes_written == _distinct_clusters(plan) * plan.cluster_size  # shared clusters written once

    _check_clean(qemu_img, out)  # refcounts exact, COPIED flags right in the active table
    listing = _run([qemu_img, "snapshot", "-l", out]).stdout
    assert re.search(r"^1\s+old\s", listing, re.MULTILINE) and re.search(r"^2\s+mid\s", listing, re.MULTILINE)
    info = json.loads(_run([qemu_img, "info", "--output=json", out]).stdout)
    assert [(s["name"], s["date-sec"]) for s in info["snapshots"]] == [("old", 1_700_000_000), ("mid", 1_700_000_001)]
    for name in ("old", "mid"):
        got = _snapshot_raw(
            qemu_img, ["-f", "qcow2", str(out)], name, len(plan.content[name]), tmp_path / f"{name}.raw"
        )
        assert got == plan.content[name], name
    _assert_identical(qemu_img, "-f", "qcow2", "-F", "raw", out, _raw(tmp_path / "a.raw", plan.content[ACTIVE]))

    # QEMU can keep using it: a write to a shared cluster copies it, deleting a snapshot drops references.
    cs = plan.cluster_size
    shared_offset = (len(plan.content["old"]) // cs // 2 - 2) * cs
    assert _run([qemu_io, "-f", "qcow2", "-c", f"write -P 0x5c {shared_offset} {cs}", out]).returncode == 0
    assert _run([qemu_img, "snapshot", "-d", "mid", out]).returncode == 0
    _check_clean(qemu_img, out)
    assert (
        _snapshot_raw(qemu_img, ["-f", "qcow2", str(out)], "old", len(plan.content["old"]), tmp_path / "old2.raw")
        == plan.content["old"]
    )


@interop
def test_snapshot_vm_state_is_where_qemu_reads_it(tmp_path: Path, qemu_img: str, qemu_io: str) -> None:
    cs = 4096
    out = tmp_path / "vm.qcow2"
    vm_state = _pattern("vm", 3 * cs + 512)
    with out.open("w+b") as fh:
        writer = Qcow2Writer(fh, virtual_size=3 << 20, cluster_bits=12)
        snap = writer.add_snapshot_table(
            id="1", name="vm", date_sec=5, date_nsec=0, vm_clock_nsec=7, vm_state_size=len(vm_state), disk_size=2 << 20
        )
        writer.write_clusters(snap, 1, bytes([0x22]) * cs)
        first = writer.vm_state_guest_offset(snap) // cs
        writer.write_clusters(snap, first, vm_state)
        with pytest.raises(MigrationError, match="outside the disk"):
            writer.write_clusters(snap, first + 4, bytes(cs))  # past the VM state
        writer.finish()
    _check_clean(qemu_img, out)
    assert _run([qemu_img, "snapshot", "-a", "vm", out]).returncode == 0
    _check_clean(qemu_img, out)
    expected = tmp_path / "vm.expected"
    expected.write_bytes(vm_state)
    result = _run([qemu_io, "-f", "qcow2", "-c", f"read -b -v 0 {len(vm_state)}", out])
    assert result.returncode == 0
    dumped = bytes.fromhex(
        "".join(line[11:58] for line in result.stdout.splitlines() if re.match(r"^[0-9a-f]{8}:", line))
    )
    assert dumped == vm_state
    assert _run([qemu_io, "-f", "qcow2", "-c", f"read -P 0x22 {cs} {cs}", out]).returncode == 0


@interop
def test_refcount_blocks_count_themselves(tmp_path: Path, qemu_img: str) -> None:
    """Around the point where one more refcount block (256 clusters each at 512 bytes) is needed."""
    cs = 512
    for data_clusters in range(240, 257):
        out = tmp_path / f"rc{data_clusters}.qcow2"
        with out.open("w+b") as fh:
            writer = Qcow2Writer(fh, virtual_size=300 * cs, cluster_bits=9)
            writer.write_clusters(ACTIVE, 0, bytes([1]) * cs * data_clusters)
            writer.finish()
        report = _check_clean(qemu_img, out)
        assert report["image-end-offset"] == out.stat().st_size


@interop
def test_large_sparse_image_is_fast_and_small(tmp_path: Path, qemu_img: str, qemu_io: str) -> None:
    cs = 1 << 16
    size = 64 << 30
    last = size // cs - 1
    out = tmp_path / "big.qcow2"
    started = time.monotonic()
    with out.open("w+b") as fh:
        writer = Qcow2Writer(fh, virtual_size=size, cluster_bits=16)
        writer.write_clusters(ACTIVE, 0, bytes([0xA1]) * cs)
        writer.write_zero_clusters(ACTIVE, 1, 1000)
        writer.write_clusters(ACTIVE, (32 << 30) // cs, bytes([0xA2]) * 2 * cs)
        writer.write_clusters(ACTIVE, last, bytes([0xA3]) * cs)
        writer.finish()
    assert time.monotonic() - started < 2
    assert out.stat().st_size < 1 << 20
    _check_clean(qemu_img, out)
    commands = [
        "read -P 0xa1 0 64k",
        "read -P 0 64k 64k",
        f"read -P 0xa2 {32 << 30} 128k",
        f"read -P 0 {(32 << 30) + (128 << 10)} 64k",
        f"read -P 0xa3 {size - cs} 64k",
    ]
    result = _run([qemu_io, "-f", "qcow2", *(x for c in commands for x in ("-c", c)), out])
    assert result.returncode == 0 and "verification failed" not in result.stdout, result.stdout


# -- LUKS ---------------------------------------------------------------------------------------------------


@dataclass
class LuksArea:
    area: bytes
    master_key: bytes
    passphrase_file: Path


@pytest.fixture(scope="module")
def luks_area(tmp_path_factory: pytest.TempPathFactory) -> LuksArea:
    cryptsetup = require_tool("cryptsetup")
    work = tmp_path_factory.mktemp("luks")
    pw = work / "pw"
    pw.write_bytes(PASSPHRASE)
    container = work / "luks.img"
    with container.open("wb") as fh:
        fh.truncate(4 << 20)
    result = _run(
        [
            cryptsetup,
            "luksFormat",
            "--type",
            "luks1",
            "--batch-mode",
            "--pbkdf-force-iterations",
            "1000",
            "--cipher",
            "aes-xts-plain64",
            "--key-size",
            "512",
            "--key-file",
            pw,
            container,
        ]
    )
    assert result.returncode == 0, result.stderr
    header = container.read_bytes()
    payload_offset = int.from_bytes(header[104:108], "big")
    dump = _run([cryptsetup, "luksDump", "--dump-master-key", "--batch-mode", "--key-file", pw, container])
    assert dump.returncode == 0, dump.stderr
    hex_text = dump.stdout.split("MK dump:", 1)[1]
    key_hex = "".join(re.findall(r"\b[0-9a-f]{2}\b", hex_text.split("\n\n")[0]))
    master_key = bytes.fromhex(key_hex)[:64]
    assert len(master_key) == 64
    return LuksArea(header[: payload_offset * 512], master_key, pw)


def _reference_encrypt(master_key: bytes) -> Callable[[bytes, int], bytes]:
    """AES-XTS per 512-byte sector, tweak = LE64(host sector) + 8 zero bytes (docs/FORMATS.md C.2)."""

    def encrypt(plaintext: bytes, host_offset: int) -> bytes:
        first_sector = host_offset // 512
        data = bytes(plaintext)
        out = bytearray()
        for index in range(len(data) // 512):
            tweak = (first_sector + index).to_bytes(8, "little") + bytes(8)
            enc = Cipher(algorithms.AES(master_key), modes.XTS(tweak)).encryptor()
            out += enc.update(data[index * 512 : (index + 1) * 512]) + enc.finalize()
        return bytes(out)

    return encrypt


def _luks_opts(out: Path) -> list[str]:
    return [f"driver=qcow2,file.filename={out},encrypt.key-secret=s"]


@interop
def test_luks_image_interoperates(tmp_path: Path, qemu_img: str, qemu_io: str, luks_area: LuksArea) -> None:
    plan = _snapshot_plan(12)
    cs = plan.cluster_size
    plan.data(ACTIVE, plan.virtual_size // cs - 1, [_pattern("tail", cs - 512)])
    out = tmp_path / "luks.qcow2"
    _build(out, plan, luks_area=luks_area.area, encrypt=_reference_encrypt(luks_area.master_key))

    fde_offset = cs  # right after cluster 0
    raw = out.read_bytes()
    assert raw[fde_offset : fde_offset + len(luks_area.area)] == luks_area.area
    info = json.loads(_run([qemu_img, "info", "--output=json", out]).stdout)
    assert info["encrypted"] is True
    assert info["format-specific"]["data"]["encrypt"]["format"] == "luks"
    secret = ["--object", f"secret,id=s,file={luks_area.passphrase_file}"]
    _check_clean(qemu_img, *secret, "--image-opts", *_luks_opts(out))
    expected = _raw(tmp_path / "expected.raw", plan.content[ACTIVE])
    _assert_identical(qemu_img, *secret, "--image-opts", *_luks_opts(out), f"driver=raw,file.filename={expected}")
    for name in plan.snapshots:
        got = _snapshot_raw(
            qemu_img,
            [*secret, "--image-opts", *_luks_opts(out)],
            name,
            len(plan.content[name]),
            tmp_path / f"{name}.raw",
        )
        assert got == plan.content[name], name
    # QEMU keeps using it: overwrite a cluster shared with both snapshots, then check and read back.
    shared_offset = (len(plan.content["old"]) // cs // 2 - 2) * cs
    write = _run([qemu_io, *secret, "--image-opts", *_luks_opts(out), "-c", f"write -P 0x5c {shared_offset} {cs}"])
    assert write.returncode == 0, write.stderr
    _check_clean(qemu_img, *secret, "--image-opts", *_luks_opts(out))
    read = _run([qemu_io, *secret, "--image-opts", *_luks_opts(out), "-c", f"read -P 0x5c {shared_offset} {cs}"])
    assert read.returncode == 0 and "verification failed" not in read.stdout, read.stdout


@interop
def test_luks_with_production_sector_cipher_matches_reference(tmp_path: Path, luks_area: LuksArea) -> None:
    from qcrypt.crypto.sector import make_sector_cipher

    cipher = make_sector_cipher("aes", "xts-plain64", luks_area.master_key)
    plan = Plan(virtual_size=40 << 16, cluster_bits=16)
    plan.data(ACTIVE, 3, [_pattern(("c", g), 1 << 16) for g in range(3, 8)])
    plan.zero(ACTIVE, 9, 2)
    plan.data(ACTIVE, 39, [_pattern("end", 700)])
    reference, production = tmp_path / "ref.qcow2", tmp_path / "prod.qcow2"
    _build(reference, plan, luks_area=luks_area.area, encrypt=_reference_encrypt(luks_area.master_key))
    _build(production, plan, luks_area=luks_area.area, encrypt=lambda data, host: cipher.encrypt(data, host // 512))
    assert_same_bytes(production.read_bytes(), reference.read_bytes(), "production vs reference writer")


# -- argument checks (no tools needed) ----------------------------------------------------------------------


def _writer(**kwargs: object) -> Qcow2Writer:
    args: dict[str, object] = {"virtual_size": 1 << 20, "cluster_bits": 12}
    args.update(kwargs)
    return Qcow2Writer(io.BytesIO(), **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cluster_bits": 8}, "outside 9..21"),
        ({"cluster_bits": 22}, "outside 9..21"),
        ({"virtual_size": -512}, "multiple of 512"),  # 0 is allowed: qemu-img makes empty disks too
        ({"virtual_size": 1000}, "multiple of 512"),
        ({"virtual_size": 1 << 40, "cluster_bits": 9}, "L1 table above 32 MiB"),
        ({"encrypt": lambda data, host_offset: data}, "go together"),
        ({"backing_format": "raw"}, "needs a backing file"),
        ({"backing_file": "b", "backing_format": "x" * 16}, "1..15 bytes"),
        ({"backing_file": "b" * 400, "cluster_bits": 9}, "does not fit"),
        ({"luks_area": b"LUKS\xba\xbe" + bytes(586), "encrypt": lambda data, host_offset: data}, "version 0"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(MigrationError, match=message):
        _writer(**kwargs)


def test_bad_luks_area_is_refused() -> None:
    with pytest.raises(FormatError):
        _writer(luks_area=b"not a LUKS header", encrypt=lambda data, host_offset: data)


def test_bad_calls_are_refused() -> None:
    writer = _writer()
    cs = 4096
    writer.write_clusters(ACTIVE, 5, bytes(cs))
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: writer.write_clusters(ACTIVE, 5, bytes(cs)), "comes after"),
        (lambda: writer.write_zero_clusters(ACTIVE, 3, 1), "comes after"),
        (lambda: writer.write_clusters(ACTIVE, 255, bytes(2 * cs)), "outside the disk"),
        (lambda: writer.write_clusters(7, 0, bytes(cs)), "unknown table"),
        (lambda: writer.write_clusters(ACTIVE, 10, bytes(cs), share_keys=[1, 2]), "2 share keys for 1"),
        (lambda: writer.write_zero_clusters(ACTIVE, 10, -1), "negative"),
        (
            lambda: writer.add_snapshot_table(
                id="1", name="s", date_sec=-1, date_nsec=0, vm_clock_nsec=0, vm_state_size=0, disk_size=4096
            ),
            "date_sec",
        ),
        (
            lambda: writer.add_snapshot_table(
                id="1", name="s", date_sec=0, date_nsec=0, vm_clock_nsec=0, vm_state_size=0, disk_size=0
            ),
            "positive multiple",
        ),
    ]
    for call, message in cases:
        with pytest.raises(MigrationError, match=message):
            call()
    writer.finish()
    with pytest.raises(MigrationError, match="already finished"):
        writer.write_zero_clusters(ACTIVE, 100, 1)


def test_snapshot_extra_keeps_source_bytes_and_fixes_disk_size() -> None:
    fh = io.BytesIO()
    writer = Qcow2Writer(fh, virtual_size=1 << 20, cluster_bits=12)
    source_extra = (7).to_bytes(8, "big") + (999).to_bytes(8, "big") + (42).to_bytes(8, "big") + b"future!!"
    writer.add_snapshot_table(
        id="1",
        name="keep",
        date_sec=1,
        date_nsec=2,
        vm_clock_nsec=3,
        vm_state_size=7,
        disk_size=1 << 20,
        extra=source_extra,
    )
    writer.add_snapshot_table(
        id="2",
        name="short",
        date_sec=1,
        date_nsec=2,
        vm_clock_nsec=3,
        vm_state_size=0,
        disk_size=1 << 19,
        extra=(5).to_bytes(8, "big"),
    )
    writer.finish()
    image = fh.getvalue()
    table = int.from_bytes(image[64:72], "big")
    first_extra = image[table + 40 : table + 40 + len(source_extra)]
    assert first_extra == source_extra[:8] + (1 << 20).to_bytes(8, "big") + source_extra[16:]
    second = table + (40 + len(source_extra) + 1 + 4 + 7) // 8 * 8
    assert int.from_bytes(image[table + 32 : table + 36], "big") == 7  # vm_state_size
    assert int.from_bytes(image[second + 36 : second + 40], "big") == 24  # extra_data_size
    assert image[second + 40 : second + 64] == (5).to_bytes(8, "big") + (1 << 19).to_bytes(8, "big") + b"\xff" * 8


def test_deferred_luks_area_must_be_set(tmp_path: Path) -> None:
    """migrate reserves the LUKS header area and sets it once the keyslot PBKDF2 (run meanwhile) is done."""
    from qcrypt.errors import FormatError, MigrationError
    from qcrypt.images.qcow2_writer import Qcow2Writer

    with open(tmp_path / "out.qcow2", "w+b") as fh:
        writer = Qcow2Writer(
            fh, virtual_size=1 << 20, luks_area_size=4096 * 512, encrypt=lambda data, host_offset: data
        )
        with pytest.raises(MigrationError, match="never set"):
            writer.finish()
        with pytest.raises(FormatError, match="magic"):
            writer.set_luks_area(bytes(4096 * 512))  # not a LUKS header


def test_a_cluster_shared_more_than_65535_times_is_refused() -> None:
    """16-bit refcounts: the 65536th reference to one cluster must be an error, not a wrapped count."""
    count = 65536
    writer = Qcow2Writer(io.BytesIO(), virtual_size=count * 512, cluster_bits=9)
    writer.write_clusters(ACTIVE, 0, bytes(512 * (count - 1)), share_keys=["same"] * (count - 1))
    with pytest.raises(MigrationError, match="more than 65535"):
        writer.write_clusters(ACTIVE, count - 1, bytes(512), share_keys=["same"])


@interop
def test_reserve_shareable_hands_out_new_runs_only(tmp_path: Path, qemu_img: str) -> None:
    """Runs of new keys are reserved for the caller to write (migrate's workers); a run with a key seen
    before, or repeated, is refused untouched and then goes through write_clusters, which shares it."""
    import os

    cs = 65536
    size = 8 * cs
    a, b, c = _pattern("a", cs), _pattern("b", cs), _pattern("c", cs)
    out = tmp_path / "shareable.qcow2"
    with out.open("w+b") as fh:
        writer = Qcow2Writer(fh, virtual_size=size)
        snap = writer.add_snapshot_table(
            id="1", name="old", date_sec=1, date_nsec=0, vm_clock_nsec=0, vm_state_size=0, disk_size=size
        )
        host_offset = writer.reserve_shareable(ACTIVE, 0, ["ka", "kb"])
        assert host_offset is not None
        os.pwrite(fh.fileno(), a + b, host_offset)  # the caller writes the reserved clusters
        assert writer.reserve_shareable(snap, 0, ["ka", "kc"]) is None  # ka was seen
        assert writer.reserve_shareable(snap, 0, ["kc", "kc"]) is None  # kc twice in one run
        writer.write_clusters(snap, 0, a + c, share_keys=["ka", "kc"])  # ka shared, kc written
        writer.finish()
        assert writer.bytes_written == 3 * cs
    _check_clean(qemu_img, out)
    _assert_identical(qemu_img, "-f", "qcow2", "-F", "raw", out, _raw(tmp_path / "a.raw", a + b + bytes(size - 2 * cs)))
    assert _snapshot_raw(qemu_img, ["-f", "qcow2", str(out)], "old", size, tmp_path / "old.raw") == (
        a + c + bytes(size - 2 * cs)
    )
