"""The declared interface of an image reader: what the guest streams, the auditor and the migration may ask of
a qcow2 or qcow file (:class:`qcrypt.images.qcow2_reader.QCow2Image`, :class:`qcrypt.images.qcow1_reader.QCowImage`).

Only the surface both formats share is here; what only qcow2 has (snapshot tables, extended L2 entries, the
LUKS header extension) is asked of :class:`QCow2Image` after an ``isinstance`` check.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO, Protocol

if TYPE_CHECKING:
    from qcrypt.images.walk import WalkBudget
    from qcrypt.model.clusters import ClusterMapping, Snapshot


class QcowHeaderFields(Protocol):
    """The header fields every qcow version has."""

    @property
    def version(self) -> int: ...

    @property
    def crypt_method(self) -> int: ...


class QcowImageReader(Protocol):
    """A qcow2 or qcow image opened for reading (a context manager; closing it closes its file)."""

    path: str
    fh: BinaryIO
    file_size: int  # bytes
    format_name: str
    backing_file: str | None

    @property
    def header(self) -> QcowHeaderFields: ...

    @property
    def backing_format(self) -> str | None: ...

    @property
    def virtual_size(self) -> int: ...  # bytes

    @property
    def cluster_size(self) -> int: ...  # bytes

    def check_readable(self) -> None: ...

    def map_cluster(self, guest_cluster: int) -> ClusterMapping: ...

    def iter_mappings(self, snapshot: Snapshot | None = None) -> Iterator[tuple[int, ClusterMapping]]: ...

    def snapshots(self) -> list[Snapshot]: ...

    def read_host(self, host_offset: int, length: int) -> bytes: ...

    def read_host_transient(self, host_offset: int, length: int) -> bytes | memoryview: ...

    def read_host_into(self, host_offset: int, out: memoryview) -> None: ...

    def use_direct_reads(self) -> None: ...

    def allocated_bytes(self, budget: WalkBudget | None = None) -> int: ...

    def crypto_header(self) -> tuple[int, int] | None: ...

    def close(self) -> None: ...
