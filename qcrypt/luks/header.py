"""The LUKS1 header: its model, the readers of a LUKS region, parsing and validation.

References: cryptsetup lib/luks1/luks.h and keymanage.c (LUKS_check_keyslots); qemu crypto/block-luks.c
(behaviour only, our own code). All offsets in a header are 512-byte sectors counted from the start of the
LUKS region (offset 0 of a raw LUKS file, or the FDE extension offset of a qcow2 file). Reads go through a
``ReadAt`` callable so the same code serves both.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import construct

from qcrypt.crypto.cipher_support import check_sector_cipher
from qcrypt.crypto.kdf import (
    MAX_ITERATIONS,
    supported_hashes,
)
from qcrypt.errors import (
    FormatError,
    LimitExceededError,
    QcryptIOError,
    UnsupportedFeatureError,
)
from qcrypt.formats import luks1 as luks1_fmt
from qcrypt.formats._parse import parse_bytes
from qcrypt.luks.cipher_spec import (
    CHAIN_MODES,
    CIPHER_KEY_BYTES,
    IV_GENERATORS,
    MAX_KEY_BYTES,
    QEMU_HASH_BYTES,
    QEMU_HASHES,
    UNSUPPORTED_FIELD,
    check_cipher,
)
from qcrypt.model.units import SECTOR
from qcrypt.plumbing import limits
from qcrypt.plumbing.files import read_at_offset

ReadAt = Callable[[int, int], bytes]

MIN_SLOT_OFFSET_SECTORS = 2  # key material must start after the 1024-byte phdr area (cryptsetup)


@dataclass(frozen=True)
class LuksKeyslot:
    """One of the 8 LUKS1 keyslots (offsets in 512-byte sectors from the region start)."""

    index: int
    active: bool
    iterations: int
    salt: bytes
    key_material_offset: int
    stripes: int

    def describe(self) -> dict[str, object]:
        return {
            "index": self.index,
            "active": self.active,
            "iterations": self.iterations,
            "salt": self.salt.hex(),
            "stripes": self.stripes,
            "key_material_offset": self.key_material_offset,
        }


@dataclass(frozen=True)
class LuksHeader:
    """A validated LUKS1 partition header (phdr)."""

    version: int
    cipher_name: str
    cipher_mode: str
    hash_spec: str
    payload_offset: int
    key_bytes: int
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iter: int
    uuid: str
    keyslots: tuple[LuksKeyslot, ...]

    @property
    def cipher(self) -> str:
        """The dm-crypt/cryptsetup spelling, e.g. ``aes-xts-plain64`` or ``aes-cbc-essiv:sha256``."""
        return f"{self.cipher_name}-{self.cipher_mode}"

    @property
    def key_bits(self) -> int:
        return self.key_bytes * 8

    @property
    def material_sectors(self) -> int:
        """Sectors of key material per slot: ceil(key_bytes x stripes / 512)."""
        return material_sectors_for(self.key_bytes, luks1_fmt.STRIPES)

    @property
    def active_slots(self) -> tuple[int, ...]:
        return tuple(slot.index for slot in self.keyslots if slot.active)

    def to_bytes(self) -> bytes:
        """The 592-byte phdr."""
        slots = [
            {
                "active": luks1_fmt.KEY_ENABLED if s.active else luks1_fmt.KEY_DISABLED,
                "iterations": s.iterations,
                "salt": s.salt,
                "key_material_offset": s.key_material_offset,
                "stripes": s.stripes,
            }
            for s in self.keyslots
        ]
        try:
            return luks1_fmt.Phdr.build(
                {
                    "version": self.version,
                    "cipher_name": _name_field(self.cipher_name, luks1_fmt.NAME_SIZE),
                    "cipher_mode": _name_field(self.cipher_mode, luks1_fmt.NAME_SIZE),
                    "hash_spec": _name_field(self.hash_spec, luks1_fmt.NAME_SIZE),
                    "payload_offset": self.payload_offset,
                    "key_bytes": self.key_bytes,
                    "mk_digest": self.mk_digest,
                    "mk_digest_salt": self.mk_digest_salt,
                    "mk_digest_iter": self.mk_digest_iter,
                    "uuid": _name_field(self.uuid, luks1_fmt.UUID_SIZE),
                    "keyslots": slots,
                }
            )
        except (construct.ConstructError, UnicodeEncodeError) as e:
            raise FormatError("header fields cannot be encoded", field="luks1 header") from e

    def describe(self) -> dict[str, object]:
        """A JSON-able summary for ``qcrypt info``."""
        return {
            "version": self.version,
            "uuid": self.uuid,
            "cipher": self.cipher,
            "hash": self.hash_spec,
            "key_bits": self.key_bits,
            "payload_offset": self.payload_offset,
            "mk_iterations": self.mk_digest_iter,
            "keyslots": [slot.describe() for slot in self.keyslots],
        }


def material_sectors_for(key_bytes: int, stripes: int) -> int:
    """cryptsetup's AF_split_sectors: the key material of one slot, in whole sectors."""
    return -(-key_bytes * stripes // SECTOR)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple if multiple > 1 else value


def bytes_reader(data: bytes | bytearray, *, path: str) -> ReadAt:
    """A ReadAt over an in-memory LUKS region."""
    view = memoryview(data)

    def read_at(offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > len(view):
            raise FormatError(
                f"read outside the LUKS region (offset {offset}, length {length}, region {len(view)} bytes)",
                path=path,
                field="luks region",
            )
        return bytes(view[offset : offset + length])

    return read_at


def file_reader(fh: BinaryIO, region_offset: int, region_size: int, *, path: str) -> ReadAt:
    """A ReadAt over ``region_size`` bytes of an open file starting at ``region_offset``."""

    def read_at(offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > region_size:
            raise FormatError(
                f"read outside the LUKS region (offset {offset}, length {length}, region {region_size} bytes)",
                path=path,
                field="luks region",
            )
        try:
            data = read_at_offset(fh, length, region_offset + offset)
        except OSError as e:
            raise QcryptIOError(f"{path}: cannot read the LUKS header: {e.strerror or e}") from e
        if len(data) != length:
            raise FormatError(f"short read at offset {region_offset + offset}", path=path, field="luks region")
        return data

    return read_at


def luks_version(read_at: ReadAt, region_size: int, *, path: str) -> int | None:
    """The LUKS version (1, 2, ...) if the region starts with the LUKS magic, else None."""
    if region_size < luks1_fmt.VersionProbe.sizeof():
        return None
    probe = parse_bytes(
        luks1_fmt.VersionProbe, read_at(0, luks1_fmt.VersionProbe.sizeof()), path=path, what="luks magic"
    )
    return int(probe.version) if probe.magic == luks1_fmt.MAGIC else None


def _text(raw: bytes, size: int, field_name: str, path: str) -> str:
    """A NUL-terminated ASCII name field (cryptsetup ignores what follows the first NUL)."""
    text = raw.split(b"\0", 1)[0]
    if len(text) >= size:
        raise FormatError("not NUL-terminated", path=path, field=field_name)
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        raise FormatError("not ASCII", path=path, field=field_name) from None


def _slot_from(index: int, raw: construct.Container, path: str) -> LuksKeyslot:
    if raw.active not in (luks1_fmt.KEY_ENABLED, luks1_fmt.KEY_DISABLED):
        raise FormatError(
            f"0x{raw.active:08x} is neither 0x{luks1_fmt.KEY_ENABLED:08x} (enabled) nor "
            f"0x{luks1_fmt.KEY_DISABLED:08x} (disabled)",
            path=path,
            field=f"keyslot {index} active",
        )
    return LuksKeyslot(
        index=index,
        active=raw.active == luks1_fmt.KEY_ENABLED,
        iterations=raw.iterations,
        salt=bytes(raw.salt),
        key_material_offset=raw.key_material_offset,
        stripes=raw.stripes,
    )


def _header_from(raw: construct.Container, path: str) -> LuksHeader:
    return LuksHeader(
        version=raw.version,
        cipher_name=_text(raw.cipher_name, luks1_fmt.NAME_SIZE, "cipher_name", path),
        cipher_mode=_text(raw.cipher_mode, luks1_fmt.NAME_SIZE, "cipher_mode", path),
        hash_spec=_text(raw.hash_spec, luks1_fmt.NAME_SIZE, "hash_spec", path),
        payload_offset=raw.payload_offset,
        key_bytes=raw.key_bytes,
        mk_digest=bytes(raw.mk_digest),
        mk_digest_salt=bytes(raw.mk_digest_salt),
        mk_digest_iter=raw.mk_digest_iter,
        uuid=_text(raw.uuid, luks1_fmt.UUID_SIZE, "uuid", path),
        keyslots=tuple(_slot_from(i, slot, path) for i, slot in enumerate(raw.keyslots)),
    )


def _check_names(header: LuksHeader, path: str) -> None:
    """What makes a LUKS1 header well-formed whatever its algorithms: names present, a key size that can exist.
    Which algorithms QEMU and qcrypt implement is a separate question (:func:`qemu_unsupported`,
    :func:`qcrypt_unsupported`): cryptsetup reads headers naming any cipher its kernel and libraries know."""
    for field_name, value in (
        ("cipher_name", header.cipher_name),
        ("cipher_mode", header.cipher_mode),
        ("hash_spec", header.hash_spec),
    ):
        if not value:
            raise FormatError("is empty", path=path, field=field_name)
    if not 1 <= header.key_bytes <= MAX_KEY_BYTES:
        raise FormatError(f"{header.key_bytes} is outside 1..{MAX_KEY_BYTES}", path=path, field="key_bytes")


def _qemu_mode_problem(cipher_mode: str, essiv_key_bytes: tuple[int, ...]) -> str | None:
    if cipher_mode == "ecb":
        return None
    chain, dash, iv_spec = cipher_mode.partition("-")
    ivgen, _colon, iv_hash = iv_spec.partition(":")
    if not dash or chain not in CHAIN_MODES:
        return f"mode {cipher_mode!r}"
    if ivgen not in IV_GENERATORS:
        return f"IV generator {iv_spec!r}"
    if ivgen == "essiv" and (iv_hash not in QEMU_HASHES or QEMU_HASH_BYTES[iv_hash] not in essiv_key_bytes):
        return f"ESSIV hash {iv_hash!r}"  # ESSIV keys the cipher with the digest: its size must be a key size
    return None


def qemu_unsupported(header: LuksHeader) -> list[str]:
    """The parts of the header's algorithms QEMU's luks driver does not implement (empty if it opens it)."""
    parts = []
    if header.cipher_name not in CIPHER_KEY_BYTES:
        parts.append(f"cipher {header.cipher_name!r}")
    mode_problem = _qemu_mode_problem(header.cipher_mode, CIPHER_KEY_BYTES.get(header.cipher_name, (16, 24, 32)))
    if mode_problem:
        parts.append(mode_problem)
    elif header.cipher_name in CIPHER_KEY_BYTES:
        try:
            check_cipher(header.cipher_name, header.cipher_mode, header.key_bytes)
        except FormatError:
            parts.append(f"a {header.key_bits}-bit key for {header.cipher}")
    if header.hash_spec not in QEMU_HASHES:
        parts.append(f"hash {header.hash_spec!r}")
    return parts


def qcrypt_unsupported(header: LuksHeader) -> list[str]:
    """The parts of the header's algorithms qcrypt cannot unlock or migrate (empty if it can)."""
    parts = []
    try:
        check_sector_cipher(header.cipher_name, header.cipher_mode, header.key_bytes)
    except UnsupportedFeatureError as e:
        parts.append(
            {
                "cipher_name": f"cipher {header.cipher_name!r}",
                "key_bytes": f"a {header.key_bits}-bit key for {header.cipher}",
            }.get(e.field or "", f"mode {header.cipher_mode!r}")
        )
    if header.hash_spec not in supported_hashes():
        parts.append(f"hash {header.hash_spec!r}")
    return parts


def require_supported(header: LuksHeader, *, path: str) -> None:
    """Raise UnsupportedFeatureError (naming the file and what is missing) unless qcrypt can unlock it."""
    parts = qcrypt_unsupported(header)
    if parts:
        who = (
            "QEMU and qcrypt do not implement (cryptsetup does)"
            if qemu_unsupported(header)
            else ("qcrypt does not implement (QEMU and cryptsetup do)")
        )
        raise UnsupportedFeatureError(
            f"LUKS1 with {' and '.join(parts)}, which {who}: qcrypt cannot unlock it",
            path=path,
            field=UNSUPPORTED_FIELD,
        )


def _check_slot(slot: LuksKeyslot, header: LuksHeader, region_size: int, path: str) -> None:
    name = f"keyslot {slot.index}"
    if slot.stripes != luks1_fmt.STRIPES:
        raise FormatError(f"{slot.stripes} stripes, expected {luks1_fmt.STRIPES}", path=path, field=f"{name} stripes")
    if slot.active and slot.iterations < 1:
        raise FormatError("an active keyslot needs at least 1 iteration", path=path, field=f"{name} iterations")
    if slot.key_material_offset < MIN_SLOT_OFFSET_SECTORS:
        raise FormatError(
            f"key material at sector {slot.key_material_offset} overlaps the header",
            path=path,
            field=f"{name} key_material_offset",
        )
    end_bytes = (slot.key_material_offset + header.material_sectors) * SECTOR
    if end_bytes > limits.MAX_LUKS1_KEY_MATERIAL_END:
        raise LimitExceededError(
            f"key material ends at byte {end_bytes}, beyond the limit of {limits.MAX_LUKS1_KEY_MATERIAL_END >> 20} MiB",
            path=path,
            field=f"{name} key_material_offset",
        )
    if end_bytes > region_size:
        raise FormatError(
            f"key material ends at byte {end_bytes}, past the end of the LUKS region ({region_size} bytes)",
            path=path,
            field=f"{name} key_material_offset",
        )
    if header.payload_offset and header.payload_offset < slot.key_material_offset + header.material_sectors:
        raise FormatError(
            f"payload at sector {header.payload_offset} overlaps keyslot {slot.index}",
            path=path,
            field="payload_offset",
        )


def _check_overlaps(header: LuksHeader, path: str) -> None:
    ordered = sorted(header.keyslots, key=lambda s: s.key_material_offset)
    for before, after in itertools.pairwise(ordered):
        if before.key_material_offset + header.material_sectors > after.key_material_offset:
            raise FormatError(
                f"key material of keyslots {before.index} and {after.index} overlaps",
                path=path,
                field=f"keyslot {after.index} key_material_offset",
            )


def validate_header(header: LuksHeader, region_size: int, *, path: str) -> None:
    """The checks of cryptsetup 2.x and QEMU combined (docs/FORMATS.md D.6); raises FormatError."""
    if header.version != luks1_fmt.VERSION:
        raise UnsupportedFeatureError(f"LUKS version {header.version}, expected 1", path=path, field="version")
    _check_names(header, path)
    if not 1 <= header.mk_digest_iter <= MAX_ITERATIONS:
        raise FormatError("must be at least 1", path=path, field="mk_digest_iter")
    for slot in header.keyslots:
        _check_slot(slot, header, region_size, path)
    _check_overlaps(header, path)


def read_header(read_at: ReadAt, region_size: int, *, path: str) -> LuksHeader:
    """Read and validate the LUKS1 header at the start of a region of ``region_size`` bytes."""
    if region_size < luks1_fmt.PHDR_SIZE:
        raise FormatError(
            f"the LUKS region ({region_size} bytes) is smaller than a LUKS1 header", path=path, field="luks1 header"
        )
    raw_bytes = read_at(0, luks1_fmt.PHDR_SIZE)
    probe = parse_bytes(luks1_fmt.VersionProbe, raw_bytes, path=path, what="luks1 header")
    if probe.magic != luks1_fmt.MAGIC:
        raise FormatError("bad LUKS magic", path=path, field="magic")
    if probe.version != luks1_fmt.VERSION:
        raise UnsupportedFeatureError(
            f"LUKS version {probe.version} (only LUKS1 is handled here)", path=path, field="version"
        )
    header = _header_from(parse_bytes(luks1_fmt.Phdr, raw_bytes, path=path, what="luks1 header"), path)
    validate_header(header, region_size, path=path)
    return header


def _name_field(text: str, size: int) -> bytes:
    """A name field as written: ASCII, padded with NULs to ``size`` bytes."""
    raw = text.encode("ascii")
    if len(raw) > size:
        raise FormatError(f"{text!r} is longer than {size} bytes", field="luks1 header")
    return raw.ljust(size, b"\0")


def disabled_slot(index: int, offset: int) -> LuksKeyslot:
    return LuksKeyslot(
        index=index,
        active=False,
        iterations=0,
        salt=bytes(luks1_fmt.SALT_SIZE),
        key_material_offset=offset,
        stripes=luks1_fmt.STRIPES,
    )
