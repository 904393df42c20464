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
from tests._cli import TOOL_TIMEOUT, cryptsetup, qcrypt, qemu_check, secret_file
from tests._tools import require_tool

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
    out = qemu_img(
        "compare",
        "--object",
        f"secret,id=s,file={pw}",
        "--image-opts",
        f"driver={driver},file.filename={path},{key}=s",
        f"driver=raw,file.filename={plain}",
    )
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
    image = im.make_luks_cryptsetup(
        path, 1 << 20, cipher="aes-cbc-essiv:sha256", key_bits=128, hash_name="sha256", passphrase=PASSPHRASE
    )
    im.zero_fill(image, 1 << 20)
    im.write_pattern(image, 4096, 65536, 0xAB)
    im.write_data(image, 300 * 512, b"guest sector 300" * 32)
    plain = tmp_path / "plain.raw"
    pw = secret_file(tmp_path, "pw", PASSPHRASE)
    out = qemu_img(
        "convert",
        "--object",
        f"secret,id=s,file={pw}",
        "--image-opts",
        f"driver=luks,file.filename={path},key-secret=s",
        "-O",
        "raw",
        str(plain),
    )
    assert out.returncode == 0, out.stderr
    offsets, payload = OLD_LAYOUTS[layout]
    im.relayout_luks1(path, offsets, payload)
    assert cryptsetup("open", "--test-passphrase", "--key-file", str(pw), str(path)).returncode == 0
    refused = qemu_img(
        "info", "--object", f"secret,id=s,file={pw}", "--image-opts", f"driver=luks,file.filename={path},key-secret=s"
    )
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
        im.make_luks_cryptsetup(
            path, 1 << 20, cipher="aes-xts-plain64", key_bits=256, hash_name="sha256", passphrase=PASSPHRASE
        )
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


LIMIT_CASES = {"l1_size", "nb_snapshots"}  # refused by qcrypt.plumbing.limits before they are parsed


@pytest.mark.interop
@pytest.mark.parametrize("case", [*sorted(BAD_QCOW2_HEADERS), "qcow1-l2_bits", "luks1-keyslot-offset"])
def test_unparseable_header_gives_one_error_in_info_migrate_and_scan(tmp_path: Path, case: str) -> None:
    source, declared = _bad_image(tmp_path, case)
    pw = secret_file(tmp_path, "pw", PASSPHRASE)
    info = qcrypt("info", str(source), check=False)
    line = info.stderr.decode().strip()
    assert info.returncode == 3 and line.startswith("qcrypt: error: ") and line.count(str(source)) == 1, line
    runs = [
        ("--to", "qcow2-luks"),
        ("--to", "qcow2-luks", "--new-passphrase-file", str(pw)),
        ("--to", "luks"),
        ("--to", "raw"),
    ]
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
    # a header beyond one of qcrypt's limits is that finding; any other damage is "unparseable"
    codes = [f["code"] for f in report["findings"]]
    assert ("limit-exceeded" if case in LIMIT_CASES else "unparseable") in codes, codes
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
        return im.make_luks_qemu(
            tmp_path / "serpent.luks",
            1 << 20,
            passphrase=PASSPHRASE,
            luks_opts={"cipher-alg": "serpent-256", "cipher-mode": "xts"},
        ).path
    if case == "twofish-qcow2":
        return im.make_qcow2(
            tmp_path / "twofish.qcow2",
            1 << 20,
            encrypt="luks",
            passphrase=PASSPHRASE,
            luks_opts={
                "cipher-alg": "twofish-128",
                "cipher-mode": "cbc",
                "ivgen-alg": "essiv",
                "ivgen-hash-alg": "sha256",
            },
        ).path
    cipher, key_bits, hash_name = {
        "whirlpool": ("aes-xts-plain64", 256, "whirlpool"),
        "essiv-sha3": ("aes-cbc-essiv:sha3-256", 256, "sha256"),
        "lrw": ("aes-xts-plain64", 256, "sha256"),
    }[case]
    path = tmp_path / f"{case}.luks"
    im.make_luks_cryptsetup(path, 1 << 20, cipher=cipher, key_bits=key_bits, hash_name=hash_name, passphrase=PASSPHRASE)
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
    qemu = qemu_img(
        "info", "--object", f"secret,id=s,file={pw}", "--image-opts", f"driver={driver},file.filename={source},{key}=s"
    )
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
        refused = qcrypt(
            "migrate", str(source), "--to", target, "-o", str(out), "--passphrase-file", str(pw), check=False
        )
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
    created = qemu_img(
        "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'ext.data'},{options}", str(image), "1M"
    )
    assert created.returncode == 0, created.stderr
    written = subprocess.run(
        [require_tool("qemu-io"), "-c", "write -q -P 0x11 0 4k", "-c", "write -q -P 0x22 512k 64k", str(image)],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
    )
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
    driver, key = {
        "qcow2-luks": ("qcow2", ",encrypt.key-secret=s"),
        "qcow2": ("qcow2", ""),
        "luks": ("luks", ",key-secret=s"),
    }[target]
    opened = qemu_img(
        "info",
        "--output=json",
        "--object",
        f"secret,id=s,file={pw}",
        "--image-opts",
        f"driver={driver},file.filename={out}{key}",
    )
    assert opened.returncode == 0, opened.stderr
    assert json.loads(opened.stdout)["virtual-size"] == 0
    if driver == "qcow2":
        qemu_check(out, pw if target == "qcow2-luks" else None)


