"""LUKS1 engine: interop with cryptsetup and qemu-img both ways, keyslot management, validation, fuzzing."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import random
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from qcrypt.crypto.sector import make_sector_cipher
from qcrypt.errors import BadPassphraseError, FormatError, MigrationError, QcryptError, UnsupportedFeatureError
from qcrypt.formats import luks1 as fmt
from qcrypt.luks import cipher_spec
from qcrypt.luks import create as luks_create
from qcrypt.luks import header as luks_header
from qcrypt.luks import keyslots as luks_keyslots
from tests._compare import assert_same_bytes
from tests._images import CPU_USAGE_ATTEMPTS
from tests._pbkdf import measured_rate

PASSPHRASE = "pässwörd 1\n".encode()  # byte exact: non-ASCII and a trailing newline are part of it
OTHER_PASSPHRASE = b"another one"
WRONG_PASSPHRASE = b"p\xc3\xa4ssw\xc3\xb6rd 1"  # the right one without its newline
FORCED = 1000
MIB = 1 << 20

CRYPTSETUP_SPECS = [
    ("aes-xts-plain64", 256),
    ("aes-xts-plain64", 512),
    ("aes-cbc-essiv:sha256", 128),
    ("aes-cbc-essiv:sha256", 256),
    ("aes-cbc-plain64", 256),
    ("aes-cbc-plain", 256),
]
HASHES = ["sha1", "sha256", "sha512"]
CREATE_SPECS = [("aes-xts-plain64", 512), ("aes-cbc-essiv:sha256", 256), ("aes-cbc-plain64", 256)]


# ---------------------------------------------------------------------------------------------------------
# helpers


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}): {result.stderr}")
    return result


def key_file(tmp_path: Path, passphrase: bytes, name: str = "key") -> str:
    path = tmp_path / name
    path.write_bytes(passphrase)
    return str(path)


def reader_for(path: Path) -> tuple[luks_header.ReadAt, int]:
    data = path.read_bytes()
    return luks_header.bytes_reader(data, path=str(path)), len(data)


def read_file_header(path: Path) -> luks_header.LuksHeader:
    read_at, size = reader_for(path)
    return luks_header.read_header(read_at, size, path=str(path))


def dump_master_key(cryptsetup: str, image: Path, keyfile: str) -> tuple[bytes, dict[str, str]]:
    """(master key, other "Name: value" lines) from ``cryptsetup luksDump --dump-master-key``."""
    out = run(cryptsetup, "luksDump", "--dump-master-key", "--key-file", keyfile, "--batch-mode", str(image)).stdout
    head, _, dump = out.partition("MK dump:")
    fields = {}
    for line in head.splitlines():
        name, colon, value = line.partition(":")
        if colon:
            fields[name.strip()] = value.strip()
    return bytes.fromhex("".join(dump.split())), fields


def cryptsetup_format(cryptsetup: str, image: Path, keyfile: str, cipher: str, key_bits: int, hash_name: str) -> None:
    with open(image, "wb") as fh:
        fh.truncate(4 * MIB)
    run(
        cryptsetup,
        "luksFormat",
        "--type",
        "luks1",
        "--batch-mode",
        "--pbkdf-force-iterations",
        str(FORCED),
        "--key-file",
        keyfile,
        "--cipher",
        cipher,
        "--key-size",
        str(key_bits),
        "--hash",
        hash_name,
        str(image),
    )


def qemu_luks_create(qemu_img: str, image: Path, keyfile: str, options: str) -> None:
    """qemu-img create -f luks, retried: QEMU's benchmark sometimes fails on a busy machine."""
    for attempt in range(CPU_USAGE_ATTEMPTS):
        result = run(
            qemu_img,
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            f"secret,id=s,file={keyfile}",
            "-o",
            f"key-secret=s,iter-time=10{',' + options if options else ''}",
            str(image),
            "1M",
            check=False,
        )
        if result.returncode == 0:
            return
        if attempt == CPU_USAGE_ATTEMPTS - 1 or "CPU usage" not in result.stderr:
            raise AssertionError(f"qemu-img create failed: {result.stderr}")
    raise AssertionError("unreachable")


