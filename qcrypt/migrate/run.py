"""``migrate``: legacy AES (or any readable) image -> raw LUKS1, qcow2-LUKS, qcow2 or raw; LUKS <-> LUKS.

Safety model (docs/GUIDE.md, "Migrating"): the source is only read (and locked against QEMU writers while we
read); the output is written to a temporary file beside its final name, fsynced, read back through our own
reader and compared with the source by streaming digests, and only then renamed into place. Any error or
interruption removes the temporary file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, BinaryIO

from qcrypt.crypto.secret import disable_core_dumps
from qcrypt.crypto.secret import wipe as wipe_secret
from qcrypt.errors import (
    BadPassphraseError,
    FormatError,
    QcryptIOError,
    VerificationError,
)
from qcrypt.guest.stream import KnownMasterKey, Opener, QcowReader, open_image
from qcrypt.images.backing import ChainRules
from qcrypt.images.qcow2_reader import QCow2Image
from qcrypt.migrate.luks_output import LuksOutput, build_luks_output
from qcrypt.migrate.options import CHUNK_BYTES, MigrateOptions, MigrateResult, PhaseTimer
from qcrypt.migrate.passphrase_check import (
    PassphraseCheck,
    check_legacy,
    check_legacy_with_fallback,
    has_fallback,
    same_legacy_key,
)
from qcrypt.migrate.plan import Plan, new_luks_weaknesses, plan
from qcrypt.migrate.read_back import ReadBack
from qcrypt.migrate.verification import verify
from qcrypt.migrate.writing import (
    Digests,
    FlatSource,
    Qcow2Job,
    flatten_job,
    layer_job,
    nonzero_pieces,
    pwrite,
    whole_disk_job,
    write_flat,
    write_qcow2_jobs,
)
from qcrypt.model.clusters import Snapshot
from qcrypt.model.units import SECTOR
from qcrypt.plumbing.files import open_image_file, pinned
from qcrypt.plumbing.locking import hold_shared_locks, refuse_if_in_use
from qcrypt.plumbing.outputs import AtomicOutput, Finalized, file_id, io_error


def migrate(source: str, opts: MigrateOptions) -> MigrateResult:
    """Migrate ``source`` as ``opts`` say. The source is never modified.

    Turns core dumps off for the calling process first (it is about to hold passphrases and master keys).
    """
    disable_core_dumps()
    source = os.fspath(source)
    try:
        return _migrate_once(source, opts)
    except BadPassphraseError as exact_error:
        if not has_fallback(opts) or getattr(exact_error, "fallback_tried", False):
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
                and has_fallback(opts)
                and not same_legacy_key(exact, fallback)
            ):
                verdict, fallback_used = check_legacy_with_fallback(source, opts)
                chosen = opts.passphrase_fallback if fallback_used else opts.passphrase
                opts = dataclasses.replace(opts, passphrase=chosen, passphrase_fallback=None)
                chosen_by_legacy = True
            else:
                try:
                    verdict = check_legacy(source, opts.passphrase, opts, force=opts.force)
                except BadPassphraseError as e:
                    e.fallback_tried = True  # the same legacy key either way
                    raise
    try:
        return _convert(source, plan_, opts, timer, verdict, fallback_used, source_fd)
    except BadPassphraseError as e:
        if chosen_by_legacy:
            e.fallback_tried = True  # the legacy check chose: no second run
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
            digests, data_bytes, size = _write(plan_, opts, luks_out, out.file, out.temp_path)
            wait_for_sync = out.start_sync()  # the data reaches the disk while we read it back
        known_key = KnownMasterKey(luks_out.master_key, proven_by=luks_out.header) if luks_out else None
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
                    direct_io=opts.direct_io,
                )
        finally:
            if known_key:
                wipe_secret(known_key.key)
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


def _write(
    plan_: Plan, opts: MigrateOptions, luks_out: LuksOutput | None, out: BinaryIO, out_path: str
) -> tuple[Digests, int, int]:
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
                with _read_back(luks_out, out, out_path, opts) as read_back:
                    written = write_flat(
                        stream,
                        out,
                        base_offset=base,
                        encrypt=luks_out.encrypt_reusing if luks_out else None,
                        opts=opts,
                        digests=digests,
                        read_back=read_back,
                    )
                if luks_out:
                    pwrite(out, 0, luks_out.resolve()[1])
                return digests, written, stream.size
        return digests, *_write_qcow2(plan_, opts, luks_out, out, out_path, digests)
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
    plan_: Plan, opts: MigrateOptions, luks_out: LuksOutput | None, out: BinaryIO, out_path: str, digests: Digests
) -> tuple[int, int]:
    from qcrypt.images.qcow2_writer import ACTIVE, Qcow2Writer

    opener = Opener(opts.passphrase, opts.layer_passphrases(), opts.rules)
    with (
        _read_back(luks_out, out, out_path, opts) as read_back,
        contextlib.closing(opener.open(plan_.source, opts.source_format)) as reader,
    ):
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
            jobs = [whole_disk_job(source)]
        elif flatten:
            jobs = [flatten_job(source)]
        else:
            jobs = [layer_job(ACTIVE, source, None, share)]
        snapshots: dict[int, tuple[Snapshot, QcowReader]] = {}
        for table_index, snapshot in enumerate(plan_.snapshots):
            table = _add_snapshot(writer, snapshot, source.size)  # v2 entries may lack a disk size
            assert table == table_index and isinstance(source, QcowReader)
            snap_reader = QcowReader(source.image, source.encryption, source.backing, snapshot)
            snapshots[table] = snapshot, snap_reader
            jobs.append(layer_job(table, snap_reader, snapshot, True))

        def vm_state(job: Qcow2Job) -> int:  # a snapshot's saved VM state, once its disk runs are handed out
            if job.table not in snapshots:
                return 0
            snapshot, snap_reader = snapshots[job.table]
            return _copy_vm_state(snapshot, snap_reader, writer, job.table, digests)

        reusing = luks_out.encrypt_reusing if luks_out else None
        done = write_qcow2_jobs(jobs, writer, opts, digests, encrypt=reusing, read_back=read_back, after=vm_state)
        if luks_out and luks_out.pending is not None:
            writer.set_luks_area(luks_out.resolve()[1])
        writer.finish()
        return done, source.size


def _read_back(
    luks_out: LuksOutput | None, out: BinaryIO, out_path: str, opts: MigrateOptions
) -> ReadBack | contextlib.nullcontext[None]:
    """LUKS data is read back by the workers that write it (qcrypt.migrate.read_back); nothing else is."""
    if luks_out is None:
        return contextlib.nullcontext()
    return luks_out.read_back(out.fileno(), out_path, direct_io=opts.direct_io)


def vm_state_bytes(snapshot: Snapshot) -> int:
    """The saved VM state's size: the 64-bit extra field when present (docs/FORMATS.md A.8), else the 32-bit one."""
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
    assert isinstance(reader.image, QCow2Image)  # only qcow2 has internal snapshots
    span = cs * reader.image.header.l2_entries
    disk_size = snapshot.virtual_size if snapshot.virtual_size is not None else reader.size
    source_offset = -(-disk_size // span) * span
    target_offset = writer.vm_state_guest_offset(table)
    for delta in range(0, size, CHUNK_BYTES):
        length = min(CHUNK_BYTES, size - delta)
        plain = reader.read(source_offset + delta, length)
        digests.add(table, target_offset + delta, plain)
        for g, piece in nonzero_pieces((target_offset + delta) // cs, plain, cs, True):
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
