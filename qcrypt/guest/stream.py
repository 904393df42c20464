"""Guest plaintext streams: ``open_image(path, passphrase)`` over qcow2, qcow, raw LUKS1 and raw files.

Each layer is a :class:`LayerReader` with ``read(guest_offset, length) -> bytes``; qcow layers fall through
to their backing layer for unallocated clusters. Runs of host-contiguous clusters are read and decrypted in
one batched call (see qcrypt.crypto.sector), so throughput is bounded by OpenSSL, not by Python.

IV bases (docs/FORMATS.md Pitfall 1): legacy AES = guest sector; qcow2-LUKS = host file sector; raw LUKS =
payload sector.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from qcrypt.crypto.encryption import DataEncryption
from qcrypt.crypto.secret import wipe
from qcrypt.crypto.sector import SectorCipher, make_sector_cipher
from qcrypt.errors import BadPassphraseError, FormatError, UnsupportedFeatureError
from qcrypt.formats import qcow2 as qcow2_fmt
from qcrypt.images.backing import ChainContext, ChainRules, open_backing, resolve_backing
from qcrypt.images.probe import declared_container, open_qcow_image
from qcrypt.images.qcow2_reader import QCow2Image
from qcrypt.images.reader import QcowImageReader
from qcrypt.model.clusters import UNALLOCATED, ZERO, ClusterKind, ClusterMapping, Snapshot
from qcrypt.model.units import SECTOR
from qcrypt.plumbing.direct_io import aligned_buffer, fill_zero
from qcrypt.plumbing.files import RawFile, open_image_file
from qcrypt.plumbing.limits import MAX_CHAIN_DEPTH

if TYPE_CHECKING:
    from qcrypt.luks.header import LuksHeader, ReadAt

Passphrase = str | bytes | bytearray


class LayerReader(Protocol):
    size: int

    def read(self, guest_offset: int, length: int) -> bytes: ...

    def read_into(self, guest_offset: int, out: memoryview) -> None: ...

    def close(self) -> None: ...


def passphrase_bytes(passphrase: Passphrase) -> bytes:
    """str -> UTF-8 bytes; bytes are used exactly as given (no newline stripping here)."""
    return passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)


def _secret(passphrase: Passphrase | KnownMasterKey) -> Secret:
    return passphrase if isinstance(passphrase, KnownMasterKey) else passphrase_bytes(passphrase)


_RUN_MAPPINGS = {ClusterKind.ZERO: ZERO, ClusterKind.UNALLOCATED: UNALLOCATED}


def _normal(host_offset: int) -> ClusterMapping:
    return ClusterMapping(ClusterKind.NORMAL, host_offset)


def source_buffer(length: int) -> memoryview:
    """This thread's reused buffer for ciphertext read from a source before it is decrypted into the caller's."""
    return aligned_buffer(length, "source ciphertext")


class PassphraseRequiredError(BadPassphraseError):
    """An encrypted layer was opened without a passphrase."""


# -- raw and raw LUKS layers ------------------------------------------------------------------------------


class RawReader:
    """A raw file: guest offset = file offset."""

    def __init__(self, path: str, fh: BinaryIO | None = None) -> None:
        self.file = RawFile(fh, path) if fh is not None else RawFile.open(path)
        self.size = self.file.file_size

    def read(self, guest_offset: int, length: int) -> bytes:
        return self.file.read_host(guest_offset, length)

    def read_into(self, guest_offset: int, out: memoryview) -> None:
        self.file.read_host_into(guest_offset, out)

    def close(self) -> None:
        self.file.close()


class RawLuksReader:
    """A raw LUKS1 file: the payload starts at payload_offset sectors (IVs: :class:`DataEncryption`)."""

    def __init__(self, path: str, passphrase: Secret | None, fh: BinaryIO | None = None) -> None:
        from qcrypt.luks import header as luks_header

        self.file = RawFile(fh, path) if fh is not None else RawFile.open(path)
        try:
            read_at = luks_header.file_reader(self.file.fh, 0, self.file.file_size, path=path)
            if int.from_bytes(read_at(6, 2), "big") == 2:
                raise UnsupportedFeatureError("unlocking LUKS2 is not supported", path=path, field="version")
            header = luks_header.read_header(read_at, self.file.file_size, path=path)
            if header.payload_offset == 0:
                raise UnsupportedFeatureError(
                    "detached-header LUKS (payload offset 0) is not supported", path=path, field="payload_offset"
                )
            self.payload_host_offset = header.payload_offset * SECTOR
            self.encryption = DataEncryption.raw_luks(
                _unlock(header, read_at, passphrase, path), self.payload_host_offset
            )
            payload_bytes = max(0, self.file.file_size - self.payload_host_offset)
            self.size = -(-payload_bytes // SECTOR) * SECTOR  # QEMU rounds up
        except BaseException:
            self.file.close()
            raise

    def read(self, guest_offset: int, length: int) -> bytes:
        first = guest_offset // SECTOR * SECTOR
        last = -(-(guest_offset + length) // SECTOR) * SECTOR
        host_offset = self.payload_host_offset + first
        data = self.file.read_host_transient(host_offset, last - first)
        plain = self.encryption.decrypt(data, guest_offset=first, host_offset=host_offset)
        return plain[guest_offset - first : guest_offset - first + length]

    def read_into(self, guest_offset: int, out: memoryview) -> None:
        if guest_offset % SECTOR or len(out) % SECTOR:
            out[:] = self.read(guest_offset, len(out))
            return
        host_offset = self.payload_host_offset + guest_offset
        data = source_buffer(len(out))
        self.file.read_host_into(host_offset, data)
        self.encryption.decrypt_into(data, out, guest_offset=guest_offset, host_offset=host_offset)

    def close(self) -> None:
        self.file.close()


class KnownMasterKey:
    """A LUKS master key the caller already holds (migrate verifying what it just wrote). It is checked
    against the header's master-key digest instead of unlocking a keyslot, which would cost --iter-time.

    ``proven_by``: a header whose digest is known to be this key's (migrate computed it when creating the
    header, or checked it when unlocking the source): a header on disk that carries the same digest, salt,
    iteration count and hash is accepted without computing the PBKDF2 again (~125 ms by cryptsetup's rule);
    any other header is checked by the PBKDF2."""

    def __init__(self, key: bytes | bytearray, proven_by: LuksHeader | None = None) -> None:
        self.key = bytearray(key)
        self._proven = _digest_fields(proven_by) if proven_by is not None else None

    def proves(self, header: LuksHeader) -> bool:
        """Whether ``header``'s master-key digest is one already known to be this key's."""
        return self._proven is not None and len(self.key) == header.key_bytes and self._proven == _digest_fields(header)

    def __repr__(self) -> str:
        return "KnownMasterKey(<hidden>)"


def _digest_fields(header: LuksHeader) -> tuple[str, bytes, int, bytes, int]:
    return header.hash_spec, header.mk_digest_salt, header.mk_digest_iter, header.mk_digest, header.key_bytes


Secret = bytes | bytearray | KnownMasterKey


def _unlock(header: LuksHeader, read_at: ReadAt, passphrase: Secret | None, path: str) -> SectorCipher:
    from qcrypt.luks import header as luks_header
    from qcrypt.luks import keyslots as luks_keyslots

    luks_header.require_supported(header, path=path)
    if passphrase is None:
        raise PassphraseRequiredError(f"{path}: LUKS-encrypted: a passphrase is required")
    if isinstance(passphrase, KnownMasterKey):
        if not passphrase.proves(header) and not luks_keyslots.verify_master_key(header, passphrase.key):
            raise BadPassphraseError(f"{path}: the master key does not match the header's digest")
        master_key = bytearray(passphrase.key)
    else:
        try:
            master_key = luks_keyslots.unlock(header, read_at, passphrase)
        except BadPassphraseError as e:  # name the layer: a chain may hold several passphrases
            raise BadPassphraseError(f"{path}: {e}") from None
    try:
        return make_sector_cipher(header.cipher_name, header.cipher_mode, master_key)
    finally:
        wipe(master_key)


# -- qcow2 / qcow layers ----------------------------------------------------------------------------------


class QcowReader:
    """Guest plaintext of one qcow2 or qcow layer; unallocated ranges come from ``backing``."""

    def __init__(
        self,
        image: QcowImageReader,
        encryption: DataEncryption | None,
        backing: LayerReader | None,
        snapshot: Snapshot | None = None,
    ) -> None:
        image.check_readable()
        self.image = image
        self.encryption = encryption
        self.backing = backing
        if snapshot and not isinstance(image, QCow2Image):
            raise FormatError("only qcow2 images have internal snapshots", path=image.path, field="snapshot")
        self.l1 = image.l1_table(snapshot) if snapshot and isinstance(image, QCow2Image) else None
        self.size: int = image.virtual_size
        if snapshot and snapshot.virtual_size is not None:
            self.size = snapshot.virtual_size
        self.cluster_size: int = image.cluster_size
        self._inflated: tuple[int, bytes] | None = None

    def map_cluster(self, guest_cluster: int) -> ClusterMapping:
        if self.l1 is None or not isinstance(self.image, QCow2Image):
            return self.image.map_cluster(guest_cluster)
        return self.image.map_cluster(guest_cluster, self.l1)

    def close(self) -> None:
        self.image.close()
        if self.backing:
            self.backing.close()

    def read(self, guest_offset: int, length: int) -> bytes:
        pieces = [self._read_mapped(mapping, start, end) for mapping, start, end in self._runs(guest_offset, length)]
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def read_into(self, guest_offset: int, out: memoryview) -> None:
        """Like :meth:`read`, into ``out``: data clusters are read and decrypted into it without a fresh buffer."""
        for mapping, start, end in self._runs(guest_offset, len(out)):
            piece = out[start - guest_offset : end - guest_offset]
            if mapping.kind is ClusterKind.NORMAL:
                cluster_start = start // self.cluster_size * self.cluster_size
                self._read_data_into(mapping.host_offset + (start - cluster_start), start, piece)
            elif mapping.kind is ClusterKind.ZERO:
                fill_zero(piece)
            else:
                piece[:] = self._read_mapped(mapping, start, end)

    def _runs(self, guest_offset: int, length: int) -> Iterator[tuple[ClusterMapping, int, int]]:
        """(mapping, start, end): guest byte ranges of one kind, host-contiguous data clusters merged."""
        pos, end = guest_offset, guest_offset + length
        cs = self.cluster_size
        if isinstance(self.image, QCow2Image) and length > 0:
            first = guest_offset // cs
            l1 = self.l1 if self.l1 is not None else self.image.l1_table()
            runs = self.image.plain_runs(l1, first, -(-end // cs) - first)
            if runs is not None:
                for kind, run_first, clusters, host_offset in runs:
                    start, stop = max(pos, run_first * cs), min(end, (run_first + clusters) * cs)
                    yield _RUN_MAPPINGS[kind] if kind is not ClusterKind.NORMAL else _normal(host_offset), start, stop
                return
        while pos < end:
            guest_cluster = pos // cs
            mapping = self.map_cluster(guest_cluster)
            run_clusters = 1
            if mapping.kind is ClusterKind.NORMAL:
                run_clusters = self._contiguous_run(guest_cluster, mapping, -(-end // cs))
            chunk_end = min(end, (guest_cluster + run_clusters) * cs)
            yield mapping, pos, chunk_end
            pos = chunk_end

    def _contiguous_run(self, guest_cluster: int, mapping: ClusterMapping, limit_cluster: int) -> int:
        count = 1
        while guest_cluster + count < limit_cluster:
            nxt = self.map_cluster(guest_cluster + count)
            if nxt.kind is not ClusterKind.NORMAL or nxt.host_offset != mapping.host_offset + count * self.cluster_size:
                break
            count += 1
        return count

    def _read_mapped(self, mapping: ClusterMapping, start: int, end: int) -> bytes:
        kind = mapping.kind
        if kind is ClusterKind.ZERO:
            return bytes(end - start)
        if kind is ClusterKind.UNALLOCATED:
            return self._read_backing(start, end - start)
        if kind is ClusterKind.COMPRESSED:
            cluster_start = start // self.cluster_size * self.cluster_size
            data = self._inflate(mapping)
            return data[start - cluster_start : end - cluster_start]
        if kind is ClusterKind.SUBCLUSTERS:
            return self._read_subclusters(mapping, start, end)
        cluster_start = start // self.cluster_size * self.cluster_size
        return self._read_data(mapping.host_offset + (start - cluster_start), start, end)

    def _read_data(self, host_offset: int, start: int, end: int) -> bytes:
        """Data at ``host_offset`` holding guest bytes [start, end), decrypted by whole sectors."""
        if self.encryption is None:
            return self.image.read_host(host_offset, end - start)
        if host_offset + (end - start) > self.image.file_size:
            raise FormatError(
                f"encrypted data for guest offset {start} lies beyond the end of the file "
                "(truncated image): it would decrypt to garbage",
                path=self.image.path,
                field="L2 entry",
            )
        head = start % SECTOR
        aligned_len = -(-(end - start + head) // SECTOR) * SECTOR
        host_first = host_offset - head
        data = self.image.read_host_transient(host_first, aligned_len)
        plain = self.encryption.decrypt(data, guest_offset=start - head, host_offset=host_first)
        return plain[head : head + end - start]

    def _read_data_into(self, host_offset: int, start: int, out: memoryview) -> None:
        """:meth:`_read_data` into ``out``: the ciphertext goes through this thread's reused source buffer."""
        end = start + len(out)
        if self.encryption is None:
            self.image.read_host_into(host_offset, out)
        elif start % SECTOR or end % SECTOR or host_offset + len(out) > self.image.file_size:
            out[:] = self._read_data(host_offset, start, end)  # partial sectors, or the truncated-image error
        else:
            data = source_buffer(len(out))
            self.image.read_host_into(host_offset, data)
            self.encryption.decrypt_into(data, out, guest_offset=start, host_offset=host_offset)

    def _read_subclusters(self, mapping: ClusterMapping, start: int, end: int) -> bytes:
        sc_size = self.cluster_size // qcow2_fmt.SUBCLUSTERS
        cluster_start = start // self.cluster_size * self.cluster_size
        out = bytearray()
        pos = start
        while pos < end:
            index = (pos - cluster_start) // sc_size
            piece_end = min(end, cluster_start + (index + 1) * sc_size)
            if mapping.alloc_bitmap >> index & 1:
                out += self._read_data(mapping.host_offset + (pos - cluster_start), pos, piece_end)
            elif mapping.zero_bitmap >> index & 1:
                out += bytes(piece_end - pos)
            else:
                out += self._read_backing(pos, piece_end - pos)
            pos = piece_end
        return bytes(out)

    def _read_backing(self, guest_offset: int, length: int) -> bytes:
        if self.backing is None or guest_offset >= self.backing.size:
            return bytes(length)
        available = min(length, self.backing.size - guest_offset)
        return self.backing.read(guest_offset, available) + bytes(length - available)

    def _inflate(self, mapping: ClusterMapping) -> bytes:
        if self._inflated and self._inflated[0] == mapping.host_offset:
            return self._inflated[1]
        raw = self.image.read_host(mapping.host_offset, mapping.compressed_bytes)
        data = self._decompress(raw)
        if len(data) < self.cluster_size:
            raise FormatError(
                f"compressed cluster at {mapping.host_offset:#x} inflates to {len(data)} bytes, "
                f"not {self.cluster_size} (QEMU reports an I/O error)",
                path=self.image.path,
                field="compressed cluster",
            )
        self._inflated = (mapping.host_offset, data)
        return data

    def _decompress(self, raw: bytes) -> bytes:
        compression = getattr(self.image.header, "compression_type", qcow2_fmt.COMPRESSION_DEFLATE)
        try:
            if compression == qcow2_fmt.COMPRESSION_ZSTD:
                return _zstd_decompress(raw, self.cluster_size, self.image.path)
            d = zlib.decompressobj(-12)
            return d.decompress(raw, self.cluster_size)
        except zlib.error as e:
            raise FormatError(
                f"compressed cluster does not inflate: {e}", path=self.image.path, field="compressed cluster"
            ) from e


def _zstd_decompress(raw: bytes, cluster_size: int, path: str) -> bytes:
    try:
        import zstandard
    except ImportError as e:
        raise UnsupportedFeatureError(
            "zstd-compressed clusters need the 'zstandard' package (into qcrypt's environment: pip install zstandard)",
            path=path,
            field="compression_type",
        ) from e
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw))
        return reader.read(cluster_size)
    except zstandard.ZstdError as e:
        raise FormatError(f"compressed cluster does not decompress: {e}", path=path, field="compressed cluster") from e


