"""Which sector ciphers qcrypt implements, decided without building one (no numpy, no OpenSSL): the auditor
asks it of every LUKS header it grades, and :func:`qcrypt.crypto.sector.make_sector_cipher` asks it first."""

from __future__ import annotations

from qcrypt.errors import UnsupportedFeatureError

AES_KEY_BYTES = (16, 24, 32)
XTS_KEY_BYTES = (32, 64)
ESSIV_HASHES = ("md5", "sha256")  # digests of an AES key length
ESSIV_UNUSABLE_DIGEST_BYTES = {"sha1": 20, "sha224": 28, "sha384": 48, "sha512": 64, "ripemd160": 20}


def check_sector_cipher(cipher_name: str, cipher_mode: str, key_bytes: int) -> None:
    """Raise UnsupportedFeatureError (``field`` names the part) unless qcrypt implements the dm-crypt style
    spec, e.g. ("aes", "xts-plain64", 64). Names are matched exactly (lowercase, as LUKS headers store them); a
    ``:hash`` after plain or plain64 is ignored, as QEMU does."""
    if cipher_name != "aes":
        raise UnsupportedFeatureError(f"cipher {cipher_name!r} is not supported (only aes)", field="cipher_name")
    chain, _, iv_spec = cipher_mode.partition("-")
    iv_name, _, iv_hash = iv_spec.partition(":")
    allowed = {"cbc": AES_KEY_BYTES, "ecb": AES_KEY_BYTES, "xts": XTS_KEY_BYTES}.get(chain)
    if allowed is None:
        raise UnsupportedFeatureError(f"mode {cipher_mode!r} is not supported", field="cipher_mode")
    if key_bytes not in allowed:
        raise UnsupportedFeatureError(
            f"aes-{chain} takes a key of {', '.join(map(str, allowed))} bytes, not {key_bytes}",
            field="key_bytes",
        )
    if chain == "ecb":
        if iv_spec:
            raise UnsupportedFeatureError(f"mode {cipher_mode!r}: ecb takes no IV", field="cipher_mode")
        return
    if iv_name in ("plain64", "plain"):
        return
    if iv_name != "essiv":
        raise UnsupportedFeatureError(f"mode {cipher_mode!r}: unknown IV generator", field="cipher_mode")
    if iv_hash in ESSIV_UNUSABLE_DIGEST_BYTES:
        digest_bytes = ESSIV_UNUSABLE_DIGEST_BYTES[iv_hash]
        raise UnsupportedFeatureError(
            f"mode {cipher_mode!r}: ESSIV needs an AES key of the digest's length ({digest_bytes} bytes)",
            field="cipher_mode",
        )
    if iv_hash not in ESSIV_HASHES:
        raise UnsupportedFeatureError(f"mode {cipher_mode!r}: unknown ESSIV hash", field="cipher_mode")
    if chain != "cbc":
        raise UnsupportedFeatureError(f"mode {cipher_mode!r} is not supported", field="cipher_mode")
