"""LUKS2 recognition and reporting (no unlocking): the binary header, its checksum and the JSON metadata.

References: cryptsetup lib/luks2/luks2.h and lib/luks2/luks2_disk_metadata.c (behaviour only).
QEMU cannot open LUKS2, so qcrypt only describes such volumes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qcrypt.errors import FormatError, LimitExceededError, UnsupportedFeatureError
from qcrypt.formats import luks1 as luks1_fmt
from qcrypt.formats import luks2 as luks2_fmt
from qcrypt.formats._parse import parse_bytes
from qcrypt.plumbing import limits

ReadAt = Callable[[int, int], bytes]  # (offset within the region, length) -> bytes; same as qcrypt.luks.header.ReadAt

KDF_FIELDS = ("hash", "iterations", "time", "memory", "cpus")


@dataclass(frozen=True)
class Luks2Info:
    """What qcrypt reports about a LUKS2 volume. ``keyslots`` entries are JSON-able dicts."""

    version: int
    uuid: str
    label: str
    hdr_size: int
    checksum_ok: bool
    segment_cipher: str | None
    segment_sector_size: int | None
    keyslots: tuple[dict[str, Any], ...]
    checksum_alg: str = "sha256"
    seqid: int = 0
    segment_offset: int | None = None  # bytes from the start of the device
    segment_size: int | None = None  # bytes; None = "dynamic" (up to the end of the device)

    def payload_bytes(self, device_size: int) -> int | None:
        """The data segment's size as dm-crypt sees it (dynamic segments end at the device's end)."""
        if self.segment_size is not None:
            return self.segment_size
        if self.segment_offset is None:
            return None
        sector = self.segment_sector_size or 512
        return max(0, device_size - self.segment_offset) // sector * sector

    def describe(self) -> dict[str, object]:
        """A JSON-able summary for ``qcrypt info``."""
        return {
            "version": self.version,
            "uuid": self.uuid,
            "label": self.label,
            "hdr_size": self.hdr_size,
            "seqid": self.seqid,
            "checksum_alg": self.checksum_alg,
            "checksum_ok": self.checksum_ok,
            "cipher": self.segment_cipher,
            "sector_size": self.segment_sector_size,
            "payload_offset_bytes": self.segment_offset,
            "keyslots": [dict(slot, kdf=dict(slot["kdf"])) for slot in self.keyslots],
        }


def _text(raw: bytes) -> str:
    """A NUL-terminated text field; undecodable bytes are replaced (labels are free-form)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _check_hdr_size(hdr_size: int, region_size: int, path: str) -> None:
    if not luks2_fmt.MIN_HDR_SIZE <= hdr_size <= luks2_fmt.MAX_HDR_SIZE or hdr_size & (hdr_size - 1):
        raise FormatError(
            f"{hdr_size} is not a power of two between {luks2_fmt.MIN_HDR_SIZE} and {luks2_fmt.MAX_HDR_SIZE}",
            path=path,
            field="hdr_size",
        )
    if hdr_size > region_size:
        raise FormatError(
            f"the LUKS2 header ({hdr_size} bytes) extends past the end of the region ({region_size} bytes)",
            path=path,
            field="hdr_size",
        )


CHECKSUM_ALGORITHMS = ("sha1", "sha256", "sha512")  # what cryptsetup writes; anything else is refused


def _checksum_ok(header_area: bytes, checksum_alg: str, stored: bytes, path: str) -> bool:
    if checksum_alg not in CHECKSUM_ALGORITHMS:
        raise UnsupportedFeatureError(
            f"unsupported checksum algorithm {checksum_alg!r}", path=path, field="checksum_alg"
        )
    h = hashlib.new(checksum_alg)
    if h.digest_size > luks2_fmt.CSUM_SIZE:
        raise UnsupportedFeatureError(
            f"unsupported checksum algorithm {checksum_alg!r}", path=path, field="checksum_alg"
        )
    h.update(header_area[: luks2_fmt.CSUM_OFFSET])
    h.update(bytes(luks2_fmt.CSUM_SIZE))
    h.update(header_area[luks2_fmt.CSUM_OFFSET + luks2_fmt.CSUM_SIZE :])
    return h.digest() == stored[: h.digest_size]


def _load_json(json_area: bytes, path: str) -> dict[str, Any]:
    end = json_area.find(b"\0")
    if end < 0:
        raise FormatError("the JSON area is not NUL-terminated", path=path, field="json")
    try:
        metadata = json.loads(json_area[:end].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"invalid JSON metadata ({type(e).__name__})", path=path, field="json") from None
    if not isinstance(metadata, dict):
        raise FormatError("the JSON metadata is not an object", path=path, field="json")
    return metadata


SECTION_LIMITS = {"keyslots": limits.MAX_LUKS2_KEYSLOTS, "segments": limits.MAX_LUKS2_SEGMENTS}


