"""Batched 512-byte sector ciphers, byte-exact with QEMU and dm-crypt (AES in XTS, CBC or ECB mode).

References: docs/FORMATS.md B.1 (legacy qcow/qcow2 AES), D.5 (cipher specs and IV generators); IEEE P1619-2007
(XTS-AES); QEMU crypto/ivgen-plain.c, ivgen-plain64.c, ivgen-essiv.c (behaviour only).

IV generators (16 bytes per sector, ``sector`` counted by the caller, see docs/FORMATS.md Pitfall 1):

* ``plain64``: LE64(sector) followed by 8 zero bytes;
* ``plain``: LE32(sector mod 2^32) followed by 12 zero bytes;
* ``essiv:H``: AES-ECB of the plain64 block under the key H(data key); that AES key has the digest's
  length, so sha256 gives AES-256 even for AES-128 data (Pitfall 15). Only digests of 16, 24 or 32 bytes
  make an AES key (md5, sha256); sha1, sha224, sha384 and sha512 raise UnsupportedFeatureError, as QEMU
  and dm-crypt refuse them.

Modes: CBC restarts at every sector from its IV (no padding); XTS uses the IV as the tweak, key halves
(data key, tweak key) of 16 or 32 bytes; ECB uses no IV (old containers only).

Speed: no Python loop runs per sector. Each call works in chunks of up to :data:`CHUNK_SECTORS` sectors:

* CBC decrypt: one AES-ECB decryption of the chunk, then two numpy XORs (previous ciphertext block, and
  the per-sector IV over block 0);
* CBC encrypt: 32 AES-ECB calls per chunk, call ``j`` encrypting block ``j`` of every sector at once;
* XTS: one ECB call for all first tweaks of the chunk, the other tweaks computed in numpy straight in the
  data's layout (:mod:`qcrypt.crypto._gf`), XOR,
  one ECB call over the chunk, XOR.

The fastest path is ``encrypt_into``/``decrypt_into`` with a reused output buffer (or in place);
``encrypt``/``decrypt`` add one copy into a new ``bytes`` (see ``scripts/bench crypto``).

Threads: ``cryptography``'s ECB ``update_into`` holds the GIL (measured with cryptography 48: two threads
on two contexts run no faster than one), and two threads running whole calls are slower than one (numpy
drops and retakes the GIL around each operation). So this module does not split buffers across threads;
callers wanting several cores should use processes. Every object is safe to share between threads:
OpenSSL contexts and scratch buffers are kept per thread.

Errors: an unknown cipher, mode, IV generator or hash, or a key length the mode does not take, raises
:class:`~qcrypt.errors.UnsupportedFeatureError` (field ``cipher_name``, ``cipher_mode`` or ``key_bytes``);
a data length that is not a whole number of sectors, or a sector range outside 0..2^64, raises
:class:`~qcrypt.errors.FormatError` (both are ``ValueError`` subclasses). Using a cipher after
:meth:`SectorCipher.wipe` raises :class:`~qcrypt.errors.QcryptError`.

Secrets: each cipher keeps one private ``bytearray`` copy of its keys (needed to build OpenSSL contexts in
new threads) and zeroes it in :meth:`SectorCipher.wipe`; the OpenSSL contexts keep their own key schedule
until they are garbage-collected. Reprs never show keys.
"""

from __future__ import annotations

import hashlib
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from qcrypt.crypto._gf import BLOCKS_PER_SECTOR, U64Array, tweak_table
from qcrypt.crypto.cipher_support import check_sector_cipher
from qcrypt.crypto.secret import wipe as wipe_buffer
from qcrypt.errors import FormatError, QcryptError
from qcrypt.model.units import SECTOR

try:  # optional accelerator: AES-XTS over many sectors per call on OpenSSL's AES (setup.py builds it when it can)
    from qcrypt.crypto._xts import xts_crypt as _native_xts_crypt
except ImportError:  # no compiler or OpenSSL headers at install time: the numpy path gives the same bytes
    _native_xts_crypt = None
_native_xts = {"enabled": _native_xts_crypt is not None and not os.environ.get("QCRYPT_PURE_PYTHON")}


def native_xts_available() -> bool:
    """Whether the compiled XTS accelerator is installed (it is used unless QCRYPT_PURE_PYTHON is set)."""
    return _native_xts_crypt is not None


