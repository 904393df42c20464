"""libvirt domain XML: the typed model of a domain's disks (``<disk>``, ``<backingStore>``, ``<encryption>``)
and its parser, shared by the VM-start hook, ``scan --libvirt-xml`` and ``migrate-domain``.

References: libvirt formatdomain.rst / formatstorageencryption.rst; docs/FORMATS.md section G.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from qcrypt.errors import FormatError
from qcrypt.images.backing import ChainRules, DeclaredLayer

MAX_XML_BYTES = 16 * 1024 * 1024
MAX_BACKING_DEPTH = 64
PARSE_CHUNK_CHARS = 64 * 1024  # with a deadline, the parser is fed this much between two looks at the clock
LEGACY_XML_FORMATS = ("qcow", "default")  # libvirt's 'default' meant qcow AES for qcow/qcow2 images


@dataclass(frozen=True)
class DiskLayer:
    """One layer of a disk: index 0 is the disk's own ``<source>``, then each ``<backingStore>``."""

    source_type: str  # file | block | network | volume | dir | ...
    path: str | None  # a local file or block device to inspect; None when there is none
    label: str | None  # what to show: the path, "rbd:pool/image", "pool/volume"; None without a source
    format: str | None  # <driver type> for layer 0, <format type> for backing layers
    encryption: tuple[str, ...] = ()  # <encryption format=...> values found at this layer
    secret: str | None = None  # "uuid ..." or "usage ..." of <encryption><secret>, to find the passphrase


def declared_format(layer: DiskLayer) -> str | None:
    """The format a layer's XML declares, as qcrypt reads it: the ``<driver type>`` (or ``<format type>``),
    except "luks" for a raw layer whose ``<encryption format='luks'>`` says its content is a LUKS container.
    A declared raw layer is never parsed as an image, whatever its first bytes (the guest wrote them)."""
    fmt = (layer.format or "").strip().lower() or None
    if fmt == "raw" and "luks" in layer.encryption:
        return "luks"
    return fmt


@dataclass(frozen=True)
class DomainDisk:
    """A ``<disk>`` element: its target device, device kind and layers."""

    target: str | None
    device: str  # disk | cdrom | floppy | lun
    layers: tuple[DiskLayer, ...]

    @property
    def driver_type(self) -> str | None:
        return self.layers[0].format

    def declared_backing(self) -> tuple[DeclaredLayer, ...]:
        """The ``<backingStore>`` layers with a local path: the administrator declared them, so the chain may
        reach them (a block device included) wherever they are."""
        return tuple(
            DeclaredLayer(layer.path, declared_format(layer), layer.source_type == "block")
            for layer in self.layers[1:]
            if layer.path
        )

    def chain_rules(self, base: ChainRules | None = None) -> ChainRules:
        """``base`` (the operator's --allow-backing-dir) plus this disk's declared ``<backingStore>`` layers."""
        base = base or ChainRules()
        return ChainRules(allow_dirs=base.allow_dirs, declared=(*base.declared, *self.declared_backing()))


@dataclass(frozen=True)
class Domain:
    """The parts of a libvirt domain XML document qcrypt needs."""

    name: str
    disks: tuple[DomainDisk, ...]
    disks_skipped: int = 0  # <disk> elements left unread because a deadline passed (domain_from_root)