# -- opening a chain -----------------------------------------------------------------------------------------


class Opener:
    """Opens an image and its backing chain as layer readers (loops and depth caught), unlocking
    encrypted layers with the passphrase given for each. Backing files are opened only as ``rules`` allow
    (qcrypt.images.backing: the image's storage, its owner's permissions, no special files), and every layer is read
    through the descriptor that was checked."""

    def __init__(
        self, passphrase: Secret | None, passphrases: Mapping[str, Secret], rules: ChainRules | None = None
    ) -> None:
        self.passphrase = passphrase
        self.passphrases = passphrases
        self.rules = rules
        self.context: ChainContext | None = None
        self.seen: set[tuple[int, int]] = set()

    def passphrase_for(self, path: str) -> Secret | None:
        return self.passphrases.get(os.path.realpath(path), self.passphrase)

    def open(self, path: str, format_hint: str | None = None, snapshot: str | None = None) -> LayerReader:
        """The top image ``path``; ``format_hint`` is its declared format (never probed then)."""
        fh = open_image_file(path)
        try:
            self.context = ChainContext.for_top(path, fh, self.rules)
        except BaseException:
            fh.close()
            raise
        return self._open_layer(path, fh, format_hint, snapshot)

    def _open_layer(self, path: str, fh: BinaryIO, format_hint: str | None, snapshot: str | None = None) -> LayerReader:
        try:
            st = os.fstat(fh.fileno())
            if (st.st_dev, st.st_ino) in self.seen:
                raise FormatError("backing chain loops", path=path, field="backing_file")
            if len(self.seen) >= MAX_CHAIN_DEPTH:
                raise FormatError(f"backing chain deeper than {MAX_CHAIN_DEPTH}", path=path, field="backing_file")
            self.seen.add((st.st_dev, st.st_ino))
            kind = declared_container(format_hint, fh).format
        except BaseException:
            fh.close()
            raise
        if kind == "raw":
            return RawReader(path, fh)
        if kind == "luks":
            return RawLuksReader(path, self.passphrase_for(path), fh)
        return self._open_qcow(path, fh, kind, snapshot)

    def _open_qcow(self, path: str, fh: BinaryIO, kind: str, snapshot_name: str | None = None) -> LayerReader:
        image = open_qcow_image(path, fh, kind)
        try:
            snapshot = find_snapshot(image, snapshot_name) if snapshot_name is not None else None
            encryption = self._layer_encryption(image)
            backing = None
            if image.backing_file:
                backing_path = resolve_backing(path, image.backing_file)
                if backing_path is None:
                    raise UnsupportedFeatureError(
                        f"backing file {image.backing_file!r} is not a local file", path=path, field="backing_file"
                    )
                assert self.context is not None
                backing_fh, declared = open_backing(path, backing_path, self.context)
                hint = declared.format if declared and declared.format else image.backing_format
                backing = self._open_layer(backing_path, backing_fh, hint)
            return QcowReader(image, encryption, backing, snapshot)
        except BaseException:
            image.close()
            raise

    def _layer_encryption(self, image: QcowImageReader) -> DataEncryption | None:
        method = image.header.crypt_method
        if method == 0:
            return None
        passphrase = self.passphrase_for(image.path)
        if passphrase is None:
            raise PassphraseRequiredError(f"{image.path}: encrypted: a passphrase is required")
        if method == qcow2_fmt.CRYPT_AES:
            if isinstance(passphrase, KnownMasterKey):
                raise UnsupportedFeatureError("legacy AES has no master key", path=image.path, field="crypt_method")
            return DataEncryption.legacy(passphrase)
        from qcrypt.luks import header as luks_header

        assert isinstance(image, QCow2Image)
        region = image.crypto_header()
        assert region is not None
        read_at = luks_header.file_reader(image.fh, region[0], region[1], path=image.path)
        header = luks_header.read_header(read_at, region[1], path=image.path)
        return DataEncryption.luks_in_qcow2(_unlock(header, read_at, passphrase, image.path))


