"""qcrypt.crypto.sector: known answers (IEEE P1619), independent per-sector references, properties, and
OpenSSL's command line as a real peer for the legacy cipher."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from array import array
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from qcrypt.crypto import sector
from qcrypt.crypto.sector import (
    SECTOR as SECTOR_SIZE,
)
from qcrypt.crypto.sector import (
    SectorCipher,
    legacy_aes_key,
    legacy_cipher,
    make_sector_cipher,
)
from qcrypt.errors import FormatError, QcryptError, UnsupportedFeatureError
from tests._compare import assert_same_bytes
from tests._tools import IN_CI, require_tool


@pytest.fixture(autouse=True, scope="module", params=["native", "numpy"])
def xts_path(request: pytest.FixtureRequest) -> Any:
    """Every test here runs twice: XTS through the compiled accelerator (qcrypt/crypto/_xts.c) and through
    the numpy path, which must give the same bytes. CI must have built the accelerator."""
    if request.param == "native" and not sector.native_xts_available():
        if IN_CI:
            pytest.fail("the XTS accelerator (qcrypt/crypto/_xts.c) was not built: CI must test it")
        pytest.skip("XTS accelerator not built (needs gcc, python3-dev, libssl-dev at install)")
    previous = sector.use_native_xts(request.param == "native")
    yield request.param
    sector.use_native_xts(previous)


def test_the_chosen_xts_path_is_the_one_used(xts_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = sector._native_xts_crypt

    def counting(*args: Any) -> None:
        calls.append(1)
        real(*args)  # type: ignore[misc]

    if real is not None:
        monkeypatch.setattr(sector, "_native_xts_crypt", counting)
    key = bytes(range(64))
    data = os.urandom(8 * SECTOR_SIZE)
    for mode in ("xts-plain64", "xts-plain"):
        cipher = make_sector_cipher("aes", mode, key)
        assert cipher.decrypt(cipher.encrypt(data, 3), 3) == data
    assert len(calls) == (4 if xts_path == "native" else 0)


SECTOR_LIMIT = 1 << 64

# --- independent per-sector references (one cryptography object per sector; no numpy) -------------------


def plain64(sector_number: int) -> bytes:
    return sector_number.to_bytes(8, "little") + bytes(8)


def plain32(sector_number: int) -> bytes:
    return (sector_number % (1 << 32)).to_bytes(4, "little") + bytes(12)


def essiv(hash_name: str, key: bytes) -> Callable[[int], bytes]:
    salt_key = hashlib.new(hash_name, key).digest()

    def iv(sector_number: int) -> bytes:
        encryptor = Cipher(algorithms.AES(salt_key), modes.ECB()).encryptor()
        return encryptor.update(plain64(sector_number)) + encryptor.finalize()

    return iv


def sectors_of(data: bytes) -> list[bytes]:
    return [data[i : i + SECTOR_SIZE] for i in range(0, len(data), SECTOR_SIZE)]


def _reference_per_sector(
    mode: Callable[[bytes], Any], key: bytes, iv: Callable[[int], bytes], data: bytes, first: int, encrypt: bool
) -> bytes:
    """One cryptography Cipher object per 512-byte sector: slow, obviously right."""
    out = []
    for index, chunk in enumerate(sectors_of(data)):
        cipher = Cipher(algorithms.AES(key), mode(iv(first + index)))
        context = cipher.encryptor() if encrypt else cipher.decryptor()
        out.append(context.update(chunk) + context.finalize())
    return b"".join(out)


def reference_cbc(key: bytes, iv: Callable[[int], bytes], data: bytes, first: int, encrypt: bool) -> bytes:
    return _reference_per_sector(modes.CBC, key, iv, data, first, encrypt)


def reference_xts_lib(key: bytes, iv: Callable[[int], bytes], data: bytes, first: int, encrypt: bool) -> bytes:
    """cryptography's own XTS, one object per sector (refuses keys with equal halves)."""
    return _reference_per_sector(modes.XTS, key, iv, data, first, encrypt)


