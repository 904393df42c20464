"""Vectorised XTS tweak expansion in GF(2^128) (IEEE P1619 convention), private to :mod:`qcrypt.crypto`.

A 16-byte tweak is a 128-bit little-endian integer: byte 0 is the least significant. It is held here as two
little-endian 64-bit words, ``lo`` (bytes 0-7) and ``hi`` (bytes 8-15). Multiplying by alpha (``x``) is a
left shift of the whole 128-bit value by one bit; a bit carried out of bit 127 is folded back by XORing
0x87 (x^7 + x^2 + x + 1) into byte 0.

Multiplying by alpha^k for k <= 16 at once: shift left by k and fold the k bits carried out, ``c``, back as
the carry-less product ``c * 0x87 = c ^ c<<1 ^ c<<2 ^ c<<7``. With k <= 16 that product is below 2^23, so
it stays inside ``lo`` and needs no second reduction.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

U64Array = npt.NDArray[np.uint64]

BLOCKS_PER_SECTOR = 32
# Exponents of x in the low part of the reduction polynomial 0x87 = x^7 + x^2 + x + 1 (besides x^0).
_FOLD_SHIFTS = (np.uint64(1), np.uint64(2), np.uint64(7))


def expand_tweaks(lo: U64Array, hi: U64Array, carry: U64Array, scratch: U64Array) -> None:
    """Fill rows 1..31 of the planes ``lo``/``hi`` (shape (32, n)) with row 0 times alpha^row.

    Row ``j`` column ``i`` then holds the tweak of block ``j`` of sector ``i``. Doubling: rows k..2k-1 are
    rows 0..k-1 times alpha^k, for k = 1, 2, 4, 8, 16, so the work takes 5 rounds of whole-array operations
    whatever the number of sectors. ``carry`` and ``scratch`` are work planes of shape (16, n) or larger.
    """
    rows = 1
    while rows < BLOCKS_PER_SECTOR:
        _times_alpha_power(lo, hi, rows, carry[:rows], scratch[:rows])
        rows *= 2


def _times_alpha_power(lo: U64Array, hi: U64Array, k: int, carry: U64Array, scratch: U64Array) -> None:
    """Set rows k..2k-1 of the planes to rows 0..k-1 multiplied by alpha^k (1 <= k <= 16)."""
    shift = np.uint64(k)
    back_shift = np.uint64(64 - k)
    src_lo, src_hi = lo[:k], hi[:k]
    dst_lo, dst_hi = lo[k : 2 * k], hi[k : 2 * k]
    np.right_shift(src_hi, back_shift, out=carry)  # the k bits leaving bit 127
    np.left_shift(src_hi, shift, out=dst_hi)
    np.right_shift(src_lo, back_shift, out=scratch)  # the k bits crossing from lo into hi
    np.bitwise_or(dst_hi, scratch, out=dst_hi)
    np.left_shift(src_lo, shift, out=dst_lo)
    np.bitwise_xor(dst_lo, carry, out=dst_lo)
    for fold_shift in _FOLD_SHIFTS:
        np.left_shift(carry, fold_shift, out=scratch)
        np.bitwise_xor(dst_lo, scratch, out=dst_lo)
