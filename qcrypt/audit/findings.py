"""Audit findings: stable codes, their severities and the grading rules (documented in README, "Findings").

Codes are part of the public interface (JSON, Prometheus, hook): never rename one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qcrypt.formats import qcow2 as qcow2_fmt

if TYPE_CHECKING:
    from qcrypt.images.qcow2_reader import QCow2Image
    from qcrypt.luks.engine import LuksHeader
    from qcrypt.luks.luks2 import Luks2Info

LEGACY_AES = "legacy-aes"
LEGACY_AES_BACKING = "legacy-aes-backing"
LUKS_LOW_ITERATIONS = "luks-low-iterations"
LUKS_PREDICTABLE_IV = "luks-predictable-iv"
LUKS_ECB = "luks-ecb"
LUKS_SHA1 = "luks-sha1"
LUKS_SHORT_KEY = "luks-short-key"
LUKS_PLAIN_IV_WRAPS = "luks-plain-iv-wraps"
LUKS2_NOT_QEMU = "luks2-not-qemu"
LUKS2_CHECKSUM = "luks2-checksum-mismatch"
LUKS1_UNALIGNED_PAYLOAD = "luks1-unaligned-payload"
LUKS_NO_ACTIVE_KEYSLOT = "luks-no-active-keyslot"
LUKS1_QEMU_REFUSES_LAYOUT = "luks1-qemu-refuses-layout"
LUKS1_UNSUPPORTED_ALGORITHM = "luks1-unsupported-algorithm"
QCOW2_UNKNOWN_INCOMPATIBLE = "qcow2-unknown-incompatible-features"
QCOW2_CORRUPT = "qcow2-corrupt"
QCOW2_DIRTY = "qcow2-dirty"
QCOW2_EXTERNAL_DATA = "qcow2-external-data-file"
UNPARSEABLE = "unparseable"
UNREADABLE = "unreadable"
BACKING_MISSING = "backing-missing"
BACKING_LOOP = "backing-loop"
BACKING_NOT_LOCAL = "backing-not-local"
BACKING_TOO_DEEP = "backing-too-deep"
LEGACY_COMPRESSED_PLAINTEXT = "legacy-aes-compressed-plaintext"
BACKING_OUTSIDE_STORAGE = "backing-outside-storage"
BACKING_NOT_OWNER_READABLE = "backing-not-owner-readable"
BACKING_SPECIAL_FILE = "backing-special-file"
SPECIAL_FILE = "special-file"
BACKING_REFUSED = (BACKING_OUTSIDE_STORAGE, BACKING_NOT_OWNER_READABLE, BACKING_SPECIAL_FILE)
LIMIT_EXCEEDED = "limit-exceeded"

MIN_PBKDF2_ITERATIONS = 1000  # cryptsetup's minimum for a LUKS1 keyslot
STRONG_CIPHER_KEY_BITS = 256  # cryptsetup's default: AES-256 (a 512-bit XTS key holds two 256-bit keys)
CRYPTSETUP_ALIGN_SECTORS = 2048


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str  # info | warning | critical
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity, "message": self.message}


def legacy_aes(format_name: str, snapshot_count: int, *, parseable: bool = True) -> Finding:
    snaps = f"; its {snapshot_count} internal snapshot(s) hold legacy ciphertext too" if snapshot_count else ""
    advice = (
        "migrate with 'qcrypt migrate'"
        if parseable
        else "its header cannot be parsed (see the unparseable finding): qcrypt cannot migrate it as it is"
    )
    return Finding(
        LEGACY_AES,
        "critical",
        f"{format_name} legacy AES-CBC encryption (passphrase used as key, predictable IVs): QEMU system "
        f"emulators refuse it; {advice}{snaps}",
    )


def legacy_aes_backing(paths: list[str]) -> Finding:
    return Finding(
        LEGACY_AES_BACKING,
        "critical",
        "backing chain holds legacy AES-encrypted layer(s): " + ", ".join(paths),
    )


def legacy_compressed_plaintext(clusters: int, *, at_least: bool = False) -> Finding:
    count = f"at least {clusters}" if at_least else f"{clusters}"
    return Finding(
        LEGACY_COMPRESSED_PLAINTEXT,
        "critical",
        f"{count} compressed cluster(s) are stored unencrypted (QEMU never encrypts compressed "
        "clusters of legacy AES images): their data is readable without the passphrase",
    )


def unparseable(format_name: str, error: str) -> Finding:
    return Finding(UNPARSEABLE, "warning", f"looks like {format_name} but cannot be parsed: {error}")


def limit_exceeded(error: str) -> Finding:
    return Finding(
        LIMIT_EXCEEDED,
        "warning",
        f"its header declares more than qcrypt inspects (see docs/SECURITY.md, 'Limits'): {error}",
    )


def unreadable(error: str) -> Finding:
    return Finding(UNREADABLE, "warning", f"cannot be read: {error}")


def backing_missing(path: str) -> Finding:
    return Finding(BACKING_MISSING, "warning", f"backing file {path} does not exist; the chain is incomplete")


def backing_loop(path: str) -> Finding:
    return Finding(BACKING_LOOP, "warning", f"backing chain loops back to {path}")


def backing_not_local(name: str) -> Finding:
    return Finding(BACKING_NOT_LOCAL, "info", f"backing file {name!r} is not a local file; not inspected")


def backing_too_deep(depth: int) -> Finding:
    return Finding(BACKING_TOO_DEEP, "warning", f"backing chain deeper than {depth} layers; not followed further")


def backing_outside(image: str, name: str, real: str, storage: tuple[str, ...]) -> Finding:
    where = real if real == name else f"{name} ({real})"
    return Finding(
        BACKING_OUTSIDE_STORAGE,
        "warning",
        f"backing file {where} of {image} lies outside the image's storage ({', '.join(storage)}): "
        "not followed. If the administrator trusts that folder, rerun with --allow-backing-dir "
        f"{os.path.dirname(real) or real}",
    )


def backing_not_owner_readable(image: str, real: str, owner: str, problem: str) -> Finding:
    return Finding(
        BACKING_NOT_OWNER_READABLE,
        "critical",
        f"backing file {real} of {image} is not readable by the image's owner {owner}: {problem}; "
        "not followed (its content would end up in their disk). Someone who can write the image "
        "named it: check the image; if the file really is its base, let the owner read it",
    )


def backing_special(image: str, real: str, reason: str) -> Finding:
    return Finding(
        BACKING_SPECIAL_FILE,
        "critical",
        f"backing file {real} of {image} is {reason}: never read. If it really is the disk's base, "
        "declare it in the domain XML (<backingStore type='block'>); otherwise remove the reference",
    )


def special_file(reason: str) -> Finding:
    return Finding(
        SPECIAL_FILE,
        "info",
        f"{reason}, not a disk image file: never read (name a block device explicitly to inspect it)",
    )


def grade_qcow2_features(image: QCow2Image) -> list[Finding]:
    h = image.header
    found = []
    unknown = image.unsupported_incompatible_features()
    if unknown:
        found.append(
            Finding(
                QCOW2_UNKNOWN_INCOMPATIBLE,
                "warning",
                f"unknown incompatible feature bits {unknown:#x}: QEMU and qcrypt refuse to open it",
            )
        )
    if h.incompatible_features & qcow2_fmt.INCOMPAT_CORRUPT:
        found.append(Finding(QCOW2_CORRUPT, "warning", "marked corrupt: QEMU opens it read-only at most"))
    if h.incompatible_features & qcow2_fmt.INCOMPAT_DIRTY:
        found.append(Finding(QCOW2_DIRTY, "info", "dirty bit set: refcounts may be stale (lazy refcounts)"))
    if h.incompatible_features & qcow2_fmt.INCOMPAT_DATA_FILE:
        found.append(Finding(QCOW2_EXTERNAL_DATA, "info", "guest data lives in an external data file"))
    return found


def _grade_cipher(cipher: str, hash_name: str) -> list[Finding]:
    found = []
    mode = cipher.split("-", 1)[1] if "-" in cipher else cipher
    if mode.startswith("ecb"):
        found.append(Finding(LUKS_ECB, "critical", f"{cipher}: ECB leaks plaintext patterns"))
    elif mode.startswith("cbc-plain"):
        found.append(
            Finding(
                LUKS_PREDICTABLE_IV,
                "warning",
                f"{cipher}: CBC with predictable IVs allows watermarking; prefer aes-xts-plain64",
            )
        )
    if mode.endswith("-plain") or mode.split(":")[0].endswith("-plain"):
        found.append(Finding(LUKS_PLAIN_IV_WRAPS, "warning", f"{cipher}: 32-bit IVs repeat beyond 2 TiB"))
    if hash_name.lower() == "sha1":
        found.append(Finding(LUKS_SHA1, "info", "sha1 for PBKDF2/AF: acceptable but dated; prefer sha256"))
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
            "info",
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
                "warning",
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
                "warning",
                f"PBKDF2 iterations below {MIN_PBKDF2_ITERATIONS} in {where}: passphrases are cheap to brute-force",
            )
        )
    if not active:
        found.append(Finding(LUKS_NO_ACTIVE_KEYSLOT, "warning", "no active keyslot: the data cannot be opened"))
    found += _algorithms(header)
    found += _qemu_layout(header)
    if raw and header.payload_offset % CRYPTSETUP_ALIGN_SECTORS:
        found.append(
            Finding(
                LUKS1_UNALIGNED_PAYLOAD,
                "info",
                f"payload offset {header.payload_offset} sectors is not 1 MiB aligned: "
                "'cryptsetup convert --type luks2' refuses it",
            )
        )
    return found


def _algorithms(header: LuksHeader) -> list[Finding]:
    """A well-formed LUKS1 header may name algorithms only cryptsetup (kernel, libgcrypt) implements."""
    from qcrypt.luks import engine as luks

    qemu_lacks, qcrypt_lacks = luks.qemu_unsupported(header), luks.qcrypt_unsupported(header)
    if qemu_lacks and qcrypt_lacks:
        return [
            Finding(
                LUKS1_UNSUPPORTED_ALGORITHM,
                "warning",
                f"{' and '.join(qemu_lacks)}: cryptsetup opens it, QEMU's luks driver cannot, and qcrypt "
                f"cannot unlock or migrate it ({' and '.join(qcrypt_lacks)})",
            )
        ]
    if qemu_lacks:
        return [
            Finding(
                LUKS1_UNSUPPORTED_ALGORITHM,
                "warning",
                f"{' and '.join(qemu_lacks)}: cryptsetup opens it, QEMU's luks driver cannot",
            )
        ]
    if qcrypt_lacks:
        return [
            Finding(
                LUKS1_UNSUPPORTED_ALGORITHM,
                "info",
                f"{' and '.join(qcrypt_lacks)}: QEMU and cryptsetup open it; qcrypt cannot unlock or migrate it",
            )
        ]
    return []


def _qemu_layout(header: LuksHeader) -> list[Finding]:
    """cryptsetup accepts layouts QEMU's stricter checks refuse (luks.qemu_keyslot_problems)."""
    from qcrypt.luks import engine as luks

    if header.payload_offset == 0:
        return [
            Finding(
                LUKS1_QEMU_REFUSES_LAYOUT,
                "warning",
                "detached header (payload offset 0): QEMU's luks driver cannot open it",
            )
        ]
    problems = luks.qemu_keyslot_problems(header) + luks.qemu_payload_problems(header)
    if not problems:
        return []
    return [
        Finding(
            LUKS1_QEMU_REFUSES_LAYOUT,
            "warning",
            "; ".join(problems) + ": cryptsetup opens it, QEMU refuses it ('qcrypt migrate --to luks' or "
            "'--to qcow2-luks' writes a layout QEMU accepts)",
        )
    ]


def grade_luks2(info: Luks2Info) -> list[Finding]:
    found = [Finding(LUKS2_NOT_QEMU, "info", "LUKS2: dm-crypt opens it, QEMU's luks driver (and qemu-img) cannot")]
    if not info.checksum_ok:
        found.append(Finding(LUKS2_CHECKSUM, "warning", "LUKS2 header checksum does not match"))
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
                LUKS_LOW_ITERATIONS, "warning", f"PBKDF2 iterations below {MIN_PBKDF2_ITERATIONS} in keyslot(s) {low}"
            )
        )
    return found
