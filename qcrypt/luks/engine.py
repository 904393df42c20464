"""The LUKS1 engine: parse and validate a header, unlock it, create one, add and remove keyslots.

References: cryptsetup lib/luks1/keymanage.c (LUKS_generate_phdr, LUKS_check_keyslots, LUKS_open_key,
LUKS_verify_volume_key, LUKS_del_key) and lib/luks1/keyencryption.c; qemu crypto/block-luks.c
(behaviour only, our own code).

All offsets in a header are 512-byte sectors counted from the start of the LUKS region (offset 0 of a raw
LUKS file, or the FDE extension offset of a qcow2 file). Reads go through a ``ReadAt`` callable so the same
code serves both. Secrets (passphrases, slot keys, master keys) are bytearrays wiped after use.
"""

from __future__ import annotations

import hmac
import io
import itertools
import os
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import BinaryIO

import construct

from qcrypt.crypto.af import af_merge, af_split
from qcrypt.crypto.kdf import (
    MAX_ITERATIONS,
    benchmark_pbkdf2,
    check_hash,
    check_pbkdf2_cost,
    iterations_for,
    pbkdf2,
    scale_iterations,
    supported_hashes,
)
from qcrypt.crypto.secret import secret, wipe
from qcrypt.crypto.sector import make_sector_cipher
from qcrypt.errors import (
    BadPassphraseError,
    FormatError,
    LimitExceededError,
    MigrationError,
    QcryptIOError,
    UnsupportedFeatureError,
)
from qcrypt.formats import luks1 as luks1_fmt
from qcrypt.formats._parse import parse_bytes
from qcrypt.plumbing import limits

ReadAt = Callable[[int, int], bytes]

SECTOR = luks1_fmt.SECTOR_SIZE
MIN_SLOT_OFFSET_SECTORS = 2  # key material must start after the 1024-byte phdr area (cryptsetup)
MKD_ITERATIONS_MS = 125  # cryptsetup LUKS_MKD_ITERATIONS_MS: the master-key digest costs ~125 ms

# Cipher names QEMU knows (crypto/block-luks.c) and their key sizes in bytes; XTS doubles them.
CIPHER_KEY_BYTES: dict[str, tuple[int, ...]] = {
    "aes": (16, 24, 32),
    "serpent": (16, 24, 32),
    "twofish": (16, 24, 32),
    "cast5": (16,),
}
CHAIN_MODES = ("cbc", "xts", "ecb", "ctr")
IV_GENERATORS = ("plain", "plain64", "essiv")
NEW_CHAIN_MODES = ("xts", "cbc")  # what create() agrees to write


# ---------------------------------------------------------------------------------------------------------
# Model


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


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple if multiple > 1 else value


# ---------------------------------------------------------------------------------------------------------
# Region readers


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


def _pread(fh: BinaryIO, length: int, file_offset: int) -> bytes:
    try:
        return os.pread(fh.fileno(), length, file_offset)
    except (AttributeError, io.UnsupportedOperation):  # in-memory file objects have no descriptor
        fh.seek(file_offset)
        return fh.read(length)


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
            data = _pread(fh, length, region_offset + offset)
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


# ---------------------------------------------------------------------------------------------------------
# Cipher specs


def split_cipher(cipher: str) -> tuple[str, str]:
    """``"aes-xts-plain64"`` -> ``("aes", "xts-plain64")``."""
    name, dash, mode = cipher.partition("-")
    if not dash or not name or not mode:
        raise FormatError(f"cipher {cipher!r} is not of the form name-chainmode-ivgen", field="cipher")
    return name, mode


