"""Grading: which findings a LUKS header, a new container's settings or a qcow2 image earns.

The findings themselves (codes, severities, messages) are in :mod:`qcrypt.model.findings`; the rules here are
documented in docs/REFERENCE.md, "Findings".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qcrypt.formats import qcow2 as qcow2_fmt
from qcrypt.model.findings import (
    CRYPTSETUP_ALIGN_SECTORS,
    LUKS1_QEMU_REFUSES_LAYOUT,
    LUKS1_UNALIGNED_PAYLOAD,
    LUKS1_UNSUPPORTED_ALGORITHM,
    LUKS2_CHECKSUM,
    LUKS2_NOT_QEMU,
    LUKS_ECB,
    LUKS_LOW_ITERATIONS,
    LUKS_NO_ACTIVE_KEYSLOT,
    LUKS_PLAIN_IV_WRAPS,
    LUKS_PREDICTABLE_IV,
    LUKS_SHA1,
    LUKS_SHORT_KEY,
    MIN_PBKDF2_ITERATIONS,
    QCOW2_CORRUPT,
    QCOW2_DIRTY,
    QCOW2_EXTERNAL_DATA,
    QCOW2_UNKNOWN_INCOMPATIBLE,
    STRONG_CIPHER_KEY_BITS,
    Finding,
    Severity,
)

if TYPE_CHECKING:
    from qcrypt.images.qcow2_reader import QCow2Image
    from qcrypt.luks.header import LuksHeader
    from qcrypt.luks.luks2 import Luks2Info


def grade_qcow2_features(image: QCow2Image) -> list[Finding]:
    h = image.header
    found = []
    unknown = image.unsupported_incompatible_features()
    if unknown:
        found.append(
            Finding(
                QCOW2_UNKNOWN_INCOMPATIBLE,
                Severity.WARNING,
                f"unknown incompatible feature bits {unknown:#x}: QEMU and qcrypt refuse to open it",
            )
        )
    if h.incompatible_features & qcow2_fmt.INCOMPAT_CORRUPT:
        found.append(Finding(QCOW2_CORRUPT, Severity.WARNING, "marked corrupt: QEMU opens it read-only at most"))
    if h.incompatible_features & qcow2_fmt.INCOMPAT_DIRTY:
        found.append(Finding(QCOW2_DIRTY, Severity.INFO, "dirty bit set: refcounts may be stale (lazy refcounts)"))
    if h.incompatible_features & qcow2_fmt.INCOMPAT_DATA_FILE:
        found.append(Finding(QCOW2_EXTERNAL_DATA, Severity.INFO, "guest data lives in an external data file"))
    return found


def _grade_cipher(cipher: str, hash_name: str) -> list[Finding]:
    found = []
    mode = cipher.split("-", 1)[1] if "-" in cipher else cipher
    if mode.startswith("ecb"):
        found.append(Finding(LUKS_ECB, Severity.CRITICAL, f"{cipher}: ECB leaks plaintext patterns"))
    elif mode.startswith("cbc-plain"):
        found.append(
            Finding(
                LUKS_PREDICTABLE_IV,
                Severity.WARNING,
                f"{cipher}: CBC with predictable IVs allows watermarking; prefer aes-xts-plain64",
            )
        )
    if mode.endswith("-plain") or mode.split(":")[0].endswith("-plain"):
        found.append(Finding(LUKS_PLAIN_IV_WRAPS, Severity.WARNING, f"{cipher}: 32-bit IVs repeat beyond 2 TiB"))
    if hash_name.lower() == "sha1":
        found.append(Finding(LUKS_SHA1, Severity.INFO, "sha1 for PBKDF2/AF: acceptable but dated; prefer sha256"))
    return found


def _grade_key_bits(cipher: str, key_bits: int) -> list[Finding]:
    """A cipher key under 256 bits (XTS splits its key in two): below cryptsetup's default of AES-256."""
    mode = cipher.split("-", 1)[1] if "-" in cipher else ""
    cipher_bits = key_bits // 2 if mode.startswith("xts") else key_bits
    if cipher_bits >= STRONG_CIPHER_KEY_BITS:
        return []
    return [
        Finding(
            LUKS_SHORT_KEY,
            Severity.INFO,
            f"{cipher} with a {key_bits}-bit key uses {cipher_bits}-bit cipher keys: below cryptsetup's "
            "default of 256 (aes-xts-plain64 with a 512-bit key)",
        )
    ]


def grade_new_luks(cipher: str, hash_name: str, key_bits: int, iterations: int | None) -> list[Finding]:
    """What the scanner would report about a LUKS1 container made with these settings (the same rules as
    :func:`grade_luks1`): ``qcrypt migrate`` refuses to create one with any of them unless --allow-weak.
    ``iterations``: a forced keyslot count; None when --iter-time measures it (never below the minimum)."""
    found = _grade_cipher(cipher, hash_name) + _grade_key_bits(cipher, key_bits)
    if iterations is not None and iterations < MIN_PBKDF2_ITERATIONS:
        found.append(
            Finding(
                LUKS_LOW_ITERATIONS,
                Severity.WARNING,
                f"PBKDF2 iterations below {MIN_PBKDF2_ITERATIONS} in the new keyslot: passphrases "
                "are cheap to brute-force",
            )
        )
    return found