def _decode_xml(xml: str | bytes) -> str:
    if isinstance(xml, str):
        text = xml
    else:
        if len(xml) > MAX_XML_BYTES:
            raise FormatError(f"larger than {MAX_XML_BYTES} bytes", field="domain XML")
        encoding = "utf-16" if xml[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
        try:
            text = xml.decode(encoding)
        except UnicodeDecodeError as e:
            raise FormatError(f"not valid {encoding}: {e.reason}", field="domain XML") from e
    if not text.strip():
        raise FormatError("empty", field="domain XML")
    return text


def _refuse_declarations(text: str) -> None:
    """Refuse DTDs outright: domain XML never has one, and entities are the expansion-bomb vector."""
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise FormatError("DOCTYPE/ENTITY declarations refused (entity expansion)", field="domain XML")


def parse_domain_root(xml: str | bytes, *, deadline: float | None = None) -> ET.Element:
    """The ``<domain>`` element of a document. Raises FormatError when it is empty, malformed or has a DTD,
    or (with ``deadline``, a time.monotonic() value) when parsing it would run past the deadline."""
    text = _decode_xml(xml)
    _refuse_declarations(text)
    try:
        root = ET.fromstring(text) if deadline is None else _parse_by(text, deadline)
    except ET.ParseError as e:
        raise FormatError(f"malformed ({e})", field="domain XML") from e
    if root.tag != "domain":
        raise FormatError(f"expected a <domain> document, found <{root.tag}>", field="domain XML")
    return root


def _parse_by(text: str, deadline: float) -> ET.Element:
    """Parse ``text`` in chunks, giving up (FormatError) once ``deadline`` has passed."""
    parser = ET.XMLParser()
    for start in range(0, len(text), PARSE_CHUNK_CHARS):
        if time.monotonic() >= deadline:
            raise FormatError(
                f"not parsed within the time limit ({len(text)} characters, {start} parsed)", field="domain XML"
            )
        parser.feed(text[start : start + PARSE_CHUNK_CHARS])
    return parser.close()


def parse_snapshot_root(xml: str | bytes) -> ET.Element:
    """The ``<domainsnapshot>`` element of a snapshot document (same limits and refusals as a domain's)."""
    text = _decode_xml(xml)
    _refuse_declarations(text)
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise FormatError(f"malformed ({e})", field="snapshot XML") from e
    if root.tag != "domainsnapshot":
        raise FormatError(f"expected a <domainsnapshot> document, found <{root.tag}>", field="snapshot XML")
    return root


def parse_domain_xml(xml: str | bytes, *, deadline: float | None = None) -> Domain:
    """Parse a domain XML document. Raises FormatError when it is empty, malformed or carries a DTD, or
    when it cannot be parsed before ``deadline`` (time.monotonic()); disks left unread at the deadline are
    counted in ``disks_skipped``."""
    return domain_from_root(parse_domain_root(xml, deadline=deadline), deadline=deadline)


def domain_from_root(root: ET.Element, *, deadline: float | None = None) -> Domain:
    """The model of a parsed ``<domain>`` element (the disks read before ``deadline``, when one is given)."""
    name = (root.findtext("name") or "").strip() or "?"
    elements = [disk for devices in root.findall("devices") for disk in devices.findall("disk")]
    disks: list[DomainDisk] = []
    for element in elements:
        if deadline is not None and time.monotonic() >= deadline:
            break
        disks.append(_parse_disk(element))
    return Domain(name=name, disks=tuple(disks), disks_skipped=len(elements) - len(disks))


def _parse_disk(disk: ET.Element) -> DomainDisk:
    driver = disk.find("driver")
    target = disk.find("target")
    source = disk.find("source")
    top = _layer(disk.get("type", "file"), source, driver.get("type") if driver is not None else None, (disk, source))
    layers = [top, *_backing_layers(disk)]
    return DomainDisk(
        target=target.get("dev") if target is not None else None,
        device=disk.get("device", "disk"),
        layers=tuple(layers),
    )


def _backing_layers(disk: ET.Element) -> list[DiskLayer]:
    """Walk the nested ``<backingStore>`` elements; an empty ``<backingStore/>`` ends the chain."""
    layers: list[DiskLayer] = []
    store = disk.find("backingStore")
    while store is not None and len(layers) < MAX_BACKING_DEPTH:
        source = store.find("source")
        if source is None and store.get("type") is None:
            break
        fmt = store.find("format")
        layers.append(
            _layer(store.get("type", "file"), source, fmt.get("type") if fmt is not None else None, (store, source))
        )
        store = store.find("backingStore")
    return layers


def _layer(
    source_type: str, source: ET.Element | None, fmt: str | None, holders: tuple[ET.Element | None, ...]
) -> DiskLayer:
    path, label = _source_location(source_type, source)
    encryptions = [enc for holder in holders if holder is not None for enc in holder.findall("encryption")]
    formats = tuple(enc.get("format", "") for enc in encryptions)
    secrets = [_secret_ref(secret) for enc in encryptions for secret in enc.findall("secret")]
    return DiskLayer(
        source_type=source_type,
        path=path,
        label=label,
        format=fmt,
        encryption=formats,
        secret=next((s for s in secrets if s), None),
    )


def _secret_ref(secret: ET.Element) -> str | None:
    if secret.get("uuid"):
        return f"uuid {secret.get('uuid')}"
    return f"usage {secret.get('usage')}" if secret.get("usage") else None


def _source_location(source_type: str, source: ET.Element | None) -> tuple[str | None, str | None]:
    """(local path to inspect, label to show) of a ``<source>`` element."""
    if source is None:
        return None, None
    if source_type == "file":
        path = source.get("file") or None
        return path, path
    if source_type == "block":
        path = source.get("dev") or None
        return path, path
    if source_type == "network":
        protocol, name = source.get("protocol", "network"), source.get("name", "")
        return None, f"{protocol}:{name}"
    if source_type == "volume":
        return None, f"{source.get('pool', '?')}/{source.get('volume', '?')}"
    label = source.get("dir") or source.get("file") or source.get("dev")
    return None, label or None
