"""The LUKS1 container a migration writes: new parameters, or the source's master key and keyslots carried over
(re-laid out to QEMU's rules when an old cryptsetup placed them otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from qcrypt.audit.report import ImageReport
from qcrypt.crypto.encryption import DataEncryption, IvBase
from qcrypt.crypto.kdf import benchmark_pbkdf2
from qcrypt.crypto.secret import wipe as wipe_secret
from qcrypt.crypto.sector import make_sector_cipher
from qcrypt.crypto.spot_check import SpotCheck
from qcrypt.errors import (
    BadPassphraseError,
    MigrationError,
    UnsupportedFeatureError,
)
from qcrypt.formats import luks1 as luks1_fmt
from qcrypt.images.qcow2_reader import QCow2Image
from qcrypt.luks import cipher_spec, qemu_layout
from qcrypt.luks import create as luks_create
from qcrypt.luks import header as luks_header
from qcrypt.luks import keyslots as luks_keyslots
from qcrypt.migrate.options import MigrateOptions
from qcrypt.migrate.read_back import ReadBack
from qcrypt.migrate.writing import reused_buffer
from qcrypt.model.encryption import Encryption
from qcrypt.model.units import SECTOR
from qcrypt.plumbing.files import RawFile
from qcrypt.plumbing.parallel import Background

if TYPE_CHECKING:
    from qcrypt.migrate.plan import Plan


@dataclass
class LuksOutput:
    """The LUKS container being written. For a new container, the header (its keyslot PBKDF2 takes
    --iter-time) is built in a background process while the payload is encrypted: ``pending`` until then."""

    payload_offset: int  # sectors; the header area is payload_offset * 512 bytes
    encryption: DataEncryption
    carried_over: bool
    master_key: bytearray = field(repr=False, default_factory=bytearray)  # wiped by wipe()
    header: luks_header.LuksHeader | None = None
    area: bytes | None = None  # phdr + key material
    pending: Background[tuple[luks_header.LuksHeader, bytearray]] | None = field(repr=False, default=None)

    @property
    def area_bytes(self) -> int:
        return self.payload_offset * SECTOR

    def encrypt(self, plaintext: bytes | bytearray | memoryview, host_offset: int) -> bytes:
        """Ciphertext of whole sectors stored at ``host_offset`` (bytes) of the output, with a sample of them
        checked against OpenSSL's own XTS/CBC."""
        return self.encryption.encrypt(plaintext, host_offset)

    def encrypt_reusing(self, plaintext: bytes | bytearray | memoryview, host_offset: int) -> memoryview:
        """Like :meth:`encrypt`, into a buffer this thread reuses: valid until its next call (for a pwrite
        right after; saves a copy and a fresh allocation per chunk)."""
        out = reused_buffer(memoryview(plaintext).nbytes)
        self.encryption.encrypt_into(plaintext, host_offset, out)
        return out

    def read_back(self, out_fd: int, path: str, *, direct_io: bool) -> ReadBack:
        """A reader of the LUKS data being written to ``out_fd``, with a cipher of its own (not the one that
        encrypts) made from this container's parameters."""
        cipher = self.encryption.cipher
        raw = self.encryption.iv_base is IvBase.PAYLOAD
        return ReadBack.open(
            out_fd,
            path,
            cipher.cipher_name,
            cipher.cipher_mode,
            self.master_key,
            payload_offset=self.area_bytes if raw else None,
            direct_io=direct_io,
        )

    def resolve(self) -> tuple[luks_header.LuksHeader, bytes]:
        """The header and its area, waiting for the background PBKDF2 if needed."""
        if self.pending is not None:
            header, area = self.pending.result()
            self.header, self.area, self.pending = header, bytes(area), None
            wipe_secret(area)
        assert self.header is not None and self.area is not None
        return self.header, self.area

    def wipe(self) -> None:
        if self.pending is not None:  # an error before the header was needed: stop its PBKDF2
            self.pending.cancel()
        wipe_secret(self.master_key)
        self.encryption.wipe()


