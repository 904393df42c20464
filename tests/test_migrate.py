"""qcrypt migrate end to end, judged by the real tools (qemu-img compare/check, cryptsetup).

Every output is checked by a peer, never only by qcrypt's own reader.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import _images as im
from tests._cli import TOOL_TIMEOUT, cryptsetup, qcrypt, qemu_check, qemu_compare, secret_file

PASSPHRASE = "correct horse battery staple, longer than 16 bytes"
SIZE = 8 << 20
FAST = ["--pbkdf-force-iterations", "1000"]


@pytest.fixture
def legacy(tmp_path: Path, qemu_img: str) -> tuple[Path, Path]:
    """A legacy AES qcow2 with data at odd offsets, compressed and zero clusters; and its passphrase file."""
    image = im.make_qcow2(tmp_path / "legacy.qcow2", SIZE, encrypt="aes", passphrase=PASSPHRASE)
    im.fill_image(image, SIZE, 65536)
    return image.path, secret_file(tmp_path, "pw", PASSPHRASE)


@pytest.mark.interop
def test_to_raw_luks(legacy: tuple[Path, Path], tmp_path: Path) -> None:
    source, pw = legacy
    before = im.file_sha256(source), source.stat().st_mtime_ns
    out = tmp_path / "out.luks"
    result = qcrypt("migrate", str(source), "--to", "luks", "-o", str(out), "--passphrase-file", str(pw), *FAST)
    assert (im.file_sha256(source), source.stat().st_mtime_ns) == before  # the source is never modified
    stdout = result.stdout.decode()
    assert "verified" in stdout and "<encryption format='luks'>" in stdout and "--image-opts driver=luks" in stdout
    assert PASSPHRASE not in stdout + result.stderr.decode()
    qemu_compare((out, "luks", True), (source, "qcow2", True), pw)
    dump = cryptsetup("luksDump", str(out)).stdout
    assert "Version:       \t1" in dump and "xts-plain64" in dump and "Payload offset:\t4096" in dump
    assert cryptsetup("open", "--test-passphrase", "--key-file", str(pw), str(out)).returncode == 0
    assert cryptsetup("open", "--test-passphrase", "--key-file", str(source), str(out)).returncode == 2
    copy = tmp_path / "copy.luks"
    copy.write_bytes(out.read_bytes())
    assert cryptsetup("convert", "--type", "luks2", "--batch-mode", str(copy)).returncode == 0
    assert (out.stat().st_size - 4096 * 512) == SIZE  # every payload sector written, nothing more


@pytest.mark.interop
def test_to_qcow2_luks_keeps_sparseness(legacy: tuple[Path, Path], tmp_path: Path) -> None:
    source, pw = legacy
    out = tmp_path / "out.qcow2"
    qcrypt("migrate", str(source), "--to", "qcow2-luks", "-o", str(out), "--passphrase-file", str(pw), *FAST)
    qemu_check(out, pw)
    qemu_compare((out, "qcow2", True), (source, "qcow2", True), pw)
    info = im.qemu_img_info(out)
    assert info["format-specific"]["data"]["encrypt"]["format"] == "luks"
    assert info["cluster-size"] == 65536
    assert out.stat().st_size < 4 << 20  # allocated data only, not the 8 MiB virtual size


@pytest.mark.interop
@pytest.mark.parametrize("target,fmt", [("qcow2", "qcow2"), ("raw", "raw")])
def test_plaintext_exports(legacy: tuple[Path, Path], tmp_path: Path, target: str, fmt: str) -> None:
    source, pw = legacy
    out = tmp_path / f"out.{target}"
    stdout = qcrypt("migrate", str(source), "--to", target, "-o", str(out), "--passphrase-file", str(pw)).stdout
    assert b"NOT encrypted" in stdout
    if target == "qcow2":
        qemu_check(out, None)
    qemu_compare((out, fmt, False), (source, "qcow2", True), pw)


@pytest.mark.interop
@pytest.mark.parametrize(
    "cipher,bits,hash_name,weak",
    [
        ("aes-cbc-essiv:sha256", "256", "sha512", False),
        ("aes-cbc-plain64", "128", "sha1", True),
        ("aes-xts-plain64", "256", "sha256", True),
    ],
)
def test_cipher_options(
    legacy: tuple[Path, Path], tmp_path: Path, cipher: str, bits: str, hash_name: str, weak: bool
) -> None:
    source, pw = legacy
    new_pw = secret_file(tmp_path, "new", "a brand new passphrase", newline=True)
    out = tmp_path / "out.luks"
    qcrypt(
        "migrate",
        str(source),
        "--to",
        "luks",
        "-o",
        str(out),
        "--passphrase-file",
        str(pw),
        "--new-passphrase-file",
        str(new_pw),
        "--cipher",
        cipher,
        "--key-size",
        bits,
        "--hash",
        hash_name,
        *FAST,
        *(["--allow-weak"] if weak else []),
    )
    dump = cryptsetup("luksDump", str(out)).stdout
    cipher_name, mode = cipher.split("-", 1)
    assert f"Cipher name:   \t{cipher_name}" in dump
    assert f"Cipher mode:   \t{mode}" in dump and f"Hash spec:     \t{hash_name}" in dump
    assert f"MK bits:       \t{bits}" in dump
    # the keyslot holds every byte of the file, its newline included, as cryptsetup --key-file reads it
    assert cryptsetup("open", "--test-passphrase", "--key-file", str(new_pw), str(out)).returncode == 0
    # QEMU decrypts our output (the payload IVs count from the payload start) and compares it with the source
    qemu_compare((out, "luks", True), (source, "qcow2", True), pw, pw_a=new_pw)


def _migrate_with_fault(fault: str, source: Path, target: str, out: Path, pw: Path) -> subprocess.CompletedProcess[str]:
    """``qcrypt migrate`` with FAULT injected by the test seam tests/_faulty_migrate.py."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "tests._faulty_migrate", fault),
            *("migrate", str(source), "--to", target, "-o", str(out), "--passphrase-file", str(pw), *FAST),
        ],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        cwd=Path(__file__).parent.parent,
    )


