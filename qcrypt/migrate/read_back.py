"""Reading a LUKS output back while it is written: each run of data, right after the worker that encrypted it wrote
it, is read from the disk, decrypted and compared with the source plaintext's digest.

Why here and not in a second pass: the second pass read the whole output again after writing it, which doubled
the time a disk spends offline (for a 4 GiB disk, 3.1 s of writing then 3.1 s of reading back). Checking each
run where it was just written overlaps the read-back with the encryption of the next runs, and it reads from the
disk itself (past the page cache, :mod:`qcrypt.plumbing.direct_io`).

What keeps this as strong as the second pass (:func:`qcrypt.migrate.verification.verify` does the rest once the
header and the tables are on disk):

* the decryption is not the one that encrypted: a separate cipher built from the container's parameters, and
  the reader's IV numbering (:meth:`DataEncryption.decrypt`, not the writer's);
* after writing, the output is opened as any reader opens it (the master key's digest must match) and its LUKS
  header must describe exactly these parameters: cipher, mode, key size, IV numbering, payload offset;
* raw LUKS: the runs read back must tile the payload exactly, so no later write can have landed on checked data;
  qcow2: every run read back must be where the output's L2 tables map those guest clusters, and no two runs may
  share a host byte;
* a sample of runs is read once more through the ordinary reader, end to end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from qcrypt.crypto.encryption import DataEncryption
from qcrypt.crypto.sector import make_sector_cipher
from qcrypt.errors import VerificationError
from qcrypt.plumbing import checksum
from qcrypt.plumbing.direct_io import DirectReader, aligned_buffer
from qcrypt.plumbing.files import pread_full

Parameters = tuple[str, str, int, str, int]  # cipher, mode, key bytes, IV numbering, payload offset (bytes)


def parameters_of(encryption: DataEncryption) -> Parameters:
    """What decides how ``encryption`` turns stored bytes into plaintext."""
    cipher = encryption.cipher
    return cipher.cipher_name, cipher.cipher_mode, cipher.key_bytes, encryption.iv_base.value, encryption.payload_offset


def differs_message(path: str, guest_offset: int, length: int) -> str:
    return (
        f"{path}: guest bytes {guest_offset}..{guest_offset + length} differ from the source after writing; "
        "the output was not kept"
    )


@dataclass
class ReadBack:
    """Reads plaintext back from a LUKS output being written (shared by the forked workers)."""

    fd: int  # the output, open for reading
    path: str  # for messages
    encryption: DataEncryption = field(repr=False)
    direct: DirectReader | None = field(repr=False, default=None)

    @classmethod
    def open(
        cls,
        out_fd: int,
        path: str,
        cipher_name: str,
        cipher_mode: str,
        master_key: bytes | bytearray,
        *,
        payload_offset: int | None,
        direct_io: bool,
    ) -> ReadBack:
        """``payload_offset``: bytes, for a raw LUKS output; None for LUKS inside qcow2 (IVs from host sectors).
        The output is reopened for reading through /proc/self/fd (the same inode)."""
        cipher = make_sector_cipher(cipher_name, cipher_mode, master_key)
        if payload_offset is None:
            encryption = DataEncryption.luks_in_qcow2(cipher)
        else:
            encryption = DataEncryption.raw_luks(cipher, payload_offset)
        fd = os.open(f"/proc/self/fd/{out_fd}", os.O_RDONLY | os.O_CLOEXEC)
        return cls(fd, path, encryption, DirectReader(fd) if direct_io else None)

    def check(self, host_offset: int, stored_length: int, guest_offset: int, guest_length: int, digest: bytes) -> None:
        """Raise VerificationError unless the ``stored_length`` bytes stored at ``host_offset`` (whole sectors, for
        guest offset ``guest_offset``) decrypt to plaintext whose first ``guest_length`` bytes have ``digest``."""
        plain = self.stored_plaintext(host_offset, stored_length, guest_offset)
        if checksum.digest(memoryview(plain)[:guest_length]) != digest:
            raise VerificationError(differs_message(self.path, guest_offset, guest_length))

    def stored_plaintext(self, host_offset: int, length: int, guest_offset: int) -> bytes | memoryview:
        """The plaintext of the ``length`` bytes (whole sectors) stored at ``host_offset`` for guest offset
        ``guest_offset``, as the disk holds them now; in a buffer this thread reuses (valid until its next
        call)."""
        data: bytes | memoryview | None = self.direct.read(host_offset, length) if self.direct else None
        if data is None or len(data) != length:
            data = pread_full(self.fd, length, host_offset)
        if len(data) != length:  # short: the digest comparison fails on what is there
            return bytes(data)
        plain = aligned_buffer(length, "read-back plaintext")
        self.encryption.decrypt_into(data, plain, guest_offset=guest_offset, host_offset=host_offset)
        return plain

    def parameters(self) -> Parameters:
        """The parameters the runs were checked with."""
        return parameters_of(self.encryption)

    def close(self) -> None:
        if self.direct is not None:
            self.direct.close()
        os.close(self.fd)
        self.encryption.wipe()

    def __enter__(self) -> ReadBack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
