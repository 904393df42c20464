"""LUKS cipher specifications: which ciphers, chain modes, IV generators and hashes exist, which of them
QEMU and qcrypt support, and the key sizes each allows.

References: cryptsetup lib/utils_crypt.c (cipher-mode parsing); qemu crypto/block-luks.c (its tables).
"""

from __future__ import annotations

from qcrypt.crypto.kdf import (
    supported_hashes,
)
from qcrypt.errors import (
    FormatError,
    UnsupportedFeatureError,
)

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


def parse_mode(cipher_mode: str, path: str | None = None) -> tuple[str, str, str | None]:
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
    chain, _ivgen, _iv_hash = parse_mode(cipher_mode, path)
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