def _section(metadata: dict[str, Any], name: str, path: str) -> list[tuple[int, dict[str, Any]]]:
    """The numbered objects of ``metadata[name]`` sorted by index, type-checked."""
    section = metadata.get(name, {})
    if not isinstance(section, dict):
        raise FormatError("not a JSON object", path=path, field=f"json {name}")
    if len(section) > SECTION_LIMITS[name]:
        raise LimitExceededError(
            f"{len(section)} entries exceed the limit of {SECTION_LIMITS[name]}", path=path, field=f"json {name}"
        )
    items = []
    for key, value in section.items():
        if not (isinstance(key, str) and _is_decimal(key, 10) and isinstance(value, dict)):
            raise FormatError(f"entry {key!r} is not a numbered object", path=path, field=f"json {name}")
        items.append((int(key), value))
    return sorted(items, key=lambda item: item[0])


def _optional(value: object, kind: type) -> Any:
    """``value`` if it has type ``kind`` (bools are not ints), else None."""
    if isinstance(value, bool) and kind is not bool:
        return None
    return value if isinstance(value, kind) else None


def _keyslot(index: int, slot: dict[str, Any]) -> dict[str, Any]:
    kdf = slot.get("kdf")
    kdf = kdf if isinstance(kdf, dict) else {}
    described: dict[str, Any] = {"type": _optional(kdf.get("type"), str)}
    for name in KDF_FIELDS:
        described[name] = _optional(kdf.get(name), str if name == "hash" else int)
    return {
        "index": index,
        "type": _optional(slot.get("type"), str),
        "kdf": described,
        "key_size": _optional(slot.get("key_size"), int),
    }


def _is_decimal(text: str, max_digits: int) -> bool:
    """ASCII digits only (str.isdigit also accepts e.g. superscripts, which int() refuses)."""
    return 0 < len(text) <= max_digits and text.isascii() and text.isdigit()


def _decimal(value: object) -> int | None:
    """LUKS2 JSON writes 64-bit numbers as decimal strings; anything else (e.g. "dynamic") is None."""
    return int(value) if isinstance(value, str) and _is_decimal(value, 20) else None


def _segment(metadata: dict[str, Any], path: str) -> tuple[str | None, int | None, int | None, int | None]:
    """(cipher, sector size, offset, size) of the first "crypt" data segment (else the first), if any."""
    segments = [segment for _index, segment in _section(metadata, "segments", path)]
    crypt = [segment for segment in segments if segment.get("type") == "crypt"]
    for segment in crypt or segments:
        return (
            _optional(segment.get("encryption"), str),
            _optional(segment.get("sector_size"), int),
            _decimal(segment.get("offset")),
            _decimal(segment.get("size")),
        )
    return None, None, None, None


def read_luks2(read_at: ReadAt, region_size: int, *, path: str) -> Luks2Info:
    """Read and check the primary LUKS2 header at the start of a region of ``region_size`` bytes."""
    if region_size < luks2_fmt.BINARY_HEADER_SIZE:
        raise FormatError("the region is smaller than a LUKS2 binary header", path=path, field="luks2 header")
    raw = parse_bytes(luks2_fmt.BinaryHeader, read_at(0, luks2_fmt.BINARY_HEADER_SIZE), path=path, what="luks2 header")
    if raw.magic != luks1_fmt.MAGIC:  # LUKS2 keeps LUKS1's magic (the version field tells them apart)
        raise FormatError("bad LUKS2 magic", path=path, field="magic")
    if raw.version != luks2_fmt.VERSION:
        raise UnsupportedFeatureError(f"LUKS version {raw.version}, expected 2", path=path, field="version")
    if raw.hdr_offset != 0:
        raise FormatError(f"primary header claims offset {raw.hdr_offset}", path=path, field="hdr_offset")
    _check_hdr_size(raw.hdr_size, region_size, path)
    header_area = read_at(0, raw.hdr_size)
    checksum_alg = _text(raw.checksum_alg)
    checksum_ok = _checksum_ok(header_area, checksum_alg, raw.csum, path)
    metadata = _load_json(header_area[luks2_fmt.BINARY_HEADER_SIZE :], path)
    cipher, sector_size, segment_offset, segment_size = _segment(metadata, path)
    return Luks2Info(
        version=raw.version,
        uuid=_text(raw.uuid),
        label=_text(raw.label),
        hdr_size=raw.hdr_size,
        checksum_ok=checksum_ok,
        segment_cipher=cipher,
        segment_sector_size=sector_size,
        segment_offset=segment_offset,
        segment_size=segment_size,
        keyslots=tuple(_keyslot(i, slot) for i, slot in _section(metadata, "keyslots", path)),
        checksum_alg=checksum_alg,
        seqid=raw.seqid,
    )