def write_image(path: Path, area: bytes | bytearray, payload: bytes = b"") -> None:
    with open(path, "wb") as fh:
        fh.write(area)
        fh.write(payload)


def patterned(sectors: int) -> bytes:
    return b"".join(struct.pack(">Q", i) * 64 for i in range(sectors))


def make_volume(
    cipher: str = "aes-xts-plain64", key_bits: int = 512, hash_name: str = "sha256"
) -> tuple[bytearray, luks_header.LuksHeader, bytearray]:
    master_key = luks_create.new_master_key(key_bits // 8)
    params = luks_create.LuksParams(cipher=cipher, key_bits=key_bits, hash_name=hash_name, iterations=FORCED)
    header, area = luks_create.create(master_key, PASSPHRASE, params)
    return master_key, header, area


@pytest.fixture(scope="module")
def volume() -> tuple[bytearray, luks_header.LuksHeader, bytearray]:
    """One xts-plain64/sha256 volume made by us (master key, header, header area)."""
    return make_volume()


# ---------------------------------------------------------------------------------------------------------
# reading headers made by the real tools


@pytest.mark.interop
@pytest.mark.parametrize("hash_name", HASHES)
@pytest.mark.parametrize(("cipher", "key_bits"), CRYPTSETUP_SPECS)
def test_unlock_cryptsetup_header(cryptsetup: str, tmp_path: Path, cipher: str, key_bits: int, hash_name: str) -> None:
    image, keyfile = tmp_path / "cs.img", key_file(tmp_path, PASSPHRASE)
    cryptsetup_format(cryptsetup, image, keyfile, cipher, key_bits, hash_name)
    expected_key, fields = dump_master_key(cryptsetup, image, keyfile)
    read_at, size = reader_for(image)
    header = luks_header.read_header(read_at, size, path=str(image))
    assert header.cipher == cipher == f"{fields['Cipher name']}-{fields['Cipher mode']}"
    assert (header.key_bits, header.hash_spec, header.uuid) == (key_bits, hash_name, fields["UUID"])
    assert header.payload_offset == int(fields["Payload offset"])
    assert header.to_bytes() == image.read_bytes()[: fmt.PHDR_SIZE]
    assert luks_keyslots.unlock(header, read_at, PASSPHRASE) == expected_key
    with pytest.raises(BadPassphraseError, match="opens no keyslot"):
        luks_keyslots.unlock(header, read_at, WRONG_PASSPHRASE)


# qemu-img benchmarks PBKDF2 for about a second whatever iter-time says, so keep this list short.
QEMU_OPTIONS = [
    pytest.param("", "aes-xts-plain64", 512, "sha256", id="defaults"),
    pytest.param(
        "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha1",
        "aes-cbc-essiv:sha256",
        128,
        "sha1",
        id="cbc-essiv-128-sha1",
    ),
]


@pytest.mark.interop
@pytest.mark.parametrize(("options", "cipher", "key_bits", "hash_name"), QEMU_OPTIONS)
def test_unlock_qemu_header(
    qemu_img: str, cryptsetup: str, tmp_path: Path, options: str, cipher: str, key_bits: int, hash_name: str
) -> None:
    image, keyfile = tmp_path / "q.luks", key_file(tmp_path, PASSPHRASE)
    qemu_luks_create(qemu_img, image, keyfile, options)
    header = read_file_header(image)
    assert (header.cipher, header.key_bits, header.hash_spec) == (cipher, key_bits, hash_name)
    step = header.keyslots[1].key_material_offset - 8
    assert header.payload_offset == 8 + 8 * step  # QEMU does not align the payload to 1 MiB
    expected_key, _ = dump_master_key(cryptsetup, image, keyfile)
    read_at, _size = reader_for(image)
    assert luks_keyslots.unlock(header, read_at, PASSPHRASE) == expected_key
    with pytest.raises(BadPassphraseError):
        luks_keyslots.unlock(header, read_at, WRONG_PASSPHRASE)


# ---------------------------------------------------------------------------------------------------------
# headers made by us, checked by the real tools


def _check_payload_with_qemu(qemu_img: str, tmp_path: Path, image: Path, keyfile: str, plaintext: bytes) -> None:
    out = tmp_path / "plain.raw"
    run(
        qemu_img,
        "convert",
        "--object",
        f"secret,id=s,file={keyfile}",
        "--image-opts",
        f"driver=luks,file.filename={image},key-secret=s",
        "-O",
        "raw",
        str(out),
    )
    assert_same_bytes(out.read_bytes(), plaintext, "qemu-img's decryption")


@pytest.mark.interop
@pytest.mark.parametrize("hash_name", HASHES)
@pytest.mark.parametrize(("cipher", "key_bits"), CREATE_SPECS)
def test_created_volume_interoperates(
    cryptsetup: str, qemu_img: str, tmp_path: Path, cipher: str, key_bits: int, hash_name: str
) -> None:
    master_key, header, area = make_volume(cipher, key_bits, hash_name)
    assert len(area) == header.payload_offset * 512
    plaintext = patterned(2048)  # 1 MiB; each sector differs, so IV mistakes past sector 0 show up
    name, mode = cipher_spec.split_cipher(cipher)
    image = tmp_path / "ours.luks"
    write_image(image, area, make_sector_cipher(name, mode, master_key).encrypt(plaintext, 0))
    keyfile, wrong = key_file(tmp_path, PASSPHRASE), key_file(tmp_path, WRONG_PASSPHRASE, "wrong")

    dump = run(cryptsetup, "luksDump", str(image)).stdout
    assert f"Hash spec:     \t{hash_name}" in dump
    assert run(cryptsetup, "open", "--test-passphrase", "--key-file", keyfile, str(image)).returncode == 0
    assert run(cryptsetup, "open", "--test-passphrase", "--key-file", wrong, str(image), check=False).returncode == 2
    dumped_key, fields = dump_master_key(cryptsetup, image, keyfile)
    assert dumped_key == master_key
    assert fields["UUID"] == header.uuid
    info = json.loads(run(qemu_img, "info", "--output=json", str(image)).stdout)
    assert info["format"] == "luks"
    _check_payload_with_qemu(qemu_img, tmp_path, image, keyfile, plaintext)
    copy = tmp_path / "copy.luks"
    shutil.copyfile(image, copy)
    run(cryptsetup, "convert", "--type", "luks2", "--batch-mode", str(copy))
    assert "Version:       \t2" in run(cryptsetup, "luksDump", str(copy)).stdout


@pytest.mark.interop
@pytest.mark.parametrize(
    ("cipher", "key_bits"), [("aes-xts-plain64", 512), ("aes-xts-plain64", 256), ("aes-cbc-essiv:sha256", 128)]
)
def test_layout_matches_cryptsetup(cryptsetup: str, tmp_path: Path, cipher: str, key_bits: int) -> None:
    image, keyfile = tmp_path / "cs.img", key_file(tmp_path, PASSPHRASE)
    cryptsetup_format(cryptsetup, image, keyfile, cipher, key_bits, "sha256")
    theirs = read_file_header(image)
    _mk, ours, area = make_volume(cipher, key_bits, "sha256")
    assert ours.payload_offset == theirs.payload_offset
    assert ours.keyslots[1:] == theirs.keyslots[1:]  # disabled slots identical, offsets and stripes included
    assert ours.keyslots[0].key_material_offset == theirs.keyslots[0].key_material_offset == 8
    assert (ours.mk_digest_iter, ours.keyslots[0].iterations) == (theirs.mk_digest_iter, FORCED)
    assert bytes(area[fmt.PHDR_SIZE : 8 * 512]) == bytes(8 * 512 - fmt.PHDR_SIZE)


def test_create_defaults_and_benchmarked_iterations() -> None:
    params = luks_create.LuksParams(iter_time_ms=20)
    master_key = luks_create.new_master_key(64)
    header, area = luks_create.create(master_key, PASSPHRASE, params)
    assert (header.cipher, header.key_bits, header.hash_spec, header.payload_offset) == (
        "aes-xts-plain64",
        512,
        "sha256",
        4096,
    )
    assert [s.key_material_offset for s in header.keyslots] == [8 + 504 * i for i in range(8)]
    rate = measured_rate(header.hash_spec, header.key_bytes)  # timed here, independently of kdf's benchmark
    assert max(1000, rate * 0.020 / 3) <= header.keyslots[0].iterations <= max(1000, rate * 0.020 * 3)
    assert max(1000, rate * 0.125 / 3) <= header.mk_digest_iter <= max(1000, rate * 0.125 * 3)
    assert header.uuid == header.uuid.lower() and len(header.uuid) == 36
    assert luks_header.read_header(luks_header.bytes_reader(area, path="mem"), len(area), path="mem") == header
    assert luks_keyslots.unlock(header, luks_header.bytes_reader(area, path="mem"), PASSPHRASE) == master_key


def test_create_qemu_style_layout_and_uuid() -> None:
    params = luks_create.LuksParams(
        iterations=FORCED, payload_align_sectors=0, uuid="0123ABCD-0123-4567-89AB-0123456789AB"
    )
    header, area = luks_create.create(luks_create.new_master_key(64), PASSPHRASE, params)
    assert header.payload_offset == 4040
    assert len(area) == 4040 * 512
    assert header.uuid == "0123abcd-0123-4567-89ab-0123456789ab"


@pytest.mark.parametrize(
    ("params", "error"),
    [
        (luks_create.LuksParams(cipher="aes-cbc-plain64:sha256", key_bits=256), FormatError),
        (luks_create.LuksParams(cipher="aes-xts-plain64", key_bits=128), FormatError),
        (luks_create.LuksParams(cipher="aes-cbc-plain64", key_bits=512), FormatError),
        (luks_create.LuksParams(cipher="aes", key_bits=256), FormatError),
        (luks_create.LuksParams(cipher="serpent-xts-plain64"), UnsupportedFeatureError),
        (luks_create.LuksParams(cipher="aes-ecb", key_bits=256), UnsupportedFeatureError),
        (luks_create.LuksParams(hash_name="md5"), UnsupportedFeatureError),
        (luks_create.LuksParams(hash_name="SHA256"), UnsupportedFeatureError),
        (luks_create.LuksParams(iterations=999), FormatError),
        (luks_create.LuksParams(uuid="not-a-uuid", iterations=FORCED), FormatError),
    ],
)
def test_create_refuses_bad_params(params: luks_create.LuksParams, error: type[Exception]) -> None:
    with pytest.raises(error):
        luks_create.create(luks_create.new_master_key(params.key_bits // 8), PASSPHRASE, params)


def test_create_refuses_wrong_key_length() -> None:
    with pytest.raises(FormatError, match="master key is 32 bytes"):
        luks_create.create(luks_create.new_master_key(32), PASSPHRASE, luks_create.LuksParams(iterations=FORCED))


def test_describe_is_json(volume: tuple[bytearray, luks_header.LuksHeader, bytearray]) -> None:
    _mk, header, _area = volume
    described = json.loads(json.dumps(header.describe()))
    assert described["cipher"] == "aes-xts-plain64"
    assert described["key_bits"] == 512 and described["version"] == 1
    assert described["keyslots"][0]["active"] is True and len(described["keyslots"][0]["salt"]) == 64
    assert [s["key_material_offset"] for s in described["keyslots"]] == [8 + 504 * i for i in range(8)]


# ---------------------------------------------------------------------------------------------------------
# keyslot management


@pytest.mark.interop
def test_add_and_remove_keyslots(cryptsetup: str, tmp_path: Path) -> None:
    master_key, header, area = make_volume("aes-cbc-essiv:sha256", 256, "sha1")
    header = luks_keyslots.add_keyslot(header, area, master_key, OTHER_PASSPHRASE, iterations=FORCED, slot=5)
    header = luks_keyslots.add_keyslot(header, area, master_key, b"third", iterations=FORCED)
    assert header.active_slots == (0, 1, 5)
    image = tmp_path / "slots.luks"
    write_image(image, area, bytes(MIB))
    key1, key2 = key_file(tmp_path, PASSPHRASE), key_file(tmp_path, OTHER_PASSPHRASE, "key2")
    test = (cryptsetup, "open", "--test-passphrase")
    assert run(*test, "--key-file", key2, "--key-slot", "5", str(image)).returncode == 0
    assert run(*test, "--key-file", key2, "--key-slot", "0", str(image), check=False).returncode != 0
    assert run(*test, "--key-file", key_file(tmp_path, b"third", "key3"), "--key-slot", "1", str(image)).returncode == 0
    read_at = luks_header.bytes_reader(area, path="mem")
    assert luks_keyslots.unlock(header, read_at, OTHER_PASSPHRASE, slot=5) == master_key
    assert luks_keyslots.unlocked_slot(header, read_at, b"third") == 1

    header = luks_keyslots.remove_keyslot(header, area, 0)
    write_image(image, area, bytes(MIB))
    assert "Key Slot 0: DISABLED" in run(cryptsetup, "luksDump", str(image)).stdout
    assert run(*test, "--key-file", key1, str(image), check=False).returncode == 2
    assert run(*test, "--key-file", key2, str(image)).returncode == 0
    assert read_file_header(image) == header
    assert header.keyslots[0] == luks_header.LuksKeyslot(0, False, 0, bytes(32), 8, 4000)


@pytest.mark.interop
def test_add_keyslot_to_cryptsetup_volume(cryptsetup: str, tmp_path: Path) -> None:
    image, keyfile = tmp_path / "cs.img", key_file(tmp_path, PASSPHRASE)
    cryptsetup_format(cryptsetup, image, keyfile, "aes-xts-plain64", 512, "sha512")
    header = read_file_header(image)
    data = bytearray(image.read_bytes())
    area = data[: header.payload_offset * 512]
    master_key = luks_keyslots.unlock(header, luks_header.bytes_reader(area, path="mem"), PASSPHRASE)
    luks_keyslots.add_keyslot(header, area, master_key, OTHER_PASSPHRASE, iterations=FORCED, slot=7)
    data[: len(area)] = area
    image.write_bytes(data)
    key2 = key_file(tmp_path, OTHER_PASSPHRASE, "key2")
    assert (
        run(cryptsetup, "open", "--test-passphrase", "--key-file", key2, "--key-slot", "7", str(image)).returncode == 0
    )
    assert "Key Slot 7: ENABLED" in run(cryptsetup, "luksDump", str(image)).stdout


def test_keyslot_management_refusals(volume: tuple[bytearray, luks_header.LuksHeader, bytearray]) -> None:
    master_key, header, area = volume
    area = bytearray(area)
    with pytest.raises(MigrationError, match="last active"):
        luks_keyslots.remove_keyslot(header, area, 0)
    with pytest.raises(MigrationError, match="not an active"):
        luks_keyslots.remove_keyslot(header, area, 3)
    with pytest.raises(MigrationError, match="already in use"):
        luks_keyslots.add_keyslot(header, area, master_key, b"x", iterations=FORCED, slot=0)
    with pytest.raises(MigrationError, match="does not exist"):
        luks_keyslots.add_keyslot(header, area, master_key, b"x", iterations=FORCED, slot=8)
    with pytest.raises(BadPassphraseError, match="master key"):
        luks_keyslots.add_keyslot(header, area, bytes(64), b"x", iterations=FORCED)
    with pytest.raises(FormatError, match="header area"):
        luks_keyslots.add_keyslot(header, bytearray(4096), master_key, b"x", iterations=FORCED, slot=2)
    full = header
    for _ in range(7):
        full = luks_keyslots.add_keyslot(full, area, master_key, b"x", iterations=FORCED)
    assert full.active_slots == tuple(range(8))
    with pytest.raises(MigrationError, match="all 8"):
        luks_keyslots.add_keyslot(full, area, master_key, b"x", iterations=FORCED)
    with pytest.raises(BadPassphraseError, match="not active"):
        luks_keyslots.unlock(header, luks_header.bytes_reader(area, path="mem"), PASSPHRASE, slot=4)


def test_verify_master_key(volume: tuple[bytearray, luks_header.LuksHeader, bytearray]) -> None:
    master_key, header, _area = volume
    assert luks_keyslots.verify_master_key(header, master_key)
    assert not luks_keyslots.verify_master_key(header, bytes(64))
    assert not luks_keyslots.verify_master_key(header, master_key[:32])


# ---------------------------------------------------------------------------------------------------------
# validation


def _poke(phdr: bytes, offset: int, fmt_code: str, value: int | bytes) -> bytes:
    data = bytearray(phdr)
    struct.pack_into(fmt_code, data, offset, value)
    return bytes(data)


def _slot_field(index: int, offset_in_slot: int) -> int:
    return 208 + 48 * index + offset_in_slot


def _read(data: bytes, region_size: int | None = None) -> luks_header.LuksHeader:
    size = len(data) if region_size is None else region_size
    return luks_header.read_header(luks_header.bytes_reader(data, path="t.luks"), size, path="t.luks")


INVALID = [
    pytest.param(lambda p: _poke(p, 0, "6s", b"LUKS\xba\xbf"), FormatError, "magic", id="magic"),
    pytest.param(lambda p: _poke(p, 6, ">H", 2), UnsupportedFeatureError, "version", id="luks2-version"),
    pytest.param(lambda p: _poke(p, 6, ">H", 3), UnsupportedFeatureError, "version", id="version-3"),
    pytest.param(
        lambda p: _poke(p, _slot_field(7, 44), ">I", 3999), FormatError, "keyslot 7 stripes", id="stripes-disabled-slot"
    ),
    pytest.param(lambda p: _poke(p, _slot_field(0, 44), ">I", 0), FormatError, "keyslot 0 stripes", id="stripes-0"),
    pytest.param(lambda p: _poke(p, _slot_field(3, 0), ">I", 0), FormatError, "keyslot 3 active", id="active-0"),
    pytest.param(
        lambda p: _poke(p, _slot_field(0, 4), ">I", 0), FormatError, "keyslot 0 iterations", id="iterations-0"
    ),
    pytest.param(lambda p: _poke(p, 40, "32s", b"x" * 32), FormatError, "cipher_mode", id="no-nul"),
    pytest.param(lambda p: _poke(p, 40, "32s", b"xts-plain\xff4"), FormatError, "cipher_mode", id="non-ascii"),
    pytest.param(lambda p: _poke(p, 108, ">I", 0), FormatError, "key_bytes", id="key-bytes-0"),
    pytest.param(lambda p: _poke(p, 108, ">I", 513), FormatError, "key_bytes", id="key-bytes-513"),
    pytest.param(lambda p: _poke(p, 8, "32s", b""), FormatError, "cipher_name", id="cipher-empty"),
    pytest.param(lambda p: _poke(p, 164, ">I", 0), FormatError, "mk_digest_iter", id="digest-iter-0"),
    pytest.param(lambda p: _poke(p, 104, ">I", 4000), FormatError, "payload_offset", id="payload-in-slot-7"),
    # slot 7's material is sectors 3536..4035 (512-bit key: 500 sectors): one sector of overlap is refused
    pytest.param(lambda p: _poke(p, 104, ">I", 4035), FormatError, "payload_offset", id="payload-1-sector-in-slot-7"),
    pytest.param(
        lambda p: _poke(p, _slot_field(2, 40), ">I", 1), FormatError, "keyslot 2 key_material_offset", id="slot-in-phdr"
    ),
    pytest.param(
        lambda p: _poke(p, _slot_field(2, 40), ">I", 600), FormatError, "key_material_offset", id="slots-overlap"
    ),
    # slot 1's material is sectors 512..1011: slot 2 starting at 1011 overlaps it by one sector
    pytest.param(
        lambda p: _poke(p, _slot_field(2, 40), ">I", 1011),
        FormatError,
        "keyslot 2 key_material_offset",
        id="slots-overlap-1-sector",
    ),
    pytest.param(
        lambda p: _poke(p, _slot_field(6, 40), ">I", 10**6),
        FormatError,
        "keyslot 6 key_material_offset",
        id="slot-past-region",
    ),
]


# Well-formed LUKS1 (cryptsetup reads them) naming algorithms qcrypt does not implement: read, then refused
# by require_supported with the part named. The last item says whether QEMU implements them.
UNSUPPORTED = [
    pytest.param(lambda p: _poke(p, 72, "32s", b"SHA256"), "hash 'SHA256'", False, id="hash-uppercase"),
    pytest.param(lambda p: _poke(p, 72, "32s", b"whirlpool"), "hash 'whirlpool'", False, id="hash-whirlpool"),
    pytest.param(lambda p: _poke(p, 72, "32s", b"md5"), "hash 'md5'", True, id="hash-md5"),
    pytest.param(lambda p: _poke(p, 8, "32s", b"blowfish"), "cipher 'blowfish'", False, id="cipher-blowfish"),
    pytest.param(lambda p: _poke(p, 8, "32s", b"serpent"), "cipher 'serpent'", True, id="cipher-serpent"),
    pytest.param(lambda p: _poke(p, 40, "32s", b"xts-benbi"), "mode 'xts-benbi'", False, id="ivgen-benbi"),
    pytest.param(lambda p: _poke(p, 40, "32s", b"lrw-benbi"), "mode 'lrw-benbi'", False, id="mode-lrw"),
    pytest.param(lambda p: _poke(p, 40, "32s", b"xts"), "mode 'xts'", False, id="no-ivgen"),
    pytest.param(lambda p: _poke(p, 108, ">I", 40), "a 320-bit key for aes-xts-plain64", False, id="key-bytes-40"),
]


@pytest.mark.parametrize(("mutate", "part", "qemu_implements"), UNSUPPORTED)
def test_unsupported_algorithms_are_still_luks1(
    volume: tuple[bytearray, luks_header.LuksHeader, bytearray], mutate: object, part: str, qemu_implements: bool
) -> None:
    _mk, _header, area = volume
    header = _read(mutate(bytes(area[: fmt.PHDR_SIZE])) + bytes(area[fmt.PHDR_SIZE :]))  # type: ignore[operator]
    assert luks_header.qcrypt_unsupported(header) == [part]
    assert bool(luks_header.qemu_unsupported(header)) is not qemu_implements
    with pytest.raises(UnsupportedFeatureError) as caught:
        luks_header.require_supported(header, path="t.luks")
    assert caught.value.path == "t.luks" and part in str(caught.value)
    assert str(caught.value).count("t.luks") == 1


@pytest.mark.parametrize(("mutate", "error", "field"), INVALID)
def test_invalid_headers(
    volume: tuple[bytearray, luks_header.LuksHeader, bytearray], mutate: object, error: type, field: str
) -> None:
    _mk, _header, area = volume
    data = mutate(bytes(area[: fmt.PHDR_SIZE])) + bytes(area[fmt.PHDR_SIZE :])  # type: ignore[operator]
    with pytest.raises(error) as caught:
        _read(data)
    assert caught.value.path == "t.luks"
    assert field in (caught.value.field or "")


def test_accepted_variants(volume: tuple[bytearray, luks_header.LuksHeader, bytearray]) -> None:
    master_key, header, area = volume
    phdr = bytes(area[: fmt.PHDR_SIZE])
    rest = bytes(area[fmt.PHDR_SIZE :])
    detached = _read(_poke(phdr, 104, ">I", 0) + rest)  # payload_offset 0: detached header
    assert detached.payload_offset == 0
    tight = _read(_poke(phdr, 104, ">I", 4036) + rest)  # payload right after slot 7's material (QEMU's layout)
    assert tight.payload_offset == 4036
    after_nul = _read(_poke(phdr, 40, "32s", b"xts-plain64\0\xff\xfe") + rest)  # bytes after the NUL ignored
    assert after_nul.cipher_mode == "xts-plain64"
    qemu_suffix = _read(_poke(phdr, 40, "32s", b"xts-plain64:sha256") + rest)  # QEMU ignores the suffix
    assert luks_keyslots.unlock(qemu_suffix, luks_header.bytes_reader(area, path="m"), PASSPHRASE) == master_key
    # the region only needs to reach the end of the last keyslot, not the payload
    last_end = (header.keyslots[7].key_material_offset + header.material_sectors) * 512
    assert _read(bytes(area[:last_end])) == header
    with pytest.raises(FormatError, match="past the end"):
        _read(bytes(area[: last_end - 512]))


def test_region_smaller_than_phdr() -> None:
    with pytest.raises(FormatError, match="smaller than a LUKS1 header"):
        _read(b"LUKS\xba\xbe\x00\x01")


def test_luks_version_probe(volume: tuple[bytearray, luks_header.LuksHeader, bytearray]) -> None:
    _mk, _header, area = volume
    assert luks_header.luks_version(luks_header.bytes_reader(area, path="m"), len(area), path="m") == 1
    assert luks_header.luks_version(luks_header.bytes_reader(b"QFI\xfb" + bytes(600), path="m"), 604, path="m") is None
    assert luks_header.luks_version(luks_header.bytes_reader(b"LUK", path="m"), 3, path="m") is None


def test_file_reader_bounds(tmp_path: Path, volume: tuple[bytearray, luks_header.LuksHeader, bytearray]) -> None:
    master_key, header, area = volume
    image = tmp_path / "embedded.bin"
    image.write_bytes(bytes(65536) + area)  # like an FDE region at a cluster offset inside a qcow2 file
    with open(image, "rb") as fh:
        read_at = luks_header.file_reader(fh, 65536, len(area), path=str(image))
        assert luks_header.read_header(read_at, len(area), path=str(image)) == header
        assert luks_keyslots.unlock(header, read_at, PASSPHRASE) == master_key
        with pytest.raises(FormatError, match="outside the LUKS region"):
            read_at(len(area) - 10, 20)
        past_end = luks_header.file_reader(fh, 65536, len(area) + 4096, path=str(image))
        with pytest.raises(FormatError, match="short read"):
            past_end(len(area), 4096)
    in_memory = luks_header.file_reader(io.BytesIO(image.read_bytes()), 65536, len(area), path="mem")
    assert luks_header.read_header(in_memory, len(area), path="mem") == header


# ---------------------------------------------------------------------------------------------------------
# robustness


def test_random_mutations_raise_only_qcrypt_errors(volume: tuple[bytearray, luks_header.LuksHeader, bytearray]) -> None:
    _mk, _header, area = volume
    original = bytes(area)
    rng = random.Random(20240601)
    outcomes = {"accepted": 0, "rejected": 0, "unlock_checked": 0}
    deadline = time.monotonic() + 15
    for round_no in range(600):
        data = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(fmt.PHDR_SIZE)] ^= 1 << rng.randrange(8)
        try:
            header = _read(bytes(data))
        except QcryptError:
            outcomes["rejected"] += 1
            continue
        outcomes["accepted"] += 1
        cheap = header.mk_digest_iter <= 5000 and all(s.iterations <= 5000 for s in header.keyslots if s.active)
        if cheap and round_no % 10 == 0:
            outcomes["unlock_checked"] += 1
            with contextlib.suppress(QcryptError):
                luks_keyslots.unlock(header, luks_header.bytes_reader(bytes(data), path="m"), PASSPHRASE)
        assert time.monotonic() < deadline
    assert outcomes["accepted"] > 50 and outcomes["rejected"] > 50 and outcomes["unlock_checked"] > 3


def test_truncations_raise_only_format_errors(volume: tuple[bytearray, luks_header.LuksHeader, bytearray]) -> None:
    _mk, header, area = volume
    for size in [0, 1, 6, 8, 100, 591, 592, 4096, 8 * 512 + 1000, 500 * 512]:
        data = bytes(area[:size])
        with pytest.raises(FormatError):
            _read(data)
        # the region claims more than the reader can deliver: the header may parse, the key material cannot
        read_at = luks_header.bytes_reader(data, path="t")
        with pytest.raises(FormatError):
            luks_keyslots.unlock(luks_header.read_header(read_at, len(area), path="t"), read_at, PASSPHRASE)
        assert size < fmt.PHDR_SIZE or luks_header.read_header(read_at, len(area), path="t") == header


def test_dataclass_replace_round_trip(volume: tuple[bytearray, luks_header.LuksHeader, bytearray]) -> None:
    _mk, header, area = volume
    changed = dataclasses.replace(header, uuid="11111111-2222-3333-4444-555555555555")
    data = changed.to_bytes() + bytes(area[fmt.PHDR_SIZE :])
    assert _read(data) == changed
