"""LUKS1 keyslots: unlock a header with a passphrase, check a master key, add and remove keyslots.

References: cryptsetup lib/luks1/keymanage.c (LUKS_open_key, LUKS_verify_volume_key, LUKS_del_key) and
lib/luks1/keyencryption.c. Secrets (passphrases, slot keys, master keys) are bytearrays wiped after use.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import replace

from qcrypt.crypto.af import af_merge, af_split
from qcrypt.crypto.kdf import (
    MAX_ITERATIONS,
    check_pbkdf2_cost,
    iterations_for,
    pbkdf2,
)
from qcrypt.crypto.secret import secret, wipe
from qcrypt.crypto.sector import make_sector_cipher
from qcrypt.errors import (
    BadPassphraseError,
    FormatError,
    LimitExceededError,
    MigrationError,
)
from qcrypt.formats import luks1 as luks1_fmt
from qcrypt.luks.header import SECTOR, LuksHeader, LuksKeyslot, ReadAt, disabled_slot


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


def _check_area(header: LuksHeader, area: bytearray, slot: LuksKeyslot) -> None:
    end = (slot.key_material_offset + header.material_sectors) * SECTOR
    if len(area) < max(end, luks1_fmt.PHDR_SIZE):
        raise FormatError(f"header area is {len(area)} bytes, keyslot {slot.index} needs {end}", field="header area")


def _replace_slot(header: LuksHeader, new_slot: LuksKeyslot) -> LuksHeader:
    slots = tuple(new_slot if s.index == new_slot.index else s for s in header.keyslots)
    return replace(header, keyslots=slots)


def store_slot(
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
    return store_slot(header, area, master_key, passphrase, index, iterations)


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
    header = _replace_slot(header, disabled_slot(slot, old.key_material_offset))
    area[: luks1_fmt.PHDR_SIZE] = header.to_bytes()
    return header