def native_xts_enabled() -> bool:
    """Whether the accelerator is used now: installed, and not turned off (QCRYPT_PURE_PYTHON, use_native_xts)."""
    return bool(_native_xts["enabled"])


def use_native_xts(enabled: bool) -> bool:
    """Turn the accelerator on or off for this process (tests compare both paths); returns the old setting."""
    previous = _native_xts["enabled"]
    _native_xts["enabled"] = enabled and _native_xts_crypt is not None
    return previous


__all__ = [
    "CHUNK_SECTORS",
    "SECTOR",
    "Buffer",
    "SectorCipher",
    "WritableBuffer",
    "legacy_aes_key",
    "legacy_cipher",
    "make_sector_cipher",
]

BLOCK_BYTES = 16
WORDS_PER_BLOCK = 2  # little-endian 64-bit words per AES block
WORDS_PER_SECTOR = SECTOR // 8
CHUNK_SECTORS = 1024  # sectors per internal step; keeps the scratch buffers in the L2 cache
SECTOR_LIMIT = 1 << 64  # IVs hold 64-bit sector numbers
LEGACY_KEY_BYTES = 16

Buffer: TypeAlias = "bytes | bytearray | memoryview"
WritableBuffer: TypeAlias = "bytearray | memoryview"

_LOW32_MASK = np.uint64(0xFFFF_FFFF)
_BLOCK_DTYPE = np.dtype(f"V{BLOCK_BYTES}")


# --- per-thread scratch ----------------------------------------------------------------------------------


class _Scratch:
    """Work buffers of one thread, sized for :data:`CHUNK_SECTORS` (plus 16 bytes that OpenSSL's
    ``update_into`` wants beyond the payload). ``work`` and ``ecb_out`` are a pair because ``update_into``
    refuses a target that overlaps its source (cryptography 51 and later), so no ECB pass runs in place."""

    def __init__(self) -> None:
        payload_bytes = CHUNK_SECTORS * SECTOR
        block_bytes = CHUNK_SECTORS * BLOCK_BYTES
        self.work = bytearray(payload_bytes + BLOCK_BYTES)
        self.work_words = _words(self.work)
        self.ecb_out = bytearray(payload_bytes + BLOCK_BYTES)
        self.ecb_out_words = _words(self.ecb_out)
        self.iv_in = bytearray(block_bytes + BLOCK_BYTES)
        self.iv_in_words = _words(self.iv_in)
        self.iv_out = bytearray(block_bytes + BLOCK_BYTES)
        self.iv_out_words = _words(self.iv_out)
        self.tweaks = np.empty((CHUNK_SECTORS, BLOCKS_PER_SECTOR, WORDS_PER_BLOCK), dtype="<u8")
        self.tweak_carry = np.empty((CHUNK_SECTORS, BLOCKS_PER_SECTOR - 1), dtype="<u8")
        self.tweak_fold = np.empty((CHUNK_SECTORS, BLOCKS_PER_SECTOR - 1), dtype="<u8")
        self.tweak_tmp = np.empty((CHUNK_SECTORS, BLOCKS_PER_SECTOR - 1), dtype="<u8")
        self.offsets = np.arange(CHUNK_SECTORS, dtype="<u8")


_thread_state = threading.local()
STAGING_LIMIT_BYTES = 4 * 1024 * 1024  # results up to this size are staged in a reused per-thread buffer


@contextmanager
def _staging(length_bytes: int) -> Iterator[memoryview]:
    """A writable buffer of ``length_bytes`` for a result that is then copied into ``bytes``.

    Reusing one warm buffer per thread (up to :data:`STAGING_LIMIT_BYTES`) avoids page-faulting a fresh
    allocation on every call, which costs more than the copy (measured: 1.2 vs 3.5 GB/s for 1 MiB).
    """
    if length_bytes > STAGING_LIMIT_BYTES:
        yield memoryview(bytearray(length_bytes))
        return
    staging: bytearray | None = getattr(_thread_state, "staging", None)
    if staging is None or len(staging) < length_bytes:
        staging = bytearray(max(length_bytes, CHUNK_SECTORS * SECTOR))
        _thread_state.staging = staging
    with memoryview(staging)[:length_bytes] as view:
        yield view


