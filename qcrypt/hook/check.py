"""Warn-only checks for VM launchers: which disks of a domain use legacy QEMU AES encryption, and the fix.

Three entry points:

* :func:`check_domain_xml` reads a libvirt domain XML document (the text libvirt feeds a qemu hook on
  stdin), inspects every local disk source, its ``<backingStore>`` chain and the images' own backing chains
  (headers only, no passphrase), and returns one :class:`HookWarning` per affected disk. It never raises and
  honours a time budget, because libvirt waits for the hook synchronously.
* :func:`emit` sends a check's warnings to syslog (ident ``qcrypt-hook``, facility daemon, priority warning)
  and to a caller-supplied stderr writer. The syslog sink is the module attribute :data:`syslog_sink` (or a
  parameter), so tests and embedders can collect the lines instead.
* :func:`warn_if_legacy` is the Python API for launchers: it issues a :class:`LegacyEncryptionWarning` when an
  image or its backing chain holds legacy encryption.

What the hook cannot see: libvirt >= 9.0 refuses a domain whose XML says ``<encryption format='qcow'>``
("old qcow/qcow2 encryption is not supported") before it calls any hook, so such domains never reach us;
``qcrypt scan --libvirt-xml /etc/libvirt/qemu`` and ``qcrypt migrate-domain`` find and fix them. The hook
does see legacy images that the XML does not declare (QEMU then refuses them itself).

References: libvirt docs/hooks.rst and src/util/virhook.c (argv, stdin, exit-code consequences);
formatdomain.rst / formatstorageencryption.rst (``<disk>``, ``<backingStore>``, ``<encryption>``);
docs/FORMATS.md section G and pitfalls 23-24.
"""

from __future__ import annotations

import os
import shlex
import syslog
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from qcrypt.errors import FormatError
from qcrypt.images.backing import ChainRules
from qcrypt.libvirt.domainxml import (
    LEGACY_XML_FORMATS,
    DiskLayer,
    Domain,
    DomainDisk,
    declared_format,
    parse_domain_xml,
)
from qcrypt.migrate.naming import suggested_output
from qcrypt.model import findings as F
from qcrypt.model.encryption import Encryption
from qcrypt.plumbing import syslog as syslog_line
from qcrypt.plumbing.syslog import SYSLOG_SOCKET, printable, syslog_listening  # noqa: F401 - hook users' names

if TYPE_CHECKING:
    from qcrypt.audit.report import ChainLayer, ImageReport

InspectFn = Callable[[str], "ImageReport"]
SyslogSink = Callable[[int, str], None]
LineSink = Callable[[str], None]

DEFAULT_BUDGET_S = 0.5  # seconds of image reads
RUN_BUDGET_S = 1.0  # seconds for the whole check: parsing the XML, reading images, deciding (plus logging)
MAX_LOG_LINES = 20  # lines one run sends to syslog (and stderr); one more says how many were left out
SYSLOG_IDENT = "qcrypt-hook"
STDERR_PREFIX = "qcrypt-hook: "
PASSPHRASE_PLACEHOLDER = "PASSPHRASE_FILE"
# libvirt qemu operations the hook acts on: "prepare" runs once before every QEMU start (a plain start, a restore,
# an incoming migration); "start", "migrate" and "restore" come with the same XML and would repeat each warning
HOOK_OPERATIONS = ("prepare",)
LEGACY_TEXT = "legacy QEMU AES encryption (qcow/qcow2 crypt_method 1), which current QEMU refuses to open"
_MAX_LISTED_PATHS = 3
CHECK_COMMAND = "qcrypt info "  # the advice for a backing file qcrypt refused to follow


class LegacyEncryptionWarning(UserWarning):
    """An image (or a layer of its backing chain) uses legacy qcow/qcow2 AES encryption.

    A ``UserWarning`` subclass, so Python shows it by default. Issued by :func:`warn_if_legacy`.
    """


