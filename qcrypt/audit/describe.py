"""Everything ``qcrypt info`` shows about one image: the scan report plus layout details."""

from __future__ import annotations

import os

import numpy as np

from qcrypt.audit.inspect import build_report, inspect_one, walk_chain
from qcrypt.audit.report import ImageDetails, ImageReport
from qcrypt.errors import LimitExceededError, QcryptError
from qcrypt.images.backing import ChainRules
from qcrypt.images.probe import QCOW_FORMATS, open_qcow_image, probe
from qcrypt.images.qcow1_reader import QCowImage
from qcrypt.images.qcow2_reader import QCow2Image
from qcrypt.images.walk import WalkBudget
from qcrypt.model import findings as F
from qcrypt.model.clusters import Snapshot
from qcrypt.model.encryption import Encryption
from qcrypt.plumbing.files import ImageFile


def _add_compressed_finding(
    report: ImageDetails, image: ImageFile, snapshots: list[Snapshot], budget: WalkBudget
) -> None:
    """Legacy AES images keep compressed clusters in plaintext (docs/FORMATS.md B.1): count them, snapshots too."""
    at_least = False
    if isinstance(image, QCowImage):
        usage = image.table_usage(budget)
        count, at_least = len(usage.compressed_offsets), usage.compressed_truncated
    else:
        assert isinstance(image, QCow2Image)
        tables = [None, *snapshots]
        usages = [image.table_usage(table, budget) for table in tables]
        count = len(np.unique(np.concatenate([u.compressed_offsets for u in usages])))
        at_least = any(u.compressed_truncated for u in usages)
    if count:
        report.add(F.legacy_compressed_plaintext(count, at_least=at_least))


def allocated_bytes_of(path: str) -> int | None:
    """Guest bytes backed by data in ``path``'s own active table (not its chain), within the inspection budget:
    the progress and time estimates of migrate and migrate-domain. None when it cannot be counted cheaply."""
    try:
        if probe(path).format not in QCOW_FORMATS:
            return None
        with open_qcow_image(path) as image:
            return image.allocated_bytes(WalkBudget())
    except (QcryptError, OSError):
        return None


def allocated_estimate(report: ImageReport, *, flatten: bool = False) -> int | None:
    """Guest bytes a migration of the image will process, for progress, time and free-space estimates: the
    allocated data of the image's own tables (and, ``flatten``, of every chain layer's), at most its virtual
    size; a raw image's virtual size. None when it cannot be counted cheaply (see :func:`allocated_bytes_of`)."""
    if report.format not in QCOW_FORMATS:
        return report.virtual_size
    total = 0
    for path in [report.path, *(report.chain_paths if flatten else [])]:
        allocated = allocated_bytes_of(path)  # each layer's own tables, within the inspection budget
        if allocated is None:
            return None
        total += allocated
    return min(total, report.virtual_size) if report.virtual_size else total


def describe(path: str | os.PathLike[str], *, rules: ChainRules | None = None) -> ImageDetails:
    """Everything ``qcrypt info`` shows: the scan report plus layout details. Raises FormatError if unparseable."""
    path = os.fspath(path)
    info = inspect_one(path, rules=rules)
    if info.error:
        raise build_report(info, [], []).error_to_raise()
    chain, chain_findings = walk_chain(info)
    report = ImageDetails(
        **vars(build_report(info, chain, chain_findings)),
        cluster_size=info.cluster_size,
        backing_format=info.backing_format,
        features=info.features,
        luks=info.luks,
    )
    if info.format in QCOW_FORMATS:
        with open_qcow_image(path) as image:
            report.snapshots = [s.describe() for s in info.snapshots]
            budget = WalkBudget()
            try:
                report.allocated_bytes = image.allocated_bytes(budget)
                if info.encryption is Encryption.LEGACY_AES:
                    _add_compressed_finding(report, image, info.snapshots, budget)
            except LimitExceededError as e:  # the header was fine: only the layout is too big to count here
                report.add(F.limit_exceeded(f"{e}; allocated bytes and compressed clusters were not (fully) counted"))
    return report
