"""What a migration is asked to do (:class:`MigrateOptions`) and what it did (:class:`MigrateResult`)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from qcrypt.guest.stream import Secret
from qcrypt.images.backing import ChainRules
from qcrypt.model import findings as F
from qcrypt.plumbing.outputs import Placement
from qcrypt.plumbing.parallel import DEFAULT_STALL_SECONDS

TARGETS = ("luks", "qcow2-luks", "qcow2", "raw")
CHUNK_BYTES = 4 * 1024 * 1024
DEFAULT_CLUSTER_SIZE = 65536
Progress = Callable[[int], None]
# (plaintext, host offset in bytes) -> ciphertext
EncryptFn = Callable[["bytes | memoryview", int], "bytes | memoryview"]


@dataclass
class MigrateOptions:
    target: str
    output: str | None = None
    passphrase: bytes | bytearray | None = field(default=None, repr=False)
    # one layer's own passphrase, by its path (any spelling of it): QEMU takes one secret per layer. Layers not
    # named here use ``passphrase``.
    passphrases: Mapping[str, bytes | bytearray] = field(default_factory=dict, repr=False)
    new_passphrase: bytes | bytearray | None = field(default=None, repr=False)
    # Tried when ``passphrase`` opens nothing: a keyfile's content without its trailing line ending (the CLI
    # sets it when a --passphrase-file ends in one). MigrateResult.passphrase_fallback_used says which worked.
    passphrase_fallback: bytes | bytearray | None = field(default=None, repr=False)
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
    # ciphertext is written and read back past the page cache (O_DIRECT) where the filesystem allows; off: through
    # the page cache, as for plaintext (qcrypt.plumbing.direct_io says why)
    direct_io: bool = True
    keep_placement: bool = False  # the result's placement stays open (the caller undoes or closes it)
    rules: ChainRules | None = None  # where backing files may be besides the source's folder (qcrypt.images.backing)
    source_format: str | None = None  # the format the domain XML declares for the source: never probed then
    accept_unverified_passphrase: bool = False  # go on when no legacy data cluster can judge the passphrase
    accept_random_content: bool = False  # legacy plaintext that looks random is the guest's (force's check part)
    random_content_option: str = "--force"  # the option the "really random" advice names (migrate-domain's own)

    def layer_passphrases(self) -> dict[str, Secret]:
        """``passphrases`` keyed by real path, as the chain opener looks layers up."""
        return {os.path.realpath(path): secret for path, secret in self.passphrases.items()}

    def passphrase_for(self, path: str) -> bytes | bytearray | None:
        """The passphrase that unlocks the layer at ``path``."""
        return {os.path.realpath(p): s for p, s in self.passphrases.items()}.get(
            os.path.realpath(path), self.passphrase
        )


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