# -- chains: a legacy overlay over a LUKS base, a passphrase per layer -----------------------------------------


def _to_raw(opts: str, secrets: dict[str, Path], raw: Path) -> None:
    objects = [arg for sid, file in secrets.items() for arg in ("--object", f"secret,id={sid},file={file}")]
    out = qemu_img("convert", *objects, "--image-opts", opts, "-O", "raw", str(raw))
    assert out.returncode == 0, out.stderr


def _same_as(opts: str, secrets: dict[str, Path], reference: Path) -> None:
    objects = [arg for sid, file in secrets.items() for arg in ("--object", f"secret,id={sid},file={file}")]
    out = qemu_img("compare", *objects, "--image-opts", opts, f"driver=raw,file.filename={reference}")
    assert out.returncode == 0 and "identical" in out.stdout, out.stdout + out.stderr


def _rebase(top: Path, base: Path, pw: Path) -> None:
    """``qemu-img rebase -u``: only the overlay's backing name changes (its key opens the overlay)."""
    rebased = qemu_img(
        "rebase",
        "--object",
        f"secret,id=s,file={pw}",
        "--image-opts",
        f"driver=qcow2,file.filename={top},encrypt.key-secret=s",
        "-u",
        "-b",
        base.name,
        "-F",
        "qcow2",
    )
    assert rebased.returncode == 0, rebased.stderr


def _legacy_chain(tmp_path: Path, base_passphrase: str, top_passphrase: str) -> tuple[Path, Path]:
    """A legacy AES base and a legacy AES overlay over it, both written; and the chain's guest view as raw."""
    base = im.make_qcow2(tmp_path / "base.qcow2", 1 << 20, cluster_size=4096, encrypt="aes", passphrase=base_passphrase)
    im.write_pattern(base, 0, 65536, 0x11)
    im.write_data(base, 262144, b"base layer text " * 4096)
    top = im.make_qcow2(
        tmp_path / "top.qcow2", 1 << 20, cluster_size=4096, encrypt="aes", passphrase=top_passphrase, backing=base
    )
    im.write_data(top, 32768, b"overlay text .. " * 4096)
    reference = tmp_path / "reference.raw"
    secrets = {
        "b": secret_file(tmp_path, "ref-b.pw", base_passphrase),
        "t": secret_file(tmp_path, "ref-t.pw", top_passphrase),
    }
    _to_raw(
        f"driver=qcow2,file.filename={top.path},encrypt.key-secret=t,backing.encrypt.key-secret=b", secrets, reference
    )
    return top.path, reference


@pytest.mark.interop
@pytest.mark.parametrize("target", ["qcow2-luks", "qcow2"])
def test_legacy_overlay_over_a_migrated_luks_base(tmp_path: Path, target: str) -> None:
    """The guide's route (docs/GUIDE.md, "Backing chains"): migrate the base, rebase the overlay onto it (-u),
    migrate the overlay."""
    top, reference = _legacy_chain(tmp_path, PASSPHRASE, PASSPHRASE)
    pw = secret_file(tmp_path, "pw", PASSPHRASE)
    base_luks = tmp_path / "base.luks.qcow2"
    qcrypt(
        "migrate",
        str(tmp_path / "base.qcow2"),
        "--to",
        "qcow2-luks",
        "-o",
        str(base_luks),
        "--passphrase-file",
        str(pw),
        "--pbkdf-force-iterations",
        "1000",
    )
    _rebase(top, base_luks, pw)
    chain = f"driver=qcow2,file.filename={top},encrypt.key-secret=s,backing.encrypt.key-secret=s"
    _same_as(chain, {"s": pw}, reference)  # QEMU reads the rebased chain
    out = tmp_path / "top.new.qcow2"
    result = qcrypt(
        "migrate",
        str(top),
        "--to",
        target,
        "-o",
        str(out),
        "--passphrase-file",
        str(pw),
        "--pbkdf-force-iterations",
        "1000",
    )
    assert b"verified" in result.stdout
    assert im.qemu_img_info(out)["backing-filename"] == base_luks.name
    own = ",encrypt.key-secret=s" if target == "qcow2-luks" else ""
    _same_as(f"driver=qcow2,file.filename={out}{own},backing.encrypt.key-secret=s", {"s": pw}, reference)