# -- what the hook reports ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HookWarning:
    """One affected disk: where it is, why it matters and the commands that fix it."""

    domain: str
    target: str
    path: str
    reason: str
    command: str  # the fix of this disk alone (qcrypt migrate ..., or virsh edit when only the XML is wrong)
    domain_command: str | None = None  # qcrypt migrate-domain DOMAIN: fixes every disk and the XML at once

    def as_dict(self) -> dict[str, str | None]:
        return {
            "domain": self.domain,
            "target": self.target,
            "path": self.path,
            "reason": self.reason,
            "command": self.command,
            "domain_command": self.domain_command,
        }

    def message(self) -> str:
        """The one-line text sent to syslog and stderr (control characters escaped)."""
        if self.command.startswith("virsh "):
            fix = f"Fix: {self.command}"
        elif self.command.startswith(CHECK_COMMAND):
            fix = f"Check it: {self.command}"
        elif self.domain_command:
            fix = f"Fix it with the VM shut off: {self.domain_command} (or this disk alone: {self.command})"
        else:
            fix = f"Fix it with the VM shut off: {self.command}"
        text = f"domain '{self.domain}' disk {self.target} ({self.path}): {self.reason}. {fix}"
        return printable(text)


@dataclass
class DomainCheck:
    """The outcome of checking one domain: warnings, plus notes and errors worth a log line."""

    domain: str | None
    warnings: list[HookWarning] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cut_short: bool = False
    elapsed_s: float = 0.0


# -- inspection within a time budget --------------------------------------------------------------------


def _default_inspect(path: str) -> ImageReport:
    from qcrypt.audit.inspect import inspect_image

    return inspect_image(path)


def _norm(path: str) -> str:
    return os.path.normpath(path)


@dataclass
class _Inspections:
    """Reports gathered by the worker thread; ``covered`` holds paths already seen in a backing chain."""

    reports: dict[str, ImageReport] = field(default_factory=dict)
    covered: dict[str, ChainLayer] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, path: str, report: ImageReport) -> None:
        with self.lock:
            self.reports[_norm(path)] = report
            for layer in report.backing_chain:
                if layer.path:
                    self.covered.setdefault(_norm(layer.path), layer)

    def snapshot(self) -> _Inspections:
        with self.lock:
            return _Inspections(dict(self.reports), dict(self.covered), list(self.failures))

    def report(self, path: str | None) -> ImageReport | None:
        return self.reports.get(_norm(path)) if path else None

    def encryption(self, path: str | None) -> Encryption | None:
        """The encryption of ``path`` if it was inspected, directly or as a backing layer."""
        if not path:
            return None
        found = self.reports.get(_norm(path)) or self.covered.get(_norm(path))
        return found.encryption if found else None


def _inspect_worker(
    paths: list[str], inspect_fn: InspectFn, deadline: float, found: _Inspections, done: threading.Event
) -> None:
    try:
        for path in paths:
            if time.monotonic() >= deadline:
                break
            with found.lock:
                seen = _norm(path) in found.reports or _norm(path) in found.covered
            if seen:
                continue
            try:
                found.add(path, inspect_fn(path))
            except Exception as e:  # inspect never raises by contract; a bug must not stop the others
                with found.lock:
                    found.failures.append(f"{path}: internal error while inspecting: {type(e).__name__}: {e}")
    finally:
        done.set()


def inspect_within(paths: list[str], inspect_fn: InspectFn, budget_s: float) -> tuple[_Inspections, list[str]]:
    """Inspect ``paths`` in a daemon thread for at most ``budget_s`` seconds (a hung read cannot hold us).

    Returns what was gathered and the paths left uninspected.
    """
    found = _Inspections()
    done = threading.Event()
    deadline = time.monotonic() + budget_s
    worker = threading.Thread(
        target=_inspect_worker, args=(paths, inspect_fn, deadline, found, done), name="qcrypt-hook-inspect", daemon=True
    )
    worker.start()
    done.wait(timeout=max(0.0, deadline - time.monotonic()))
    result = found.snapshot()
    missed = [p for p in paths if _norm(p) not in result.reports and _norm(p) not in result.covered]
    return result, missed