@pytest.mark.interop
@pytest.mark.parametrize(
    "target, fault",
    [("luks", "0"), ("luks", "late:0"), ("qcow2-luks", "0"), ("qcow2-luks", "late:0"), ("qcow2", "0"), ("raw", "0")],
)
def test_fault_between_writing_and_verification_is_caught(
    legacy: tuple[Path, Path], tmp_path: Path, target: str, fault: str
) -> None:
    """One byte of the temporary output flipped after writing: verification must refuse to commit it. LUKS
    outputs are read back run by run while they are written: "0" flips the byte before its run is read back,
    "late:0" after that, where only the end-to-end sample read after writing (which always includes the first
    run) can see it."""
    source, pw = legacy
    out = tmp_path / f"out.{target}"
    result = _migrate_with_fault(fault, source, target, out, pw)
    assert "fault injected at" in result.stderr, result.stderr  # verification started on the temp file
    assert result.returncode == 7, result.stderr
    assert "differ from the source" in result.stderr and "verified" not in result.stdout
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["legacy.qcow2", "pw"]  # no temp file left


@pytest.mark.interop
@pytest.mark.parametrize("fault", ["snapshot", "snapshot-mapping", "drop-snapshot", "short-verify"])
def test_faults_in_snapshots_and_coverage_are_caught(tmp_path: Path, qemu_img: str, fault: str) -> None:
    """A byte of a snapshot-only cluster flipped, a snapshot's cluster shared with the active table re-pointed
    elsewhere, a snapshot dropped, or a read-back reporting one sector less than was written: each must stop the
    commit (exit 7, nothing under the output name)."""
    name = "aes-qcow2-v3-snapshots-c4k.qcow2"
    source = im.fixture_path(name, tmp_path)
    pw = secret_file(tmp_path, "pw", im.manifest()["fixtures"][name]["passphrase"])
    out = tmp_path / "out.qcow2"
    result = _migrate_with_fault(fault, source, "qcow2-luks", out, pw)
    assert "fault injected at" in result.stderr, result.stderr
    assert result.returncode == 7, result.stderr
    expected = {
        "snapshot": "differ from the source",
        "snapshot-mapping": "do not point at data read back from the same source clusters",
        "drop-snapshot": "snapshot count differs from the source",
        "short-verify": "were read back",
    }[fault]
    assert expected in result.stderr, result.stderr  # the check meant for this fault caught it
    assert "verified" not in result.stdout and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name, "pw"]


@pytest.mark.interop
def test_iter_time_is_what_cryptsetup_measures(legacy: tuple[Path, Path], tmp_path: Path) -> None:
    """--iter-time 2000: the keyslot's iterations match cryptsetup's own PBKDF2 benchmark for 2 s, and
    cryptsetup takes about 2 s to unlock it (wide bands: the machine is shared)."""
    source, pw = legacy
    out = tmp_path / "out.luks"
    qcrypt(
        "migrate",
        str(source),
        "--to",
        "luks",
        "-o",
        str(out),
        "--passphrase-file",
        str(pw),
        "--iter-time",
        "2000",
        "--hash",
        "sha256",
        "-q",
    )
    iterations = im.luks_dump(out)["keyslots"][0]["iterations"]
    bench = cryptsetup("benchmark", "--pbkdf", "pbkdf2", "--hash", "sha256", "--key-size", "512")
    assert bench.returncode == 0, bench.stderr
    rate = int(bench.stdout.split("PBKDF2-sha256")[1].split("iterations per second")[0].strip())
    assert rate * 2 / 3 <= iterations <= rate * 2 * 3, (iterations, rate)
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    assert cryptsetup("open", "--test-passphrase", "--key-file", str(pw), str(out)).returncode == 0
    wall_s = time.monotonic() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    # CPU time is what --iter-time calibrates (wall time also counts the other jobs on this shared machine)
    assert 0.8 <= cpu_s <= 6.0 and wall_s >= 0.8, (cpu_s, wall_s)


