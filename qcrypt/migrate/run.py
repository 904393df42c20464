"""``migrate``: legacy AES (or any readable) image -> raw LUKS1, qcow2-LUKS, qcow2 or raw; LUKS <-> LUKS.

Safety model (README, "Migrating"): the source is only read (and locked against QEMU writers while we
read); the output is written to a temporary file beside its final name, fsynced, read back through our own
reader and compared with the source by streaming digests, and only then renamed into place. Any error or
interruption removes the temporary file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

from qcrypt.audit import grading, plausibility
from qcrypt.audit.inspect import inspect_image
from qcrypt.audit.report import ImageReport
from qcrypt.crypto.kdf import benchmark_pbkdf2
from qcrypt.crypto.secret import disable_core_dumps
from qcrypt.crypto.secret import wipe as wipe_secret
from qcrypt.crypto.sector import SectorCipher, legacy_aes_key, make_sector_cipher
from qcrypt.crypto.spot_check import SpotCheck
from qcrypt.errors import (
    BadPassphraseError,
    FormatError,
    MigrationError,
    QcryptIOError,
    UnsupportedFeatureError,
    VerificationError,
)
from qcrypt.formats import luks1 as luks1_fmt
from qcrypt.guest.stream import GuestStream, KnownMasterKey, Opener, QcowReader, Secret, open_image
from qcrypt.images.backing import BackingRefusedError, ChainRules, resolve_backing
from qcrypt.images.probe import probe
from qcrypt.images.qcow2_reader import QCow2Image
from qcrypt.luks import engine as luks
from qcrypt.model import findings as F
from qcrypt.model.clusters import ClusterKind, Snapshot
from qcrypt.model.encryption import Encryption
from qcrypt.plumbing import checksum
from qcrypt.plumbing.files import RawFile, open_image_file, pinned
from qcrypt.plumbing.locking import hold_shared_locks, refuse_if_in_use
from qcrypt.plumbing.outputs import AtomicOutput, Finalized, Placement, file_id, io_error
from qcrypt.plumbing.parallel import DEFAULT_STALL_SECONDS, Background, ordered_map

TARGETS = ("luks", "qcow2-luks", "qcow2", "raw")
CHUNK_BYTES = 4 * 1024 * 1024
DEFAULT_CLUSTER_SIZE = 65536
SECTOR = 512
Progress = Callable[[int], None]
EncryptFn = Callable[[bytes, int], "bytes | memoryview"]


@dataclass
class MigrateOptions:
    target: str
    output: str | None = None
    passphrase: bytes | None = field(default=None, repr=False)
    # one layer's own passphrase, by its path (any spelling of it): QEMU takes one secret per layer. Layers not
    # named here use ``passphrase``.
    passphrases: dict[str, bytes] = field(default_factory=dict, repr=False)
    new_passphrase: bytes | None = field(default=None, repr=False)
    # Tried when ``passphrase`` opens nothing: a keyfile's content without its trailing line ending (the CLI
    # sets it when a --passphrase-file ends in one). MigrateResult.passphrase_fallback_used says which worked.
    passphrase_fallback: bytes | None = field(default=None, repr=False)
    cipher: str = "aes-xts-plain64"
    key_bits: int | None = None
    hash_name: str = "sha256"
    iter_time_ms: int = 2000
    iterations: int | None = None  # forced PBKDF2 iterations (tests, reproducible benchmarks)
    allow_weak: bool = False  # create a LUKS container with settings the scanner grades (findings.grade_new_luks)
    flatten: bool = False
    force: bool = False
    replace: bool = False
    progress: Progress | None = None
    chunk_bytes: int = CHUNK_BYTES
    workers: int | None = None  # None = every core we may use
    stall_seconds: float = DEFAULT_STALL_SECONDS  # a worker making no progress this long is an error
    keep_placement: bool = False  # the result's placement stays open (the caller undoes or closes it)
    rules: ChainRules | None = None  # where backing files may be besides the source's folder (qcrypt.images.backing)
    source_format: str | None = None  # the format the domain XML declares for the source: never probed then
    accept_unverified_passphrase: bool = False  # go on when no legacy data cluster can judge the passphrase
    accept_random_content: bool = False  # legacy plaintext that looks random is the guest's (force's check part)
    random_content_option: str = "--force"  # the option the "really random" advice names (migrate-domain's own)

    def layer_passphrases(self) -> dict[str, Secret]:
        """``passphrases`` keyed by real path, as the chain opener looks layers up."""
        return {os.path.realpath(path): secret for path, secret in self.passphrases.items()}

    def passphrase_for(self, path: str) -> bytes | None:
        """The passphrase that unlocks the layer at ``path``."""
        return self.layer_passphrases().get(os.path.realpath(path), self.passphrase)  # type: ignore[return-value]


@dataclass
class MigrateResult:
    source: str
    output: str
    target: str
    virtual_size: int
    data_bytes: int
    verified: bool  # the output was read back and matched the source (verified_bytes accounted for)
    verified_bytes: int = 0
    luks: dict[str, Any] | None = None
    original_kept: str | None = None  # --replace: NAME.qcrypt-orig, checked to be the source read at the end
    original_changed: bool = False  # --replace: NAME.qcrypt-orig is no longer the source qcrypt read
    snapshots: list[str] = field(default_factory=list)
    backing_file: str | None = None
    plausibility: str | None = None
    passphrase_verified: bool | None = None  # legacy sources: False when nothing could check the passphrase
    luks_carried_over: bool = False
    passphrase_fallback_used: bool = False  # MigrateOptions.passphrase_fallback opened the source, not passphrase
    weak_findings: list[F.Finding] = field(default_factory=list)  # what --allow-weak let through
    phase_seconds: dict[str, float] = field(default_factory=dict)  # wall-clock seconds per phase, in order
    placement: Placement | None = field(default=None, repr=False)  # with opts.keep_placement: close() it
    source_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the source file qcrypt opened and read


class PhaseTimer:
    """Wall-clock seconds per phase of a migration (plan, passphrase check, LUKS setup, write, verify, sync,
    commit), so the next bottleneck is visible (``qcrypt migrate --timings``, ``scripts/bench``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started


# -- planning -------------------------------------------------------------------------------------------------


def new_luks_weaknesses(report: ImageReport, opts: MigrateOptions) -> list[F.Finding]:
    """What the scanner would grade in the LUKS container this migration creates (none when it creates none:
    another target, or a LUKS source whose header and keyslots carry over unchanged)."""
    if opts.target not in ("luks", "qcow2-luks") or report.encryption is Encryption.LUKS1:
        return []
    key_bits = opts.key_bits or (512 if "xts" in opts.cipher else 256)
    return grading.grade_new_luks(opts.cipher, opts.hash_name, key_bits, opts.iterations)


def refuse_weak_settings(report: ImageReport, opts: MigrateOptions) -> None:
    """MigrationError when the new container would carry a scanner finding and ``opts.allow_weak`` is off."""
    weak = new_luks_weaknesses(report, opts)
    if weak and not opts.allow_weak:
        raise MigrationError(
            "refusing to create a LUKS container that 'qcrypt scan' grades as weak: "
            + "; ".join(f"{f.code} ({f.message})" for f in weak)
            + ". Use the defaults (aes-xts-plain64, 512-bit key, sha256), or rerun with --allow-weak"
        )


@dataclass
class Plan:
    source: str
    report: ImageReport
    final_path: str
    keep_backing: str | None
    backing_format: str | None
    snapshots: list[Snapshot]


def plan(source: str, opts: MigrateOptions) -> Plan:
    if opts.target not in TARGETS:
        raise MigrationError(f"unknown target {opts.target!r} (choose from {', '.join(TARGETS)})")
    report = inspect_image(source, rules=opts.rules, declared_format=opts.source_format)
    refuse_unreadable_source(source, report)
    refused = report.refused_backing()
    if refused:  # never copy a file its owner could not read, a device or a host file into the output
        raise BackingRefusedError(refused)
    if report.encryption is Encryption.LUKS2:
        raise MigrationError(f"{source} is LUKS2, which qcrypt cannot unlock; use cryptsetup")
    refuse_weak_settings(report, opts)
    final_path = os.path.realpath(source) if opts.replace else opts.output  # --replace acts on the real file
    if not final_path:
        raise MigrationError("an output path is required (-o OUT), or --replace")
    if not opts.replace:
        _refuse_output_over_inputs(final_path, [source, *report.chain_paths])
    _check_layer_passphrases(source, report, opts)
    keep_backing, backing_format, snapshots = _chain_plan(source, report, opts)
    if keep_backing:
        keep_backing = backing_name_for(source, keep_backing, final_path)
    return Plan(source, report, final_path, keep_backing, backing_format, snapshots)


def _check_layer_passphrases(source: str, report: ImageReport, opts: MigrateOptions) -> None:
    """Every path given a passphrase of its own must be a layer of the source's chain (a typo would otherwise
    silently fall back to the default passphrase)."""
    layers = {os.path.realpath(path) for path in [source, *report.chain_paths]}
    strangers = [path for path in opts.passphrases if os.path.realpath(path) not in layers]
    if strangers:
        raise MigrationError(
            f"{strangers[0]} is given a passphrase but is not a layer of {source}'s chain "
            f"(layers: {', '.join([source, *report.chain_paths])})"
        )


def backing_name_for(source: str, backing_file: str, output: str) -> str:
    """The backing name to write into ``output`` so that it opens the same base as ``source`` does.

    Relative names resolve against the image's own folder (as in QEMU): when the output lives elsewhere,
    the name is rewritten relative to the output's folder."""
    base = resolve_backing(source, backing_file)
    if base is None or os.path.isabs(backing_file):
        return backing_file
    output_dir = os.path.dirname(os.path.abspath(output))
    if os.path.samefile(output_dir, os.path.dirname(os.path.abspath(source)) or "."):
        return backing_file
    rewritten = os.path.relpath(os.path.realpath(base), os.path.realpath(output_dir))
    if not _same_file(os.path.join(output_dir, rewritten), base):
        raise MigrationError(f"cannot name backing file {base} relative to {output_dir}")
    return rewritten


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _refuse_output_over_inputs(output: str, inputs: list[str]) -> None:
    """Whatever path leads there (symlinks, hard links), the output must not be the source or a backing layer."""
    for path in inputs:
        if _same_file(output, path):
            what = "the source" if path == inputs[0] else f"backing layer {path}"
            raise MigrationError(f"the output would overwrite {what}; use --replace to swap the source safely")


def _chain_plan(
    source: str, report: ImageReport, opts: MigrateOptions
) -> tuple[str | None, str | None, list[Snapshot]]:
    snapshots: list[Snapshot] = []
    backing_format = None
    if report.format == "qcow2":
        with QCow2Image.open(source) as image:
            snapshots = image.snapshots()
            backing_format = image.backing_format
    qcow2_target = opts.target in ("qcow2", "qcow2-luks")
    if not report.backing_file or not qcow2_target or opts.flatten:
        if snapshots and report.backing_file and qcow2_target:
            raise MigrationError(
                "--flatten of an overlay with internal snapshots is not supported: "
                "delete the snapshots or migrate without --flatten"
            )
        return None, None, snapshots if qcow2_target else []
    legacy = [layer.path for layer in report.backing_chain if layer.encryption is Encryption.LEGACY_AES]
    if legacy:
        raise MigrationError(
            f"backing layer {legacy[0]} uses legacy AES encryption too: add --flatten to fold the chain into "
            "one standalone image, or migrate each layer from the base up and rebase the overlays"
        )
    return report.backing_file, backing_format, snapshots


# -- passphrase plausibility (legacy AES has no key check) ------------------------------------------------------


UNVERIFIED_OPTION = "--accept-unverified-passphrase"


@dataclass(frozen=True)
class PassphraseCheck:
    """What the legacy passphrase check found: ``verified`` is False when no layer had data to judge it by."""

    summary: str
    verified: bool


def check_legacy_passphrase(
    source: str,
    passphrase: bytes | None,
    *,
    force: bool,
    accept_unverified: bool = False,
    rules: ChainRules | None = None,
    source_format: str | None = None,
    passphrases: Mapping[str, Secret] | None = None,
    random_option: str = "--force",
) -> PassphraseCheck:
    """Decrypt a sample of clusters of every legacy layer; refuse random-looking plaintext unless forced.
    ``passphrases`` maps a layer's real path to its own passphrase (else ``passphrase``).

    A legacy layer without any data cluster cannot judge the passphrase: when no layer has data, that is
    "unverified", not "verified", and refused (MigrationError, exit 8) unless ``accept_unverified``."""
    opener = Opener(passphrase, passphrases or {}, rules)
    reader = opener.open(source, source_format)
    try:
        verdicts = [(layer.image.path, _judge_layer(layer)) for layer in _legacy_layers(reader)]
    finally:
        reader.close()
    bad = [(path, v) for path, v in verdicts if v.samples and not v.plausible]
    if bad and not force:
        path, verdict = bad[0]
        raise BadPassphraseError(
            f"{path}: the passphrase is probably wrong: {verdict.reason} (legacy AES has no key check). If the "
            f"disk's content really is random (e.g. encrypted inside the guest), rerun with {random_option}"
        )
    # A passphrase counts as checked when some layer it unlocks had data to judge; a layer with its own
    # passphrase and no data leaves that passphrase unchecked, whatever the other layers say.
    judged = {bytes(opener.passphrase_for(path) or b"") for path, v in verdicts if v.samples}
    unjudged = [
        path for path, v in verdicts if not v.samples and bytes(opener.passphrase_for(path) or b"") not in judged
    ]
    if unjudged and not accept_unverified:
        raise MigrationError(
            f"the passphrase cannot be verified: legacy layer {unjudged[0]} holds no data cluster to check it "
            "against (legacy AES has no key check), so a wrong passphrase would go unnoticed. If you are sure of "
            f"it, rerun with {UNVERIFIED_OPTION}"
        )
    summary = "; ".join(
        v.reason if v.samples else f"{path}: no data cluster to check the passphrase against" for path, v in verdicts
    )
    return PassphraseCheck(summary, verified=not unjudged and not bad)


def _check_legacy(source: str, passphrase: bytes | None, opts: MigrateOptions, *, force: bool) -> PassphraseCheck:
    return check_legacy_passphrase(
        source,
        passphrase,
        force=force or opts.accept_random_content,
        passphrases=opts.layer_passphrases(),
        accept_unverified=opts.accept_unverified_passphrase,
        rules=opts.rules,
        source_format=opts.source_format,
        random_option=opts.random_content_option,
    )


def _has_fallback(opts: MigrateOptions) -> bool:
    return (
        opts.passphrase is not None
        and opts.passphrase_fallback is not None
        and bytes(opts.passphrase_fallback) != bytes(opts.passphrase)
    )


def _same_legacy_key(passphrase: bytes, other: bytes) -> bool:
    """True when both give the same legacy AES key (its first 16 bytes): nothing to choose between them."""
    key, other_key = legacy_aes_key(passphrase), legacy_aes_key(other)
    try:
        return key == other_key
    finally:
        wipe_secret(key)
        wipe_secret(other_key)


def check_legacy_with_fallback(source: str, opts: MigrateOptions) -> tuple[PassphraseCheck, bool]:
    """The plausibility verdict and whether ``opts.passphrase_fallback`` is the one to use.

    The exact passphrase wins when its plaintext looks like a disk; else the fallback when its plaintext
    does; else the exact passphrase again under --force (or the refusal, naming both tries)."""
    fallback = opts.passphrase_fallback
    assert opts.passphrase is not None and fallback is not None
    try:
        return _check_legacy(source, opts.passphrase, opts, force=False), False
    except BadPassphraseError as exact_error:
        try:
            return _check_legacy(source, fallback, opts, force=False), True
        except BadPassphraseError:
            if opts.force or opts.accept_random_content:
                return _check_legacy(source, opts.passphrase, opts, force=True), False
            error = BadPassphraseError(
                f"{exact_error} (tried the passphrase file's exact bytes, and without its trailing newline)"
            )
            error.fallback_tried = True  # type: ignore[attr-defined]
            raise error from None


def _legacy_layers(reader: object) -> Iterator[QcowReader]:
    while isinstance(reader, QcowReader):
        if reader.cipher is not None and not reader.iv_from_host:
            yield reader
        reader = reader.backing


def _encrypted_extents(layer: QcowReader) -> Iterator[tuple[int, int]]:
    """(guest_offset, length) of the layer's own encrypted data: whole clusters and allocated subclusters."""
    cs = layer.cluster_size
    sc_size = cs // 32
    for g, m in layer.image.iter_mappings():  # type: ignore[attr-defined]
        if m.kind is ClusterKind.NORMAL:
            yield g * cs, min(cs, layer.size - g * cs)
        elif m.kind is ClusterKind.SUBCLUSTERS:
            for i in range(32):
                if m.alloc_bitmap >> i & 1:
                    start = g * cs + i * sc_size
                    yield start, min(sc_size, layer.size - start)


def _judge_layer(layer: QcowReader) -> plausibility.Verdict:
    extents = plausibility.sample(_encrypted_extents(layer))
    return plausibility.judge((off, layer.read(off, min(length, 65536))) for off, length in extents if length > 0)


# -- LUKS output parameters ---------------------------------------------------------------------------------------


@dataclass
class LuksOutput:
    """The LUKS container being written. For a new container, the header (its keyslot PBKDF2 takes
    --iter-time) is built in a background process while the payload is encrypted: ``pending`` until then."""

    payload_offset: int  # sectors; the header area is payload_offset * 512 bytes
    cipher: SectorCipher
    carried_over: bool
    master_key: bytearray = field(repr=False, default_factory=bytearray)  # wiped by wipe()
    header: luks.LuksHeader | None = None
    area: bytes | None = None  # phdr + key material
    pending: Background[tuple[luks.LuksHeader, bytearray]] | None = field(repr=False, default=None)
    spot_check: SpotCheck | None = field(repr=False, default=None)

    @property
    def area_bytes(self) -> int:
        return self.payload_offset * SECTOR

    def encrypt(self, plaintext: bytes | bytearray | memoryview, first_sector: int) -> bytes:
        """Ciphertext of whole sectors, with a sample of them checked against OpenSSL's own XTS/CBC."""
        ciphertext = self.cipher.encrypt(plaintext, first_sector)
        if self.spot_check is not None:
            self.spot_check.check(plaintext, ciphertext, first_sector)
        return ciphertext

    def encrypt_reusing(self, plaintext: bytes | bytearray | memoryview, first_sector: int) -> memoryview:
        """Like :meth:`encrypt`, into a buffer this thread reuses: valid until its next call (for a pwrite
        right after; saves a copy and a fresh allocation per chunk)."""
        out = _reused_buffer(memoryview(plaintext).nbytes)
        self.cipher.encrypt_into(plaintext, first_sector, out)
        if self.spot_check is not None:
            self.spot_check.check(plaintext, out, first_sector)
        return out

    def resolve(self) -> tuple[luks.LuksHeader, bytes]:
        """The header and its area, waiting for the background PBKDF2 if needed."""
        if self.pending is not None:
            header, area = self.pending.result()
            self.header, self.area, self.pending = header, bytes(area), None
            area[:] = bytes(len(area))
        assert self.header is not None and self.area is not None
        return self.header, self.area

    def wipe(self) -> None:
        if self.pending is not None:  # an error before the header was needed: stop its PBKDF2
            self.pending.cancel()
        self.master_key[:] = bytes(len(self.master_key))
        self.cipher.wipe()
        if self.spot_check is not None:
            self.spot_check.wipe()


def source_luks(
    source: str, report: ImageReport, passphrase: bytes | None
) -> tuple[luks.LuksHeader, bytes, bytearray] | None:
    """Header, header area bytes and master key of a LUKS1 source (raw or qcow2), else None."""
    if report.encryption is not Encryption.LUKS1:
        return None
    if passphrase is None:
        raise BadPassphraseError(f"{source} is LUKS-encrypted: a passphrase is required")
    return _with_luks_region(source, report, lambda read_at, size: _read_luks_area(read_at, size, source, passphrase))


def _with_luks_region(source: str, report: ImageReport, use: Callable[[luks.ReadAt, int], Any]) -> Any:
    """``use(read_at, region_size)`` over the LUKS region of a raw LUKS or qcow2-LUKS source."""
    if report.format == "qcow2":
        with QCow2Image.open(source) as image:
            region = image.crypto_header()
            assert region is not None
            return use(luks.file_reader(image.fh, *region, path=source), region[1])
    with RawFile.open(source) as raw:
        return use(luks.file_reader(raw.fh, 0, raw.file_size, path=source), raw.file_size)


def refuse_unreadable_source(source: str, report: ImageReport) -> None:
    """Raise, before any passphrase is asked for, what ``qcrypt info`` would raise for an image that cannot be
    parsed, and the UnsupportedFeatureError naming what qcrypt lacks for a LUKS1 source it cannot unlock."""
    if report.error:
        raise report.error_to_raise()
    if report.encryption is Encryption.LUKS1:
        header = _with_luks_region(source, report, lambda read_at, size: luks.read_header(read_at, size, path=source))
        luks.require_supported(header, path=source)


def _read_luks_area(
    read_at: Callable[[int, int], bytes], region_size: int, path: str, passphrase: bytes
) -> tuple[luks.LuksHeader, bytes, bytearray]:
    header = luks.read_header(read_at, region_size, path=path)
    luks.require_supported(header, path=path)
    try:
        master_key = luks.unlock(header, read_at, passphrase)
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
        qemu_lacks = luks.qemu_unsupported(header)
        if qemu_lacks:  # the output would keep them: QEMU could not open it
            raise UnsupportedFeatureError(
                f"LUKS1 with {' and '.join(qemu_lacks)}, which QEMU does not implement: "
                "a LUKS output keeps the source's algorithms",
                path=plan_.source,
                field=luks.UNSUPPORTED_FIELD,
            )
        header, area = _relayout(header, area, raw_target=raw_target)
        return LuksOutput(
            header.payload_offset,
            _cipher_for(header, master_key),
            True,
            master_key,
            header,
            area,
            spot_check=SpotCheck(header.cipher_name, header.cipher_mode, master_key),
        )
    passphrase = opts.new_passphrase if opts.new_passphrase is not None else opts.passphrase_for(plan_.source)
    if passphrase is None:
        raise MigrationError("the source is not encrypted: give the LUKS passphrase with --new-passphrase-file")
    key_bits = opts.key_bits or (512 if "xts" in opts.cipher else 256)
    params = luks.LuksParams(
        cipher=opts.cipher,
        key_bits=key_bits,
        hash_name=opts.hash_name,
        iter_time_ms=opts.iter_time_ms,
        iterations=opts.iterations,
    )
    payload_offset = luks.payload_offset_for(params)
    if opts.iterations is None:  # calibrate now, before the payload workers load every core
        params.pbkdf2_rate = benchmark_pbkdf2(opts.hash_name, key_bits // 8)
    master_key = luks.new_master_key(key_bits // 8)
    cipher_name, cipher_mode = luks.split_cipher(opts.cipher)
    cipher = make_sector_cipher(cipher_name, cipher_mode, master_key)
    # The process inherits the key and passphrase by fork (nothing secret is pickled, written or on argv).
    pending = Background(
        lambda: luks.create(master_key, passphrase, params),
        what="the new keyslot's PBKDF2",
        stall_seconds=opts.stall_seconds + params.iter_time_ms / 1000,
    )
    return LuksOutput(
        payload_offset,
        cipher,
        False,
        master_key,
        pending=pending,
        spot_check=SpotCheck(cipher_name, cipher_mode, master_key),
    )


def _cipher_for(header: luks.LuksHeader, master_key: bytearray) -> SectorCipher:
    return make_sector_cipher(header.cipher_name, header.cipher_mode, master_key)


def _relayout(header: luks.LuksHeader, area: bytes, *, raw_target: bool) -> tuple[luks.LuksHeader, bytes]:
    """Keep every keyslot's key material byte for byte, placed the way QEMU accepts it, and put the payload
    where the target container wants it.

    Key material is encrypted with sector numbers counted from its own start, so it can move: a source laid
    out by an older cryptsetup (material from sector 2, slots touching once rounded to 4 KiB) gets today's
    offsets (sector 8, 4 KiB steps); a layout QEMU already accepts keeps its offsets."""
    slots = header.keyslots
    if luks.qemu_keyslot_problems(header):
        offsets = luks.qemu_keyslot_offsets(header.key_bytes)
        slots = tuple(replace(slot, key_material_offset=offset) for slot, offset in zip(slots, offsets))
    material_end = max(s.key_material_offset + luks.qemu_material_sectors(header) for s in slots)
    payload = material_end
    if raw_target:
        payload = (
            -(-material_end // luks1_fmt.DEFAULT_DATA_ALIGNMENT_SECTORS) * luks1_fmt.DEFAULT_DATA_ALIGNMENT_SECTORS
        )
    new_header = replace(header, keyslots=slots, payload_offset=payload)
    problems = luks.qemu_keyslot_problems(new_header) + luks.qemu_payload_problems(new_header)
    if problems:  # never write an output QEMU refuses
        raise MigrationError(f"cannot lay out the LUKS header for QEMU: {'; '.join(problems)}")
    blob = bytearray(payload * SECTOR)
    length = header.material_sectors * SECTOR
    for old, new in zip(header.keyslots, slots):
        source_start, target_start = old.key_material_offset * SECTOR, new.key_material_offset * SECTOR
        blob[target_start : target_start + length] = area[source_start : source_start + length]
    blob[: luks1_fmt.PHDR_SIZE] = new_header.to_bytes()
    return new_header, bytes(blob)


# -- writing ------------------------------------------------------------------------------------------------------

_thread_buffers = threading.local()


def _reused_buffer(length: int) -> memoryview:
    """A writable buffer of ``length`` bytes that this thread (in practice: each forked worker) reuses."""
    buffer: bytearray | None = getattr(_thread_buffers, "buffer", None)
    if buffer is None or len(buffer) < length:
        buffer = bytearray(length)
        _thread_buffers.buffer = buffer
    return memoryview(buffer)[:length]


class Digests:
    """Streaming digests of the plaintext written, per (table, guest_offset, length) range."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int, int, bytes]] = []

    def add(self, table: int, guest_offset: int, data: bytes | memoryview) -> None:
        self.ranges.append((table, guest_offset, len(data), checksum.digest(data)))

    @property
    def total_bytes(self) -> int:
        return sum(length for _, _, length, _ in self.ranges)


def write_flat(
    stream: GuestStream,
    out: BinaryIO,
    *,
    base_offset: int,
    encrypt: EncryptFn | None,
    opts: MigrateOptions,
    digests: Digests,
) -> int:
    """Raw or raw-LUKS payload: every sector written (zeros encrypted too); plaintext raw stays sparse.

    Chunks are processed by forked workers (both cores) that read, decrypt, encrypt and pwrite themselves.
    """
    padded = -(-stream.size // SECTOR) * SECTOR
    fd = out.fileno()

    def one_chunk(guest_offset: int, length: int) -> tuple[int, int, bytes]:
        plain = stream.read_at(guest_offset, length)
        plain += bytes(length - len(plain))
        if encrypt is not None:
            _pwrite_fd(fd, base_offset + guest_offset, encrypt(plain, guest_offset // SECTOR))
        elif plain.count(0) != len(plain):  # C speed; any() would iterate a zero chunk byte by byte
            _pwrite_fd(fd, base_offset + guest_offset, plain)
        return guest_offset, length, checksum.digest(plain)

    chunks = ((off, min(opts.chunk_bytes, padded - off)) for off in range(0, padded, opts.chunk_bytes))
    with contextlib.closing(
        ordered_map(one_chunk, chunks, workers=opts.workers, stall_seconds=opts.stall_seconds, describe=_describe_run)
    ) as results:
        for guest_offset, length, digest in results:
            digests.ranges.append((-1, guest_offset, length, digest))
            if opts.progress:
                opts.progress(length)
    out.truncate(base_offset + padded)
    return padded


def _describe_run(item: tuple[Any, ...]) -> str:
    guest_offset, length = item[:2]
    return f"guest bytes {guest_offset}..{guest_offset + length}"


def _pwrite(out: BinaryIO, offset: int, data: bytes | memoryview) -> None:
    _pwrite_fd(out.fileno(), offset, data)


def _pwrite_fd(fd: int, offset: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while len(view):
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


@dataclass
class Qcow2Job:
    """What the qcow2 writer gets for one table: a stream of (guest_cluster, "zero"|"data", share key), in
    guest order, and the reader to take data from (a generator: memory does not grow with the image)."""

    table: int
    reader: Any  # QcowReader of the source layer (or the whole chain when flattening)
    clusters: Iterable[tuple[int, str, Any]]


def _layer_job(table: int, reader: QcowReader, snapshot: Snapshot | None, share: bool) -> Qcow2Job:
    def clusters() -> Iterator[tuple[int, str, Any]]:
        for guest_cluster, mapping in reader.image.iter_mappings(snapshot):  # type: ignore[attr-defined]
            if mapping.kind is ClusterKind.ZERO:
                yield guest_cluster, "zero", None
            else:
                yield guest_cluster, "data", (mapping.host_offset, guest_cluster) if share else None

    return Qcow2Job(table, reader, clusters())


class FlatSource:
    """A raw or raw-LUKS source seen as clusters of the output's size (every cluster may hold data)."""

    def __init__(self, reader: Any, cluster_size: int = DEFAULT_CLUSTER_SIZE) -> None:
        self.reader = reader
        self.size: int = reader.size
        self.cluster_size = cluster_size

    def read(self, guest_offset: int, length: int) -> bytes:
        return self.reader.read(guest_offset, length)


def _whole_disk_job(source: FlatSource) -> Qcow2Job:
    clusters = -(-source.size // source.cluster_size)
    return Qcow2Job(-1, source, ((g, "data", None) for g in range(clusters)))


def _runs_of(mappings: Iterable[tuple[int, Any]], cluster_size: int, size: int) -> Iterator[tuple[int, int]]:
    """Merge one layer's mapped clusters (guest order) into byte extents as they stream by."""
    start = end = None
    for g, _ in mappings:
        begin, finish = g * cluster_size, min((g + 1) * cluster_size, size)
        if end is not None and begin == end:
            end = finish
            continue
        if start is not None and end is not None:
            yield start, end
        start, end = begin, finish
    if start is not None and end is not None:
        yield start, end


def allocated_extents(reader: Any) -> list[tuple[int, int]]:
    """Guest byte ranges [start, end) that any layer of ``reader``'s chain maps (zero clusters included).

    Memory grows with the number of separate runs, not with the number of clusters."""
    extents: list[tuple[int, int]] = []
    layer = reader
    while isinstance(layer, QcowReader):
        extents = merge_extents(
            extents
            + list(
                _runs_of(
                    layer.image.iter_mappings(),  # type: ignore[attr-defined]
                    layer.cluster_size,
                    layer.size,
                )
            ),
            limit=reader.size,
        )
        layer = layer.backing
    if layer is not None:  # a raw (or raw LUKS) base: all of it may hold data
        extents.append((0, layer.size))
    return merge_extents(extents, limit=reader.size)


def merge_extents(extents: list[tuple[int, int]], *, limit: int) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(extents):
        end = min(end, limit)
        if start >= end:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _flatten_job(reader: QcowReader) -> Qcow2Job:
    cs = reader.cluster_size
    extents = allocated_extents(reader)

    def clusters() -> Iterator[tuple[int, str, Any]]:
        last = -1
        for start, end in extents:
            for g in range(max(start // cs, last + 1), -(-end // cs)):
                yield g, "data", None
                last = g

    return Qcow2Job(-1, reader, clusters())


def write_qcow2_job(
    job: Qcow2Job,
    writer: Any,
    opts: MigrateOptions,
    digests: Digests,
    *,
    skip_zero_data: bool,
    encrypt: EncryptFn | None = None,
) -> int:
    """Feed one table's clusters to the writer in guest order: zero runs flagged, data runs re-encrypted.

    Runs whose placement does not depend on their content (no skipping of zero data; with sharing, runs whose
    clusters are all new) are reserved here and read, decrypted, encrypted and written by forked workers
    (both cores); the rest is done here.
    """
    cs = job.reader.cluster_size
    size = job.reader.size
    fd = writer._fh.fileno()
    done = 0

    def parallel_run(guest_offset: int, length: int, host_offset: int) -> tuple[int, int, bytes]:
        plain = job.reader.read(guest_offset, length)
        padded = plain + bytes(-len(plain) % cs)
        _pwrite_fd(fd, host_offset, encrypt(padded, host_offset // SECTOR) if encrypt else padded)
        return guest_offset, length, checksum.digest(plain)

    def tasks() -> Iterator[tuple[int, int, int]]:
        nonlocal done
        for kind, first, count, keys in _kind_runs(job.clusters, max(1, opts.chunk_bytes // cs)):
            guest_offset = first * cs
            length = min(count * cs, size - guest_offset)
            done += length
            if kind == "zero":
                writer.write_zero_clusters(job.table, first, count)
                digests.add(job.table, guest_offset, bytes(length))
            elif skip_zero_data:
                _write_run_here(job, writer, digests, first, length, keys, skip_zero_data)
            elif keys[0] is None:
                yield guest_offset, length, writer.reserve_clusters(job.table, first, count)
                continue
            else:  # sharable (snapshots): new clusters go to the workers, clusters seen before are only mapped
                host_offset = writer.reserve_shareable(job.table, first, keys)
                if host_offset is not None:
                    yield guest_offset, length, host_offset
                    continue
                _write_run_here(job, writer, digests, first, length, keys, skip_zero_data)
            if opts.progress:
                opts.progress(length)

    with contextlib.closing(
        ordered_map(
            parallel_run, tasks(), workers=opts.workers, stall_seconds=opts.stall_seconds, describe=_describe_run
        )
    ) as results:
        for guest_offset, length, digest in results:
            digests.ranges.append((job.table, guest_offset, length, digest))
            if opts.progress:
                opts.progress(length)
    return done


def _write_run_here(
    job: Qcow2Job, writer: Any, digests: Digests, first: int, length: int, keys: list[Any], skip_zero_data: bool
) -> None:
    """A run whose placement depends on its content (zero skipping) or on sharing: done in this process."""
    cs = job.reader.cluster_size
    plain = job.reader.read(first * cs, length)
    if skip_zero_data:
        digests.add(job.table, first * cs, plain)  # skipped zero clusters must read back as zeros
    for g, piece in _nonzero_pieces(first, plain, cs, skip_zero_data):
        share_keys = keys[g - first : g - first + -(-len(piece) // cs)] if keys[0] is not None else None
        writer.write_clusters(job.table, g, piece, share_keys=share_keys)
        if not skip_zero_data:
            digests.add(job.table, g * cs, piece)


def _kind_runs(clusters: list[tuple[int, str, Any]], max_run: int) -> Iterator[tuple[str, int, int, list[Any]]]:
    """(kind, first guest cluster, count, share keys) for runs of consecutive clusters of one kind."""
    run: list[tuple[int, str, Any]] = []
    for item in clusters:
        if run and (item[1] != run[-1][1] or item[0] != run[-1][0] + 1 or len(run) >= max_run):
            yield run[0][1], run[0][0], len(run), [key for _, _, key in run]
            run = []
        run.append(item)
    if run:
        yield run[0][1], run[0][0], len(run), [key for _, _, key in run]


def _nonzero_pieces(first: int, plain: bytes, cs: int, skip_zero: bool) -> Iterator[tuple[int, memoryview]]:
    """Split a run into sub-runs of clusters, dropping all-zero clusters when ``skip_zero``."""
    view = memoryview(plain)
    if not skip_zero:
        yield first, view
        return
    start = None
    for i in range(-(-len(plain) // cs)):
        empty = not any(view[i * cs : (i + 1) * cs])
        if empty and start is not None:
            yield first + start, view[start * cs : i * cs]
            start = None
        elif not empty and start is None:
            start = i
    if start is not None:
        yield first + start, view[start * cs :]


# -- verification -------------------------------------------------------------------------------------------


def verify(
    output_path: str,
    passphrase: Secret | None,
    digests: Digests,
    *,
    target: str,
    snapshots: list[Snapshot],
    stall_seconds: float = DEFAULT_STALL_SECONDS,
    source: str | None = None,
    backing_passphrase: Secret | None = None,
    backing_passphrases: Mapping[str, Secret] | None = None,
    rules: ChainRules | None = None,
) -> int:
    """Read the output back through our reader; every range must hash as the source plaintext did.
    Returns the guest bytes accounted for: compared, or (snapshot ranges) shared with the active table.

    ``passphrase`` is normally the KnownMasterKey we encrypted with: the header written on disk must carry
    its digest (re-deriving the keyslot would cost another --iter-time of PBKDF2; cryptsetup's
    --test-passphrase accepting our keyslots is established by the test suite).

    With ``source`` (a qcow2 with these snapshots), a snapshot range is not decrypted again when every one of
    its clusters is shared with the active table in *both* images: the output's snapshot L2 entry points at the
    same host cluster as its active L2 entry, and the source's do too. Both then read what the active table
    reads there, which the active table's check has just compared with the source.

    A kept backing chain opens with the source's passphrases (``backing_passphrase`` and, per layer by real
    path, ``backing_passphrases``): only the output itself uses ``passphrase``."""
    if target in ("raw", "luks"):
        with open_image(output_path, passphrase, container="raw" if target == "raw" else None) as stream:
            return _check_ranges(stream.read_at, digests.ranges, -1, output_path, stall_seconds)
    layers = dict(backing_passphrases or {})
    if passphrase is not None:
        layers[os.path.realpath(output_path)] = passphrase
    opener = Opener(backing_passphrase, layers, rules)
    top = opener.open(output_path)
    try:
        compared = _check_ranges(top.read, digests.ranges, -1, output_path, stall_seconds)
        assert isinstance(top, QcowReader)
        written = top.image.snapshots()  # type: ignore[attr-defined]
        if len(written) != len(snapshots):
            raise VerificationError(f"{output_path}: snapshot count differs from the source")
        shared = _SharedWithActive(top.image, source, written)
        try:
            for table, snapshot in enumerate(written):
                snap_reader = QcowReader(top.image, top.cipher, top.iv_from_host, top.backing, snapshot)
                mine = [r for r in digests.ranges if r[0] == table]
                ranges = [r for r in mine if not shared.covers(table, r[1], r[2])]
                compared += _check_ranges(snap_reader.read, ranges, table, output_path, stall_seconds)
                compared += sum(r[2] for r in mine) - sum(r[2] for r in ranges)  # checked through the active table
        finally:
            shared.close()
    finally:
        top.close()
    return compared


class _SharedWithActive:
    """Which snapshot clusters both the output and the source share with their active table (see verify)."""

    def __init__(self, output: Any, source: str | None, written: list[Snapshot]) -> None:
        self.output = output
        self.source = None
        if source is not None and probe(source).format == "qcow2":
            self.source = QCow2Image.open(source)
            if len(self.source.snapshots()) != len(written):
                self.source.close()
                self.source = None
        self.output_l1 = [output.l1_table(snapshot) for snapshot in written]
        self.source_l1 = [self.source.l1_table(s) for s in self.source.snapshots()] if self.source else []

    def covers(self, table: int, guest_offset: int, length: int) -> bool:
        if self.source is None or length <= 0:
            return False
        cs = self.output.cluster_size
        if cs != self.source.cluster_size:
            return False
        return all(self._shared(table, g) for g in range(guest_offset // cs, -(-(guest_offset + length) // cs)))

    def _shared(self, table: int, guest_cluster: int) -> bool:
        assert self.source is not None
        if guest_cluster >= min(self.output.guest_clusters, self.source.guest_clusters):
            return False  # VM state, or beyond a smaller active disk: no active counterpart
        out_snap = self.output.map_cluster(guest_cluster, self.output_l1[table])
        out_active = self.output.map_cluster(guest_cluster)
        if out_snap.kind is not ClusterKind.NORMAL or out_snap != out_active:
            return False
        src_snap = self.source.map_cluster(guest_cluster, self.source_l1[table])
        return src_snap.kind not in (ClusterKind.ZERO, ClusterKind.UNALLOCATED) and (
            src_snap == self.source.map_cluster(guest_cluster)
        )

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


def _check_ranges(
    read: Callable[[int, int], bytes],
    ranges: list[tuple[int, int, int, bytes]],
    table: int,
    path: str,
    stall_seconds: float,
    workers: int | None = None,
) -> int:
    def digest_of(guest_offset: int, length: int, expected: bytes) -> tuple[int, int, bool]:
        return guest_offset, length, checksum.digest(read(guest_offset, length)) == expected

    mine = ((off, length, digest) for t, off, length, digest in ranges if t == table)
    compared = 0
    with contextlib.closing(
        ordered_map(digest_of, mine, workers=workers, stall_seconds=stall_seconds, describe=_describe_run)
    ) as results:
        for guest_offset, length, same in results:
            if not same:
                raise VerificationError(
                    f"{path}: guest bytes {guest_offset}..{guest_offset + length} differ "
                    "from the source after writing; the output was not kept"
                )
            compared += length
    return compared


# -- the whole migration ------------------------------------------------------------------------------------------


def migrate(source: str, opts: MigrateOptions) -> MigrateResult:
    """Migrate ``source`` as ``opts`` say. The source is never modified.

    Turns core dumps off for the calling process first (it is about to hold passphrases and master keys).
    """
    disable_core_dumps()
    source = os.fspath(source)
    try:
        return _migrate_once(source, opts)
    except BadPassphraseError as exact_error:
        if not _has_fallback(opts) or getattr(exact_error, "fallback_tried", False):
            raise
        retry = dataclasses.replace(opts, passphrase=opts.passphrase_fallback, passphrase_fallback=None)
        try:
            result = _migrate_once(source, retry)
        except BadPassphraseError as e:
            raise BadPassphraseError(f"{exact_error}; without the passphrase file's trailing newline: {e}") from None
        result.passphrase_fallback_used = True
        return result


def _migrate_once(source: str, opts: MigrateOptions) -> MigrateResult:
    timer = PhaseTimer()
    # Opened once, first, and held until the end (QEMU cannot start writing the source); every later open of
    # the source's name must reach this very file (a tenant's swap of the name fails the migration).
    try:
        source_lock = open_image_file(source)
    except (OSError, FormatError):
        plan(source, opts)  # says why the source cannot be migrated, as for any other unreadable image
        raise
    with source_lock, pinned(source, source_lock.fileno()):
        with timer("plan"):
            plan_ = plan(source, opts)
            hold_shared_locks(source_lock.fileno(), writing=False)
            refuse_if_in_use(source, fd=source_lock.fileno())  # our own locks on this fd do not count
            for layer_path in plan_.report.chain_paths:
                refuse_if_in_use(layer_path)
        return _migrate_locked(source, plan_, opts, timer, source_lock.fileno())


def _migrate_locked(source: str, plan_: Plan, opts: MigrateOptions, timer: PhaseTimer, source_fd: int) -> MigrateResult:
    verdict = None
    fallback_used = False
    chosen_by_legacy = False
    if bool(plan_.report.legacy_paths):
        with timer("passphrase check"):
            exact, fallback = opts.passphrase, opts.passphrase_fallback
            if (
                exact is not None
                and fallback is not None
                and _has_fallback(opts)
                and not _same_legacy_key(exact, fallback)
            ):
                verdict, fallback_used = check_legacy_with_fallback(source, opts)
                chosen = opts.passphrase_fallback if fallback_used else opts.passphrase
                opts = dataclasses.replace(opts, passphrase=chosen, passphrase_fallback=None)
                chosen_by_legacy = True
            else:
                try:
                    verdict = _check_legacy(source, opts.passphrase, opts, force=opts.force)
                except BadPassphraseError as e:
                    e.fallback_tried = True  # type: ignore[attr-defined]  # the same legacy key either way
                    raise
    try:
        return _convert(source, plan_, opts, timer, verdict, fallback_used, source_fd)
    except BadPassphraseError as e:
        if chosen_by_legacy:
            e.fallback_tried = True  # type: ignore[attr-defined]  # the legacy check chose: no second run
        raise


def _convert(
    source: str,
    plan_: Plan,
    opts: MigrateOptions,
    timer: PhaseTimer,
    verdict: PassphraseCheck | None,
    fallback_used: bool,
    source_fd: int,
) -> MigrateResult:
    luks_out = None
    if opts.target in ("luks", "qcow2-luks"):
        with timer("LUKS setup"):
            luks_out = build_luks_output(plan_, opts, raw_target=opts.target == "luks")
    try:
        final, data_bytes, size, (compared, recorded) = _write_verify_commit(plan_, opts, luks_out, timer, source_fd)
    finally:
        if luks_out:
            luks_out.wipe()
    original_changed = False
    if final.placement is not None:
        original_changed = final.original_kept is not None and not final.placement.original_intact()
        if not opts.keep_placement:
            final.placement.close()
            final.placement = None
    return MigrateResult(
        source=source,
        output=final.path,
        target=opts.target,
        virtual_size=size,
        data_bytes=data_bytes,
        verified=compared == recorded,
        verified_bytes=compared,
        luks=luks_out.resolve()[0].describe() if luks_out else None,
        original_kept=final.original_kept,
        original_changed=original_changed,
        snapshots=[s.name for s in plan_.snapshots],
        backing_file=plan_.keep_backing,
        plausibility=verdict.summary if verdict else None,
        passphrase_verified=verdict.verified if verdict else None,
        luks_carried_over=bool(luks_out and luks_out.carried_over),
        phase_seconds=timer.seconds,
        placement=final.placement,
        source_id=file_id(os.fstat(source_fd)),
        passphrase_fallback_used=fallback_used,
        weak_findings=new_luks_weaknesses(plan_.report, opts),
    )


def _write_verify_commit(
    plan_: Plan, opts: MigrateOptions, luks_out: LuksOutput | None, timer: PhaseTimer, source_fd: int
) -> tuple[Finalized, int, int, tuple[int, int]]:
    """Write to a temp file, read it back (verify), and only then give it its final name.
    The last item is (guest bytes verification accounted for, guest bytes written and recorded)."""
    with AtomicOutput(plan_.final_path, overwrite=opts.force, replace_source=opts.replace, source_fd=source_fd) as out:
        out.copy_ownership_from(
            os.fstat(source_fd), plaintext_from_encrypted=luks_out is None and plan_.report.encrypted_anywhere
        )
        with timer("write"):
            digests, data_bytes, size = _write(plan_, opts, luks_out, out.file)
            wait_for_sync = out.start_sync()  # the data reaches the disk while we read it back
        known_key = KnownMasterKey(luks_out.master_key) if luks_out else None
        try:
            with timer("verify"):
                compared = verify(
                    out.temp_path,
                    known_key,
                    digests,
                    target=opts.target,
                    snapshots=plan_.snapshots,
                    stall_seconds=opts.stall_seconds,
                    source=plan_.source,
                    backing_passphrase=opts.passphrase,
                    backing_passphrases=opts.layer_passphrases(),
                    rules=_output_rules(plan_, opts),
                )
        finally:
            if known_key:
                known_key.key[:] = bytes(len(known_key.key))
            with timer("sync"):  # only what the fsync still needs after the read-back
                wait_for_sync()
        if compared != digests.total_bytes:
            raise VerificationError(
                f"{plan_.final_path}: only {compared} of {digests.total_bytes} bytes were "
                "read back; the output was not kept"
            )
        with timer("commit"):
            return out.commit(), data_bytes, size, (compared, digests.total_bytes)


def _output_rules(plan_: Plan, opts: MigrateOptions) -> ChainRules:
    """The output keeps the source's backing file (which the source's rules allowed): reading it back may reach
    the source's folder, wherever the output lives."""
    rules = opts.rules or ChainRules()
    return rules.with_dirs([os.path.dirname(os.path.realpath(plan_.source))])


def _write(plan_: Plan, opts: MigrateOptions, luks_out: LuksOutput | None, out: BinaryIO) -> tuple[Digests, int, int]:
    digests = Digests()
    try:
        if opts.target in ("raw", "luks"):
            with open_image(
                plan_.source,
                opts.passphrase,
                passphrases=opts.layer_passphrases(),
                container=opts.source_format,
                rules=opts.rules,
            ) as stream:
                base = luks_out.area_bytes if luks_out else 0
                if luks_out:  # every byte will be written: a disk that is too small fails before any work
                    _check_free_space(out, base + -(-stream.size // SECTOR) * SECTOR)
                written = write_flat(
                    stream,
                    out,
                    base_offset=base,
                    encrypt=luks_out.encrypt_reusing if luks_out else None,
                    opts=opts,
                    digests=digests,
                )
                if luks_out:
                    _pwrite(out, 0, luks_out.resolve()[1])
                return digests, written, stream.size
        return digests, *_write_qcow2(plan_, opts, luks_out, out, digests)
    except OSError as e:
        raise io_error(e, "writing the output") from e


def _check_free_space(out: BinaryIO, needed_bytes: int) -> None:
    try:
        st = os.fstatvfs(out.fileno())
    except OSError:
        return
    free_bytes = st.f_bavail * st.f_frsize
    if free_bytes < needed_bytes:
        raise QcryptIOError(f"the output needs {needed_bytes} bytes but its filesystem has {free_bytes} free")


def _write_qcow2(
    plan_: Plan, opts: MigrateOptions, luks_out: LuksOutput | None, out: BinaryIO, digests: Digests
) -> tuple[int, int]:
    from qcrypt.images.qcow2_writer import ACTIVE, Qcow2Writer

    opener = Opener(opts.passphrase, opts.layer_passphrases(), opts.rules)
    reader = opener.open(plan_.source, opts.source_format)
    try:
        source = reader if isinstance(reader, QcowReader) else FlatSource(reader)
        encrypt = luks_out.encrypt if luks_out else None
        writer = Qcow2Writer(
            out,
            virtual_size=source.size,
            cluster_bits=source.cluster_size.bit_length() - 1,
            luks_area=luks_out.area if luks_out and luks_out.pending is None else None,
            luks_area_size=luks_out.area_bytes if luks_out and luks_out.pending is not None else None,
            encrypt=encrypt,
            backing_file=plan_.keep_backing,
            backing_format=plan_.backing_format,
        )
        share = bool(plan_.snapshots)
        flatten = bool(plan_.report.backing_file) and plan_.keep_backing is None
        if isinstance(source, FlatSource):
            job, skip_zero = _whole_disk_job(source), True
        elif flatten:
            job, skip_zero = _flatten_job(source), True
        else:
            job, skip_zero = _layer_job(ACTIVE, source, None, share), False
        reusing = luks_out.encrypt_reusing if luks_out else None
        done = write_qcow2_job(job, writer, opts, digests, skip_zero_data=skip_zero, encrypt=reusing)
        for table_index, snapshot in enumerate(plan_.snapshots):
            table = _add_snapshot(writer, snapshot, source.size)  # v2 entries may lack a disk size
            assert table == table_index
            assert isinstance(source, QcowReader)
            snap_reader = QcowReader(source.image, source.cipher, source.iv_from_host, source.backing, snapshot)
            done += write_qcow2_job(
                _layer_job(table, snap_reader, snapshot, True),
                writer,
                opts,
                digests,
                skip_zero_data=False,
                encrypt=reusing,
            )
            done += _copy_vm_state(snapshot, snap_reader, writer, table, digests)
        if luks_out and luks_out.pending is not None:
            writer.set_luks_area(luks_out.resolve()[1])
        writer.finish()
        return done, source.size
    finally:
        reader.close()


def vm_state_bytes(snapshot: Snapshot) -> int:
    """The saved VM state's size: the 64-bit extra field when present (formats.md A.8), else the 32-bit one."""
    extra_size = int.from_bytes(snapshot.entry[36:40], "big")
    if extra_size >= 8:
        return int.from_bytes(snapshot.entry[40:48], "big")
    return snapshot.vm_state_size


def _copy_vm_state(snapshot: Snapshot, reader: QcowReader, writer: Any, table: int, digests: Digests) -> int:
    """Copy a snapshot's saved VM state (stored after the disk, from the next L2-table boundary on)."""
    size = vm_state_bytes(snapshot)
    if not size:
        return 0
    cs = reader.cluster_size
    span = cs * reader.image.header.l2_entries  # type: ignore[attr-defined]
    disk_size = snapshot.virtual_size if snapshot.virtual_size is not None else reader.size
    source_offset = -(-disk_size // span) * span
    target_offset = writer.vm_state_guest_offset(table)
    for delta in range(0, size, CHUNK_BYTES):
        length = min(CHUNK_BYTES, size - delta)
        plain = reader.read(source_offset + delta, length)
        digests.add(table, target_offset + delta, plain)
        for g, piece in _nonzero_pieces((target_offset + delta) // cs, plain, cs, True):
            writer.write_clusters(table, g, piece)
    return size


def _add_snapshot(writer: Any, snapshot: Snapshot, disk_size: int) -> int:
    extra_size = int.from_bytes(snapshot.entry[36:40], "big")
    extra = snapshot.entry[40 : 40 + extra_size]
    return writer.add_snapshot_table(
        id=snapshot.id,
        name=snapshot.name,
        date_sec=snapshot.date_sec,
        date_nsec=snapshot.date_nsec,
        vm_clock_nsec=snapshot.vm_clock_nsec,
        vm_state_size=vm_state_bytes(snapshot),
        disk_size=snapshot.virtual_size if snapshot.virtual_size else disk_size,
        extra=extra,
    )