# -- deciding what to say ---------------------------------------------------------------------------------


def _codes(report: ImageReport | None) -> set[str]:
    return report.codes if report else set()


def _first_legacy_layer(report: ImageReport) -> str:
    for layer in report.backing_chain:
        if layer.encryption is Encryption.LEGACY_AES:
            return layer.path
    return "a backing layer"


def migrate_domain_command(domain: str, *, needs_passphrase: bool = False) -> str:
    """The ``qcrypt migrate-domain`` command line that fixes every disk of ``domain`` and its XML;
    ``needs_passphrase``: a disk names no libvirt secret, so the passphrase must be given."""
    command = f"qcrypt migrate-domain {shlex.quote(domain)}"
    return f"{command} --passphrase-file {PASSPHRASE_PLACEHOLDER}" if needs_passphrase else command


def migrate_command(path: str, *, to: str = "qcow2-luks", flatten: bool = False, block: bool = False) -> str:
    """The ``qcrypt migrate`` command line that replaces ``path`` by a LUKS-encrypted copy."""
    output = suggested_output(path, to, local_dir=block)
    words = [
        "qcrypt",
        "migrate",
        shlex.quote(path),
        "--to",
        to,
        "-o",
        shlex.quote(output),
        "--passphrase-file",
        PASSPHRASE_PLACEHOLDER,
    ]
    if flatten:
        words.append("--flatten")
    return " ".join(words)


@dataclass
class _Verdict:
    reasons: list[str] = field(default_factory=list)
    flatten: bool = False
    xml_only: bool = False  # the image is fine (LUKS); only the XML still says qcow
    refused: bool = False  # a backing file broke the chain rules: look before migrating anything


def _refused_reasons(report: ImageReport | None, verdict: _Verdict) -> None:
    for finding in report.findings if report else ():
        if finding.code in F.BACKING_REFUSED:
            verdict.reasons.append(finding.message)
            verdict.refused = True


def _image_reasons(report: ImageReport | None, verdict: _Verdict) -> None:
    codes = _codes(report)
    if report and F.LEGACY_AES in codes:
        verdict.reasons.append(f"the image uses {LEGACY_TEXT}")
    if report and F.LEGACY_AES_BACKING in codes:
        verdict.reasons.append(f"its backing file {_first_legacy_layer(report)} uses {LEGACY_TEXT}")
        verdict.flatten = True


def _backing_store_reasons(disk: DomainDisk, found: _Inspections, verdict: _Verdict, mentioned: set[str]) -> None:
    for layer in disk.layers[1:]:
        encryption = found.encryption(layer.path)
        declared = [
            f for f in layer.encryption if f == "qcow" or (f == "default" and not (encryption and encryption.is_luks))
        ]
        label = layer.label or "a <backingStore> layer"
        key = _norm(label)
        if key in mentioned:
            verdict.flatten = verdict.flatten or bool(declared) or encryption is Encryption.LEGACY_AES
            continue
        if encryption is Encryption.LEGACY_AES:
            verdict.reasons.append(f"its backing layer {label} uses {LEGACY_TEXT}")
        elif declared:
            verdict.reasons.append(
                f"its backing layer {label} is declared <encryption format='{declared[0]}'> (legacy QEMU AES)"
            )
        else:
            continue
        mentioned.add(key)
        verdict.flatten = True


