"""Creating a LUKS1 header: a new master key, QEMU's layout, one keyslot.

Reference: cryptsetup lib/luks1/keymanage.c (LUKS_generate_phdr). Secrets are bytearrays wiped after use.
"""

from __future__ import annotations

import os
import uuid as uuidlib
from dataclasses import dataclass

from qcrypt.crypto.kdf import (
    MAX_ITERATIONS,
    benchmark_pbkdf2,
    check_hash,
    pbkdf2,
    scale_iterations,
)
from qcrypt.crypto.secret import secret, wipe
from qcrypt.crypto.sector import make_sector_cipher
from qcrypt.errors import (
    FormatError,
    UnsupportedFeatureError,
)
from qcrypt.formats import luks1 as luks1_fmt
from qcrypt.luks.cipher_spec import NEW_CHAIN_MODES, check_cipher, parse_mode, split_cipher
from qcrypt.luks.header import SECTOR, LuksHeader, disabled_slot
from qcrypt.luks.keyslots import store_slot
from qcrypt.luks.qemu_layout import keyslot_layout

MKD_ITERATIONS_MS = 125  # cryptsetup LUKS_MKD_ITERATIONS_MS: the master-key digest costs ~125 ms


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
    chain, ivgen, iv_hash = parse_mode(mode)
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


def payload_offset_for(params: LuksParams) -> int:
    """The payload offset (sectors) ``create`` will choose for ``params``: known before any PBKDF2 runs."""
    _name, _mode, key_bytes = _check_new_spec(params)
    return keyslot_layout(key_bytes, params.payload_align_sectors)[1]


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
    offsets, payload_offset = keyslot_layout(key_bytes, params.payload_align_sectors)
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
            keyslots=tuple(disabled_slot(i, offset) for i, offset in enumerate(offsets)),
        )
    area = bytearray(payload_offset * SECTOR)
    header = store_slot(header, area, master_key, passphrase, 0, slot_iterations)
    return header, area