@pytest.mark.interop
def test_wrong_passphrase_refused_and_nothing_created(legacy: tuple[Path, Path], tmp_path: Path) -> None:
    source, _ = legacy
    wrong = secret_file(tmp_path, "wrong", "not the passphrase")
    out = tmp_path / "out.luks"
    result = qcrypt(
        "migrate", str(source), "--to", "luks", "-o", str(out), "--passphrase-file", str(wrong), check=False
    )
    assert result.returncode == 4
    assert b"probably wrong" in result.stderr and len(result.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["legacy.qcow2", "pw", "wrong"]
    forced = qcrypt(
        "migrate", str(source), "--to", "raw", "-o", str(out), "--passphrase-file", str(wrong), "--force", check=False
    )
    assert forced.returncode == 0, forced.stderr
    qemu_compare((out, "raw", False), (source, "qcow2", True), wrong)  # QEMU's garbage with the same wrong key


@pytest.mark.interop
def test_random_plaintext_needs_force(tmp_path: Path, qemu_img: str) -> None:
    image = im.make_qcow2(tmp_path / "rnd.qcow2", 1 << 20, encrypt="aes", passphrase=PASSPHRASE)
    im.write_data(image, 0, os.urandom(1 << 20))
    pw = secret_file(tmp_path, "pw", PASSPHRASE)
    refused = qcrypt(
        "migrate", str(image.path), "--to", "raw", "-o", str(tmp_path / "o"), "--passphrase-file", str(pw), check=False
    )
    assert refused.returncode == 4 and b"--force" in refused.stderr
    qcrypt(
        "migrate", str(image.path), "--to", "raw", "-o", str(tmp_path / "o"), "--passphrase-file", str(pw), "--force"
    )
    qemu_compare((tmp_path / "o", "raw", False), (image.path, "qcow2", True), pw)


@pytest.mark.interop
def test_passphrase_from_stdin(legacy: tuple[Path, Path], tmp_path: Path) -> None:
    source, pw = legacy
    out = tmp_path / "out.raw"
    qcrypt(
        "migrate",
        str(source),
        "--to",
        "raw",
        "-o",
        str(out),
        "--passphrase-file",
        "-",
        stdin=PASSPHRASE.encode() + b"\n",
    )
    qemu_compare((out, "raw", False), (source, "qcow2", True), pw)
    missing = qcrypt("migrate", str(source), "--to", "raw", "-o", str(tmp_path / "x"), check=False, stdin=b"")
    assert missing.returncode == 2 and b"--passphrase-file" in missing.stderr


@pytest.mark.interop
def test_snapshots_are_kept(tmp_path: Path, qemu_img: str) -> None:
    name = "aes-qcow2-v3-snapshots-c4k.qcow2"
    entry = im.manifest()["fixtures"][name]
    source = im.fixture_path(name, tmp_path)
    pw = secret_file(tmp_path, "pw", entry["passphrase"])
    out = tmp_path / "out.qcow2"
    stdout = qcrypt(
        "migrate", str(source), "--to", "qcow2-luks", "-o", str(out), "--passphrase-file", str(pw), *FAST
    ).stdout
    assert b"snap-1, snap-2" in stdout
    qemu_check(out, pw)
    migrated = im.Image(out, "qcow2", entry["passphrase"])
    assert im.plaintext_sha256(migrated) == entry["plaintext_sha256"]
    for snap, digest in entry["snapshot_sha256"].items():
        assert im.plaintext_sha256(migrated, snapshot_name=snap) == digest
    listing = subprocess.run(
        [qemu_img, "info", "--output=json", str(out)], capture_output=True, text=True, timeout=TOOL_TIMEOUT
    ).stdout
    assert [s["name"] for s in json.loads(listing)["snapshots"]] == ["snap-1", "snap-2"]


@pytest.mark.interop
def test_backing_chains(tmp_path: Path, qemu_img: str) -> None:
    fixtures = im.manifest()["fixtures"]
    pw = secret_file(tmp_path, "pw", fixtures["chain-aes-base-c4k.qcow2"]["passphrase"])
    over_aes = im.fixture_path("chain-plain-over-aes.qcow2", tmp_path)
    refused = qcrypt(
        "migrate",
        str(over_aes),
        "--to",
        "qcow2-luks",
        "-o",
        str(tmp_path / "o.qcow2"),
        "--passphrase-file",
        str(pw),
        check=False,
    )
    assert refused.returncode == 8 and b"--flatten" in refused.stderr
    assert not (tmp_path / "o.qcow2").exists()
    flat = tmp_path / "flat.qcow2"
    qcrypt(
        "migrate",
        str(over_aes),
        "--to",
        "qcow2-luks",
        "-o",
        str(flat),
        "--passphrase-file",
        str(pw),
        "--flatten",
        *FAST,
    )
    assert "backing-filename" not in im.qemu_img_info(flat)
    qemu_check(flat, pw)
    qemu_compare((flat, "qcow2", True), (over_aes, "qcow2", "backing"), pw)
    # a legacy overlay over a plain base keeps its backing reference
    over_plain = im.fixture_path("chain-aes-over-plain-c4k.qcow2", tmp_path)
    pw2 = secret_file(tmp_path, "pw2", fixtures["chain-aes-over-plain-c4k.qcow2"]["passphrase"])
    kept = tmp_path / "kept.qcow2"
    qcrypt("migrate", str(over_plain), "--to", "qcow2-luks", "-o", str(kept), "--passphrase-file", str(pw2), *FAST)
    assert im.qemu_img_info(kept)["backing-filename"] == fixtures["chain-aes-over-plain-c4k.qcow2"]["backing_file"]
    qemu_compare((kept, "qcow2", True), (over_plain, "qcow2", True), pw2)


@pytest.mark.interop
@pytest.mark.parametrize(
    "name,target",
    [
        ("luks-qcow2-v3-c64k.qcow2", "luks"),
        ("luks1-cs-aes-cbc-essiv-sha256-256-sha256.luks", "qcow2-luks"),
        ("luks1-qemu-aes-xts-plain64-512.luks", "qcow2-luks"),
    ],
)
def test_luks_to_luks_keeps_master_key_and_keyslots(tmp_path: Path, qemu_img: str, name: str, target: str) -> None:
    entry = im.manifest()["fixtures"][name]
    source = im.fixture_path(name, tmp_path)
    pw = secret_file(tmp_path, "pw", entry["passphrase"])
    out = tmp_path / ("out.luks" if target == "luks" else "out.qcow2")
    stdout = qcrypt("migrate", str(source), "--to", target, "-o", str(out), "--passphrase-file", str(pw)).stdout
    assert b"carried over" in stdout
    src_fmt = "luks" if name.endswith(".luks") else "qcow2"
    out_fmt = "luks" if target == "luks" else "qcow2"
    qemu_compare((out, out_fmt, True), (source, src_fmt, True), pw)
    # cryptsetup's view of both headers: the same master key, UUID, digest and keyslots (salt, iterations, AF)
    assert im.luks_master_key(out, entry["passphrase"]) == im.luks_master_key(source, entry["passphrase"])
    assert len(im.luks_master_key(out, entry["passphrase"])) * 8 == entry["luks"]["key_bits"]
    assert _header_and_slots(im.luks_dump_text(out)) == _header_and_slots(im.luks_dump_text(source))
    assert f"UUID:          \t{entry['luks']['uuid']}" in im.luks_dump_text(out)
    if target == "luks":
        assert cryptsetup("open", "--test-passphrase", "--key-file", str(pw), str(out)).returncode == 0
    else:
        qemu_check(out, pw)


def _header_and_slots(dump: str) -> list[str]:
    """luksDump lines that a carried-over header keeps (everything but the file name and payload offset)."""
    return [
        line
        for line in dump.splitlines()
        if line.strip() and not line.startswith(("LUKS header information", "Payload offset"))
    ]


@pytest.mark.interop
def test_output_exists_force_and_permissions(legacy: tuple[Path, Path], tmp_path: Path) -> None:
    source, pw = legacy
    os.chmod(source, 0o640)
    out = tmp_path / "out.raw"
    out.write_bytes(b"precious")
    refused = qcrypt("migrate", str(source), "--to", "raw", "-o", str(out), "--passphrase-file", str(pw), check=False)
    assert refused.returncode == 6 and out.read_bytes() == b"precious"
    qcrypt("migrate", str(source), "--to", "raw", "-o", str(out), "--passphrase-file", str(pw), "--force")
    assert out.stat().st_mode & 0o777 == 0o600  # a decrypted copy of an encrypted image: owner only
    qemu_compare((out, "raw", False), (source, "qcow2", True), pw)
    luks_out = tmp_path / "out.luks"
    qcrypt("migrate", str(source), "--to", "luks", "-o", str(luks_out), "--passphrase-file", str(pw), *FAST)
    assert luks_out.stat().st_mode & 0o777 == 0o640  # still encrypted: the source's bits
    qemu_compare((luks_out, "luks", True), (source, "qcow2", True), pw)
    assert not [p for p in tmp_path.iterdir() if ".qcrypt-" in p.name]


@pytest.mark.interop
def test_replace_keeps_original(legacy: tuple[Path, Path], tmp_path: Path) -> None:
    source, pw = legacy
    before = source.read_bytes()
    stdout = qcrypt(
        "migrate", str(source), "--to", "qcow2-luks", "--replace", "--passphrase-file", str(pw), *FAST
    ).stdout
    kept = Path(str(source) + ".qcrypt-orig")
    assert kept.read_bytes() == before and b"shred -u" in stdout
    assert im.qemu_img_info(source)["format-specific"]["data"]["encrypt"]["format"] == "luks"
    qemu_compare((source, "qcow2", True), (kept, "qcow2", True), pw)


@pytest.mark.interop
def test_source_in_use_is_refused(legacy: tuple[Path, Path], tmp_path: Path, qemu_io: str) -> None:
    source, pw = legacy
    holder = subprocess.Popen(
        [
            qemu_io,
            "--object",
            f"secret,id=s,file={pw}",
            "--image-opts",
            f"driver=qcow2,file.filename={source},encrypt.key-secret=s",
            "-c",
            "sleep 20000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while "OFDLCK" not in Path("/proc/locks").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        result = qcrypt(
            "migrate", str(source), "--to", "raw", "-o", str(tmp_path / "o"), "--passphrase-file", str(pw), check=False
        )
        assert result.returncode == 5 and b"QEMU" in result.stderr
    finally:
        holder.kill()
        holder.wait(timeout=120)


def _start_and_kill(args: list[str], tmp_path: Path, sig: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "qcrypt", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")] and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    return proc


@pytest.fixture
def big_legacy(tmp_path: Path, qemu_img: str) -> tuple[Path, Path]:
    """64 MiB of guest data: long enough to be interrupted while writing."""
    raw = tmp_path / "data.raw"
    with open(raw, "wb") as fh:
        for i in range(64):
            fh.write(bytes([i]) * (1 << 20))
    pw = secret_file(tmp_path, "pw", PASSPHRASE)
    source = tmp_path / "big.qcow2"
    subprocess.run(
        [
            qemu_img,
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "--object",
            f"secret,id=s,file={pw}",
            "-o",
            "encrypt.format=aes,encrypt.key-secret=s",
            str(raw),
            str(source),
        ],
        check=True,
        timeout=TOOL_TIMEOUT,
    )
    raw.unlink()
    return source, pw


@pytest.mark.interop
def test_sigkill_leaves_no_output_and_rerun_cleans_up(big_legacy: tuple[Path, Path], tmp_path: Path) -> None:
    source, pw = big_legacy
    out = tmp_path / "out.luks"
    args = ["migrate", str(source), "--to", "luks", "-o", str(out), "--passphrase-file", str(pw), *FAST]
    proc = _start_and_kill(args, tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the debris a SIGKILL leaves
    qcrypt(*args)
    assert out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    qemu_compare((out, "luks", True), (source, "qcow2", True), pw)


@pytest.mark.interop
def test_sigterm_removes_temp_file(big_legacy: tuple[Path, Path], tmp_path: Path) -> None:
    source, pw = big_legacy
    out = tmp_path / "out.luks"
    proc = _start_and_kill(
        ["migrate", str(source), "--to", "luks", "-o", str(out), "--passphrase-file", str(pw), *FAST],
        tmp_path,
        signal.SIGTERM,
    )
    # 130 = our handler ran; -15 = the signal landed while the interpreter was already shutting down
    assert proc.returncode in (130, -signal.SIGTERM)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.interop
def test_file_size_limit_gives_one_line_error(big_legacy: tuple[Path, Path], tmp_path: Path) -> None:
    """ENOSPC-like failure without a loop device: RLIMIT_FSIZE makes writes fail with EFBIG."""
    source, pw = big_legacy

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))

    out = tmp_path / "out.luks"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qcrypt",
            "migrate",
            str(source),
            "--to",
            "luks",
            "-o",
            str(out),
            "--passphrase-file",
            str(pw),
            *FAST,
        ],
        capture_output=True,
        preexec_fn=limit,
        timeout=TOOL_TIMEOUT,
    )
    assert result.returncode == 9
    assert len(result.stderr.splitlines()) == 1 and b"file size limit" in result.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.interop
