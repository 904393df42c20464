"""Who uses an image file: the domains whose disks read it and the images whose backing chain names it.

A domain's disk uses the files its XML names (``<source>``, each ``<backingStore>``) and the backing chain
its image's own headers name: libvirt does not require ``<backingStore>``, and QEMU follows the header. The
header chain is the scanner's (:func:`qcrypt.audit.inspect.inspect_image`, so its rules about which backing files may be
followed apply), read only for disks whose ``<driver type>`` is an image format with a backing file (a raw
disk's content is guest data, never parsed). Used by ``scan --libvirt-xml`` (which domains use each image)
and by ``migrate-domain`` (which old images may be named in destructive advice).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from qcrypt.audit.inspect import inspect_image
from qcrypt.audit.report import ImageReport
from qcrypt.libvirt.domainxml import Domain, DomainDisk

HEADER_CHAIN_FORMATS = ("qcow2", "qcow")  # driver types whose image header may name a backing file
MAX_FOLDER_ENTRIES = 4096  # images beside an old image inspected for a backing chain naming it
Inspect = Callable[[str], ImageReport]


def _default_inspect(path: str) -> ImageReport:
    return inspect_image(path)


def disk_paths(disk: DomainDisk, inspect: Inspect = _default_inspect) -> list[str]:
    """Every local file the disk reads: the XML's layers, then its image's backing chain from the headers."""
    paths = [layer.path for layer in disk.layers if layer.path and layer.source_type in ("file", "block")]
    top = disk.layers[0]
    if top.path and top.source_type in ("file", "block") and top.format in HEADER_CHAIN_FORMATS:
        paths += inspect(top.path).chain_paths
    return list(dict.fromkeys(paths))


def domain_users(domains: Iterable[Domain], inspect: Inspect = _default_inspect) -> dict[str, set[str]]:
    """{real path: names of the domains that use it}, through the XML and the image headers."""
    users: dict[str, set[str]] = {}
    for domain in domains:
        for disk in domain.disks:
            for path in disk_paths(disk, inspect):
                users.setdefault(os.path.realpath(path), set()).add(domain.name)
    return users


@dataclass
class FolderUsers:
    """Images in a folder whose backing chain names a file; ``incomplete`` when not every entry was read."""

    users: dict[str, set[str]] = field(default_factory=dict)  # real path -> paths of the images using it
    incomplete: list[str] = field(default_factory=list)  # folders with more entries than were inspected


def raw_disk_paths(domains: Iterable[Domain]) -> set[str]:
    """Real paths of the files domains use as raw disks: guest data, never read as an image."""
    return {
        os.path.realpath(str(disk.layers[0].path))
        for domain in domains
        for disk in domain.disks
        if disk.layers[0].path and disk.layers[0].source_type == "file" and disk.driver_type == "raw"
    }


def folder_users(
    folders: Iterable[str], inspect: Inspect = _default_inspect, *, skip: set[str] | frozenset[str] = frozenset()
) -> FolderUsers:
    """For the regular files directly in ``folders`` (symlinks not followed; the real paths in ``skip``, raw
    disks, left out), the files their backing chains name. A folder with more than MAX_FOLDER_ENTRIES entries
    is listed as incomplete."""
    found = FolderUsers()
    for folder in dict.fromkeys(folders):
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            found.incomplete.append(folder)
            continue
        if len(entries) > MAX_FOLDER_ENTRIES:
            found.incomplete.append(folder)
            entries = entries[:MAX_FOLDER_ENTRIES]
        for entry in entries:
            try:
                if not stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                    continue
            except OSError:
                continue
            if os.path.realpath(entry.path) in skip:
                continue
            for path in inspect(entry.path).chain_paths:
                found.users.setdefault(os.path.realpath(path), set()).add(entry.path)
    return found