def _declared_reasons(top: DiskLayer, report: ImageReport | None, verdict: _Verdict) -> None:
    if F.LEGACY_AES in _codes(report):
        return  # already said, from the image itself
    encryption = report.encryption if report else None
    for fmt in dict.fromkeys(top.encryption):
        if fmt not in LEGACY_XML_FORMATS:
            continue
        if encryption and encryption.is_luks:
            if fmt == "qcow":
                verdict.reasons.append(
                    f"the domain XML declares <encryption format='qcow'> but the image is "
                    f"{encryption}: change it to <encryption format='luks'>"
                )
                verdict.xml_only = True
            continue
        verdict.reasons.append(f"the domain XML declares <encryption format='{fmt}'> (legacy QEMU AES)")


def _disk_warning(domain: str, disk: DomainDisk, found: _Inspections) -> HookWarning | None:
    top = disk.layers[0]
    report = found.report(top.path)
    verdict = _Verdict()
    _refused_reasons(report, verdict)
    _image_reasons(report, verdict)
    mentioned = {_norm(_first_legacy_layer(report))} if report and verdict.flatten else set()
    _backing_store_reasons(disk, found, verdict, mentioned)
    _declared_reasons(top, report, verdict)
    if not verdict.reasons:
        return None
    reason = "; ".join(verdict.reasons)
    if top.secret:
        reason += f" (passphrase: libvirt secret {top.secret})"
    command = _fix_command(domain, disk, verdict)
    local = bool(top.path) and top.source_type in ("file", "block") and not verdict.refused
    return HookWarning(
        domain=domain,
        target=disk.target or "?",
        path=top.label or "(no source)",
        reason=reason,
        command=command,
        domain_command=migrate_domain_command(domain) if local and domain != "?" else None,
    )


def _fix_command(domain: str, disk: DomainDisk, verdict: _Verdict) -> str:
    top = disk.layers[0]
    if verdict.refused and top.path:  # migrate refuses this chain: the operator looks first
        return CHECK_COMMAND + shlex.quote(top.path)
    if verdict.xml_only and not verdict.flatten and len(verdict.reasons) == 1:
        return f"virsh edit {shlex.quote(domain)}"
    to = "luks" if disk.driver_type == "raw" else "qcow2-luks"
    if top.path:
        return migrate_command(top.path, to=to, flatten=verdict.flatten, block=top.source_type == "block")
    local = "LOCAL_COPY_OF_THE_IMAGE"
    command = migrate_command(local, to=to, flatten=verdict.flatten)
    return f"copy {top.label or 'the image'} to a local file, then: {command}"


def _local_paths(domain: Domain) -> list[str]:
    """Every local path once: all disks' own sources first, then their ``<backingStore>`` layers."""
    tops = [d.layers[0].path for d in domain.disks]
    backing = [layer.path for d in domain.disks for layer in d.layers[1:]]
    return list(dict.fromkeys(p for p in [*tops, *backing] if p))


def declared_inspect(domain: Domain, rules: ChainRules | None = None) -> InspectFn:
    """The hook's inspection: each disk layer is read as the format its XML declares (a raw disk is never
    parsed as an image, whatever the guest wrote in it), and backing chains reach only the image's folder,
    ``rules`` and the layers the disk's ``<backingStore>`` declares."""
    from qcrypt.audit.inspect import inspect_image as inspect

    plans: dict[str, tuple[str | None, ChainRules]] = {}
    for disk in domain.disks:
        disk_rules = disk.chain_rules(rules)
        for layer in disk.layers:
            if not layer.path:
                continue
            fmt = declared_format(layer)
            known = plans.get(_norm(layer.path))
            if known is None or (fmt == "raw" and known[0] != "raw"):
                plans[_norm(layer.path)] = (fmt, disk_rules)

    def inspect_declared(path: str) -> ImageReport:
        fmt, disk_rules = plans.get(_norm(path), (None, rules or ChainRules()))
        return inspect(path, rules=disk_rules, declared_format=fmt)

    return inspect_declared