def find_snapshot(image: QcowImageReader, name: str) -> Snapshot:
    """The internal snapshot whose id or name is ``name``."""
    snapshots = image.snapshots()
    for snap in snapshots:
        if name in (snap.id, snap.name):
            return snap
    known = ", ".join(s.name for s in snapshots) or "none"
    raise FormatError(f"no internal snapshot {name!r} (snapshots: {known})", path=image.path, field="snapshots")


class GuestStream(io.RawIOBase):
    """A read-only, seekable binary file over a guest's plaintext. ``size`` is the virtual size."""

    def __init__(self, reader: LayerReader, name: str) -> None:
        super().__init__()
        self._reader = reader
        self.size = reader.size
        self.name = name
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        self._checkClosed()
        remaining = max(0, self.size - self._pos)
        n = remaining if size is None or size < 0 else min(size, remaining)
        if n == 0:
            return b""
        data = self._reader.read(self._pos, n)
        self._pos += n
        return data

    def read_at(self, guest_offset: int, length: int) -> bytes:
        """Like os.pread: ``length`` bytes at ``guest_offset`` (fewer at the end), position unchanged."""
        self._checkClosed()
        length = max(0, min(length, self.size - guest_offset))
        return self._reader.read(guest_offset, length) if length else b""

    def read_into(self, guest_offset: int, out: memoryview) -> None:
        """Fill ``out`` with the guest bytes at ``guest_offset``; zeros past the end of the disk."""
        self._checkClosed()
        inside = max(0, min(len(out), self.size - guest_offset))
        if inside:
            self._reader.read_into(guest_offset, out[:inside])
        fill_zero(out[inside:])

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._reader.close()
        super().close()