@pytest.mark.interop
def test_a_passphrase_per_layer_when_flattening(tmp_path: Path) -> None:
    top, reference = _legacy_chain(tmp_path, "the base's own secret", PASSPHRASE)
    base = tmp_path / "base.qcow2"
    base_pw, top_pw = secret_file(tmp_path, "base.pw", "the base's own secret"), secret_file(tmp_path, "pw", PASSPHRASE)
    out = tmp_path / "flat.qcow2"
    for default, wrong_layer in ((top_pw, base), (base_pw, top)):
        refused = qcrypt(
            "migrate",
            str(top),
            "--to",
            "qcow2-luks",
            "--flatten",
            "-o",
            str(out),
            "--passphrase-file",
            str(default),
            "--pbkdf-force-iterations",
            "1000",
            check=False,
        )
        line = refused.stderr.decode().strip()
        assert refused.returncode == 4 and f"error: {wrong_layer}: the passphrase is probably wrong" in line, line
        assert not out.exists()
    stranger = qcrypt(
        "migrate",
        str(top),
        "--to",
        "qcow2-luks",
        "--flatten",
        "-o",
        str(out),
        "--passphrase-file",
        str(top_pw),
        "--layer-passphrase-file",
        str(reference),
        str(base_pw),
        check=False,
    )
    assert stranger.returncode == 8 and b"not a layer of" in stranger.stderr and not out.exists()
    qcrypt(
        "migrate",
        str(top),
        "--to",
        "qcow2-luks",
        "--flatten",
        "-o",
        str(out),
        "--passphrase-file",
        str(top_pw),
        "--layer-passphrase-file",
        str(base),
        str(base_pw),
        "--pbkdf-force-iterations",
        "1000",
    )
    assert "backing-filename" not in im.qemu_img_info(out)
    qemu_check(out, top_pw)  # the new keyslot takes the top layer's passphrase
    _same_as(f"driver=qcow2,file.filename={out},encrypt.key-secret=s", {"s": top_pw}, reference)


@pytest.mark.interop
def test_a_passphrase_per_layer_over_a_luks_base(tmp_path: Path) -> None:
    """Base and overlay with different secrets, base already LUKS: the API and the CLI take both."""
    from qcrypt.migrate.options import MigrateOptions
    from qcrypt.migrate.run import migrate

    top, reference = _legacy_chain(tmp_path, "the base's own secret", PASSPHRASE)
    base_pw, top_pw = secret_file(tmp_path, "base.pw", "the base's own secret"), secret_file(tmp_path, "pw", PASSPHRASE)
    base_luks = tmp_path / "base.luks.qcow2"
    qcrypt(
        "migrate",
        str(tmp_path / "base.qcow2"),
        "--to",
        "qcow2-luks",
        "-o",
        str(base_luks),
        "--passphrase-file",
        str(base_pw),
        "--pbkdf-force-iterations",
        "1000",
    )
    _rebase(top, base_luks, top_pw)
    out = tmp_path / "top.new.qcow2"
    refused = qcrypt(
        "migrate", str(top), "--to", "qcow2-luks", "-o", str(out), "--passphrase-file", str(top_pw), check=False
    )
    line = refused.stderr.decode().strip()
    assert refused.returncode == 4 and f"error: {base_luks}: the passphrase opens no keyslot" in line, line
    qcrypt(
        "migrate",
        str(top),
        "--to",
        "qcow2-luks",
        "-o",
        str(out),
        "--passphrase-file",
        str(top_pw),
        "--layer-passphrase-file",
        str(base_luks),
        str(base_pw),
        "--pbkdf-force-iterations",
        "1000",
    )
    secrets = {"t": top_pw, "b": base_pw}
    _same_as(f"driver=qcow2,file.filename={out},encrypt.key-secret=t,backing.encrypt.key-secret=b", secrets, reference)
    api_out = tmp_path / "api.qcow2"
    result = migrate(
        str(top),
        MigrateOptions(
            target="qcow2",
            output=str(api_out),
            passphrase=PASSPHRASE.encode(),
            passphrases={str(base_luks): b"the base's own secret"},
        ),
    )
    assert result.verified and result.backing_file == base_luks.name
    _same_as(f"driver=qcow2,file.filename={api_out},backing.encrypt.key-secret=b", secrets, reference)