def source_luks(
    source: str, report: ImageReport, passphrase: bytes | bytearray | None
) -> tuple[luks_header.LuksHeader, bytes, bytearray] | None:
    """Header, header area bytes and master key of a LUKS1 source (raw or qcow2), else None."""
    if report.encryption is not Encryption.LUKS1:
        return None
    if passphrase is None:
        raise BadPassphraseError(f"{source} is LUKS-encrypted: a passphrase is required")
    return _with_luks_region(source, report, lambda read_at, size: _read_luks_area(read_at, size, source, passphrase))


def _with_luks_region(source: str, report: ImageReport, use: Callable[[luks_header.ReadAt, int], Any]) -> Any:
    """``use(read_at, region_size)`` over the LUKS region of a raw LUKS or qcow2-LUKS source."""
    if report.format == "qcow2":
        with QCow2Image.open(source) as image:
            region = image.crypto_header()
            assert region is not None
            return use(luks_header.file_reader(image.fh, *region, path=source), region[1])
    with RawFile.open(source) as raw:
        return use(luks_header.file_reader(raw.fh, 0, raw.file_size, path=source), raw.file_size)


def refuse_unreadable_source(source: str, report: ImageReport) -> None:
    """Raise, before any passphrase is asked for, what ``qcrypt info`` would raise for an image that cannot be
    parsed, and the UnsupportedFeatureError naming what qcrypt lacks for a LUKS1 source it cannot unlock."""
    if report.error:
        raise report.error_to_raise()
    if report.encryption is Encryption.LUKS1:
        header = _with_luks_region(
            source, report, lambda read_at, size: luks_header.read_header(read_at, size, path=source)
        )
        luks_header.require_supported(header, path=source)


def _read_luks_area(
    read_at: Callable[[int, int], bytes], region_size: int, path: str, passphrase: bytes | bytearray
) -> tuple[luks_header.LuksHeader, bytes, bytearray]:
    header = luks_header.read_header(read_at, region_size, path=path)
    luks_header.require_supported(header, path=path)
    try:
        master_key = luks_keyslots.unlock(header, read_at, passphrase)
    except BadPassphraseError as e:
        raise BadPassphraseError(f"{path}: {e}") from None
    end = max(s.key_material_offset + header.material_sectors for s in header.keyslots) * SECTOR
    return header, read_at(0, min(region_size, end)), master_key