def test_large_sparse_image_costs_its_data(tmp_path: Path, qemu_img: str) -> None:
    """A 1 TiB legacy image with a few MiB of data converts to qcow2-LUKS quickly and stays small."""
    image = im.make_qcow2(tmp_path / "huge.qcow2", 1 << 40, encrypt="aes", passphrase=PASSPHRASE)
    for offset in (0, 1 << 30, 600 << 30, (1 << 40) - (1 << 20)):
        im.write_pattern(image, offset, 1 << 20, 0x5A)
    pw = secret_file(tmp_path, "pw", PASSPHRASE)
    out = tmp_path / "out.qcow2"
    qcrypt(
        "migrate",
        str(image.path),
        "--to",
        "qcow2-luks",
        "-o",
        str(out),
        "--passphrase-file",
        str(pw),
        *FAST,
        timeout=120,
    )
    assert out.stat().st_size < 64 << 20
    qemu_check(out, pw)
    qemu_compare((out, "qcow2", True), (image.path, "qcow2", True), pw)


@pytest.mark.interop
def test_snapshot_vm_state_is_kept(tmp_path: Path, qemu_img: str, qemu_io: str) -> None:
    """VM state saved with a snapshot (stored after the disk) survives, encrypted with the new key."""
    image = im.make_qcow2(tmp_path / "vm.qcow2", 4 << 20, encrypt="aes", passphrase=PASSPHRASE)
    im.write_pattern(image, 0, 65536, 0x11)
    im.qemu_io(image, "write -b -P 0x77 0 131072")  # VM state area of the active layer
    im.snapshot(image, "with-ram")
    # qemu-img cannot save a VM, so record the VM-state size in the snapshot entry by hand
    from qcrypt.images.qcow2_reader import QCow2Image

    with QCow2Image.open(image.path) as opened:
        table = opened.header.snapshots_offset
    with open(image.path, "r+b") as fh:
        fh.seek(table + 32)
        fh.write((131072).to_bytes(4, "big"))
        fh.seek(table + 40)
        fh.write((131072).to_bytes(8, "big"))
    pw = secret_file(tmp_path, "pw", PASSPHRASE)
    out = tmp_path / "out.qcow2"
    qcrypt("migrate", str(image.path), "--to", "qcow2-luks", "-o", str(out), "--passphrase-file", str(pw), *FAST)
    qemu_check(out, pw)
    opts = f"driver=qcow2,file.filename={out},encrypt.key-secret=s"
    obj = ["--object", f"secret,id=s,file={pw}"]
    subprocess.run(
        [qemu_img, "snapshot", *obj, "-a", "with-ram", "--image-opts", opts], check=True, timeout=TOOL_TIMEOUT
    )
    read = subprocess.run(
        [qemu_io, *obj, "--image-opts", opts, "-c", "read -b -P 0x77 0 131072"],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
    )
    assert "Pattern verification failed" not in read.stdout + read.stderr and read.returncode == 0
    info = json.loads(
        subprocess.run(
            [qemu_img, "info", "--output=json", str(out)], capture_output=True, text=True, timeout=TOOL_TIMEOUT
        ).stdout
    )
    assert info["snapshots"][0]["vm-state-size"] == 131072


