"""Writing the output: flat (raw, raw LUKS) or qcow2 (per cluster, snapshots and their tables), with streaming
digests of every guest byte written for the verification.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from qcrypt.guest.stream import GuestStream, QcowReader
from qcrypt.migrate.options import DEFAULT_CLUSTER_SIZE, EncryptFn, MigrateOptions
from qcrypt.migrate.read_back import Parameters, ReadBack
from qcrypt.model.clusters import ClusterKind, Snapshot
from qcrypt.model.units import SECTOR
from qcrypt.plumbing import checksum
from qcrypt.plumbing.direct_io import DirectWriter, aligned_buffer, fill_zero, pwrite_all
from qcrypt.plumbing.parallel import disk_bound_workers, ordered_map


def reused_buffer(length: int) -> memoryview:
    """A writable buffer of ``length`` bytes that this thread (in practice: each forked worker) reuses; page
    aligned, so that a :class:`DirectWriter` writes it past the page cache."""
    return aligned_buffer(length, "ciphertext")


def plaintext_buffer(length: int) -> memoryview:
    """This thread's reused buffer for the source plaintext of one run: reading into it touches no fresh memory
    (a fresh multi-MiB bytes object per run costs a page fault per 4 KiB, and on a VM that hands free memory
    back to its host, a host fault too)."""
    return aligned_buffer(length, "plaintext")


class Digests:
    """Streaming digests of the plaintext written, per (table, guest_offset, length) range; ``read_back``: the
    (table, guest_offset, length, host_offset) ranges already read back from the disk and compared while writing
    (LUKS outputs), with the parameters they were decrypted with; ``mapped``: the (table, guest_offset, length)
    snapshot ranges that were neither read nor written, only mapped onto clusters an earlier table wrote and read
    back at the same guest clusters (verification checks the mapping against the source's tables)."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int, int, bytes]] = []
        self.read_back: list[tuple[int, int, int, int]] = []
        self.read_back_with: Parameters | None = None
        self.mapped: list[tuple[int, int, int]] = []

    def add(self, table: int, guest_offset: int, data: bytes | memoryview) -> None:
        self.ranges.append((table, guest_offset, len(data), checksum.digest(data)))

    @property
    def total_bytes(self) -> int:
        return sum(length for _, _, length, _ in self.ranges) + sum(length for _, _, length in self.mapped)


def write_flat(
    stream: GuestStream,
    out: BinaryIO,
    *,
    base_offset: int,
    encrypt: EncryptFn | None,
    opts: MigrateOptions,
    digests: Digests,
    read_back: ReadBack | None = None,
) -> int:
    """Raw or raw-LUKS payload: every sector written (zeros encrypted too); plaintext raw stays sparse.

    Chunks are processed by forked workers (both cores) that read, decrypt, encrypt and pwrite themselves;
    ciphertext is written past the page cache where the filesystem allows (:mod:`qcrypt.plumbing.direct_io`).
    With ``read_back``, each worker reads its chunk back from the disk right after writing it and compares it
    with the source's (:mod:`qcrypt.migrate.read_back`).
    """
    padded = -(-stream.size // SECTOR) * SECTOR
    out.flush()
    writer = DirectWriter(out.fileno(), enabled=opts.direct_io and encrypt is not None)
    if read_back is not None:
        digests.read_back_with = read_back.parameters()

    def one_chunk(guest_offset: int, length: int) -> tuple[int, int, bytes, bool]:
        host_offset = base_offset + guest_offset
        if encrypt is None:
            data = stream.read_at(guest_offset, length)
            if data.count(0) != len(data):  # C speed; any() would iterate a zero chunk byte by byte
                writer.pwrite(host_offset, data)
            return guest_offset, length, checksum.digest(data + bytes(length - len(data))), False
        plain = plaintext_buffer(length)
        stream.read_into(guest_offset, plain)  # zeros past the end of the disk
        digest = checksum.digest(plain)
        writer.pwrite(host_offset, encrypt(plain, host_offset))
        if read_back is None:
            return guest_offset, length, digest, False
        read_back.check(host_offset, length, guest_offset, length, digest)
        return guest_offset, length, digest, True

    chunks = ((off, min(opts.chunk_bytes, padded - off)) for off in range(0, padded, opts.chunk_bytes))
    work = ordered_map(
        one_chunk, chunks, workers=_workers(opts, writer), stall_seconds=opts.stall_seconds, describe=describe_run
    )
    with writer, contextlib.closing(work) as results:
        for guest_offset, length, digest, checked in results:
            digests.ranges.append((-1, guest_offset, length, digest))
            if checked:
                digests.read_back.append((-1, guest_offset, length, base_offset + guest_offset))
            if opts.progress:
                opts.progress(length)
    out.truncate(base_offset + padded)
    return padded


def _workers(opts: MigrateOptions, writer: DirectWriter) -> int | None:
    """--jobs, else one per core, plus one when workers wait for direct writes."""
    if opts.workers is None and writer.direct:
        return disk_bound_workers()
    return opts.workers


def describe_run(item: tuple[Any, ...]) -> str:
    guest_offset, length = item[:2]
    return f"guest bytes {guest_offset}..{guest_offset + length}"


def describe_indexed_run(item: tuple[Any, ...]) -> str:
    return describe_run(item[1:])


TableRun = tuple[int, int, int, bytes, "int | None"]  # (table, guest_offset, length, digest, host offset read back)


def pwrite(out: BinaryIO, offset: int, data: bytes | memoryview) -> None:
    pwrite_all(out.fileno(), offset, data)


@dataclass
class Qcow2Job:
    """What the qcow2 writer gets for one table: a stream of (guest_cluster, "zero"|"data", share key), in
    guest order, and the reader to take data from (a generator: memory does not grow with the image).
    ``skip_zero_data``: data clusters that turn out to hold zeros are left unallocated (flattening a chain, a
    raw source), so their placement depends on their content and they are written by this process."""

    table: int
    reader: Any  # QcowReader of the source layer (or the whole chain when flattening)
    clusters: Iterable[tuple[int, str, Any]]
    skip_zero_data: bool = False


def layer_job(table: int, reader: QcowReader, snapshot: Snapshot | None, share: bool) -> Qcow2Job:
    def clusters() -> Iterator[tuple[int, str, Any]]:
        for guest_cluster, mapping in reader.image.iter_mappings(snapshot):
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

    def read_into(self, guest_offset: int, out: memoryview) -> None:
        self.reader.read_into(guest_offset, out)


def whole_disk_job(source: FlatSource) -> Qcow2Job:
    clusters = -(-source.size // source.cluster_size)
    return Qcow2Job(-1, source, ((g, "data", None) for g in range(clusters)), skip_zero_data=True)


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
                    layer.image.iter_mappings(),
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


def flatten_job(reader: QcowReader) -> Qcow2Job:
    cs = reader.cluster_size
    extents = allocated_extents(reader)

    def clusters() -> Iterator[tuple[int, str, Any]]:
        last = -1
        for start, end in extents:
            for g in range(max(start // cs, last + 1), -(-end // cs)):
                yield g, "data", None
                last = g

    return Qcow2Job(-1, reader, clusters(), skip_zero_data=True)


def write_qcow2_jobs(
    jobs: Sequence[Qcow2Job],
    writer: Any,
    opts: MigrateOptions,
    digests: Digests,
    *,
    encrypt: EncryptFn | None = None,
    read_back: ReadBack | None = None,
    after: Callable[[Qcow2Job], int] | None = None,
) -> int:
    """Feed each table's clusters to the writer in guest order, table after table: zero runs flagged, data runs
    re-encrypted. ``after(job)`` runs once a table's runs have all been handed out (a snapshot's VM state) and
    returns the guest bytes it wrote. Returns the guest bytes accounted for.

    Runs whose placement does not depend on their content (no skipping of zero data; with sharing, runs whose
    clusters are all new) are reserved here and read, decrypted, encrypted and written by forked workers
    (both cores), which with ``read_back`` also read each run back from the disk and compare it. One set of
    workers serves every table: their buffers are made once, and a table's first runs do not wait for the last
    runs of the one before. With ``read_back``, a snapshot's run of clusters written before is only mapped
    (``Digests.mapped``): the same source cluster at the same guest cluster holds the same plaintext, already
    read back. The rest is done here (and verified after writing).
    """
    writer._fh.flush()
    data_writer = DirectWriter(writer._fh.fileno(), enabled=opts.direct_io and encrypt is not None)
    done = 0

    if read_back is not None:
        digests.read_back_with = read_back.parameters()

    def parallel_run(index: int, guest_offset: int, length: int, host_offset: int) -> TableRun:
        job = jobs[index]  # every job's reader exists before the workers are forked
        cs = job.reader.cluster_size
        padded = plaintext_buffer(length + -length % cs)
        job.reader.read_into(guest_offset, padded[:length])
        fill_zero(padded[length:])
        data_writer.pwrite(host_offset, encrypt(padded, host_offset) if encrypt else padded)
        digest = checksum.digest(padded[:length])
        if read_back is None:
            return job.table, guest_offset, length, digest, None
        read_back.check(host_offset, len(padded), guest_offset, length, digest)
        return job.table, guest_offset, length, digest, host_offset

    def job_runs(index: int, job: Qcow2Job) -> Iterator[tuple[int, int, int, int]]:
        nonlocal done
        cs, size = job.reader.cluster_size, job.reader.size
        runs = _kind_runs(job.clusters, max(1, opts.chunk_bytes // cs))
        for kind, first, count, keys in _split_seen(runs, writer.has_shared):
            guest_offset = first * cs
            length = min(count * cs, size - guest_offset)
            done += length
            if kind == "zero":
                writer.write_zero_clusters(job.table, first, count)
                digests.add(job.table, guest_offset, bytes(length))
            elif job.skip_zero_data:
                _write_run_here(job, writer, digests, first, length, keys)
            elif keys[0] is None:
                yield index, guest_offset, length, writer.reserve_clusters(job.table, first, count)
                continue
            else:  # sharable (snapshots): new clusters go to the workers, clusters seen before are only mapped
                host_offset = writer.reserve_shareable(job.table, first, keys)
                if host_offset is not None:
                    yield index, guest_offset, length, host_offset
                    continue
                if read_back is not None and all(writer.has_shared(key) for key in keys):
                    writer.map_shared(job.table, first, keys)
                    digests.mapped.append((job.table, guest_offset, length))
                else:
                    _write_run_here(job, writer, digests, first, length, keys)
            if opts.progress:
                opts.progress(length)
        if after is not None:
            done += after(job)

    def tasks() -> Iterator[tuple[int, int, int, int]]:
        for index, job in enumerate(jobs):
            yield from job_runs(index, job)

    work = ordered_map(
        parallel_run,
        tasks(),
        workers=_workers(opts, data_writer),
        stall_seconds=opts.stall_seconds,
        describe=describe_indexed_run,
    )
    with data_writer, contextlib.closing(work) as results:
        for table, guest_offset, length, digest, checked_at in results:
            digests.ranges.append((table, guest_offset, length, digest))
            if checked_at is not None:
                digests.read_back.append((table, guest_offset, length, checked_at))
            if opts.progress:
                opts.progress(length)
    return done


def _write_run_here(job: Qcow2Job, writer: Any, digests: Digests, first: int, length: int, keys: list[Any]) -> None:
    """A run whose placement depends on its content (zero skipping) or on sharing: done in this process."""
    cs = job.reader.cluster_size
    plain = job.reader.read(first * cs, length)
    if job.skip_zero_data:
        digests.add(job.table, first * cs, plain)  # skipped zero clusters must read back as zeros
    for g, piece in nonzero_pieces(first, plain, cs, job.skip_zero_data):
        share_keys = keys[g - first : g - first + -(-len(piece) // cs)] if keys[0] is not None else None
        writer.write_clusters(job.table, g, piece, share_keys=share_keys)
        if not job.skip_zero_data:
            digests.add(job.table, g * cs, piece)


def _kind_runs(clusters: Iterable[tuple[int, str, Any]], max_run: int) -> Iterator[tuple[str, int, int, list[Any]]]:
    """(kind, first guest cluster, count, share keys) for runs of consecutive clusters of one kind."""
    run: list[tuple[int, str, Any]] = []
    for item in clusters:
        if run and (item[1] != run[-1][1] or item[0] != run[-1][0] + 1 or len(run) >= max_run):
            yield run[0][1], run[0][0], len(run), [key for _, _, key in run]
            run = []
        run.append(item)
    if run:
        yield run[0][1], run[0][0], len(run), [key for _, _, key in run]


def _split_seen(
    runs: Iterable[tuple[str, int, int, list[Any]]], seen: Callable[[Any], bool]
) -> Iterator[tuple[str, int, int, list[Any]]]:
    """Runs of sharable data split where their clusters change from new to written before (by an earlier table):
    the new parts go to the workers (and are read back there), the parts written before are only mapped, and
    each part has a digest of its own, so that verification can skip a part shared with the active table."""
    for kind, first, count, keys in runs:
        if kind != "data" or keys[0] is None:
            yield kind, first, count, keys
            continue
        start = 0
        for index in range(1, count + 1):
            if index == count or seen(keys[index]) != seen(keys[start]):
                yield kind, first + start, index - start, keys[start:index]
                start = index


def nonzero_pieces(first: int, plain: bytes, cs: int, skip_zero: bool) -> Iterator[tuple[int, memoryview]]:
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