def check_domain(
    domain: Domain,
    *,
    budget_s: float = DEFAULT_BUDGET_S,
    inspect_fn: InspectFn | None = None,
    rules: ChainRules | None = None,
    deadline: float | None = None,
) -> DomainCheck:
    """Inspect a parsed domain's disks within ``budget_s`` seconds; one warning per affected disk.

    By default each disk is read as its XML declares it (see :func:`declared_inspect`); ``rules`` adds folders
    backing files may be in. ``deadline`` (time.monotonic()) bounds the whole check: image reads stop there at
    the latest, and so does deciding about the disks (the disks left are counted in a note)."""
    started = time.monotonic()
    if deadline is None:
        deadline = started + RUN_BUDGET_S
    if inspect_fn is None:
        import qcrypt.audit.inspect  # noqa: F401 - loaded before the clock starts: the budget is for reading images
    budget_s = max(0.0, min(budget_s, deadline - time.monotonic()))
    found, missed = inspect_within(_local_paths(domain), inspect_fn or declared_inspect(domain, rules), budget_s)
    check = DomainCheck(domain=domain.name, errors=list(found.failures))
    seen: set[tuple[str, str]] = set()
    unchecked = domain.disks_skipped
    secretless = False  # an affected disk names no libvirt secret: migrate-domain needs the passphrase given
    for index, disk in enumerate(domain.disks):
        if time.monotonic() >= deadline:
            unchecked += len(domain.disks) - index
            break
        warning = _disk_warning(domain.name, disk, found)
        if warning and (warning.target, warning.path) not in seen:
            seen.add((warning.target, warning.path))
            check.warnings.append(warning)
            secretless |= warning.domain_command is not None and not any(layer.secret for layer in disk.layers)
    if secretless:
        command = migrate_domain_command(domain.name, needs_passphrase=True)
        check.warnings = [replace(w, domain_command=command) if w.domain_command else w for w in check.warnings]
    if unchecked:
        check.cut_short = True
        check.notes.append(
            f"domain '{domain.name}': {unchecked} of {len(domain.disks) + domain.disks_skipped} "
            f"disk(s) not checked: the hook's time limit ({RUN_BUDGET_S:g} s) was reached"
        )
    if missed:
        check.cut_short = True
        listed = ", ".join(missed[:_MAX_LISTED_PATHS]) + (", ..." if len(missed) > _MAX_LISTED_PATHS else "")
        check.notes.append(
            f"domain '{domain.name}': check cut short after {budget_s * 1000:.0f} ms; "
            f"{len(missed)} image(s) not inspected: {listed}"
        )
    check.elapsed_s = time.monotonic() - started
    return check


def check_domain_xml(
    xml: str | bytes,
    *,
    budget_s: float = DEFAULT_BUDGET_S,
    inspect_fn: InspectFn | None = None,
    rules: ChainRules | None = None,
    deadline: float | None = None,
) -> DomainCheck:
    """Parse and check a domain XML document. Never raises: problems land in ``errors``.

    The whole check, parsing included, ends by ``deadline`` (time.monotonic(); default RUN_BUDGET_S from now)."""
    started = time.monotonic()
    if deadline is None:
        deadline = started + RUN_BUDGET_S
    try:
        domain = parse_domain_xml(xml, deadline=deadline)
        return check_domain(domain, budget_s=budget_s, inspect_fn=inspect_fn, rules=rules, deadline=deadline)
    except FormatError as e:
        return DomainCheck(domain=None, errors=[str(e)], elapsed_s=time.monotonic() - started)
    except Exception as e:  # the hook must survive its own bugs
        return DomainCheck(
            domain=None, errors=[f"internal error: {type(e).__name__}: {e}"], elapsed_s=time.monotonic() - started
        )


# -- reporting --------------------------------------------------------------------------------------------


def send_to_syslog(priority: int, message: str, ident: str = SYSLOG_IDENT) -> None:
    """Log one line as the hook (see :func:`qcrypt.plumbing.syslog.send_to_syslog`: never waits)."""
    syslog_line.send_to_syslog(priority, message, ident)