@pytest.mark.interop
@pytest.mark.parametrize("digest_name", ["xxh3_128", "sha256"])
def test_verification_catches_a_corrupted_output(
    legacy: tuple[Path, Path], tmp_path: Path, digest_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read-back check compares digests of the source plaintext with what the output decodes to (with
    XXH3-128, and with the SHA-256 fallback used where the xxhash wheel is missing)."""
    import qcrypt as api
    from qcrypt.migrate import verification as mig
    from qcrypt.plumbing import checksum

    monkeypatch.setattr(checksum, "_current", [(digest_name, checksum.AVAILABLE[digest_name])])

    source, _ = legacy
    out = tmp_path / "out.raw"
    qcrypt("migrate", str(source), "--to", "raw", "-o", str(out), "--passphrase-file", str(tmp_path / "pw"))
    digests = mig.Digests()
    with api.open_image(source, PASSPHRASE) as stream:
        for offset in range(0, stream.size, 1 << 20):
            digests.add(-1, offset, stream.read_at(offset, 1 << 20))
    mig.verify(str(out), None, digests, target="raw", snapshots=[])  # intact: passes
    with open(out, "r+b") as fh:
        fh.seek(3 << 20)
        byte = fh.read(1)
        fh.seek(3 << 20)
        fh.write(bytes([byte[0] ^ 1]))
    with pytest.raises(api.VerificationError, match="differ from the source"):
        mig.verify(str(out), None, digests, target="raw", snapshots=[])


@pytest.mark.interop
def test_too_small_filesystem_fails_before_writing(legacy: tuple[Path, Path], tmp_path: Path) -> None:
    """A raw LUKS output is fully allocated: if it cannot fit, say so at once, leaving nothing behind."""
    _, pw = legacy
    small = tmp_path / "small"
    small.mkdir()
    # a 1 PiB virtual disk: its raw LUKS form cannot fit on any filesystem here
    image = im.make_qcow2(tmp_path / "huge.qcow2", 1 << 50, encrypt="aes", passphrase=PASSPHRASE)
    im.write_pattern(image, 0, 65536, 0x41)
    result = qcrypt(
        "migrate",
        str(image.path),
        "--to",
        "luks",
        "-o",
        str(small / "out.luks"),
        "--passphrase-file",
        str(pw),
        *FAST,
        check=False,
        timeout=60,
    )
    assert result.returncode == 9 and b"free" in result.stderr and len(result.stderr.splitlines()) == 1
    assert list(small.iterdir()) == []


def test_hidden_prompt_on_a_terminal(tmp_path: Path) -> None:
    """Without --passphrase-file and with a terminal, qcrypt prompts without echo."""
    import pty

    name = "aes-qcow2-v2-c4k.qcow2"
    entry = im.manifest()["fixtures"][name]
    source = im.fixture_path(name, tmp_path)
    out = tmp_path / "out.raw"
    pid, fd = pty.fork()
    if pid == 0:  # child: the pty is its controlling terminal
        os.execv(
            sys.executable, [sys.executable, "-m", "qcrypt", "migrate", str(source), "--to", "raw", "-o", str(out)]
        )
    transcript = b""
    deadline = time.monotonic() + 30
    while b"passphrase" not in transcript and time.monotonic() < deadline:
        transcript += os.read(fd, 1024)
    os.write(fd, entry["passphrase"].encode() + b"\n")
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        transcript += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, transcript
    assert entry["passphrase"].encode() not in transcript  # not echoed
    assert b"Enter the source passphrase" in transcript and b"verified" in transcript
    assert im.file_sha256(out) == entry["plaintext_sha256"]


@pytest.mark.interop
def test_output_reaching_the_source_by_another_path_is_refused(legacy: tuple[Path, Path], tmp_path: Path) -> None:
    """--force overwrites outputs, never the source or a backing layer, whatever path leads there."""
    source, pw = legacy
    before = im.file_sha256(source)
    (tmp_path / "alias").symlink_to(tmp_path, target_is_directory=True)
    via_link = tmp_path / "alias" / source.name
    result = qcrypt(
        "migrate", str(source), "--to", "raw", "-o", str(via_link), "--passphrase-file", str(pw), "--force", check=False
    )
    assert result.returncode == 8 and b"overwrite the source" in result.stderr
    assert im.file_sha256(source) == before


def test_wrong_passphrase_refused_on_extended_l2(tmp_path: Path) -> None:
    """Extended-L2 images keep their data in subclusters: the plausibility check must sample those too."""
    name = "aes-qcow2-v3-extl2-c64k.qcow2"
    source = im.fixture_path(name, tmp_path)
    wrong = secret_file(tmp_path, "wrong", "not the passphrase")
    result = qcrypt(
        "migrate",
        str(source),
        "--to",
        "raw",
        "-o",
        str(tmp_path / "o.raw"),
        "--passphrase-file",
        str(wrong),
        check=False,
    )
    assert result.returncode == 4 and b"probably wrong" in result.stderr
    right = secret_file(tmp_path, "right", im.manifest()["fixtures"][name]["passphrase"])
    qcrypt("migrate", str(source), "--to", "raw", "-o", str(tmp_path / "o.raw"), "--passphrase-file", str(right))
    assert im.file_sha256(tmp_path / "o.raw") == im.manifest()["fixtures"][name]["plaintext_sha256"]


@pytest.mark.interop
def test_replace_through_a_symlink_replaces_the_real_image(legacy: tuple[Path, Path], tmp_path: Path) -> None:
    source, pw = legacy
    link = tmp_path / "link.qcow2"
    link.symlink_to(source)
    qcrypt("migrate", str(link), "--to", "qcow2-luks", "--replace", "--passphrase-file", str(pw), *FAST)
    assert link.is_symlink()  # the link still points at the (now migrated) real file
    assert im.qemu_img_info(source)["format-specific"]["data"]["encrypt"]["format"] == "luks"
    kept = Path(str(source) + ".qcrypt-orig")
    assert kept.exists() and not kept.is_symlink()
    qemu_compare((source, "qcow2", True), (kept, "qcow2", True), pw)


@pytest.mark.interop
def test_overlay_migrated_to_another_folder_keeps_its_base(tmp_path: Path, qemu_img: str, qemu_io: str) -> None:
    """A relative backing name is rewritten for the output's folder; a decoy base there is not picked up."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    base = im.make_qcow2(tmp_path / "a" / "base.qcow2", 1 << 20)
    im.write_pattern(base, 131072, 4096, 0x11)
    decoy = im.make_qcow2(tmp_path / "b" / "base.qcow2", 1 << 20)
    im.write_pattern(decoy, 131072, 4096, 0x99)
    pw = secret_file(tmp_path, "pw", PASSPHRASE)
    subprocess.run(
        [
            qemu_img,
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            f"secret,id=s,file={pw}",
            "-o",
            "encrypt.format=aes,encrypt.key-secret=s",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            str(tmp_path / "a" / "ov.qcow2"),
        ],
        check=True,
        cwd=tmp_path / "a",
        timeout=TOOL_TIMEOUT,
    )
    overlay = im.Image(tmp_path / "a" / "ov.qcow2", "qcow2", PASSPHRASE)
    im.write_pattern(overlay, 0, 4096, 0x22)
    out = tmp_path / "b" / "out.qcow2"
    qcrypt(
        "migrate",
        str(overlay.path),
        "--to",
        "qcow2-luks",
        "-o",
        str(out),
        "--passphrase-file",
        str(tmp_path / "pw"),
        *FAST,
    )
    assert im.qemu_img_info(out)["backing-filename"] == "../a/base.qcow2"
    opts = f"driver=qcow2,file.filename={out},encrypt.key-secret=s"
    read = subprocess.run(
        [
            qemu_io,
            "--object",
            f"secret,id=s,file={tmp_path / 'pw'}",
            "--image-opts",
            opts,
            "-c",
            "read -P 0x11 131072 4096",
            "-c",
            "read -P 0x22 0 4096",
        ],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
    )
    assert read.returncode == 0 and "verification failed" not in read.stdout, read.stdout


@pytest.mark.interop
def test_timings_name_every_phase(legacy: tuple[Path, Path], tmp_path: Path) -> None:
    """--timings prints one stderr line with the seconds of each phase, even with -q."""
    import re

    source, pw = legacy
    out = tmp_path / "out.luks"
    result = qcrypt(
        "migrate", str(source), "--to", "luks", "-o", str(out), "--passphrase-file", str(pw), *FAST, "-q", "--timings"
    )
    assert result.stdout == b""
    line = result.stderr.decode().strip()
    phases = re.findall(r"([a-zA-Z ]+?) (\d+\.\d\d) s", line.removeprefix("timings: "))
    names = [name.strip(", (") for name, _ in phases]
    assert names == ["plan", "passphrase check", "LUKS setup", "write", "verify", "sync", "commit", "total"]
    seconds = [float(value) for _, value in phases]
    assert abs(sum(seconds[:-1]) - seconds[-1]) < 0.02 and seconds[3] > 0


def _snapshot_fixture(tmp_path: Path) -> tuple[Path, bytes]:
    name = "aes-qcow2-v3-snapshots-c4k.qcow2"
    entry = im.manifest()["fixtures"][name]
    return im.fixture_path(name, tmp_path), entry["passphrase"].encode()


@pytest.mark.parametrize("target", ["qcow2", "qcow2-luks"])
def test_verify_skips_only_clusters_both_images_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    """Snapshot ranges whose clusters the output *and* the source share with the active table are not decrypted
    twice; everything else still is. LUKS: a snapshot's clusters written before are only mapped while writing
    (neither read nor decrypted), its new runs are read back while writing, and verification reads only its
    sample of them."""
    from qcrypt.migrate import run as mig
    from qcrypt.migrate import verification

    source, passphrase = _snapshot_fixture(tmp_path)
    checked: dict[int, int] = {}
    real_check = verification._check_ranges

    def counting(read: object, ranges: list, table: int, *args: object, **kw: object) -> int:
        checked[table] = checked.get(table, 0) + sum(1 for r in ranges if r[0] == table)
        return real_check(read, ranges, table, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(verification, "_check_ranges", counting)
    written: dict[int, int] = {}
    real_verify = mig.verify

    mapped: dict[int, int] = {}

    def recording(path: str, key: object, digests: verification.Digests, **kw: object) -> int:
        for table, *_ in digests.ranges:
            written[table] = written.get(table, 0) + 1
        for table, *_ in digests.mapped:
            mapped[table] = mapped.get(table, 0) + 1
        return real_verify(path, key, digests, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(mig, "verify", recording)
    opts = mig.MigrateOptions(
        target=target, output=str(tmp_path / "out.qcow2"), passphrase=passphrase, iterations=1000, workers=1
    )
    mig.migrate(str(source), opts)
    snapshot_tables = [t for t in written if t >= 0]
    assert snapshot_tables and all(checked.get(t, 0) <= written[t] for t in snapshot_tables)
    if target == "qcow2":
        assert checked[-1] == written[-1] and not mapped  # the active table: every range
        assert sum(checked.get(t, 0) for t in snapshot_tables) < sum(written[t] for t in snapshot_tables)
    else:
        assert set(mapped) == set(snapshot_tables)
        assert all(checked.get(t, 0) <= verification.SNAPSHOT_SAMPLE_RANGES for t in snapshot_tables)


@pytest.mark.parametrize(
    "target, caught_by",
    [("qcow2", "differ from the source"), ("qcow2-luks", "do not point at data read back from the same source")],
)
def test_verify_catches_a_cluster_shared_by_mistake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, caught_by: str
) -> None:
    """A writer bug that shares a snapshot cluster with the active table although the source does not (share
    keys without the source's host offset) leaves the output's tables looking shared: the source's tables
    disagree, so the range is read back in full and the wrong content is caught (qcow2), or (LUKS, where the
    range was only mapped) its mapping is refused."""
    import qcrypt as api
    from qcrypt.migrate import run as mig
    from qcrypt.migrate import writing

    source, passphrase = _snapshot_fixture(tmp_path)
    real_layer_job = mig.layer_job

    def keyed_by_guest_cluster_only(table: int, reader: object, snapshot: object, share: bool) -> writing.Qcow2Job:
        job = real_layer_job(table, reader, snapshot, share)  # type: ignore[arg-type]
        job.clusters = ((g, kind, ("guest", g) if key is not None else None) for g, kind, key in job.clusters)
        return job

    monkeypatch.setattr(mig, "layer_job", keyed_by_guest_cluster_only)
    out = tmp_path / "out.qcow2"
    opts = mig.MigrateOptions(target=target, output=str(out), passphrase=passphrase, iterations=1000, workers=1)
    with pytest.raises(api.VerificationError, match=caught_by):
        mig.migrate(str(source), opts)
    assert not out.exists()