def build_luks_output(plan_: Plan, opts: MigrateOptions, *, raw_target: bool) -> LuksOutput:
    carried = source_luks(plan_.source, plan_.report, opts.passphrase_for(plan_.source))
    if carried:
        header, area, master_key = carried
        if opts.new_passphrase is not None:
            raise MigrationError(
                "a LUKS source keeps its keyslots (every passphrase keeps working); "
                "--new-passphrase-file does not apply: add keys afterwards"
            )
        qemu_lacks = luks_header.qemu_unsupported(header)
        if qemu_lacks:  # the output would keep them: QEMU could not open it
            raise UnsupportedFeatureError(
                f"LUKS1 with {' and '.join(qemu_lacks)}, which QEMU does not implement: "
                "a LUKS output keeps the source's algorithms",
                path=plan_.source,
                field=cipher_spec.UNSUPPORTED_FIELD,
            )
        header, area = _relayout(header, area, raw_target=raw_target)
        return LuksOutput(
            header.payload_offset,
            _output_encryption(header.cipher_name, header.cipher_mode, master_key, header.payload_offset, raw_target),
            True,
            master_key,
            header,
            area,
        )
    passphrase = opts.new_passphrase if opts.new_passphrase is not None else opts.passphrase_for(plan_.source)
    if passphrase is None:
        raise MigrationError("the source is not encrypted: give the LUKS passphrase with --new-passphrase-file")
    key_bits = opts.key_bits or (512 if "xts" in opts.cipher else 256)
    params = luks_create.LuksParams(
        cipher=opts.cipher,
        key_bits=key_bits,
        hash_name=opts.hash_name,
        iter_time_ms=opts.iter_time_ms,
        iterations=opts.iterations,
    )
    payload_offset = luks_create.payload_offset_for(params)
    if opts.iterations is None:  # calibrate now, before the payload workers load every core
        params.pbkdf2_rate = benchmark_pbkdf2(opts.hash_name, key_bits // 8)
    master_key = luks_create.new_master_key(key_bits // 8)
    cipher_name, cipher_mode = cipher_spec.split_cipher(opts.cipher)
    encryption = _output_encryption(cipher_name, cipher_mode, master_key, payload_offset, raw_target)
    # The process inherits the key and passphrase by fork (nothing secret is pickled, written or on argv).
    pending = Background(
        lambda: luks_create.create(master_key, passphrase, params),
        what="the new keyslot's PBKDF2",
        stall_seconds=opts.stall_seconds + params.iter_time_ms / 1000,
    )
    return LuksOutput(payload_offset, encryption, False, master_key, pending=pending)


def _output_encryption(
    cipher_name: str, cipher_mode: str, master_key: bytearray, payload_offset: int, raw_target: bool
) -> DataEncryption:
    """The output's data encryption: raw LUKS (payload ``payload_offset`` sectors in) or LUKS in qcow2, its
    sectors spot-checked against OpenSSL."""
    cipher = make_sector_cipher(cipher_name, cipher_mode, master_key)
    spot_check = SpotCheck(cipher_name, cipher_mode, master_key)
    if raw_target:
        return DataEncryption.raw_luks(cipher, payload_offset * SECTOR, spot_check)
    return DataEncryption.luks_in_qcow2(cipher, spot_check)


def _relayout(header: luks_header.LuksHeader, area: bytes, *, raw_target: bool) -> tuple[luks_header.LuksHeader, bytes]:
    """Keep every keyslot's key material byte for byte, placed the way QEMU accepts it, and put the payload
    where the target container wants it.

    Key material is encrypted with sector numbers counted from its own start, so it can move: a source laid
    out by an older cryptsetup (material from sector 2, slots touching once rounded to 4 KiB) gets today's
    offsets (sector 8, 4 KiB steps); a layout QEMU already accepts keeps its offsets."""
    slots = header.keyslots
    if qemu_layout.qemu_keyslot_problems(header):
        offsets = qemu_layout.qemu_keyslot_offsets(header.key_bytes)
        slots = tuple(replace(slot, key_material_offset=offset) for slot, offset in zip(slots, offsets))
    material_end = max(s.key_material_offset + qemu_layout.qemu_material_sectors(header) for s in slots)
    payload = material_end
    if raw_target:
        payload = (
            -(-material_end // luks1_fmt.DEFAULT_DATA_ALIGNMENT_SECTORS) * luks1_fmt.DEFAULT_DATA_ALIGNMENT_SECTORS
        )
    new_header = replace(header, keyslots=slots, payload_offset=payload)
    problems = qemu_layout.qemu_keyslot_problems(new_header) + qemu_layout.qemu_payload_problems(new_header)
    if problems:  # never write an output QEMU refuses
        raise MigrationError(f"cannot lay out the LUKS header for QEMU: {'; '.join(problems)}")
    blob = bytearray(payload * SECTOR)
    length = header.material_sectors * SECTOR
    for old, new in zip(header.keyslots, slots):
        source_start, target_start = old.key_material_offset * SECTOR, new.key_material_offset * SECTOR
        blob[target_start : target_start + length] = area[source_start : source_start + length]
    blob[: luks1_fmt.PHDR_SIZE] = new_header.to_bytes()
    return new_header, bytes(blob)
