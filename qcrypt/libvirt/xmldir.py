"""A folder of libvirt domain XML files for the auditor: which domains use which images
(``qcrypt scan --libvirt-xml DIR``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from qcrypt.audit.report import ImageReport
from qcrypt.errors import FormatError
from qcrypt.images.backing import ChainRules, DeclaredLayer
from qcrypt.libvirt.domainxml import LEGACY_XML_FORMATS, MAX_XML_BYTES, Domain, declared_format, parse_domain_xml
from qcrypt.libvirt.usage import domain_users


def read_domains(xml_dir: str) -> tuple[list[Domain], list[str]]:
    """Every domain XML file in ``xml_dir`` (not recursive); unparseable files are listed, not fatal."""
    domains, problems = [], []
    for name in sorted(os.listdir(xml_dir)):
        path = os.path.join(xml_dir, name)
        if not name.endswith(".xml") or not os.path.isfile(path):
            continue
        try:
            with open(path, "rb") as fh:
                domains.append(parse_domain_xml(fh.read(MAX_XML_BYTES)))
        except (OSError, FormatError) as e:
            problems.append(f"{path}: {e}")
    return domains, problems


def declared_formats(xml_dir: str, rules: ChainRules | None = None) -> tuple[dict[str, str], ChainRules]:
    """What the domain XML files in ``xml_dir`` declare: real path -> format of every local disk layer (a path
    two domains declare differently counts as raw, the reading that never parses guest data), and ``rules``
    plus every declared ``<backingStore>`` layer."""
    domains, _problems = read_domains(xml_dir)
    formats: dict[str, str] = {}
    declared: list[DeclaredLayer] = []
    for domain in domains:
        for disk in domain.disks:
            for layer in disk.layers:
                fmt = declared_format(layer)
                if not layer.path or not fmt:
                    continue
                real = os.path.realpath(layer.path)
                formats[real] = fmt if formats.get(real, fmt) == fmt else "raw"
            declared += disk.declared_backing()
    rules = rules or ChainRules()
    return formats, ChainRules(allow_dirs=rules.allow_dirs, declared=(*rules.declared, *declared))


@dataclass(frozen=True)
class MissingLegacyImage:
    """A domain's disk that declares legacy encryption on an image that does not exist."""

    domain: str
    target: str
    path: str
    encryption: str  # the <encryption format> the XML declares

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.domain, "target": self.target, "path": self.path, "encryption": self.encryption}


def annotate_reports(reports: list[ImageReport], xml_dir: str) -> list[MissingLegacyImage]:
    """Add ``domains`` to each report a domain uses (through its XML and its image's backing chain as the
    headers name it); return domains whose legacy-encrypted image is missing."""
    domains, _problems = read_domains(xml_dir)
    users = domain_users(domains)
    missing: list[MissingLegacyImage] = []
    for domain in domains:
        for disk in domain.disks:
            for layer in disk.layers:
                if not layer.path:
                    continue
                legacy = [fmt for fmt in layer.encryption if fmt in LEGACY_XML_FORMATS]
                if legacy and not os.path.exists(layer.path):
                    missing.append(MissingLegacyImage(domain.name, disk.target or "?", layer.path, legacy[0]))
    for report in reports:
        names = users.get(os.path.realpath(report.path))
        if names:
            report.domains = sorted(names)
    return missing
