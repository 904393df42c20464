"""Which container a file is: its magic, or the format the domain XML declares for it (never probed then)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO

from qcrypt.formats import luks1 as luks1_fmt
from qcrypt.formats import qcow2 as qcow2_fmt
from qcrypt.images.qcow1_reader import QCowImage
from qcrypt.images.qcow2_reader import QCow2Image
from qcrypt.plumbing.files import open_image_file

PROBE_BYTES = 8


@dataclass
class Probe:
    """What the first bytes of a file say it is."""

    format: str  # qcow2 | qcow | luks | raw
    version: int | None = None


def probe(path: str) -> Probe:
    """Recognise the container from its magic (qcow and qcow2 share one; LUKS1/2 dispatch on version).

    Only for files nobody declared a format for: a disk the domain XML declares raw is never probed."""
    with open_image_file(path) as fh:
        return probe_file(fh)


def probe_file(fh: BinaryIO) -> Probe:
    """:func:`probe` on an open file (its position is not used)."""
    head = os.pread(fh.fileno(), PROBE_BYTES, 0)
    if head[:4] == qcow2_fmt.MAGIC and len(head) == 8:
        version = int.from_bytes(head[4:8], "big")
        return Probe("qcow" if version == 1 else "qcow2", version)
    if head[:6] == luks1_fmt.MAGIC and len(head) == 8:
        return Probe("luks", int.from_bytes(head[6:8], "big"))
    return Probe("raw")


def open_qcow_image(
    path: str, fh: BinaryIO | None = None, declared_format: str | None = None
) -> QCow2Image | QCowImage:
    """Open a qcow2 or qcow file with the right reader (raises FormatError for anything else). With ``fh``,
    that open file is used (and owned by the result); ``declared_format`` ("qcow" or "qcow2") skips probing."""
    if fh is None:
        fh = open_image_file(path)
    try:
        kind = declared_format or probe_file(fh).format
        return QCowImage(fh, path) if kind == "qcow" else QCow2Image(fh, path)
    except BaseException:
        fh.close()
        raise


QCOW_FORMATS = ("qcow", "qcow2")


def declared_container(declared_format: str | None, fh: BinaryIO) -> Probe:
    """What to read a file as: its declared format when there is one (a raw disk's content is guest data,
    never parsed as an image; "luks" = raw driver with LUKS encryption declared), else what its magic says."""
    if declared_format is None:
        return probe_file(fh)
    if declared_format in QCOW_FORMATS or declared_format == "luks":
        return Probe(declared_format)
    return Probe("raw")