def grade_luks1(header: LuksHeader, *, raw: bool) -> list[Finding]:
    found = _grade_cipher(header.cipher, header.hash_spec) + _grade_key_bits(header.cipher, header.key_bits)
    active = [k for k in header.keyslots if k.active]
    low = [k.index for k in active if k.iterations < MIN_PBKDF2_ITERATIONS]
    if low or header.mk_digest_iter < MIN_PBKDF2_ITERATIONS:
        where = f"keyslot(s) {low}" if low else "master-key digest"
        found.append(
            Finding(
                LUKS_LOW_ITERATIONS,
                Severity.WARNING,
                f"PBKDF2 iterations below {MIN_PBKDF2_ITERATIONS} in {where}: passphrases are cheap to brute-force",
            )
        )
    if not active:
        found.append(Finding(LUKS_NO_ACTIVE_KEYSLOT, Severity.WARNING, "no active keyslot: the data cannot be opened"))
    found += _algorithms(header)
    found += _qemu_layout(header)
    if raw and header.payload_offset % CRYPTSETUP_ALIGN_SECTORS:
        found.append(
            Finding(
                LUKS1_UNALIGNED_PAYLOAD,
                Severity.INFO,
                f"payload offset {header.payload_offset} sectors is not 1 MiB aligned: "
                "'cryptsetup convert --type luks2' refuses it",
            )
        )
    return found


def _algorithms(header: LuksHeader) -> list[Finding]:
    """A well-formed LUKS1 header may name algorithms only cryptsetup (kernel, libgcrypt) implements."""
    from qcrypt.luks import header as luks_header

    qemu_lacks, qcrypt_lacks = luks_header.qemu_unsupported(header), luks_header.qcrypt_unsupported(header)
    if qemu_lacks and qcrypt_lacks:
        return [
            Finding(
                LUKS1_UNSUPPORTED_ALGORITHM,
                Severity.WARNING,
                f"{' and '.join(qemu_lacks)}: cryptsetup opens it, QEMU's luks driver cannot, and qcrypt "
                f"cannot unlock or migrate it ({' and '.join(qcrypt_lacks)})",
            )
        ]
    if qemu_lacks:
        return [
            Finding(
                LUKS1_UNSUPPORTED_ALGORITHM,
                Severity.WARNING,
                f"{' and '.join(qemu_lacks)}: cryptsetup opens it, QEMU's luks driver cannot",
            )
        ]
    if qcrypt_lacks:
        return [
            Finding(
                LUKS1_UNSUPPORTED_ALGORITHM,
                Severity.INFO,
                f"{' and '.join(qcrypt_lacks)}: QEMU and cryptsetup open it; qcrypt cannot unlock or migrate it",
            )
        ]
    return []


def _qemu_layout(header: LuksHeader) -> list[Finding]:
    """cryptsetup accepts layouts QEMU's stricter checks refuse (qemu_layout.qemu_keyslot_problems)."""
    from qcrypt.luks import qemu_layout

    if header.payload_offset == 0:
        return [
            Finding(
                LUKS1_QEMU_REFUSES_LAYOUT,
                Severity.WARNING,
                "detached header (payload offset 0): QEMU's luks driver cannot open it",
            )
        ]
    problems = qemu_layout.qemu_keyslot_problems(header) + qemu_layout.qemu_payload_problems(header)
    if not problems:
        return []
    return [
        Finding(
            LUKS1_QEMU_REFUSES_LAYOUT,
            Severity.WARNING,
            "; ".join(problems) + ": cryptsetup opens it, QEMU refuses it ('qcrypt migrate --to luks' or "
            "'--to qcow2-luks' writes a layout QEMU accepts)",
        )
    ]


def grade_luks2(info: Luks2Info) -> list[Finding]:
    found = [
        Finding(LUKS2_NOT_QEMU, Severity.INFO, "LUKS2: dm-crypt opens it, QEMU's luks driver (and qemu-img) cannot")
    ]
    if not info.checksum_ok:
        found.append(Finding(LUKS2_CHECKSUM, Severity.WARNING, "LUKS2 header checksum does not match"))
    if info.segment_cipher:
        found += [f for f in _grade_cipher(info.segment_cipher, "") if f.code != LUKS_SHA1]
    low = [
        k["index"]
        for k in info.keyslots
        if k.get("kdf", {}).get("type") == "pbkdf2" and (k["kdf"].get("iterations") or 0) < MIN_PBKDF2_ITERATIONS
    ]
    if low:
        found.append(
            Finding(
                LUKS_LOW_ITERATIONS,
                Severity.WARNING,
                f"PBKDF2 iterations below {MIN_PBKDF2_ITERATIONS} in keyslot(s) {low}",
            )
        )
    return found