syslog_sink: SyslogSink = send_to_syslog
"""Where :func:`emit` sends syslog lines when no sink is passed (replace it to collect the lines)."""


def _safe_call(sink: Callable[..., None] | None, *args: Any) -> None:
    if sink is None:
        return
    try:
        sink(*args)
    except Exception:  # a broken log channel must not break the hook
        return


def emit(
    check: DomainCheck,
    *,
    domain_hint: str | None = None,
    syslog_to: SyslogSink | None = None,
    stderr_to: LineSink | None = None,
    max_lines: int = MAX_LOG_LINES,
) -> None:
    """Send each warning (LOG_WARNING), note (LOG_NOTICE) and error (LOG_ERR) to syslog and stderr.

    At most ``max_lines`` of them; when there are more, one last line (LOG_WARNING) says how many were left out."""
    to_syslog = syslog_to if syslog_to is not None else syslog_sink
    name = check.domain or domain_hint or "?"
    warned = [(syslog.LOG_WARNING, w.message(), "warning: ") for w in check.warnings]
    others = [(syslog.LOG_NOTICE, printable(note), "") for note in check.notes]
    others += [(syslog.LOG_ERR, printable(f"domain '{name}': {error}"), "error: ") for error in check.errors]
    lines = warned + others
    if len(lines) > max_lines:  # notes and errors (why the check was cut short) keep up to half the lines
        kept_others = others[: max_lines - min(len(warned), max_lines // 2)]
        kept = warned[: max_lines - len(kept_others)] + kept_others
        counts = {
            "warning": len(warned) - len(kept) + len(kept_others),
            "note or error": len(others) - len(kept_others),
        }
        listed = ", ".join(f"{n} {kind}(s)" for kind, n in counts.items() if n)
        summary = printable(
            f"domain '{name}': {len(lines) - len(kept)} more line(s) not logged ({listed}): the "
            f"hook logs at most {max_lines} per run"
        )
        lines = [*kept, (syslog.LOG_WARNING, summary, "")]
    for priority, line, label in lines:
        _safe_call(to_syslog, priority, line)
        _safe_call(stderr_to, f"{STDERR_PREFIX}{label}{line}")


# -- Python API -----------------------------------------------------------------------------------------------


def legacy_message(report: ImageReport, domain: str | None = None) -> str | None:
    """The warning text for one image's scan report, or None when it holds no legacy encryption. With the
    libvirt ``domain`` that uses the image, the fix named first is ``qcrypt migrate-domain DOMAIN``."""
    codes = _codes(report)
    path = report.path
    if F.LEGACY_AES in codes:
        where = f"{path}: {LEGACY_TEXT}"
    elif F.LEGACY_AES_BACKING in codes:
        where = f"{path}: its backing file {_first_legacy_layer(report)} uses {LEGACY_TEXT}"
    else:
        return None
    command = migrate_command(path, flatten=F.LEGACY_AES_BACKING in codes)
    if domain:
        return printable(
            f"{where}. Fix it with the VM shut off: {migrate_domain_command(domain)} (or this image alone: {command})"
        )
    return printable(f"{where}. Fix it with the VM shut off: {command}")


def warn_if_legacy(path: str | os.PathLike[str], domain: str | None = None) -> bool:
    """Issue a LegacyEncryptionWarning and return True when ``path`` or its backing chain holds legacy AES.

    ``domain``: the libvirt domain using the image, when the caller knows it; the warning then suggests
    ``qcrypt migrate-domain DOMAIN``. Returns False silently otherwise. Never raises for any path (missing,
    a directory, garbage, a wrong type); only a warnings filter set to "error" turns the warning into an
    exception, as usual.
    """
    try:
        message = legacy_message(_default_inspect(os.fsdecode(path)), domain if isinstance(domain, str) else None)
    except Exception:
        return False
    if message is None:
        return False
    warnings.warn(LegacyEncryptionWarning(message), stacklevel=2)
    return True
