"""qcrypt agrees with its peers on the images they handle: QEMU's exact LUKS1 layout rules, headers qcrypt
cannot parse or unlock (one error everywhere), LUKS1 ciphers qcrypt does not implement, small legacy clusters,
and the smaller cases (external data files, empty LUKS payloads).

qemu-img, qemu-io and cryptsetup build every image and judge every output.
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest

from tests import _images as im
from tests.conftest import require_tool
from tests.test_migrate import TOOL_TIMEOUT, cryptsetup, qcrypt, qemu_check, secret_file

PASSPHRASE = "agreeing with the peers"
OLD_LAYOUTS = {
    # cryptsetup 1.0: key material from sector 2, slots 1 KiB aligned (126 sectors for a 128-bit key)
    "cryptsetup-1.0": ([2 + 126 * i for i in range(8)], 1010),
    # material from sector 8 but slots closer than QEMU's 4 KiB rounding allows
    "packed": ([8 + 126 * i for i in range(8)], 1024),
}


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("qemu-img"), *args], capture_output=True, text=True, timeout=TOOL_TIMEOUT)


def qemu_opens(path: Path, driver: str, pw: Path, plain: Path) -> None:
    """qemu-img opens ``path`` and reads exactly the guest view in the raw file ``plain``."""
    key = "key-secret" if driver == "luks" else "encrypt.key-secret"
    out = qemu_img("compare", "--object", f"secret,id=s,file={pw}", "--image-opts",
                   f"driver={driver},file.filename={path},{key}=s", f"driver=raw,file.filename={plain}")
    assert out.returncode == 0 and "identical" in out.stdout, out.stdout + out.stderr


def info_json(path: Path) -> tuple[int, dict[str, object] | None, str]:
    result = qcrypt("info", "--format", "json", str(path), check=False)
    report = json.loads(result.stdout) if result.returncode == 0 else None
    return result.returncode, report, result.stderr.decode()


# -- QEMU's LUKS1 layout rules ------------------------------------------------------------------------------


def _old_layout_luks(tmp_path: Path, layout: str) -> tuple[Path, Path, Path]:
    """A raw LUKS1 file laid out as an older cryptsetup did (cryptsetup opens it, QEMU refuses it), its
    passphrase file, and its guest view as a raw file (read by qemu-img before the header edit)."""
    path = tmp_path / f"{layout}.luks"
    image = im.make_luks_cryptsetup(path, 1 << 20, cipher="aes-cbc-essiv:sha256", key_bits=128,
                                    hash_name="sha256", passphrase=PASSPHRASE)
    im.zero_fill(image, 1 << 20)
    im.write_pattern(image, 4096, 65536, 0xAB)
    im.write_data(image, 300 * 512, b"guest sector 300" * 32)
    plain = tmp_path / "plain.raw"
    pw = secret_file(tmp_path, "pw", PASSPHRASE)
    out = qemu_img("convert", "--object", f"secret,id=s,file={pw}", "--image-opts",
                   f"driver=luks,file.filename={path},key-secret=s", "-O", "raw", str(plain))
    assert out.returncode == 0, out.stderr
    offsets, payload = OLD_LAYOUTS[layout]
    im.relayout_luks1(path, offsets, payload)
    assert cryptsetup("open", "--test-passphrase", "--key-file", str(pw), str(path)).returncode == 0
    refused = qemu_img("info", "--object", f"secret,id=s,file={pw}", "--image-opts",
                       f"driver=luks,file.filename={path},key-secret=s")
    assert refused.returncode != 0 and "overlapping" in refused.stderr
    return path, pw, plain


@pytest.mark.interop
@pytest.mark.parametrize("layout", sorted(OLD_LAYOUTS))
def test_old_cryptsetup_layouts_are_reported_and_migrated_to_what_qemu_opens(tmp_path: Path, layout: str) -> None:
    source, pw, plain = _old_layout_luks(tmp_path, layout)
    code, report, _ = info_json(source)
    assert code == 0 and report is not None
    refusal = [f for f in report["findings"] if f["code"] == "luks1-qemu-refuses-layout"]  # type: ignore[index]
    assert refusal and "overlap" in refusal[0]["message"]
    if layout == "cryptsetup-1.0":
        assert "before sector 8" in refusal[0]["message"]
    for target, driver in (("luks", "luks"), ("qcow2-luks", "qcow2")):
        out = tmp_path / f"out-{target}"
        result = qcrypt("migrate", str(source), "--to", target, "-o", str(out), "--passphrase-file", str(pw))
        assert b"verified" in result.stdout and b"carried over" in result.stdout
        qemu_opens(out, driver, pw, plain)
        if target == "qcow2-luks":
            qemu_check(out, pw)
        else:
            assert cryptsetup("open", "--test-passphrase", "--key-file", str(pw), str(out)).returncode == 0
        code, report, _ = info_json(out)
        assert code == 0 and report is not None
        assert "luks1-qemu-refuses-layout" not in [f["code"] for f in report["findings"]]  # type: ignore[index]


@pytest.mark.interop
def test_unaligned_payload_text_does_not_call_cryptsetup_layouts_qemu_ones(tmp_path: Path) -> None:
    source, _pw, _plain = _old_layout_luks(tmp_path, "cryptsetup-1.0")
    _, report, _ = info_json(source)
    assert report is not None
    texts = [f["message"] for f in report["findings"] if f["code"] == "luks1-unaligned-payload"]  # type: ignore[index]
    assert texts and "QEMU" not in texts[0] and "1010 sectors" in texts[0]


# -- one error for one problem ------------------------------------------------------------------------------

# (header field offset, struct format, value, what qemu-img says): every one is a header QEMU refuses too
BAD_QCOW2_HEADERS = {
    "l1_size": (36, ">I", 0x7FFFFFFF, "Active L1 table too large"),
    "cluster_bits": (20, ">I", 40, "Unsupported cluster size"),
    "header_length": (100, ">I", 50, "header too short"),
    "nb_snapshots": (60, ">I", 0xFFFFFFFF, "Snapshot table too large"),
    "l1_table_offset": (40, ">Q", 0x10001, "Active L1 table offset invalid"),
}


def _edit(path: Path, offset: int, fmt: str, value: int) -> None:
    im.record_note(f"python: write {value:#x} at header byte {offset} of {path.name}")
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(struct.pack(fmt, value))


def _bad_image(tmp_path: Path, case: str) -> tuple[Path, str]:
    """An image whose header qcrypt cannot parse (nor the peers open), and the encryption its header declares."""
    if case == "luks1-keyslot-offset":
        path = tmp_path / "bad.luks"
        im.make_luks_cryptsetup(path, 1 << 20, cipher="aes-xts-plain64", key_bits=256, hash_name="sha256",
                                passphrase=PASSPHRASE)
        _edit(path, 208 + 40, ">I", 1)  # keyslot 0's key material inside the phdr
        pw = secret_file(tmp_path, "check.pw", PASSPHRASE)
        refused = cryptsetup("open", "--test-passphrase", "--key-file", str(pw), str(path))
        assert refused.returncode != 0 and "not a valid LUKS device" in refused.stderr
        return path, "luks1"
    if case == "qcow1-l2_bits":
        path = tmp_path / "bad.qcow"
        im.make_qcow1(path, 1 << 20, passphrase=PASSPHRASE)
        _edit(path, 33, ">B", 30)
        expected = "L2 table size"
    else:
        path = tmp_path / "bad.qcow2"
        im.make_qcow2(path, 1 << 20, encrypt="aes", passphrase=PASSPHRASE)
        offset, fmt, value, expected = BAD_QCOW2_HEADERS[case]
        _edit(path, offset, fmt, value)
    refused = qemu_img("info", str(path))
    assert refused.returncode != 0 and expected in refused.stderr
    return path, "aes-cbc-legacy"


@pytest.mark.interop
@pytest.mark.parametrize("case", [*sorted(BAD_QCOW2_HEADERS), "qcow1-l2_bits", "luks1-keyslot-offset"])
def test_unparseable_header_gives_one_error_in_info_migrate_and_scan(tmp_path: Path, case: str) -> None:
    source, declared = _bad_image(tmp_path, case)
    pw = secret_file(tmp_path, "pw", PASSPHRASE)
    info = qcrypt("info", str(source), check=False)
    line = info.stderr.decode().strip()
    assert info.returncode == 3 and line.startswith("qcrypt: error: ") and line.count(str(source)) == 1, line
    runs = [("--to", "qcow2-luks"), ("--to", "qcow2-luks", "--new-passphrase-file", str(pw)), ("--to", "luks"),
            ("--to", "raw")]
    for extra in runs:
        out = tmp_path / "out.img"
        migrate = qcrypt("migrate", str(source), *extra, "-o", str(out), "--passphrase-file", str(pw), check=False)
        assert (migrate.returncode, migrate.stderr.decode().strip()) == (3, line), extra
        assert not out.exists()
    migrate = qcrypt("migrate", str(source), "--to", "qcow2-luks", "-o", str(tmp_path / "o"), check=False)
    assert (migrate.returncode, migrate.stderr.decode().strip()) == (3, line)  # no passphrase asked for first
    scan = qcrypt("scan", "--format", "json", "--fail-on", "never", str(source))
    report = json.loads(scan.stdout)["images"][0]
    assert f"qcrypt: error: {report['error']}" == line
    assert report["encryption"] == declared
    assert "unparseable" in [f["code"] for f in report["findings"]]
    if declared == "aes-cbc-legacy":
        assert report["severity"] == "critical" and json.loads(scan.stdout)["summary"]["legacy"] == 1


# -- LUKS1 headers with algorithms qcrypt does not implement -------------------------------------------------

# case: (what the peer is asked to make, the part qcrypt names, QEMU opens it too)
ALGORITHMS = {
    "serpent": ("qemu-img luks cipher-alg=serpent-256", "cipher 'serpent'", True),
    "twofish-qcow2": ("qemu-img qcow2 encrypt.cipher-alg=twofish-128", "cipher 'twofish'", True),
    "whirlpool": ("cryptsetup --hash whirlpool", "hash 'whirlpool'", False),
    "essiv-sha3": ("cryptsetup --cipher aes-cbc-essiv:sha3-256", "mode 'cbc-essiv:sha3-256'", False),
    "lrw": ("cryptsetup header edited to aes-lrw-benbi", "mode 'lrw-benbi'", False),
}


def _algorithm_image(tmp_path: Path, case: str) -> Path:
    if case == "serpent":
        return im.make_luks_qemu(tmp_path / "serpent.luks", 1 << 20, passphrase=PASSPHRASE,
                                 luks_opts={"cipher-alg": "serpent-256", "cipher-mode": "xts"}).path
    if case == "twofish-qcow2":
        return im.make_qcow2(tmp_path / "twofish.qcow2", 1 << 20, encrypt="luks", passphrase=PASSPHRASE,
                             luks_opts={"cipher-alg": "twofish-128", "cipher-mode": "cbc", "ivgen-alg": "essiv",
                                        "ivgen-hash-alg": "sha256"}).path
    cipher, key_bits, hash_name = {"whirlpool": ("aes-xts-plain64", 256, "whirlpool"),
                                   "essiv-sha3": ("aes-cbc-essiv:sha3-256", 256, "sha256"),
                                   "lrw": ("aes-xts-plain64", 256, "sha256")}[case]
    path = tmp_path / f"{case}.luks"
    im.make_luks_cryptsetup(path, 1 << 20, cipher=cipher, key_bits=key_bits, hash_name=hash_name,
                            passphrase=PASSPHRASE)
    if case == "lrw":  # cryptsetup 2.6 needs dm-crypt to write LRW keyslots; it reads such headers
        mode = b"lrw-benbi".ljust(32, b"\0")
        im.record_note(f"python: set {path.name}'s cipher_mode to lrw-benbi")
        with open(path, "r+b") as handle:
            handle.seek(40)
            handle.write(mode)
    return path


@pytest.mark.interop
@pytest.mark.parametrize("case", sorted(ALGORITHMS))
def test_luks1_with_algorithms_qcrypt_lacks_is_luks1_and_refused_the_same_way(tmp_path: Path, case: str) -> None:
    _how, part, qemu_opens_it = ALGORITHMS[case]
    source = _algorithm_image(tmp_path, case)
    pw = secret_file(tmp_path, "pw", PASSPHRASE)
    region = source
    if source.suffix == ".qcow2":
        region = im.luks_header_file(source, tmp_path)
    dump = cryptsetup("luksDump", str(region))
    assert dump.returncode == 0 and "Version:       \t1" in dump.stdout  # cryptsetup reads the header
    driver = "qcow2" if source.suffix == ".qcow2" else "luks"
    key = "encrypt.key-secret" if driver == "qcow2" else "key-secret"
    qemu = qemu_img("info", "--object", f"secret,id=s,file={pw}", "--image-opts",
                    f"driver={driver},file.filename={source},{key}=s")
    assert (qemu.returncode == 0) == qemu_opens_it, qemu.stderr

    code, report, _ = info_json(source)
    assert code == 0 and report is not None
    assert report["encryption"] == "luks1" and report["luks"]["version"] == 1  # type: ignore[index]
    found = {f["code"]: f for f in report["findings"]}  # type: ignore[union-attr]
    assert "unparseable" not in found and part in found["luks1-unsupported-algorithm"]["message"]
    assert found["luks1-unsupported-algorithm"]["severity"] == ("info" if qemu_opens_it else "warning")
    scan = json.loads(qcrypt("scan", "--format", "json", "--fail-on", "never", str(source)).stdout)
    assert scan["images"][0]["encryption"] == "luks1" and scan["summary"]["by_encryption"] == {"luks1": 1}

    lines = set()
    for target in ("luks", "qcow2-luks", "qcow2", "raw"):
        out = tmp_path / f"out-{target}"
        refused = qcrypt("migrate", str(source), "--to", target, "-o", str(out), "--passphrase-file", str(pw),
                         check=False)
        line = refused.stderr.decode().strip()
        assert refused.returncode == 3 and line.count(str(source)) == 1 and part in line, line
        assert not out.exists()
        lines.add(line)
    assert len(lines) == 1  # one message for one problem, whatever the target
    no_passphrase = qcrypt("migrate", str(source), "--to", "qcow2", "-o", str(tmp_path / "o"), check=False)
    assert (no_passphrase.returncode, no_passphrase.stderr.decode().strip()) == (3, lines.pop())


# -- smaller ones ------------------------------------------------------------------------------------------


@pytest.mark.interop
@pytest.mark.parametrize("options", ["data_file_raw=on", "data_file_raw=off", "extended_l2=on"])
def test_allocated_bytes_with_an_external_data_file(tmp_path: Path, options: str) -> None:
    """With an external data file, guest cluster 0 may live at host offset 0 (QEMU's rule)."""
    image = tmp_path / "ext.qcow2"
    created = qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'ext.data'},{options}",
                       str(image), "1M")
    assert created.returncode == 0, created.stderr
    written = subprocess.run([require_tool("qemu-io"), "-c", "write -q -P 0x11 0 4k", "-c",
                              "write -q -P 0x22 512k 64k", str(image)], capture_output=True, text=True,
                             timeout=TOOL_TIMEOUT)
    assert written.returncode == 0, written.stderr
    mapped = json.loads(qemu_img("map", "--output=json", str(image)).stdout)
    expected = sum(extent["length"] for extent in mapped if extent["data"])
    code, report, err = info_json(image)
    assert code == 0, err
    assert report is not None and report["allocated_bytes"] == expected


@pytest.mark.interop
@pytest.mark.parametrize("target", ["qcow2-luks", "qcow2", "luks"])
def test_empty_luks_payload_migrates(tmp_path: Path, target: str) -> None:
    source = im.make_luks_qemu(tmp_path / "empty.luks", 0, passphrase=PASSPHRASE).path
    pw = secret_file(tmp_path, "pw", PASSPHRASE)
    out = tmp_path / "out.img"
    qcrypt("migrate", str(source), "--to", target, "-o", str(out), "--passphrase-file", str(pw))
    driver, key = {"qcow2-luks": ("qcow2", ",encrypt.key-secret=s"), "qcow2": ("qcow2", ""),
                   "luks": ("luks", ",key-secret=s")}[target]
    opened = qemu_img("info", "--output=json", "--object", f"secret,id=s,file={pw}", "--image-opts",
                      f"driver={driver},file.filename={out}{key}")
    assert opened.returncode == 0, opened.stderr
    assert json.loads(opened.stdout)["virtual-size"] == 0
    if driver == "qcow2":
        qemu_check(out, pw if target == "qcow2-luks" else None)