def _scratch() -> _Scratch:
    scratch: _Scratch | None = getattr(_thread_state, "scratch", None)
    if scratch is None:
        scratch = _Scratch()
        _thread_state.scratch = scratch
    return scratch


def _words(buffer: Buffer) -> U64Array:
    """Little-endian 64-bit word view of ``buffer`` (no copy; writable if the buffer is)."""
    return np.frombuffer(buffer, dtype="<u8", count=len(buffer) // 8)


# --- AES-ECB with per-thread OpenSSL contexts ------------------------------------------------------------


class _AesEcb:
    """One AES key; hands out this thread's ECB encryptor and decryptor."""

    def __init__(self, key: Buffer) -> None:
        self._key = bytearray(key)
        self._wiped = False
        self._local = threading.local()
        self.encryptor()  # build (and so validate) the first contexts now

    def encryptor(self) -> CipherContext:
        return self._contexts()[0]

    def decryptor(self) -> CipherContext:
        return self._contexts()[1]

    def wipe(self) -> None:
        self._wiped = True
        wipe_buffer(self._key)
        self._local = threading.local()

    def _contexts(self) -> tuple[CipherContext, CipherContext]:
        pair: tuple[CipherContext, CipherContext] | None = getattr(self._local, "pair", None)
        if pair is None:
            if self._wiped:
                raise QcryptError("sector cipher used after wipe()")
            cipher = Cipher(algorithms.AES(self._key), modes.ECB())
            pair = (cipher.encryptor(), cipher.decryptor())
            self._local.pair = pair
        return pair


def _as_blocks(words: U64Array) -> npt.NDArray[np.void]:
    """View 64-bit words as one opaque 16-byte element per AES block, for block-granular transposes
    (a (..., 2) word array would cost numpy a 2-element inner loop per block)."""
    return words.view(_BLOCK_DTYPE)


def _bytes_of(words: U64Array) -> memoryview:
    """Byte view of a C-contiguous word array, in the form ``cryptography`` accepts."""
    return words.data.cast("B")


def _ecb(context: CipherContext, source: Buffer, target: bytearray | memoryview) -> None:
    """ECB over ``source`` (whole blocks) into the start of ``target`` (which has >= 15 spare bytes and
    must not overlap ``source``)."""
    context.update_into(source, target)


# --- IV generators ---------------------------------------------------------------------------------------


class _IvGen(ABC):
    """Per-sector 16-byte IVs for ``n`` consecutive sectors, as an (n, 2) array of LE64 words."""

    name: str

    @abstractmethod
    def fill(self, first_sector: int, n: int, scratch: _Scratch) -> U64Array: ...

    def wipe(self) -> None:
        """Zero any key material (only ESSIV has some)."""
        return None

    @staticmethod
    def _counter_blocks(first_sector: int, n: int, scratch: _Scratch) -> U64Array:
        blocks = scratch.iv_in_words[: n * WORDS_PER_BLOCK].reshape(n, WORDS_PER_BLOCK)
        np.add(scratch.offsets[:n], np.uint64(first_sector), out=blocks[:, 0])
        blocks[:, 1] = 0
        return blocks


class _Plain64(_IvGen):
    name = "plain64"

    def fill(self, first_sector: int, n: int, scratch: _Scratch) -> U64Array:
        return self._counter_blocks(first_sector, n, scratch)


class _Plain(_IvGen):
    name = "plain"

    def fill(self, first_sector: int, n: int, scratch: _Scratch) -> U64Array:
        blocks = self._counter_blocks(first_sector, n, scratch)
        np.bitwise_and(blocks[:, 0], _LOW32_MASK, out=blocks[:, 0])
        return blocks


class _Essiv(_IvGen):
    def __init__(self, hash_name: str, data_key: Buffer) -> None:
        self.name = f"essiv:{hash_name}"
        salt = bytearray(hashlib.new(hash_name, data_key).digest())
        try:
            self._salt_cipher = _AesEcb(salt)
        finally:
            wipe_buffer(salt)

    def fill(self, first_sector: int, n: int, scratch: _Scratch) -> U64Array:
        counters = self._counter_blocks(first_sector, n, scratch)
        _ecb(self._salt_cipher.encryptor(), _bytes_of(counters), scratch.iv_out)
        return scratch.iv_out_words[: n * WORDS_PER_BLOCK].reshape(n, WORDS_PER_BLOCK)

    def wipe(self) -> None:
        self._salt_cipher.wipe()


# --- the ciphers -----------------------------------------------------------------------------------------


class SectorCipher(ABC):
    """Encrypts and decrypts whole 512-byte sectors; sector ``i`` of a buffer uses the IV of
    ``first_sector + i``. ``key_bytes`` is the data key length (both halves for XTS)."""

    key_bytes: int
    cipher_name: str = "aes"
    cipher_mode: str

    def encrypt(self, data: Buffer, first_sector: int) -> bytes:
        """Ciphertext of ``data`` (a whole number of sectors) starting at sector ``first_sector``."""
        with _staging(memoryview(data).nbytes) as out:
            self.encrypt_into(data, first_sector, out)
            return bytes(out)

    def decrypt(self, data: Buffer, first_sector: int) -> bytes:
        """Plaintext of ``data`` (a whole number of sectors) starting at sector ``first_sector``."""
        with _staging(memoryview(data).nbytes) as out:
            self.decrypt_into(data, first_sector, out)
            return bytes(out)

    def encrypt_into(self, data: Buffer, first_sector: int, out: WritableBuffer) -> None:
        """Like :meth:`encrypt`, writing into ``out`` (same length; may be ``data`` itself)."""
        self._run(self._encrypt_chunk, data, first_sector, out)

    def decrypt_into(self, data: Buffer, first_sector: int, out: WritableBuffer) -> None:
        """Like :meth:`decrypt`, writing into ``out`` (same length; may be ``data`` itself)."""
        self._run(self._decrypt_chunk, data, first_sector, out)

    @abstractmethod
    def wipe(self) -> None:
        """Zero this object's key copies; later calls raise QcryptError."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.cipher_name}-{self.cipher_mode} key_bytes={self.key_bytes}>"

    @abstractmethod
    def _encrypt_chunk(self, source: memoryview, first_sector: int, out_words: U64Array) -> None: ...

    @abstractmethod
    def _decrypt_chunk(self, source: memoryview, first_sector: int, out_words: U64Array) -> None: ...

    def _run(
        self,
        step: Callable[[memoryview, int, U64Array], None],
        data: Buffer,
        first_sector: int,
        out: WritableBuffer,
    ) -> None:
        source = _byte_view(data)
        sectors = _check_extent(len(source), first_sector)
        target = _byte_view(out)
        if len(target) != len(source):
            raise FormatError(f"output buffer holds {len(target)} bytes, input {len(source)}")
        out_words = _words(target)
        for chunk_start in range(0, sectors, CHUNK_SECTORS):
            n = min(CHUNK_SECTORS, sectors - chunk_start)
            begin, end = chunk_start * SECTOR, (chunk_start + n) * SECTOR
            step(source[begin:end], first_sector + chunk_start, out_words[begin // 8 : end // 8])


def _byte_view(buffer: Buffer) -> memoryview:
    view = memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _check_extent(length_bytes: int, first_sector: int) -> int:
    """Number of sectors in ``length_bytes``; checks the sector range fits a 64-bit IV."""
    if length_bytes % SECTOR:
        raise FormatError(f"data length {length_bytes} is not a multiple of the {SECTOR}-byte sector")
    sectors = length_bytes // SECTOR
    if first_sector < 0 or first_sector + sectors > SECTOR_LIMIT:
        raise FormatError(f"sectors {first_sector}..{first_sector + sectors - 1} do not fit a 64-bit IV")
    return sectors


class _CbcCipher(SectorCipher):
    def __init__(self, key: Buffer, iv_gen: _IvGen) -> None:
        self.key_bytes = len(key)
        self.cipher_mode = f"cbc-{iv_gen.name}"
        self._aes = _AesEcb(key)
        self._iv_gen = iv_gen

    def wipe(self) -> None:
        self._aes.wipe()
        self._iv_gen.wipe()

    def _decrypt_chunk(self, source: memoryview, first_sector: int, out_words: U64Array) -> None:
        n = len(source) // SECTOR
        scratch = _scratch()
        ivs = self._iv_gen.fill(first_sector, n, scratch)
        _ecb(self._aes.decryptor(), source, scratch.work)
        decrypted = scratch.work_words[: n * WORDS_PER_SECTOR]
        # Every block but the very first takes the previous ciphertext block ...
        np.bitwise_xor(decrypted[WORDS_PER_BLOCK:], _words(source)[:-WORDS_PER_BLOCK], out=out_words[2:])
        # ... then block 0 of each sector is redone with that sector's IV.
        per_sector_decrypted = decrypted.reshape(n, WORDS_PER_SECTOR)[:, :WORDS_PER_BLOCK]
        np.bitwise_xor(per_sector_decrypted, ivs, out=out_words.reshape(n, WORDS_PER_SECTOR)[:, :2])

    def _encrypt_chunk(self, source: memoryview, first_sector: int, out_words: U64Array) -> None:
        n = len(source) // SECTOR
        scratch = _scratch()
        encryptor = self._aes.encryptor()
        # Row j of `columns` holds block j of every sector, so one ECB call encrypts it for all sectors.
        column_words = scratch.work_words[: n * WORDS_PER_SECTOR]
        plain_blocks = _as_blocks(_words(source)).reshape(n, BLOCKS_PER_SECTOR)
        np.copyto(_as_blocks(column_words).reshape(BLOCKS_PER_SECTOR, n), plain_blocks.T)
        columns = column_words.reshape(BLOCKS_PER_SECTOR, n * WORDS_PER_BLOCK)
        column_bytes = n * BLOCK_BYTES
        work_view = memoryview(scratch.work)
        encrypted_view = memoryview(scratch.ecb_out)
        encrypted_words = scratch.ecb_out_words[: n * WORDS_PER_SECTOR]
        encrypted_columns = encrypted_words.reshape(BLOCKS_PER_SECTOR, n * WORDS_PER_BLOCK)
        previous = self._iv_gen.fill(first_sector, n, scratch).reshape(-1)
        for block in range(BLOCKS_PER_SECTOR):
            np.bitwise_xor(columns[block], previous, out=columns[block])
            start = block * column_bytes
            _ecb(encryptor, work_view[start : start + column_bytes], encrypted_view[start:])
            previous = encrypted_columns[block]
        np.copyto(_as_blocks(out_words).reshape(n, BLOCKS_PER_SECTOR), _as_blocks(encrypted_words).reshape(-1, n).T)


class _EcbCipher(SectorCipher):
    cipher_mode = "ecb"

    def __init__(self, key: Buffer) -> None:
        self.key_bytes = len(key)
        self._aes = _AesEcb(key)

    def wipe(self) -> None:
        self._aes.wipe()

    def _encrypt_chunk(self, source: memoryview, first_sector: int, out_words: U64Array) -> None:
        self._through(self._aes.encryptor(), source, out_words)

    def _decrypt_chunk(self, source: memoryview, first_sector: int, out_words: U64Array) -> None:
        self._through(self._aes.decryptor(), source, out_words)

    @staticmethod
    def _through(context: CipherContext, source: memoryview, out_words: U64Array) -> None:
        scratch = _scratch()
        _ecb(context, source, scratch.work)
        np.copyto(out_words, scratch.work_words[: len(out_words)])


class _XtsCipher(SectorCipher):
    def __init__(self, key: Buffer, iv_gen: _IvGen) -> None:
        self.key_bytes = len(key)
        self.cipher_mode = f"xts-{iv_gen.name}"
        half = len(key) // 2
        key_view = memoryview(key)
        self._data_aes = _AesEcb(key_view[:half])
        self._tweak_aes = _AesEcb(key_view[half:])
        self._iv_gen = iv_gen
        # the accelerator knows the counter IVs only (plain64, plain); ESSIV tweaks take the numpy path
        self._native_key: bytearray | None = bytearray(key) if iv_gen.name in ("plain64", "plain") else None

    def wipe(self) -> None:
        self._data_aes.wipe()
        self._tweak_aes.wipe()
        self._drop_native_key()

    def _drop_native_key(self) -> None:
        if self._native_key is not None:
            wipe_buffer(self._native_key)
            self._native_key = None

    def _encrypt_chunk(self, source: memoryview, first_sector: int, out_words: U64Array) -> None:
        if not self._native(source, first_sector, out_words, encrypt=True):
            self._xts(self._data_aes.encryptor(), source, first_sector, out_words)

    def _decrypt_chunk(self, source: memoryview, first_sector: int, out_words: U64Array) -> None:
        if not self._native(source, first_sector, out_words, encrypt=False):
            self._xts(self._data_aes.decryptor(), source, first_sector, out_words)

    def _native(self, source: memoryview, first_sector: int, out: U64Array, *, encrypt: bool) -> bool:
        """The chunk through the accelerator, if installed and enabled; False: use the numpy path."""
        if self._native_key is None or not _native_xts["enabled"] or _native_xts_crypt is None:
            return False
        try:
            _native_xts_crypt(self._native_key, source, out, first_sector, encrypt, self._iv_gen.name == "plain")
        except ValueError:  # OpenSSL refused (it should not): the numpy path gives the same bytes
            self._drop_native_key()
            return False
        return True

    def _xts(self, data_context: CipherContext, source: memoryview, first_sector: int, out: U64Array) -> None:
        n = len(source) // SECTOR
        scratch = _scratch()
        tweaks = self._tweaks(first_sector, n, scratch).reshape(-1)
        work = scratch.work_words[: n * WORDS_PER_SECTOR]
        np.bitwise_xor(_words(source), tweaks, out=work)
        _ecb(data_context, memoryview(scratch.work)[: n * SECTOR], scratch.ecb_out)
        np.bitwise_xor(scratch.ecb_out_words[: n * WORDS_PER_SECTOR], tweaks, out=out)

    def _tweaks(self, first_sector: int, n: int, scratch: _Scratch) -> U64Array:
        """The tweaks of all 32 blocks of ``n`` sectors, shape (n, 32, 2), in the layout of the data."""
        ivs = self._iv_gen.fill(first_sector, n, scratch)
        _ecb(self._tweak_aes.encryptor(), _bytes_of(ivs), scratch.iv_out)
        first = scratch.iv_out_words[: n * WORDS_PER_BLOCK].reshape(n, WORDS_PER_BLOCK)
        tweaks = scratch.tweaks[:n]
        tweak_table(first, tweaks, scratch.tweak_carry[:n], scratch.tweak_fold[:n], scratch.tweak_tmp[:n])
        return tweaks


# --- construction ----------------------------------------------------------------------------------------


def make_sector_cipher(cipher_name: str, cipher_mode: str, key: Buffer) -> SectorCipher:
    """A sector cipher for a dm-crypt style spec, e.g. ("aes", "xts-plain64", 64-byte key).

    What is supported is decided by :func:`qcrypt.crypto.cipher_support.check_sector_cipher` (its errors are
    raised as they are). The caller keeps ownership of ``key`` (it is copied).
    """
    check_sector_cipher(cipher_name, cipher_mode, len(key))
    chain, _, iv_spec = cipher_mode.partition("-")
    iv_name, _, iv_hash = iv_spec.partition(":")
    if chain == "ecb":
        return _EcbCipher(key)
    iv_gen: _IvGen
    if iv_name == "plain64":
        iv_gen = _Plain64()
    elif iv_name == "plain":
        iv_gen = _Plain()
    else:
        iv_gen = _Essiv(iv_hash, key)
    if chain == "cbc":
        return _CbcCipher(key, iv_gen)
    return _XtsCipher(key, iv_gen)


def legacy_aes_key(passphrase: Buffer) -> bytearray:
    """QEMU's legacy qcow/qcow2 AES-128 key: the passphrase bytes up to the first NUL, cut to 16 bytes and
    NUL-padded to 16 (docs/FORMATS.md B.1, Pitfall 3). Returned as a bytearray the caller should wipe."""
    source = _byte_view(passphrase)
    key = bytearray(LEGACY_KEY_BYTES)
    for index in range(min(LEGACY_KEY_BYTES, len(source))):
        if source[index] == 0:
            break
        key[index] = source[index]
    return key


def legacy_cipher(passphrase: Buffer) -> SectorCipher:
    """The legacy qcow/qcow2 sector cipher: AES-128-CBC with plain64 IVs of the guest sector number."""
    key = legacy_aes_key(passphrase)
    try:
        return make_sector_cipher("aes", "cbc-plain64", key)
    finally:
        wipe_buffer(key)