def open_image(
    path: str | os.PathLike[str],
    passphrase: Passphrase | KnownMasterKey | None = None,
    *,
    passphrases: Mapping[Any, Passphrase | KnownMasterKey] | None = None,  # keys: paths (str or path-like)
    container: str | None = None,
    snapshot: str | None = None,
    rules: ChainRules | None = None,
) -> GuestStream:
    """Open the guest plaintext of an image (qcow2, qcow, raw LUKS1, raw), following its backing chain.

    ``passphrase`` unlocks every encrypted layer unless ``passphrases`` maps a layer's path to its own.
    Raises :class:`qcrypt.BadPassphraseError` when a LUKS passphrase opens no keyslot. ``container="raw"``
    reads the file as a raw disk whatever its first bytes say (QEMU's ``format=raw``). ``snapshot`` (an id
    or name) reads a qcow2 internal snapshot instead of the active layer. Backing files are followed only as
    ``rules`` allow (see :mod:`qcrypt.images.backing`): a refused one raises
    :class:`qcrypt.images.backing.BackingRefusedError`.
    """
    path = os.fspath(path)
    per_layer = {os.path.realpath(os.fspath(k)): _secret(v) for k, v in (passphrases or {}).items()}
    opener = Opener(_secret(passphrase) if passphrase is not None else None, per_layer, rules)
    return GuestStream(opener.open(path, container, snapshot), path)