def _times_alpha(tweak: int) -> int:
    tweak <<= 1
    if tweak >> 128:
        tweak ^= (1 << 128) | 0x87
    return tweak


def reference_xts_blocks(key: bytes, data: bytes, first: int, encrypt: bool) -> bytes:
    """Textbook XTS from IEEE P1619 with Python integers and single-block ECB (accepts equal halves)."""
    half = len(key) // 2
    data_cipher = Cipher(algorithms.AES(key[:half]), modes.ECB())
    tweak_cipher = Cipher(algorithms.AES(key[half:]), modes.ECB())
    out = bytearray()
    for index, chunk in enumerate(sectors_of(data)):
        tweak = int.from_bytes(tweak_cipher.encryptor().update(plain64(first + index)), "little")
        for offset in range(0, SECTOR_SIZE, 16):
            mask = tweak.to_bytes(16, "little")
            block = bytes(a ^ b for a, b in zip(chunk[offset : offset + 16], mask))
            context = data_cipher.encryptor() if encrypt else data_cipher.decryptor()
            out += bytes(a ^ b for a, b in zip(context.update(block), mask))
            tweak = _times_alpha(tweak)
    return bytes(out)


def distinct_halves_key(length: int) -> bytes:
    while True:
        key = os.urandom(length)
        if key[: length // 2] != key[length // 2 :]:
            return key


# --- IEEE P1619-2007 XTS-AES vectors with 512-byte data units ---------------------------------------------

PATTERN_512 = bytes(range(256)) * 2

P1619_VECTORS = [
    pytest.param(
        "2718281828459045235360287471352631415926535897932384626433832795",
        0,
        "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c"
        "c78cf7f5e543445f8333d8fa7f56000005279fa5d8b5e4ad40e736ddb4d35412"
        "328063fd2aab53e5ea1e0a9f332500a5df9487d07a5c92cc512c8866c7e860ce"
        "93fdf166a24912b422976146ae20ce846bb7dc9ba94a767aaef20c0d61ad0265"
        "5ea92dc4c4e41a8952c651d33174be51a10c421110e6d81588ede82103a252d8"
        "a750e8768defffed9122810aaeb99f9172af82b604dc4b8e51bcb08235a6f434"
        "1332e4ca60482a4ba1a03b3e65008fc5da76b70bf1690db4eae29c5f1badd03c"
        "5ccf2a55d705ddcd86d449511ceb7ec30bf12b1fa35b913f9f747a8afd1b130e"
        "94bff94effd01a91735ca1726acd0b197c4e5b03393697e126826fb6bbde8ecc"
        "1e08298516e2c9ed03ff3c1b7860f6de76d4cecd94c8119855ef5297ca67e9f3"
        "e7ff72b1e99785ca0a7e7720c5b36dc6d72cac9574c8cbbc2f801e23e56fd344"
        "b07f22154beba0f08ce8891e643ed995c94d9a69c9f1b5f499027a78572aeebd"
        "74d20cc39881c213ee770b1010e4bea718846977ae119f7a023ab58cca0ad752"
        "afe656bb3c17256a9f6e9bf19fdd5a38fc82bbe872c5539edb609ef4f79c203e"
        "bb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18d"
        "eb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568",
        id="vector4-aes128-unit0",
    ),
    pytest.param(
        "2718281828459045235360287471352662497757247093699959574966967627"
        "3141592653589793238462643383279502884197169399375105820974944592",
        0xFF,
        "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b"
        "5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd"
        "5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0"
        "c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca"
        "2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0"
        "b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f"
        "93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec"
        "583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a"
        "84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1"
        "505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae"
        "9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29"
        "a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac"
        "6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f"
        "645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385"
        "1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa"
        "773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
        id="vector10-aes256-unit-ff",
    ),
    pytest.param(
        "e0e1e2e3e4e5e6e7e8e9eaebecedeeefc0c1c2c3c4c5c6c7c8c9cacbcccdcecf",
        0xA987654321,
        "38b45812ef43a05bd957e545907e223b954ab4aaf088303ad910eadf14b42be6"
        "8b2461149d8c8ba85f992be970bc621f1b06573f63e867bf5875acafa04e42cc"
        "bd7bd3c2a0fb1fff791ec5ec36c66ae4ac1e806d81fbf709dbe29e471fad3854"
        "9c8e66f5345d7c1eb94f405d1ec785cc6f6a68f6254dd8339f9d84057e01a177"
        "41990482999516b5611a38f41bb6478e6f173f320805dd71b1932fc333cb9ee3"
        "9936beea9ad96fa10fb4112b901734ddad40bc1878995f8e11aee7d141a2f5d4"
        "8b7a4e1e7f0b2c04830e69a4fd1378411c2f287edf48c6c4e5c247a19680f7fe"
        "41cefbd49b582106e3616cbbe4dfb2344b2ae9519391f3e0fb4922254b1d6d2d"
        "19c6d4d537b3a26f3bcc51588b32f3eca0829b6a5ac72578fb814fb43cf80d64"
        "a233e3f997a3f02683342f2b33d25b492536b93becb2f5e1a8b82f5b88334272"
        "9e8ae09d16938841a21a97fb543eea3bbff59f13c1a18449e398701c1ad51648"
        "346cbc04c27bb2da3b93a1372ccae548fb53bee476f9e9c91773b1bb19828394"
        "d55d3e1a20ed69113a860b6829ffa847224604435070221b257e8dff783615d2"
        "cae4803a93aa4334ab482a0afac9c0aeda70b45a481df5dec5df8cc0f423c77a"
        "5fd46cd312021d4b438862419a791be03bb4d97c0e59578542531ba466a83baf"
        "92cefc151b5cc1611a167893819b63fb8a6b18e86de60290fa72b797b0ce59f3",
        id="vector19-aes128-unit-a987654321",
    ),
]


@pytest.mark.parametrize(("key_hex", "data_unit", "ciphertext_hex"), P1619_VECTORS)
def test_xts_p1619_vectors(key_hex: str, data_unit: int, ciphertext_hex: str) -> None:
    key = bytes.fromhex(key_hex)
    expected = bytes.fromhex(ciphertext_hex)
    cipher = make_sector_cipher("aes", "xts-plain64", key)
    assert cipher.encrypt(PATTERN_512, data_unit) == expected
    assert cipher.decrypt(expected, data_unit) == PATTERN_512
    # The vector inside a batch (sector 1 of 3, or sector 0 for data unit 0).
    position = min(data_unit, 1)
    batch = os.urandom(position * SECTOR_SIZE) + PATTERN_512 + os.urandom(SECTOR_SIZE)
    start = position * SECTOR_SIZE
    assert cipher.encrypt(batch, data_unit - position)[start : start + SECTOR_SIZE] == expected
    # Both oracles agree with the published value (guards the inline hex too).
    assert reference_xts_lib(key, plain64, PATTERN_512, data_unit, True) == expected
    assert reference_xts_blocks(key, PATTERN_512, data_unit, True) == expected


# --- modes against the references --------------------------------------------------------------------------

SECTOR_NUMBERS = st.one_of(
    st.integers(0, 1 << 20),
    st.integers(0, SECTOR_LIMIT - 64),
    st.sampled_from([(1 << 32) - 3, 1 << 32, (1 << 63) - 2, 1 << 63, SECTOR_LIMIT - 8]),
)


def sector_data(max_sectors: int = 6) -> st.SearchStrategy[bytes]:
    """Whole sectors, 1 to ``max_sectors`` of them."""
    sectors = st.binary(min_size=SECTOR_SIZE, max_size=SECTOR_SIZE)
    return st.lists(sectors, min_size=1, max_size=max_sectors).map(b"".join)


@settings(max_examples=60, deadline=None)
@given(data=sector_data(), first=SECTOR_NUMBERS, key_bytes=st.sampled_from([32, 64]))
def test_xts_matches_cryptography_xts(data: bytes, first: int, key_bytes: int) -> None:
    key = distinct_halves_key(key_bytes)
    cipher = make_sector_cipher("aes", "xts-plain64", key)
    ciphertext = cipher.encrypt(data, first)
    assert ciphertext == reference_xts_lib(key, plain64, data, first, True)
    assert cipher.decrypt(ciphertext, first) == data


@settings(max_examples=60, deadline=None)
@given(data=sector_data(), first=SECTOR_NUMBERS, key_bytes=st.sampled_from([16, 24, 32]))
def test_cbc_plain64_matches_reference(data: bytes, first: int, key_bytes: int) -> None:
    key = os.urandom(key_bytes)
    cipher = make_sector_cipher("aes", "cbc-plain64", key)
    ciphertext = cipher.encrypt(data, first)
    assert ciphertext == reference_cbc(key, plain64, data, first, True)
    assert cipher.decrypt(ciphertext, first) == data
    assert cipher.decrypt(data, first) == reference_cbc(key, plain64, data, first, False)


@settings(max_examples=40, deadline=None)
@given(
    data=sector_data(),
    first=SECTOR_NUMBERS,
    key_bytes=st.sampled_from([16, 24, 32]),
    hash_name=st.sampled_from(["sha256", "md5"]),
)
def test_cbc_essiv_matches_reference(data: bytes, first: int, key_bytes: int, hash_name: str) -> None:
    key = os.urandom(key_bytes)
    cipher = make_sector_cipher("aes", f"cbc-essiv:{hash_name}", key)
    iv = essiv(hash_name, key)
    ciphertext = cipher.encrypt(data, first)
    assert ciphertext == reference_cbc(key, iv, data, first, True)
    assert cipher.decrypt(ciphertext, first) == data


def test_essiv_sha256_uses_aes256_even_for_aes128_data() -> None:
    key = os.urandom(16)
    iv = essiv("sha256", key)  # AES-256 keyed with the 32-byte digest (docs/FORMATS.md Pitfall 15)
    data = os.urandom(3 * SECTOR_SIZE)
    cipher = make_sector_cipher("aes", "cbc-essiv:sha256", key)
    assert cipher.encrypt(data, 77) == reference_cbc(key, iv, data, 77, True)


@pytest.mark.parametrize("chain", ["cbc", "xts"])
def test_plain_iv_is_sector_mod_2_pow_32(chain: str) -> None:
    key = distinct_halves_key(32)
    data = os.urandom(4 * SECTOR_SIZE)
    cipher = make_sector_cipher("aes", f"{chain}-plain", key)
    low = (1 << 32) - 2  # the batch wraps: sectors 2^32-2, 2^32-1, 0, 1
    assert cipher.encrypt(data, low) == cipher.encrypt(data, low + (5 << 32))
    if chain == "cbc":
        expected = reference_cbc(key, plain32, data, low, True)
    else:
        expected = reference_xts_lib(key, plain32, data, low, True)
    assert cipher.encrypt(data, low) == expected
    assert cipher.encrypt(data, 7) != make_sector_cipher("aes", f"{chain}-plain64", key).encrypt(data, 7 + (1 << 32))


def test_ecb_is_plain_ecb_without_iv() -> None:
    key = os.urandom(32)
    data = os.urandom(5 * SECTOR_SIZE)
    expected = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(data)
    cipher = make_sector_cipher("aes", "ecb", key)
    assert cipher.encrypt(data, 123) == expected
    assert cipher.encrypt(data, 9) == expected
    assert cipher.decrypt(expected, 0) == data


def test_xts_with_equal_key_halves() -> None:
    # cryptography refuses such keys (Pitfall 18); QEMU and dm-crypt accept them when reading.
    key = bytes(range(32)) * 2
    data = os.urandom(3 * SECTOR_SIZE)
    cipher = make_sector_cipher("aes", "xts-plain64", key)
    ciphertext = cipher.encrypt(data, (1 << 40) + 3)
    assert ciphertext == reference_xts_blocks(key, data, (1 << 40) + 3, True)
    assert cipher.decrypt(ciphertext, (1 << 40) + 3) == data


# --- batching ----------------------------------------------------------------------------------------------

ALL_MODES = ["xts-plain64", "xts-plain", "cbc-plain64", "cbc-plain", "cbc-essiv:sha256", "ecb"]


def key_for(mode: str) -> bytes:
    return distinct_halves_key(64 if mode.startswith("xts") else 32)


def reference_for(mode: str, key: bytes, data: bytes, first: int, encrypt: bool) -> bytes:
    """The per-sector reference of any mode in ALL_MODES."""
    if mode == "ecb":
        context = Cipher(algorithms.AES(key), modes.ECB())
        worker = context.encryptor() if encrypt else context.decryptor()
        return worker.update(data) + worker.finalize()
    chain, ivgen = mode.split("-", 1)
    iv = {"plain64": plain64, "plain": plain32}.get(ivgen) or essiv(ivgen.split(":")[1], key)
    return (reference_xts_lib if chain == "xts" else reference_cbc)(key, iv, data, first, encrypt)


@settings(max_examples=40, deadline=None)
@given(
    mode=st.sampled_from(ALL_MODES),
    data=sector_data(8),
    first=SECTOR_NUMBERS,
    cut=st.integers(0, 8),
)
def test_batched_equals_sector_by_sector(mode: str, data: bytes, first: int, cut: int) -> None:
    cipher = make_sector_cipher("aes", mode, key_for(mode))
    whole = cipher.encrypt(data, first)
    one_by_one = b"".join(cipher.encrypt(chunk, first + i) for i, chunk in enumerate(sectors_of(data)))
    assert whole == one_by_one
    split = min(cut, len(data) // SECTOR_SIZE) * SECTOR_SIZE
    assert cipher.encrypt(data[:split], first) + cipher.encrypt(data[split:], first + split // SECTOR_SIZE) == whole
    assert cipher.decrypt(whole[split:], first + split // SECTOR_SIZE) == data[split:]


@settings(max_examples=40, deadline=None)
@given(mode=st.sampled_from(ALL_MODES), data=sector_data(), first=SECTOR_NUMBERS)
def test_round_trip(mode: str, data: bytes, first: int) -> None:
    key = key_for(mode)
    cipher = make_sector_cipher("aes", mode, key)
    ciphertext = cipher.encrypt(data, first)
    assert_same_bytes(ciphertext, reference_for(mode, key, data, first, True), f"{mode} ciphertext")
    assert_same_bytes(cipher.decrypt(ciphertext, first), data, f"{mode} round trip")


@pytest.mark.parametrize("mode", ["xts-plain64", "cbc-plain64", "cbc-essiv:sha256"])
def test_buffers_spanning_several_chunks(mode: str) -> None:
    key = key_for(mode)
    sectors = 2 * sector.CHUNK_SECTORS + 3
    data = os.urandom(sectors * SECTOR_SIZE)
    first = (1 << 33) + 11
    cipher = make_sector_cipher("aes", mode, key)
    if mode.startswith("xts"):
        expected = reference_xts_lib(key, plain64, data, first, True)
    else:
        expected = reference_cbc(key, essiv("sha256", key) if "essiv" in mode else plain64, data, first, True)
    assert_same_bytes(cipher.encrypt(data, first), expected, "encrypt")
    assert_same_bytes(cipher.decrypt(expected, first), data, "decrypt")


@pytest.mark.parametrize("mode", ALL_MODES)
def test_in_place_and_buffer_types(mode: str) -> None:
    cipher = make_sector_cipher("aes", mode, key_for(mode))
    data = os.urandom(6 * SECTOR_SIZE)
    expected = cipher.encrypt(data, 4242)
    buffer = bytearray(data)
    cipher.encrypt_into(buffer, 4242, buffer)
    assert bytes(buffer) == expected
    cipher.decrypt_into(memoryview(buffer), 4242, memoryview(buffer))
    assert bytes(buffer) == data
    words = array("I", data)  # a memoryview whose items are not bytes
    assert cipher.encrypt(memoryview(words), 4242) == expected
    assert cipher.decrypt(memoryview(bytearray(expected))[SECTOR_SIZE:], 4243) == data[SECTOR_SIZE:]
    unaligned = memoryview(b"x" * 3 + expected)[3:]  # numpy and OpenSSL see a misaligned buffer
    assert cipher.decrypt(unaligned, 4242) == data
    out = bytearray(len(data) + 5)
    cipher.encrypt_into(data, 4242, memoryview(out)[5:])
    assert bytes(out[5:]) == expected


def test_empty_input() -> None:
    assert legacy_cipher(b"pw").decrypt(b"", 5) == b""


def test_one_cipher_shared_by_threads() -> None:
    cipher = make_sector_cipher("aes", "xts-plain64", distinct_halves_key(64))
    data = os.urandom(300 * SECTOR_SIZE)
    expected = [cipher.encrypt(data, first) for first in range(4)]
    results: dict[int, list[bool]] = {}

    def work(first: int) -> None:
        results[first] = [cipher.encrypt(data, first) == expected[first] for _ in range(20)]

    threads = [threading.Thread(target=work, args=(first,)) for first in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {first: [True] * 20 for first in range(4)}


# --- legacy qcow/qcow2 AES ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("passphrase", "key"),
    [
        (b"0123456789abcdefXYZ", b"0123456789abcdef"),
        (b"0123456789abcdef", b"0123456789abcdef"),
        (b"secret", b"secret" + bytes(10)),
        (b"", bytes(16)),
        (b"ab\0cd", b"ab" + bytes(14)),
        ("0123456789abcdé!".encode(), b"0123456789abcd\xc3\xa9"),
        ("0123456789abcdeé".encode(), b"0123456789abcde\xc3"),  # a UTF-8 character cut in half
    ],
)
def test_legacy_aes_key(passphrase: bytes, key: bytes) -> None:
    derived = legacy_aes_key(passphrase)
    assert isinstance(derived, bytearray)
    assert bytes(derived) == key


@settings(max_examples=40, deadline=None)
@given(passphrase=st.binary(max_size=40), data=sector_data(4), first=SECTOR_NUMBERS)
def test_legacy_cipher_matches_reference(passphrase: bytes, data: bytes, first: int) -> None:
    key = bytes(legacy_aes_key(passphrase))
    cipher = legacy_cipher(passphrase)
    assert cipher.key_bytes == 16
    assert cipher.cipher_mode == "cbc-plain64"
    assert cipher.decrypt(data, first) == reference_cbc(key, plain64, data, first, False)
    assert cipher.encrypt(data, first) == reference_cbc(key, plain64, data, first, True)


@pytest.mark.interop
def test_legacy_cipher_matches_openssl_cli() -> None:
    openssl = require_tool("openssl")
    passphrase = b"qcrypt-legacy-passphrase"
    key_hex = legacy_aes_key(passphrase).hex()
    cipher = legacy_cipher(passphrase)
    for first in (0, 1, 0x1234_5678_9A, (1 << 63) + 5):
        data = os.urandom(3 * SECTOR_SIZE)
        peer = b"".join(
            subprocess.run(
                [openssl, "enc", "-aes-128-cbc", "-nopad", "-K", key_hex, "-iv", plain64(first + i).hex()],
                input=chunk,
                capture_output=True,
                check=True,
                timeout=120,
            ).stdout
            for i, chunk in enumerate(sectors_of(data))
        )
        assert cipher.encrypt(data, first) == peer
        assert cipher.decrypt(peer, first) == data


# --- errors, repr, wipe ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "mode", "key_bytes", "field"),
    [
        ("twofish", "xts-plain64", 64, "cipher_name"),
        ("AES", "xts-plain64", 64, "cipher_name"),
        ("aes", "ctr-plain64", 32, "cipher_mode"),
        ("aes", "xts", 64, "cipher_mode"),
        ("aes", "cbc-benbi", 32, "cipher_mode"),
        ("aes", "cbc-essiv:sha1", 32, "cipher_mode"),
        ("aes", "cbc-essiv:sha512", 32, "cipher_mode"),
        ("aes", "cbc-essiv:whirlpool", 32, "cipher_mode"),
        ("aes", "cbc-essiv", 32, "cipher_mode"),
        ("aes", "xts-essiv:sha256", 64, "cipher_mode"),
        ("aes", "ecb-plain64", 32, "cipher_mode"),
        ("aes", "xts-plain64", 48, "key_bytes"),
        ("aes", "xts-plain64", 16, "key_bytes"),
        ("aes", "cbc-plain64", 64, "key_bytes"),
        ("aes", "cbc-essiv:sha256", 20, "key_bytes"),
        ("aes", "ecb", 0, "key_bytes"),
    ],
)
def test_unsupported_specs(name: str, mode: str, key_bytes: int, field: str) -> None:
    with pytest.raises(UnsupportedFeatureError) as caught:
        make_sector_cipher(name, mode, bytes(key_bytes))
    assert caught.value.field == field
    assert isinstance(caught.value, ValueError)


def test_hash_after_plain64_is_ignored() -> None:
    key = os.urandom(32)
    data = os.urandom(2 * SECTOR_SIZE)
    with_hash = make_sector_cipher("aes", "cbc-plain64:sha256", key)
    assert with_hash.encrypt(data, 9) == make_sector_cipher("aes", "cbc-plain64", key).encrypt(data, 9)


@pytest.mark.parametrize(
    ("length", "first"),
    [(511, 0), (513, 0), (SECTOR_SIZE, -1), (2 * SECTOR_SIZE, SECTOR_LIMIT - 1), (SECTOR_SIZE, SECTOR_LIMIT)],
)
def test_bad_extents(length: int, first: int) -> None:
    cipher = legacy_cipher(b"pw")
    for call in (cipher.encrypt, cipher.decrypt):
        with pytest.raises(FormatError):
            call(bytes(length), first)


def test_last_possible_sector() -> None:
    key = distinct_halves_key(32)
    cipher = make_sector_cipher("aes", "xts-plain64", key)
    data = os.urandom(2 * SECTOR_SIZE)
    first = SECTOR_LIMIT - 2  # sectors 2^64-2 and 2^64-1: all 64 IV bits set in the last one
    assert cipher.encrypt(data, first) == reference_xts_lib(key, plain64, data, first, True)


def test_output_length_must_match() -> None:
    cipher = legacy_cipher(b"pw")
    with pytest.raises(FormatError):
        cipher.decrypt_into(bytes(1024), 0, bytearray(512))


def test_repr_hides_the_key() -> None:
    key = bytes.fromhex("00112233445566778899aabbccddeeff")
    cipher = make_sector_cipher("aes", "cbc-essiv:sha256", key)
    text = repr(cipher)
    assert "cbc-essiv:sha256" in text
    assert "key_bytes=16" in text
    assert key.hex() not in text
    assert "00112233" not in text


def test_wipe_stops_use_in_every_thread() -> None:
    cipher: SectorCipher = make_sector_cipher("aes", "xts-plain64", distinct_halves_key(64))
    cipher.encrypt(bytes(SECTOR_SIZE), 0)
    cipher.wipe()
    with pytest.raises(QcryptError):
        cipher.encrypt(bytes(SECTOR_SIZE), 0)
    errors: list[BaseException] = []

    def use() -> None:
        try:
            cipher.decrypt(bytes(SECTOR_SIZE), 0)
        except QcryptError as error:
            errors.append(error)

    thread = threading.Thread(target=use)
    thread.start()
    thread.join()
    assert len(errors) == 1
