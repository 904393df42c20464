"""Corrupt input never gives a traceback or a hang: truncations and seeded header mutations.

Every image made by the real tools is mutated (bytes of the header, first tables and LUKS header flipped,
fields set to extreme values) and fed to ``inspect``, ``describe`` and ``open_image``. The only acceptable
failures are QcryptError subclasses (and, for unreadable files, OSError).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import qcrypt
from tests import _audit as scan
from tests import _bounded
from tests import _images as im
from tests._tools import require_tool

SEED = 20261124
MUTATIONS_PER_IMAGE = 60
FUZZ_SEED = 20261205
FUZZ_CASES_PER_BASE = 30
FUZZ_CPU_SECONDS = 2.0  # scan + info of one file, this process's own CPU time (no interpreter start-up)
FUZZ_MIGRATE_SECONDS = 15.0
FUZZ_RSS_MIB = 256
FUZZ_WALL_SECONDS = 200  # about 20 s here; far more only when cases hang (then the guards stop the child)
PASSPHRASE = "robustness test"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, str | None]]:
    require_tool("qemu-img")
    base = tmp_path_factory.mktemp("robust")
    made = []
    plain = im.make_qcow2(base / "plain.qcow2", 4 << 20, cluster_size=4096)
    im.write_pattern(plain, 8192, 8192, 0x5A)
    im.snapshot(plain, "snap1")
    made.append((plain.path, None))
    legacy = im.make_qcow2(base / "legacy.qcow2", 4 << 20, encrypt="aes", passphrase=PASSPHRASE)
    im.write_pattern(legacy, 65536 + 512, 4096, 0x11)
    made.append((legacy.path, PASSPHRASE))
    ext = im.make_qcow2(base / "ext.qcow2", 4 << 20, extended_l2=True)
    im.write_pattern(ext, 70000, 3000, 0x22)
    made.append((ext.path, None))
    v1 = im.make_qcow1(base / "v1.qcow", 4 << 20, passphrase=PASSPHRASE)
    im.write_pattern(v1, 4096, 4096, 0x33)
    made.append((v1.path, PASSPHRASE))
    luks = im.make_qcow2(base / "luks.qcow2", 1 << 20, encrypt="luks", passphrase=PASSPHRASE)
    made.append((luks.path, PASSPHRASE))
    return made


@pytest.fixture(autouse=True)
def _no_hang() -> Iterator[None]:
    def timeout(signum: int, frame: object) -> None:
        raise TimeoutError("hang: a corrupt image took more than 60 s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _exercise(path: Path, passphrase: str | None) -> None:
    report = qcrypt.inspect(path)
    assert report["severity"] in scan.SEVERITIES
    assert report["format"] in ("qcow2", "qcow", "luks", "raw")
    if "error" in report:
        assert any(f["code"] in ("unparseable", "limit-exceeded") for f in report["findings"])
        assert "internal error" not in report["error"]  # a parser bug hidden by scan's safety net
    try:
        scan.describe(path)
        with qcrypt.open_image(path, passphrase) as stream:
            stream.read(2 << 20)
    except qcrypt.QcryptError as e:
        assert str(e)
        assert passphrase is None or passphrase not in str(e)


def _mutate(data: bytearray, rng: random.Random) -> None:
    region = min(len(data), rng.choice([112, 512, 4096, 65536, 8 << 20]))
    for _ in range(rng.randint(1, 4)):
        offset = rng.randrange(region)
        style = rng.random()
        if style < 0.5:
            data[offset] ^= 1 << rng.randrange(8)
        elif style < 0.8:
            data[offset] = rng.choice([0x00, 0xFF, 0x80, 0x7F])
        else:
            width = rng.choice([4, 8])
            value = rng.choice([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1, rng.getrandbits(width * 8)])
            data[offset : offset + width] = (value % (1 << (8 * width))).to_bytes(width, "big")


@pytest.mark.interop
def test_mutated_headers_never_traceback(images: list[tuple[Path, str | None]], tmp_path: Path) -> None:
    rng = random.Random(SEED)
    for original, passphrase in images:
        pristine = original.read_bytes()
        target = tmp_path / original.name
        for _ in range(MUTATIONS_PER_IMAGE):
            data = bytearray(pristine)
            _mutate(data, rng)
            target.write_bytes(data)
            _exercise(target, passphrase)


@pytest.mark.interop
@pytest.mark.parametrize("cut", [0, 3, 8, 40, 71, 100, 111, 4095, 65536, 200000])
def test_truncated_images_never_traceback(images: list[tuple[Path, str | None]], tmp_path: Path, cut: int) -> None:
    for original, passphrase in images:
        target = tmp_path / original.name
        shutil.copyfile(original, target)
        with open(target, "r+b") as fh:
            fh.truncate(min(cut, original.stat().st_size))
        _exercise(target, passphrase)


@pytest.mark.interop
def test_backing_loop_is_caught(tmp_path: Path) -> None:
    require_tool("qemu-img")
    a = im.make_qcow2(tmp_path / "a.qcow2", 1 << 20)
    b = im.make_qcow2(tmp_path / "b.qcow2", 1 << 20, backing=a)
    # point a at b: qemu-img refuses to create a loop, so rewrite a's header by hand
    name = b"b.qcow2"
    with open(a.path, "r+b") as fh:
        fh.seek(8)
        fh.write((4096 - 64).to_bytes(8, "big") + len(name).to_bytes(4, "big"))
        fh.seek(4096 - 64)
        fh.write(name)
    report = qcrypt.inspect(b.path)
    assert "backing-loop" in [f["code"] for f in report["findings"]]
    with pytest.raises(qcrypt.FormatError, match="loops"):
        qcrypt.open_image(b.path)


@pytest.mark.interop
def test_fifo_backing_file_does_not_hang(tmp_path: Path) -> None:
    """A FIFO where an image should be (a backing file, or given directly) must not block a scan."""
    require_tool("qemu-img")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    overlay = tmp_path / "ov.qcow2"
    subprocess.run(
        [
            require_tool("qemu-img"),
            "create",
            "-q",
            "-u",
            "-f",
            "qcow2",
            "-b",
            str(fifo),
            "-F",
            "raw",
            str(overlay),
            "1M",
        ],
        check=True,
        timeout=120,
    )
    report = qcrypt.inspect(overlay)  # the autouse alarm fails the test if this blocks
    assert report["backing_chain"] == []  # never opened for reading: refused, and said so
    assert "backing-special-file" in [f["code"] for f in report["findings"]]
    assert qcrypt.inspect(fifo)["format"] == "special"
    with pytest.raises(qcrypt.QcryptError, match="a FIFO: never read"):
        qcrypt.open_image(overlay)


@pytest.fixture(scope="module")
def fuzz_bases(
    images: list[tuple[Path, str | None]], tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, str | None]]:
    require_tool("cryptsetup")
    base = tmp_path_factory.mktemp("fuzz")
    kinds = {
        "plain.qcow2": "qcow2",
        "legacy.qcow2": "qcow2",
        "ext.qcow2": "qcow2",
        "v1.qcow": "qcow",
        "luks.qcow2": "qcow2-luks",
    }
    bases = [{"path": str(path), "kind": kinds[path.name], "passphrase": passphrase} for path, passphrase in images]
    luks1 = im.make_luks_qemu(base / "raw.luks", 1 << 20, passphrase=PASSPHRASE)
    luks2 = im.make_luks2(base / "raw.luks2", 1 << 20, passphrase=PASSPHRASE)
    bases += [
        {"path": str(luks1.path), "kind": "luks1", "passphrase": PASSPHRASE},
        {"path": str(luks2.path), "kind": "luks2", "passphrase": PASSPHRASE},
    ]
    return bases


@pytest.mark.interop
def test_fuzzed_header_quantities_stay_within_the_limits(
    fuzz_bases: list[dict[str, str | None]], tmp_path: Path
) -> None:
    """Seeded field-aware mutations of qcow2, qcow, LUKS1 and LUKS2 headers (counts, sizes, offsets, iterations,
    LUKS2 metadata; files grown sparse-huge so that big offsets fit): scan and info of each case stay within
    2 s of CPU and 256 MiB, end with a report (a finding when something is wrong) or a clean error, and migrate
    (where cheap) ends with a clean error or a verified output."""
    signal.alarm(FUZZ_WALL_SECONDS + 30)  # the whole run, not one image: the child has its own guards too
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {"seed": FUZZ_SEED, "bases": fuzz_bases, "cases_per_base": FUZZ_CASES_PER_BASE, "work": str(tmp_path)}
        )
    )
    outcome = _bounded.run_bounded(
        ["-m", "tests._fuzz", str(spec)], wall_seconds=FUZZ_WALL_SECONDS, cpu_guard_seconds=FUZZ_WALL_SECONDS
    )
    assert outcome.returncode == 0, outcome.stderr[-3000:]
    cases = [json.loads(line) for line in outcome.stdout.splitlines()]
    assert len(cases) == FUZZ_CASES_PER_BASE * len(fuzz_bases)
    findings_seen: set[str] = set()
    for case in cases:
        name = f"{case['base']} case {case['case']}"
        assert case["inspect_cpu"] <= FUZZ_CPU_SECONDS, f"{name}: {case['inspect_cpu']:.2f} s"
        assert case["inspect_rss_mib"] <= FUZZ_RSS_MIB, f"{name}: {case['inspect_rss_mib']:.0f} MiB"
        if case["scan_error"]:
            assert "internal error" not in case["scan_error"], name
            assert {"unparseable", "limit-exceeded", "unreadable"} & set(case["scan_codes"]), name
        findings_seen.update(case["scan_codes"])
        for command in ("info", "migrate"):
            assert not case.get(command, "").startswith("CRASH"), f"{name}: {command}: {case[command]}"
        if "migrate" in case:
            assert case["migrate_wall"] <= FUZZ_MIGRATE_SECONDS, f"{name}: migrate took {case['migrate_wall']:.1f} s"
    assert "limit-exceeded" in findings_seen and "unparseable" in findings_seen  # the mutations reach both
    assert any("migrate" in case for case in cases)
