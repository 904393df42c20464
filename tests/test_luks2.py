"""LUKS2 recognition: headers made by cryptsetup, compared with ``cryptsetup luksDump``; damage handling."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import subprocess
from pathlib import Path

import pytest

from qcrypt.errors import FormatError, QcryptError, UnsupportedFeatureError
from qcrypt.luks import create as luks_create
from qcrypt.luks import header as luks_header
from qcrypt.luks import luks2
from tests._tools import require_tool

MIB = 1 << 20
HDR_SIZE = 0x4000

PBKDF_OPTIONS = {
    "pbkdf2": ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
    "argon2id": ["--pbkdf", "argon2id", "--pbkdf-memory", "32", "--pbkdf-force-iterations", "4"],
}


def luks_dump_fields(cryptsetup: str, image: Path) -> dict[str, list[str]]:
    """Every "name: value" line of ``cryptsetup luksDump``, values in order of appearance."""
    out = subprocess.run(
        [cryptsetup, "luksDump", str(image)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    fields: dict[str, list[str]] = {}
    for line in out.splitlines():
        name, colon, value = line.partition(":")
        if colon:
            fields.setdefault(name.strip(), []).append(value.strip())
    return fields


def format_luks2(cryptsetup: str, image: Path, kdf: str, label: str = "qcrypt test") -> None:
    keyfile = image.with_suffix(".key")
    keyfile.write_bytes(b"luks2 passphrase")
    with open(image, "wb") as fh:
        fh.truncate(2 * MIB)
    subprocess.run(
        [
            cryptsetup,
            "luksFormat",
            "--type",
            "luks2",
            "--batch-mode",
            *PBKDF_OPTIONS[kdf],
            "--luks2-keyslots-size",
            "512k",
            "--label",
            label,
            "--key-file",
            str(keyfile),
            str(image),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )


def read(data: bytes | bytearray, region_size: int | None = None) -> luks2.Luks2Info:
    size = len(data) if region_size is None else region_size
    return luks2.read_luks2(luks_header.bytes_reader(data, path="t.img"), size, path="t.img")


@pytest.fixture(scope="module")
def pbkdf2_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    image = tmp_path_factory.mktemp("luks2") / "pbkdf2.img"
    format_luks2(require_tool("cryptsetup"), image, "pbkdf2")
    return image.read_bytes()


@pytest.mark.interop
@pytest.mark.parametrize("kdf", ["pbkdf2", "argon2id"])
def test_matches_luks_dump(cryptsetup: str, tmp_path: Path, kdf: str) -> None:
    image = tmp_path / f"{kdf}.img"
    format_luks2(cryptsetup, image, kdf, label=f"label-{kdf}")
    dump = luks_dump_fields(cryptsetup, image)
    with open(image, "rb") as fh:
        size = image.stat().st_size
        read_at = luks_header.file_reader(fh, 0, size, path=str(image))
        assert luks_header.luks_version(read_at, size, path=str(image)) == 2
        info = luks2.read_luks2(read_at, size, path=str(image))
    assert info.version == 2 and info.checksum_ok
    assert info.uuid == dump["UUID"][0]
    assert info.label == dump["Label"][0] == f"label-{kdf}"
    assert info.hdr_size == int(dump["Metadata area"][0].split()[0]) == HDR_SIZE
    assert info.segment_cipher == dump["cipher"][0] == "aes-xts-plain64"
    assert info.segment_sector_size == int(dump["sector"][0].split()[0])
    [slot] = info.keyslots
    assert slot["type"] == "luks2" and slot["key_size"] == 64
    assert slot["kdf"]["type"] == dump["PBKDF"][0] == kdf
    if kdf == "pbkdf2":
        assert slot["kdf"]["hash"] == "sha256"
        assert slot["kdf"]["iterations"] == 1000
    else:
        assert (slot["kdf"]["time"], slot["kdf"]["memory"]) == (4, 32)
        assert slot["kdf"]["cpus"] == int(dump["Threads"][0])
    described = json.loads(json.dumps(info.describe()))
    assert described["cipher"] == "aes-xts-plain64" and described["keyslots"][0]["kdf"]["type"] == kdf


def _json_area(data: bytes) -> bytes:
    return data[4096:HDR_SIZE]


@pytest.mark.interop
def test_changed_json_byte_breaks_checksum(pbkdf2_image: bytes) -> None:
    data = bytearray(pbkdf2_image)
    position = data.index(b'"aes-xts-plain64"', data.index(b'"segments"', 4096))
    data[position + 15] = ord("5")  # still valid JSON, now "aes-xts-plain65"
    info = read(data)
    assert not info.checksum_ok
    assert info.segment_cipher == "aes-xts-plain65"


@pytest.mark.interop
def test_padding_after_json_is_covered_by_checksum(pbkdf2_image: bytes) -> None:
    data = bytearray(pbkdf2_image)
    data[HDR_SIZE - 1] ^= 0x01
    assert read(pbkdf2_image).checksum_ok
    assert not read(data).checksum_ok


@pytest.mark.interop
def test_checksum_recomputed_independently(pbkdf2_image: bytes) -> None:
    header = bytearray(pbkdf2_image[:HDR_SIZE])
    stored = bytes(header[448:480])
    header[448:512] = bytes(64)
    assert hashlib.sha256(header).digest() == stored


@pytest.mark.interop
def test_damaged_headers(pbkdf2_image: bytes) -> None:
    def patched(offset: int, value: bytes) -> bytearray:
        data = bytearray(pbkdf2_image)
        data[offset : offset + len(value)] = value
        return data

    cases: list[tuple[bytearray, type[QcryptError], str]] = [
        (patched(4096, b"x"), FormatError, "json"),  # broken JSON
        (patched(4096, b"[1, 2]" + bytes(10)), FormatError, "json"),  # not an object
        (patched(4096, b"\xff\xfe"), FormatError, "json"),  # not UTF-8
        (patched(4096, b"\x01" * (HDR_SIZE - 4096)), FormatError, "json"),  # no NUL terminator
        (patched(8, struct.pack(">Q", 12345)), FormatError, "hdr_size"),
        (patched(8, struct.pack(">Q", 0x2000)), FormatError, "hdr_size"),
        (patched(8, struct.pack(">Q", 0x800000)), FormatError, "hdr_size"),
        (patched(8, struct.pack(">Q", 0x400000)), FormatError, "hdr_size"),  # past the 2 MiB file
        (patched(0, b"LUKS\xba\xbf"), FormatError, "magic"),
        (patched(0, b"SKUL\xba\xbe"), FormatError, "magic"),  # a secondary header is not a primary one
        (patched(6, b"\x00\x03"), UnsupportedFeatureError, "version"),
        (patched(72, b"whirlpool\0"), UnsupportedFeatureError, "checksum_alg"),
        (patched(256, struct.pack(">Q", 4096)), FormatError, "hdr_offset"),
    ]
    for data, error, field in cases:
        with pytest.raises(error) as caught:
            read(data)
        assert caught.value.field == field
        assert caught.value.path == "t.img"


@pytest.mark.interop
def test_luks1_readers_refuse_each_other(pbkdf2_image: bytes) -> None:
    with pytest.raises(UnsupportedFeatureError, match="version 2"):
        luks_header.read_header(luks_header.bytes_reader(pbkdf2_image, path="t"), len(pbkdf2_image), path="t")
    params = luks_create.LuksParams(iterations=1000)
    _header, area = luks_create.create(luks_create.new_master_key(64), b"pw", params)
    with pytest.raises(UnsupportedFeatureError, match="version 1"):
        read(area)
    with pytest.raises(FormatError, match="smaller than"):
        read(pbkdf2_image[:4000])


@pytest.mark.interop
def test_random_damage_raises_only_qcrypt_errors(pbkdf2_image: bytes) -> None:
    rng = random.Random(7)
    json_end = pbkdf2_image.index(b"\0", 4096)
    results = {"ok": 0, "bad_checksum": 0, "error": 0}
    for _ in range(300):
        data = bytearray(pbkdf2_image[:HDR_SIZE])
        for _ in range(rng.randint(1, 3)):
            position = rng.choice([rng.randrange(512), rng.randrange(4096, json_end + 1)])
            data[position] = rng.randrange(256)
        try:
            info = read(data)
        except QcryptError:
            results["error"] += 1
            continue
        results["ok" if info.checksum_ok else "bad_checksum"] += 1
        json.dumps(info.describe())
    assert results["error"] > 10 and results["bad_checksum"] > 10


def test_odd_but_valid_json_is_reported_leniently() -> None:
    metadata = {
        "keyslots": {
            "1": {"type": "luks2", "kdf": {"type": "pbkdf2", "hash": 5, "iterations": True}},
            "0": {"type": 7, "key_size": "64"},
        },
        "segments": {
            "3": {"type": "crypt", "encryption": "aes-cbc-essiv:sha256", "sector_size": 512},
            "0": {"type": "linear"},
        },
    }
    data = _make_header(metadata, label=b"\xc3\xa9t\xe9")
    info = read(data)
    assert info.checksum_ok and info.label == "\u00e9t\ufffd"
    assert [slot["index"] for slot in info.keyslots] == [0, 1]
    assert info.keyslots[0] == {
        "index": 0,
        "type": None,
        "kdf": {"type": None, "hash": None, "iterations": None, "time": None, "memory": None, "cpus": None},
        "key_size": None,
    }
    assert info.keyslots[1]["kdf"]["hash"] is None and info.keyslots[1]["kdf"]["iterations"] is None
    assert (info.segment_cipher, info.segment_sector_size) == ("aes-cbc-essiv:sha256", 512)  # first "crypt"
    assert read(_make_header({"segments": {"0": {"type": "linear"}}})).segment_cipher is None
    with pytest.raises(FormatError, match="numbered object"):
        read(_make_header({"keyslots": {"x": {}}}))
    with pytest.raises(FormatError, match="not a JSON object"):
        read(_make_header({"segments": []}))


def _make_header(metadata: object, label: bytes = b"") -> bytes:
    """A synthetic primary LUKS2 header (16 KiB) with a correct sha256 checksum."""
    binary = bytearray(4096)
    binary[0:8] = b"LUKS\xba\xbe\x00\x02"
    binary[8:16] = struct.pack(">Q", HDR_SIZE)
    binary[24 : 24 + len(label)] = label
    binary[72:78] = b"sha256"
    binary[168:204] = b"01234567-89ab-cdef-0123-456789abcdef"
    text = json.dumps(metadata).encode()
    area = binary + text + bytes(HDR_SIZE - 4096 - len(text))
    csum = hashlib.sha256(area).digest()
    return area[:448] + csum + bytes(32) + area[512:]


def _reseal(area: bytearray, json_text: bytes, csum_alg: bytes = b"sha256") -> bytearray:
    """Replace the JSON area of a LUKS2 header and recompute a valid checksum (hostile but well-formed)."""
    import hashlib

    hdr_size = int.from_bytes(area[8:16], "big")
    area[4096:hdr_size] = json_text.ljust(hdr_size - 4096, b"\0")
    area[72:104] = csum_alg.ljust(32, b"\0")
    area[448:512] = bytes(64)
    if csum_alg in (b"sha1", b"sha256", b"sha512"):
        digest = hashlib.new(csum_alg.decode(), bytes(area[:hdr_size])).digest()
        area[448 : 448 + len(digest)] = digest
    return area


@pytest.mark.parametrize(
    "json_text,csum",
    [
        (
            b'{"keyslots":{},"segments":{"0":{"type":"crypt","offset":"\\u00b2","size":"dynamic"}},"digests":{}}',
            b"sha256",
        ),
        (b'{"keyslots":{"\\u00b2":{}},"segments":{},"digests":{}}', b"sha256"),
        (b'{"keyslots":{},"segments":{},"digests":{}}', b"shake_256"),
    ],
)
def test_hostile_but_checksummed_headers_give_format_errors(tmp_path: Path, json_text: bytes, csum: bytes) -> None:
    """Non-ASCII digits and odd checksum algorithms must not escape as ValueError/TypeError (scan aborts)."""
    from tests import _audit as scan

    area = bytearray(0x4000 * 2)
    area[0:6] = b"LUKS\xba\xbe"
    area[6:8] = (2).to_bytes(2, "big")
    area[8:16] = (0x4000).to_bytes(8, "big")
    path = tmp_path / "hostile.luks"
    path.write_bytes(bytes(_reseal(area, json_text, csum)) + bytes(1 << 20))
    report = scan.inspect(path)
    assert report["encryption"] in ("luks2", "none") and report["severity"] in scan.SEVERITIES
    if "error" in report:
        assert "internal error" not in report["error"]