# md5 is refused as a LUKS hash_spec (PBKDF2), but cryptsetup and QEMU use it for ESSIV (aes-cbc-essiv:md5);
# the sector cipher then refuses digests that make no AES key (sha1, sha512, ...).
ESSIV_ONLY_HASHES = ("md5",)
# Hashes QEMU's luks driver knows (for PBKDF2, AF and ESSIV), lowercase as it requires.
QEMU_HASH_BYTES = {"md5": 16, "sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48, "sha512": 64, "ripemd160": 20}
QEMU_HASHES = tuple(QEMU_HASH_BYTES)
MAX_KEY_BYTES = 512  # bounds the key material read per slot (4000 stripes: 2 MiB at most)
UNSUPPORTED_FIELD = "cipher"  # the field named by require_supported's error


def _parse_mode(cipher_mode: str, path: str | None = None) -> tuple[str, str, str | None]:
    """``"cbc-essiv:sha256"`` -> ``("cbc", "essiv", "sha256")``; unknown parts are unsupported."""
    if cipher_mode == "ecb":
        return "ecb", "", None
    chain, dash, iv_spec = cipher_mode.partition("-")
    ivgen, colon, iv_hash = iv_spec.partition(":")
    if not dash or chain not in CHAIN_MODES or ivgen not in IV_GENERATORS:
        raise UnsupportedFeatureError(f"unsupported cipher mode {cipher_mode!r}", path=path, field="cipher_mode")
    if ivgen == "essiv" and iv_hash not in (*supported_hashes(), *ESSIV_ONLY_HASHES):
        raise UnsupportedFeatureError(f"essiv needs a supported hash, got {iv_hash!r}", path=path, field="cipher_mode")
    return chain, ivgen, (iv_hash if colon else None)


def check_cipher(cipher_name: str, cipher_mode: str, key_bytes: int, *, path: str | None = None) -> None:
    """Raise unless name, mode and key size form a cipher spec QEMU and cryptsetup both accept."""
    chain, _ivgen, _iv_hash = _parse_mode(cipher_mode, path)
    if cipher_name not in CIPHER_KEY_BYTES:
        raise UnsupportedFeatureError(f"unsupported cipher {cipher_name!r}", path=path, field="cipher_name")
    valid = CIPHER_KEY_BYTES[cipher_name]
    if chain == "xts":
        valid = tuple(2 * size for size in valid)
    if key_bytes not in valid:
        raise FormatError(
            f"{key_bytes} is not a valid key size for {cipher_name}-{chain} "
            f"(valid: {', '.join(map(str, valid))} bytes)",
            path=path,
            field="key_bytes",
        )


# ---------------------------------------------------------------------------------------------------------
# QEMU's layout rules (stricter than cryptsetup's)


def qemu_material_sectors(header: LuksHeader) -> int:
    """Sectors QEMU reserves for one slot's key material: cryptsetup's count rounded up to 4 KiB."""
    return _round_up(header.material_sectors, luks1_fmt.ALIGN_KEYSLOTS_SECTORS)


def qemu_keyslot_problems(header: LuksHeader) -> list[str]:
    """Why QEMU's luks driver refuses the keyslot placement (empty when it accepts it).

    QEMU checks every slot, active or not: its key material must start at or after sector 8 (the first
    4 KiB hold the header), and no two slots may overlap once each is rounded up to 4 KiB. cryptsetup only
    needs sector 2 and the unrounded size, so layouts of older cryptsetup versions open there but not in QEMU.
    """
    problems = []
    length = qemu_material_sectors(header)
    early = [s.index for s in header.keyslots if s.key_material_offset < luks1_fmt.ALIGN_KEYSLOTS_SECTORS]
    if early:
        problems.append(
            f"keyslot(s) {early} start before sector {luks1_fmt.ALIGN_KEYSLOTS_SECTORS} (QEMU: overlapping "
            "with the LUKS header)"
        )
    pairs = [
        (a.index, b.index)
        for a, b in itertools.combinations(header.keyslots, 2)
        if a.key_material_offset < b.key_material_offset + length
        and b.key_material_offset < a.key_material_offset + length
    ]
    if pairs:
        shown = ", ".join(f"{a}/{b}" for a, b in pairs[:4]) + (" ..." if len(pairs) > 4 else "")
        problems.append(f"keyslots {shown} overlap once QEMU rounds key material to 4 KiB")
    return problems


def qemu_payload_problems(header: LuksHeader) -> list[str]:
    """Why QEMU refuses where the payload starts (detached header, or key material reaching the payload)."""
    if header.payload_offset == 0:
        return ["detached header (payload offset 0)"]
    length = qemu_material_sectors(header)
    reaching = [s.index for s in header.keyslots if s.key_material_offset + length > header.payload_offset]
    if reaching:
        return [f"keyslot(s) {reaching} reach the payload once QEMU rounds key material to 4 KiB"]
    return []


def qemu_keyslot_offsets(key_bytes: int) -> list[int]:
    """Where QEMU (and today's cryptsetup) place the 8 slots' key material: from sector 8, 4 KiB apart."""
    return _layout(key_bytes, 1)[0]


def _name_field(text: str, size: int) -> bytes:
    """A name field as written: ASCII, padded with NULs to ``size`` bytes."""
    raw = text.encode("ascii")
    if len(raw) > size:
        raise FormatError(f"{text!r} is longer than {size} bytes", field="luks1 header")
    return raw.ljust(size, b"\0")


# ---------------------------------------------------------------------------------------------------------
# Reading and validation


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
    key = os.urandom(header.key_bytes)
    try:
        make_sector_cipher(header.cipher_name, header.cipher_mode, key).wipe()
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
    """The checks of cryptsetup 2.x and QEMU combined (formats.md D.6); raises FormatError."""
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


# ---------------------------------------------------------------------------------------------------------
# Unlocking


def verify_master_key(header: LuksHeader, master_key: bytes | bytearray) -> bool:
    """True if ``master_key`` matches the header's master-key digest (constant-time compare)."""
    if len(master_key) != header.key_bytes:
        return False
    with secret(
        pbkdf2(header.hash_spec, master_key, header.mk_digest_salt, header.mk_digest_iter, luks1_fmt.DIGEST_SIZE)
    ) as digest:
        return hmac.compare_digest(bytes(digest), header.mk_digest)


def _open_slot(
    header: LuksHeader, read_at: ReadAt, passphrase: bytes | bytearray, slot: LuksKeyslot
) -> bytearray | None:
    """The master key if ``passphrase`` opens ``slot``, else None."""
    encrypted = read_at(slot.key_material_offset * SECTOR, header.material_sectors * SECTOR)
    with (
        secret(pbkdf2(header.hash_spec, passphrase, slot.salt, slot.iterations, header.key_bytes)) as slot_key,
        secret(bytearray(len(encrypted))) as split,
    ):
        cipher = make_sector_cipher(header.cipher_name, header.cipher_mode, slot_key)
        try:
            cipher.decrypt_into(encrypted, 0, split)  # key material sectors count from 0
        finally:
            cipher.wipe()
        candidate = af_merge(split, header.key_bytes, slot.stripes, header.hash_spec)
    if verify_master_key(header, candidate):
        return candidate
    wipe(candidate)
    return None


def _candidate_slots(header: LuksHeader, slot: int | None) -> list[LuksKeyslot]:
    if slot is None:
        return [s for s in header.keyslots if s.active]
    if not 0 <= slot < len(header.keyslots):
        raise MigrationError(f"keyslot {slot} does not exist (0-{len(header.keyslots) - 1})")
    if not header.keyslots[slot].active:
        raise BadPassphraseError(f"keyslot {slot} is not active")
    return [header.keyslots[slot]]


def _first_opening(
    header: LuksHeader, read_at: ReadAt, passphrase: bytes | bytearray, slot: int | None
) -> tuple[int, bytearray]:
    """The first slot ``passphrase`` opens. Slots whose PBKDF2 would cost more than the allowed time at this
    machine's measured rate are skipped, and named if no other slot opens."""
    check_pbkdf2_cost(header.hash_spec, header.mk_digest_iter, luks1_fmt.DIGEST_SIZE, what="mk_digest_iter")
    skipped: list[str] = []
    for candidate in _candidate_slots(header, slot):
        try:
            check_pbkdf2_cost(
                header.hash_spec, candidate.iterations, header.key_bytes, what=f"keyslot {candidate.index} iterations"
            )
        except LimitExceededError as e:
            skipped.append(str(e))
            continue
        master_key = _open_slot(header, read_at, passphrase, candidate)
        if master_key is not None:
            return candidate.index, master_key
    if skipped:
        raise LimitExceededError(f"the passphrase opens no keyslot that was tried; skipped: {'; '.join(skipped)}")
    raise BadPassphraseError("the passphrase opens no keyslot")


def unlock(header: LuksHeader, read_at: ReadAt, passphrase: bytes | bytearray, *, slot: int | None = None) -> bytearray:
    """The master key: tries the active slots in order (or only ``slot``)."""
    return _first_opening(header, read_at, passphrase, slot)[1]


def unlocked_slot(header: LuksHeader, read_at: ReadAt, passphrase: bytes | bytearray) -> int:
    """The index of the first keyslot ``passphrase`` opens."""
    index, master_key = _first_opening(header, read_at, passphrase, None)
    wipe(master_key)
    return index


# ---------------------------------------------------------------------------------------------------------
# Creating


@dataclass
class LuksParams:
    """What ``create`` builds. ``iterations`` forces the slot iteration count (tests); else ``iter_time_ms``."""

    cipher: str = "aes-xts-plain64"
    key_bits: int = 512
    hash_name: str = "sha256"
    iter_time_ms: int = 2000
    iterations: int | None = None
    uuid: str | None = None
    payload_align_sectors: int = luks1_fmt.DEFAULT_DATA_ALIGNMENT_SECTORS
    pbkdf2_rate: int | None = None  # iterations/s measured beforehand (else create() benchmarks)


def new_master_key(key_bytes: int) -> bytearray:
    """A random master key (os.urandom); XTS halves are redrawn in the negligible case they are equal."""
    if key_bytes < 1:
        raise FormatError(f"key size {key_bytes} bytes is not positive", field="key_bits")
    while True:
        key = bytearray(os.urandom(key_bytes))
        half = key_bytes // 2
        if key_bytes % 2 or key[:half] != key[half:]:
            return key
        wipe(key)


def _check_new_spec(params: LuksParams) -> tuple[str, str, int]:
    """Validate ``params`` for a new header; returns (cipher_name, cipher_mode, key_bytes)."""
    name, mode = split_cipher(params.cipher)
    if params.key_bits <= 0 or params.key_bits % 8:
        raise FormatError(f"key size {params.key_bits} bits is not a positive multiple of 8", field="key_bits")
    key_bytes = params.key_bits // 8
    check_cipher(name, mode, key_bytes)
    chain, ivgen, iv_hash = _parse_mode(mode)
    if chain not in NEW_CHAIN_MODES:
        raise UnsupportedFeatureError(
            f"qcrypt creates only {' or '.join(NEW_CHAIN_MODES)} volumes, not {chain}", field="cipher_mode"
        )
    if iv_hash is not None and ivgen != "essiv":
        raise FormatError(
            f"{mode!r}: a ':hash' suffix is only valid with essiv (cryptsetup refuses it)", field="cipher_mode"
        )
    if len(name) >= luks1_fmt.NAME_SIZE or len(mode) >= luks1_fmt.NAME_SIZE:
        raise FormatError("cipher name or mode is too long", field="cipher")
    check_hash(params.hash_name)
    make_sector_cipher(name, mode, os.urandom(key_bytes)).wipe()  # fail early if we cannot encrypt it
    if params.iterations is not None and not luks1_fmt.MIN_ITERATIONS <= params.iterations <= MAX_ITERATIONS:
        raise FormatError(f"forced iterations must be {luks1_fmt.MIN_ITERATIONS}..{MAX_ITERATIONS}", field="iterations")
    if params.payload_align_sectors < 0 or params.iter_time_ms < 1:
        raise FormatError("payload alignment must be >= 0 sectors and iter time >= 1 ms", field="params")
    return name, mode, key_bytes


def _new_uuid(requested: str | None) -> str:
    if requested is None:
        return str(uuidlib.uuid4())
    try:
        return str(uuidlib.UUID(requested))
    except ValueError:
        raise FormatError(f"{requested!r} is not a UUID", field="uuid") from None


def _layout(key_bytes: int, payload_align_sectors: int) -> tuple[list[int], int]:
    """cryptsetup's layout: slot offsets from sector 8, each 4 KiB aligned; payload aligned up."""
    step = _round_up(material_sectors_for(key_bytes, luks1_fmt.STRIPES), luks1_fmt.ALIGN_KEYSLOTS_SECTORS)
    offsets = [luks1_fmt.ALIGN_KEYSLOTS_SECTORS + i * step for i in range(luks1_fmt.NUM_KEYSLOTS)]
    end = offsets[-1] + step
    return offsets, _round_up(end, payload_align_sectors)


def _disabled_slot(index: int, offset: int) -> LuksKeyslot:
    return LuksKeyslot(
        index=index,
        active=False,
        iterations=0,
        salt=bytes(luks1_fmt.SALT_SIZE),
        key_material_offset=offset,
        stripes=luks1_fmt.STRIPES,
    )


def payload_offset_for(params: LuksParams) -> int:
    """The payload offset (sectors) ``create`` will choose for ``params``: known before any PBKDF2 runs."""
    _name, _mode, key_bytes = _check_new_spec(params)
    return _layout(key_bytes, params.payload_align_sectors)[1]


def create(
    master_key: bytes | bytearray, passphrase: bytes | bytearray, params: LuksParams
) -> tuple[LuksHeader, bytearray]:
    """A new LUKS1 header with ``passphrase`` in slot 0, and the header area (payload_offset x 512 bytes)."""
    name, mode, key_bytes = _check_new_spec(params)
    if len(master_key) != key_bytes:
        raise FormatError(f"master key is {len(master_key)} bytes, expected {key_bytes}", field="key_bits")
    if params.iterations is not None:
        slot_iterations, digest_iterations = params.iterations, luks1_fmt.MIN_ITERATIONS  # cryptsetup: no benchmark
    else:
        rate = params.pbkdf2_rate or benchmark_pbkdf2(params.hash_name, key_bytes)
        slot_iterations = scale_iterations(rate, params.iter_time_ms, luks1_fmt.MIN_ITERATIONS)
        digest_iterations = scale_iterations(rate, MKD_ITERATIONS_MS, luks1_fmt.MIN_ITERATIONS)
    offsets, payload_offset = _layout(key_bytes, params.payload_align_sectors)
    digest_salt = os.urandom(luks1_fmt.SALT_SIZE)
    with secret(pbkdf2(params.hash_name, master_key, digest_salt, digest_iterations, luks1_fmt.DIGEST_SIZE)) as digest:
        header = LuksHeader(
            version=luks1_fmt.VERSION,
            cipher_name=name,
            cipher_mode=mode,
            hash_spec=params.hash_name,
            payload_offset=payload_offset,
            key_bytes=key_bytes,
            mk_digest=bytes(digest),
            mk_digest_salt=digest_salt,
            mk_digest_iter=digest_iterations,
            uuid=_new_uuid(params.uuid),
            keyslots=tuple(_disabled_slot(i, offset) for i, offset in enumerate(offsets)),
        )
    area = bytearray(payload_offset * SECTOR)
    header = _store_slot(header, area, master_key, passphrase, 0, slot_iterations)
    return header, area


# ---------------------------------------------------------------------------------------------------------
# Keyslot management


def _check_area(header: LuksHeader, area: bytearray, slot: LuksKeyslot) -> None:
    end = (slot.key_material_offset + header.material_sectors) * SECTOR
    if len(area) < max(end, luks1_fmt.PHDR_SIZE):
        raise FormatError(f"header area is {len(area)} bytes, keyslot {slot.index} needs {end}", field="header area")


def _replace_slot(header: LuksHeader, new_slot: LuksKeyslot) -> LuksHeader:
    slots = tuple(new_slot if s.index == new_slot.index else s for s in header.keyslots)
    return replace(header, keyslots=slots)


def _store_slot(
    header: LuksHeader,
    area: bytearray,
    master_key: bytes | bytearray,
    passphrase: bytes | bytearray,
    index: int,
    iterations: int,
) -> LuksHeader:
    """Encrypt an AF split of ``master_key`` into slot ``index`` of ``area``; rewrite the phdr in ``area``."""
    old = header.keyslots[index]
    _check_area(header, area, old)
    salt = os.urandom(luks1_fmt.SALT_SIZE)
    length = header.material_sectors * SECTOR
    with (
        secret(af_split(master_key, luks1_fmt.STRIPES, header.hash_spec)) as split,
        secret(pbkdf2(header.hash_spec, passphrase, salt, iterations, header.key_bytes)) as slot_key,
    ):
        split += bytes(length - len(split))  # zero padding to whole sectors, as cryptsetup
        cipher = make_sector_cipher(header.cipher_name, header.cipher_mode, slot_key)
        start = old.key_material_offset * SECTOR
        try:
            cipher.encrypt_into(split, 0, memoryview(area)[start : start + length])
        finally:
            cipher.wipe()
    new = replace(old, active=True, iterations=iterations, salt=salt)
    header = _replace_slot(header, new)
    area[: luks1_fmt.PHDR_SIZE] = header.to_bytes()
    return header


def _free_slot(header: LuksHeader, slot: int | None) -> int:
    if slot is None:
        for candidate in header.keyslots:
            if not candidate.active:
                return candidate.index
        raise MigrationError("all 8 keyslots are in use")
    if not 0 <= slot < len(header.keyslots):
        raise MigrationError(f"keyslot {slot} does not exist (0-{len(header.keyslots) - 1})")
    if header.keyslots[slot].active:
        raise MigrationError(f"keyslot {slot} is already in use")
    return slot


def add_keyslot(
    header: LuksHeader,
    area: bytearray,
    master_key: bytes | bytearray,
    passphrase: bytes | bytearray,
    *,
    iterations: int | None = None,
    iter_time_ms: int = 2000,
    slot: int | None = None,
) -> LuksHeader:
    """Store ``passphrase`` for ``master_key`` in ``slot`` (default: the first free one), in place in ``area``."""
    if not verify_master_key(header, master_key):
        raise BadPassphraseError("the master key does not match this LUKS header")
    index = _free_slot(header, slot)
    if iterations is None:
        iterations = iterations_for(header.hash_spec, header.key_bytes, iter_time_ms, luks1_fmt.MIN_ITERATIONS)
    elif not 1 <= iterations <= MAX_ITERATIONS:
        raise FormatError(f"iterations must be 1..{MAX_ITERATIONS}", field="iterations")
    return _store_slot(header, area, master_key, passphrase, index, iterations)


def remove_keyslot(header: LuksHeader, area: bytearray, slot: int) -> LuksHeader:
    """Overwrite slot ``slot``'s key material with random bytes and disable it; never the last active slot."""
    if not 0 <= slot < len(header.keyslots) or not header.keyslots[slot].active:
        raise MigrationError(f"keyslot {slot} is not an active keyslot")
    if header.active_slots == (slot,):
        raise MigrationError(f"keyslot {slot} is the last active keyslot; removing it would lose the data")
    old = header.keyslots[slot]
    _check_area(header, area, old)
    start = old.key_material_offset * SECTOR
    length = header.material_sectors * SECTOR
    area[start : start + length] = os.urandom(length)
    header = _replace_slot(header, _disabled_slot(slot, old.key_material_offset))
    area[: luks1_fmt.PHDR_SIZE] = header.to_bytes()
    return header
