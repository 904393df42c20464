"""qcrypt.hook.check: domain XML parsing, disk checks on real qemu-img images, syslog/stderr emission, the time
budget and the Python API (warn_if_legacy)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import syslog
import threading
import time
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

import qcrypt
from qcrypt.audit.inspect import inspect_image
from qcrypt.audit.report import ImageReport
from qcrypt.errors import FormatError
from qcrypt.hook import check as hook
from qcrypt.libvirt.domainxml import MAX_BACKING_DEPTH, parse_domain_xml
from tests._hook_domains import (
    DEV_LOG,
    domain_xml,
)


def by_target(check: hook.DomainCheck) -> dict[str, hook.HookWarning]:
    return {w.target: w for w in check.warnings}


def migrate(path: Path | str, output: str, *extra: str, to: str = "qcow2-luks") -> str:
    return " ".join(
        [
            "qcrypt migrate",
            str(path),
            "--to",
            to,
            "-o",
            output,
            "--passphrase-file",
            hook.PASSPHRASE_PLACEHOLDER,
            *extra,
        ]
    )


# -- parsing -------------------------------------------------------------------------------------------------


def test_parse_file_disks_and_empty_cdrom() -> None:
    domain = parse_domain_xml(domain_xml("legacy-file.xml", "/img"))
    assert domain.name == "web"
    disks = {d.target: d for d in domain.disks}
    assert list(disks) == ["vda", "vdb", "vdc", "sda"]
    vda = disks["vda"].layers[0]
    assert (vda.source_type, vda.path, vda.format, vda.encryption) == ("file", "/img/legacy.qcow2", "qcow2", ("qcow",))
    assert vda.secret == "uuid 0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f"
    assert disks["vdc"].driver_type == "qcow"
    cdrom = disks["sda"]
    assert cdrom.device == "cdrom"
    assert (cdrom.layers[0].path, cdrom.layers[0].label) == (None, None)


def test_parse_block_network_volume_and_sourceless_disks() -> None:
    disks = {d.target: d for d in parse_domain_xml(domain_xml("devices.xml", "/img")).disks}
    assert disks["vdb"].layers[0].source_type == "block"
    assert disks["vdb"].layers[0].path == "/img/legacy-lv"
    rbd = disks["vdc"].layers[0]
    assert (rbd.path, rbd.label, rbd.encryption, rbd.secret) == (
        None,
        "rbd:pool/legacy-rbd",
        ("qcow",),
        "usage legacy-rbd-pass",
    )
    assert disks["vdd"].layers[0].encryption == ()
    assert (disks["vde"].layers[0].path, disks["vde"].layers[0].label) == (None, "default/data.qcow2")
    assert disks["hdc"].layers[0].path is None
    assert disks["vdf"].driver_type == "raw"


def test_parse_encryption_in_every_place() -> None:
    disks = {d.target: d for d in parse_domain_xml(domain_xml("encryption-placements.xml", "/i")).disks}
    assert disks["vda"].layers[0].encryption == ("qcow",)  # under <disk>
    assert disks["vdb"].layers[0].encryption == ("qcow",)  # under <source>
    under_source = disks["vdc"].layers
    assert len(under_source) == 2  # the empty <backingStore/> ends the chain
    assert under_source[0].encryption == ()
    assert (under_source[1].path, under_source[1].format, under_source[1].encryption) == (
        "/i/missing-base.qcow2",
        "qcow2",
        ("qcow",),
    )
    assert disks["vdg"].layers[1].encryption == ("qcow",)  # directly under <backingStore>
    assert disks["vdd"].layers[0].encryption == ("default",)


def test_parse_backing_store_chain() -> None:
    disks = {d.target: d for d in parse_domain_xml(domain_xml("backing-chain.xml", "/i")).disks}
    assert [layer.path for layer in disks["vda"].layers] == ["/i/top.qcow2", "/i/mid.qcow2", "/i/legacy.qcow2"]
    assert [layer.format for layer in disks["vda"].layers] == ["qcow2", "qcow2", "qcow2"]


def test_parse_bounds_a_runaway_backing_chain() -> None:
    nested = "<backingStore type='file'><format type='qcow2'/><source file='/x'/>" * 200
    xml = (
        f"<domain><name>deep</name><devices><disk type='file'><source file='/top'/>{nested}"
        f"{'</backingStore>' * 200}<target dev='vda'/></disk></devices></domain>"
    )
    (disk,) = parse_domain_xml(xml).disks
    assert len(disk.layers) == 1 + MAX_BACKING_DEPTH


@pytest.mark.parametrize(
    ("xml", "expected"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        (domain_xml("malformed.xml"), "malformed"),
        (domain_xml("entity-bomb.xml"), "DOCTYPE/ENTITY"),
        ("<!DOCTYPE domain SYSTEM 'file:///etc/passwd'><domain/>", "DOCTYPE/ENTITY"),
        ("<network><name>n</name></network>", "expected a <domain>"),
        (b"\xff\xfe<\x00d", "not valid utf-16"),
        (b"<domain>\xff</domain>", "not valid utf-8"),
    ],
    ids=["empty", "blank", "malformed", "entity-bomb", "external-dtd", "not-a-domain", "bad-utf16", "bad-utf8"],
)
def test_parse_refuses_bad_documents(xml: str | bytes, expected: str) -> None:
    started = time.monotonic()
    with pytest.raises(FormatError, match=expected):
        parse_domain_xml(xml)
    assert time.monotonic() - started < 0.5  # the bomb is refused before any expansion


def test_parse_accepts_bytes_utf8_and_utf16() -> None:
    text = domain_xml("plain.xml", "/i")
    assert parse_domain_xml(text.encode("utf-8")).name == "clean"
    assert parse_domain_xml(text.encode("utf-16")).name == "clean"
    assert len(parse_domain_xml(text.encode("utf-8")).disks) == 3


# -- checking domains against real images ------------------------------------------------------------------


@pytest.mark.interop
def test_legacy_file_disk(images: Path) -> None:
    check = hook.check_domain_xml(domain_xml("legacy-file.xml", images))
    assert (check.domain, check.errors, check.notes, check.cut_short) == ("web", [], [], False)
    warned = by_target(check)
    assert sorted(warned) == ["vda", "vdc"]  # not the clean vdb, not the empty cdrom
    vda = warned["vda"]
    assert (vda.domain, vda.path) == ("web", str(images / "legacy.qcow2"))
    assert "legacy QEMU AES" in vda.reason
    assert "0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f" in vda.reason
    assert vda.command == migrate(images / "legacy.qcow2", str(images / "legacy.luks.qcow2"))
    assert warned["vdc"].command == migrate(images / "legacy-v1.qcow", str(images / "legacy-v1.luks.qcow2"))
    # vdc names no libvirt secret: migrate-domain needs the passphrase given, for the whole domain
    fix = "qcrypt migrate-domain web --passphrase-file PASSPHRASE_FILE"
    assert vda.domain_command == warned["vdc"].domain_command == fix
    assert vda.as_dict() == {
        "domain": "web",
        "target": "vda",
        "path": vda.path,
        "reason": vda.reason,
        "command": vda.command,
        "domain_command": fix,
    }


@pytest.mark.interop
def test_domain_hint_without_passphrase_file_when_every_affected_disk_names_a_secret(images: Path) -> None:
    root = ET.fromstring(domain_xml("legacy-file.xml", images))
    devices = root.find("devices")
    assert devices is not None
    for disk in devices.findall("disk"):
        if disk.find("target").get("dev") == "vdc":  # type: ignore[union-attr]
            devices.remove(disk)
    check = hook.check_domain_xml(ET.tostring(root, encoding="unicode"))
    assert [(w.target, w.domain_command) for w in check.warnings] == [("vda", "qcrypt migrate-domain web")]


@pytest.mark.interop
def test_block_network_cdrom_and_raw_driver(images: Path) -> None:
    check = hook.check_domain_xml(domain_xml("devices.xml", images))
    assert check.errors == []
    warned = by_target(check)
    assert sorted(warned) == ["vdb", "vdc"]  # vdf: declared raw, so its legacy-looking header is guest data
    # block device: the output goes to a file in the current folder, not into /dev
    assert warned["vdb"].command == migrate(images / "legacy-lv", "legacy-lv.luks.qcow2")
    assert warned["vdc"].path == "rbd:pool/legacy-rbd"
    assert "<encryption format='qcow'>" in warned["vdc"].reason
    assert "copy rbd:pool/legacy-rbd to a local file" in warned["vdc"].command
    assert "qcrypt migrate" in warned["vdc"].command


@pytest.mark.interop
def test_encryption_declared_in_each_place(images: Path) -> None:
    warned = by_target(hook.check_domain_xml(domain_xml("encryption-placements.xml", images)))
    assert sorted(warned) == ["vda", "vdb", "vdc", "vdd", "vde", "vdg"]  # vdf: LUKS declared as luks
    for target in ("vda", "vdb"):
        assert "declares <encryption format='qcow'>" in warned[target].reason
        assert "--flatten" not in warned[target].command
    assert warned["vdd"].reason.startswith("the domain XML declares <encryption format='default'>")
    for target, base in (("vdc", "missing-base.qcow2"), ("vdg", "missing-base2.qcow2")):
        assert str(images / base) in warned[target].reason
        assert warned[target].command == migrate(images / "plain.qcow2", str(images / "plain.luks.qcow2"), "--flatten")
    assert "the image is luks1" in warned["vde"].reason
    assert warned["vde"].command == "virsh edit placements"


@pytest.mark.interop
def test_backing_store_chains(images: Path) -> None:
    warned = by_target(hook.check_domain_xml(domain_xml("backing-chain.xml", images)))
    assert sorted(warned) == ["vda", "vdb"]
    vda = warned["vda"]
    assert vda.reason.count(str(images / "legacy.qcow2")) == 1  # header chain and XML chain agree: said once
    assert vda.command == migrate(images / "top.qcow2", str(images / "top.luks.qcow2"), "--flatten")
    # standalone.qcow2's header has no backing file: only the XML's <backingStore> reveals the legacy base
    assert str(images / "legacy2.qcow2") in warned["vdb"].reason
    assert warned["vdb"].command.endswith("--flatten")


@pytest.mark.interop
def test_image_own_backing_file_is_legacy(images: Path) -> None:
    (warning,) = hook.check_domain_xml(domain_xml("own-backing.xml", images)).warnings
    assert (warning.domain, warning.target) == ("overlay", "vda")
    assert f"its backing file {images / 'legacy.qcow2'}" in warning.reason
    assert warning.command == migrate(images / "overlay.qcow2", str(images / "overlay.luks.qcow2"), "--flatten")


@pytest.mark.interop
def test_clean_domain_says_nothing(images: Path) -> None:
    check = hook.check_domain_xml(domain_xml("plain.xml", images))
    assert (check.domain, check.warnings, check.notes, check.errors) == ("clean", [], [], [])


@pytest.mark.interop
def test_missing_files_without_declared_encryption_are_quiet(images: Path) -> None:
    check = hook.check_domain_xml(domain_xml("plain.xml", images / "gone"))
    assert (check.warnings, check.errors, check.cut_short) == ([], [], False)


@pytest.mark.interop
def test_one_warning_per_disk(images: Path) -> None:
    disk = (
        f"<disk type='file' device='disk'><driver type='qcow2'/><source file='{images}/legacy.qcow2'/>"
        "<target dev='vda'/><encryption format='qcow'/></disk>"
    )
    xml = f"<domain><name>dup</name><devices>{disk}{disk}</devices></domain>"
    (warning,) = hook.check_domain_xml(xml).warnings
    assert warning.target == "vda"


@pytest.mark.interop
def test_message_is_one_line_even_for_hostile_paths(images: Path) -> None:
    xml = (
        "<domain><name>evil&#10;name</name><devices><disk type='file'><driver type='qcow2'/>"
        "<source file='/nowhere/a&#10;b.qcow2'/><target dev='vda'/><encryption format='qcow'/></disk>"
        "</devices></domain>"
    )
    (warning,) = hook.check_domain_xml(xml).warnings
    assert warning.path == "/nowhere/a\nb.qcow2"
    assert "\n" not in warning.message()
    assert "a\\nb.qcow2" in warning.message()
    assert "'/nowhere/a\nb.qcow2'" in warning.command  # the command itself is shell-quoted, exact


# -- time budget --------------------------------------------------------------------------------------------


@pytest.mark.interop
def test_many_disks_finish_well_under_a_second(images: Path, tmp_path: Path) -> None:
    disks = []
    for index in range(150):
        source = images / ("legacy.qcow2" if index % 10 == 0 else "plain.qcow2")
        copy = tmp_path / f"disk{index}.qcow2"
        shutil.copyfile(source, copy)
        disks.append(f"<disk type='file'><driver type='qcow2'/><source file='{copy}'/><target dev='vd{index}'/></disk>")
    xml = f"<domain><name>many</name><devices>{''.join(disks)}</devices></domain>"
    started = time.monotonic()
    check = hook.check_domain_xml(xml)
    assert time.monotonic() - started < 1.0
    if not check.cut_short:  # on a loaded machine the budget may cut it; then the note says so
        assert sorted(w.target for w in check.warnings) == sorted(f"vd{i}" for i in range(0, 150, 10))
    else:
        assert "not inspected" in check.notes[0]


@pytest.mark.interop
def test_zero_budget_still_reports_what_the_xml_declares(images: Path) -> None:
    check = hook.check_domain_xml(domain_xml("encryption-placements.xml", images), budget_s=0.0)
    assert check.cut_short
    (note,) = check.notes
    assert "check cut short after 0 ms" in note
    assert "image(s) not inspected" in note
    assert {"vda", "vdb", "vdc", "vdd", "vdg"} <= set(by_target(check))


@pytest.mark.interop
def test_a_hanging_image_cannot_hold_the_hook(images: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "hangs.qcow2"
    os.mkfifo(fifo)  # opening a FIFO for reading would block: qcrypt never opens one
    xml = (
        f"<domain><name>slow</name><devices>"
        f"<disk type='file'><driver type='qcow2'/><source file='{fifo}'/><target dev='vda'/></disk>"
        f"<disk type='file'><driver type='qcow2'/><source file='{images}/legacy.qcow2'/>"
        f"<target dev='vdb'/><encryption format='qcow'/></disk></devices></domain>"
    )
    started = time.monotonic()
    check = hook.check_domain_xml(xml, budget_s=0.5)
    assert time.monotonic() - started < 1.0 and not check.cut_short
    assert [w.target for w in check.warnings] == ["vdb"]
    # a read that really hangs (dead NFS): the budget cuts it off and the XML-declared disk is still reported
    release = threading.Event()

    def hangs(path: str) -> ImageReport:
        release.wait(10)
        return inspect_image(path)

    try:
        started = time.monotonic()
        check = hook.check_domain_xml(xml, budget_s=0.2, inspect_fn=hangs)
        assert time.monotonic() - started < 1.0
        assert check.cut_short and str(fifo) in check.notes[0]
        assert [w.target for w in check.warnings] == ["vdb"]  # declared in the XML: still reported
    finally:
        release.set()


@pytest.mark.interop
def test_an_inspect_bug_is_reported_not_raised(images: Path) -> None:
    def broken_inspect(path: str) -> ImageReport:
        raise RuntimeError(f"boom on {path}")

    check = hook.check_domain_xml(domain_xml("legacy-file.xml", images), inspect_fn=broken_inspect)
    assert [w.target for w in check.warnings] == ["vda"]  # from <encryption format='qcow'> alone
    assert any("internal error while inspecting" in e and "RuntimeError" in e for e in check.errors)


# -- emission --------------------------------------------------------------------------------------------------


@pytest.mark.interop
def test_emit_sends_each_line_to_syslog_and_stderr(images: Path) -> None:
    sent: list[tuple[int, str]] = []
    lines: list[str] = []
    check = hook.check_domain_xml(domain_xml("legacy-file.xml", images))
    hook.emit(check, syslog_to=lambda priority, line: sent.append((priority, line)), stderr_to=lines.append)
    assert [p for p, _ in sent] == [syslog.LOG_WARNING, syslog.LOG_WARNING]
    assert [line for _, line in sent] == [w.message() for w in check.warnings]
    assert lines == [f"qcrypt-hook: warning: {w.message()}" for w in check.warnings]
    assert "domain 'web' disk vda (" in lines[0]
    assert (
        "Fix it with the VM shut off: qcrypt migrate-domain web --passphrase-file PASSPHRASE_FILE (or this disk "
        "alone: qcrypt migrate "
    ) in lines[0]


def test_emit_errors_and_notes_priorities() -> None:
    sent: list[tuple[int, str]] = []
    check = hook.DomainCheck(domain=None, notes=["cut short"], errors=["domain XML: empty"])
    hook.emit(check, domain_hint="vm1", syslog_to=lambda p, line: sent.append((p, line)))
    assert sent == [(syslog.LOG_NOTICE, "cut short"), (syslog.LOG_ERR, "domain 'vm1': domain XML: empty")]


def test_emit_uses_the_module_sink_and_survives_a_broken_one(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []
    monkeypatch.setattr(hook, "syslog_sink", lambda _p, line: sent.append(line))
    hook.emit(hook.DomainCheck(domain="d", errors=["x"]))
    assert sent == ["domain 'd': x"]

    def broken(*_args: object) -> None:
        raise OSError("log socket gone")

    lines: list[str] = []
    hook.emit(hook.DomainCheck(domain="d", errors=["y"]), syslog_to=broken, stderr_to=lines.append)
    assert lines == ["qcrypt-hook: error: domain 'd': y"]


@contextlib.contextmanager
def dev_log_listener() -> Iterator[socket.socket]:
    """A datagram socket bound at /dev/log for the test's duration (none runs in this sandbox; a live one is never
    taken over: the test skips)."""
    if os.path.exists(DEV_LOG):
        pytest.skip(f"{DEV_LOG} exists (a syslog daemon runs here): not taking it over")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        listener.bind(DEV_LOG)
    except OSError as e:  # another test run bound it a moment ago
        listener.close()
        pytest.skip(f"cannot bind {DEV_LOG}: {e}")
    try:
        yield listener
    finally:
        listener.close()
        os.unlink(DEV_LOG)


def test_real_syslog_sink_reaches_dev_log() -> None:
    """The default sink sends what syslog(3) sends: a datagram listener bound at /dev/log (none runs in this
    sandbox; we never take over a live one) receives the line with ident, PID, facility daemon and priority."""
    assert hook.syslog_sink is hook.send_to_syslog  # the default is the real sender
    with dev_log_listener() as listener:
        listener.settimeout(5)
        lines: list[str] = []
        hook.emit(hook.DomainCheck(domain="d", notes=["qcrypt test note"]), stderr_to=lines.append)
        received = listener.recv(4096).decode()
    assert lines == ["qcrypt-hook: qcrypt test note"]
    priority = syslog.LOG_DAEMON | syslog.LOG_NOTICE
    assert received.startswith(f"<{priority}>") and received.endswith(f"qcrypt-hook[{os.getpid()}]: qcrypt test note")


def test_a_syslog_daemon_that_reads_nothing_cannot_hold_the_hook() -> None:
    """A daemon whose queue is full (stuck, overloaded) made syslog(3) block, and with it the hook and the
    VM's start: the sender never waits, a line it cannot queue is lost with an OSError."""
    outcome: list[str] = []

    def flood() -> None:  # far more lines than a datagram queue holds (net.unix.max_dgram_qlen, 512 by default)
        lost = 0
        for i in range(4000):
            try:
                hook.send_to_syslog(syslog.LOG_WARNING, f"line {i} " + "x" * 200)
            except OSError:
                lost += 1
        outcome.append(f"lost {lost}")

    with dev_log_listener():
        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        sender.join(timeout=20)
        assert not sender.is_alive(), "sending to a full syslog queue blocked"
    assert outcome and outcome[0] != "lost 0", outcome  # the queue did fill: the test reached the full case


# -- Python API ----------------------------------------------------------------------------------------------


@pytest.mark.interop
def test_warn_if_legacy_warns_with_the_fix(images: Path) -> None:
    with pytest.warns(hook.LegacyEncryptionWarning) as record:
        assert hook.warn_if_legacy(images / "legacy.qcow2") is True
    (warning,) = record
    text = str(warning.message)
    assert str(images / "legacy.qcow2") in text
    assert migrate(images / "legacy.qcow2", str(images / "legacy.luks.qcow2")) in text
    assert warning.filename == __file__  # stacklevel=2 points at the caller


@pytest.mark.interop
def test_warn_if_legacy_names_the_domain_when_told(images: Path) -> None:
    with pytest.warns(hook.LegacyEncryptionWarning) as record:
        assert hook.warn_if_legacy(images / "legacy.qcow2", domain="web 1") is True
    text = str(record[0].message)
    assert "Fix it with the VM shut off: qcrypt migrate-domain 'web 1' (or this image alone: qcrypt migrate " in text
    with pytest.warns(hook.LegacyEncryptionWarning) as record:
        hook.warn_if_legacy(images / "legacy.qcow2")
    assert "migrate-domain" not in str(record[0].message)  # no domain known: no domain command


@pytest.mark.interop
def test_warn_if_legacy_backing_chain(images: Path) -> None:
    with pytest.warns(qcrypt.LegacyEncryptionWarning, match="its backing file .*legacy.qcow2") as record:
        assert qcrypt.warn_if_legacy(str(images / "top.qcow2")) is True
    assert "--flatten" in str(record[0].message)


@pytest.mark.interop
@pytest.mark.parametrize("name", ["plain.qcow2", "plain.raw", "luks.qcow2", "missing.qcow2", ".", "garbage"])
def test_warn_if_legacy_is_silent_otherwise(images: Path, tmp_path: Path, name: str) -> None:
    (tmp_path / "garbage").write_bytes(b"QFI\xfb" + os.urandom(60))  # qcow2 magic, nonsense header
    base = tmp_path if name == "garbage" else images
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert hook.warn_if_legacy(base / name) is False
    assert caught == []


@pytest.mark.parametrize("path", [None, 42, b"/nonexistent/\xff", "a\0b", "", object()])
def test_warn_if_legacy_never_raises(path: object) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert hook.warn_if_legacy(path) is False  # type: ignore[arg-type]
    assert caught == []


@pytest.mark.interop
def test_warning_is_shown_by_default(images: Path) -> None:
    code = f"import qcrypt; print(qcrypt.warn_if_legacy({str(images / 'legacy.qcow2')!r}))"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False, timeout=120
    )
    assert done.returncode == 0
    assert done.stdout.strip() == "True"
    assert "LegacyEncryptionWarning" in done.stderr
    assert "qcrypt migrate" in done.stderr


def test_public_names() -> None:
    assert qcrypt.LegacyEncryptionWarning is hook.LegacyEncryptionWarning
    assert issubclass(hook.LegacyEncryptionWarning, UserWarning)
    assert qcrypt.warn_if_legacy is hook.warn_if_legacy


def test_migrate_command_quotes_paths() -> None:
    assert hook.migrate_command("/vm images/a b.qcow2", flatten=True) == (
        "qcrypt migrate '/vm images/a b.qcow2' --to qcow2-luks -o '/vm images/a b.luks.qcow2' "
        "--passphrase-file PASSPHRASE_FILE --flatten"
    )
    assert hook.migrate_command("/dev/vg/lv", block=True) == (
        "qcrypt migrate /dev/vg/lv --to qcow2-luks -o lv.luks.qcow2 --passphrase-file PASSPHRASE_FILE"
    )
    assert hook.migrate_command("/i/d.img", to="luks").split(" -o ")[1].startswith("/i/d.luks ")


@pytest.mark.interop
def test_inspection_thread_is_a_daemon(images: Path) -> None:
    """A hung inspection (dead NFS) must not keep the hook process alive: it runs in a daemon thread."""
    release = threading.Event()
    seen: list[threading.Thread] = []

    def stuck(path: str) -> dict[str, object]:
        seen.append(threading.current_thread())
        release.wait(10)
        return {"path": path, "findings": [], "encryption": "none", "format": "raw", "backing_chain": []}

    try:
        check = hook.check_domain_xml(domain_xml("plain.xml", images), budget_s=0.2, inspect_fn=stuck)
        assert check.cut_short
        assert seen and seen[0].is_alive() and seen[0].daemon
    finally:
        release.set()


# -- the whole run is bounded: XML size and parse time, disk count, log lines ---------------------------------------


def declared_disks_xml(count: int) -> str:
    """``count`` disks that declare legacy encryption on files that do not exist (one warning each, no reads)."""
    disks = "".join(
        f"<disk type='file'><driver type='qcow2'/><source file='/nonexistent/d{i:06d}.qcow2'/>"
        f"<target dev='vd{i}'/><encryption format='qcow'/></disk>"
        for i in range(count)
    )
    return f"<domain><name>many</name><devices>{disks}</devices></domain>"


def test_log_lines_are_capped_with_one_summary() -> None:
    check = hook.check_domain_xml(declared_disks_xml(100), deadline=time.monotonic() + 60)
    assert len(check.warnings) == 100 and not check.cut_short
    sent: list[tuple[int, str]] = []
    lines: list[str] = []
    hook.emit(check, syslog_to=lambda p, line: sent.append((p, line)), stderr_to=lines.append)
    assert len(sent) == len(lines) == hook.MAX_LOG_LINES + 1
    assert [line for _, line in sent[:-1]] == [w.message() for w in check.warnings[: hook.MAX_LOG_LINES]]
    assert sent[-1] == (
        syslog.LOG_WARNING,
        "domain 'many': 80 more line(s) not logged (80 warning(s)): the hook "
        f"logs at most {hook.MAX_LOG_LINES} per run",
    )


def test_notes_and_errors_keep_their_place_when_lines_are_capped() -> None:
    check = hook.DomainCheck(domain="d", notes=["cut short"], errors=["e1", "e2"])
    check.warnings = [hook.HookWarning("d", f"vd{i}", f"/p{i}", "legacy", "qcrypt migrate x") for i in range(50)]
    sent: list[tuple[int, str]] = []
    hook.emit(check, syslog_to=lambda p, line: sent.append((p, line)), max_lines=10)
    assert [p for p, _ in sent] == [syslog.LOG_WARNING] * 7 + [
        syslog.LOG_NOTICE,
        syslog.LOG_ERR,
        syslog.LOG_ERR,
        syslog.LOG_WARNING,
    ]
    assert sent[-1][1] == "domain 'd': 43 more line(s) not logged (43 warning(s)): the hook logs at most 10 per run"


def test_parsing_and_deciding_stop_at_the_deadline() -> None:
    xml = declared_disks_xml(20_000)  # about 3 MiB
    with pytest.raises(FormatError, match="not parsed within the time limit"):
        parse_domain_xml(xml, deadline=time.monotonic())
    started = time.monotonic()
    check = hook.check_domain_xml(xml, deadline=started + 0.3)
    assert time.monotonic() - started < 1.0
    assert check.cut_short or check.errors  # cut while parsing (an error) or while deciding (a note)
    if not check.errors:
        assert "disk(s) not checked: the hook's time limit" in check.notes[0]
        assert len(check.warnings) < 20_000


def test_a_16_mib_domain_xml_costs_the_hook_about_a_second(tmp_path: Path) -> None:
    """A real hook process (what the installed script runs) on a 16 MiB XML of 118,000 declared disks: done
    within its time limit (plus interpreter start-up) and at most MAX_LOG_LINES + 1 lines."""
    xml = declared_disks_xml(118_000).encode()
    assert len(xml) > 15 << 20
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "qcrypt.cli.hook", "libvirt", "many", "prepare", "begin", "-"],
        input=xml,
        capture_output=True,
        cwd="/",
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(hook.__file__).parents[2])},
    )
    elapsed = time.monotonic() - started
    assert (done.returncode, done.stdout) == (0, b"")
    assert 1 <= len(done.stderr.splitlines()) <= hook.MAX_LOG_LINES + 1, done.stderr[-2000:]
    assert b"time limit" in done.stderr
    assert elapsed < 4.0, elapsed  # 1 s of work + start-up; the old hook took 6 to 12 s here


def test_a_stdin_that_never_closes_cannot_hold_the_hook() -> None:
    """libvirt closes stdin after the XML; if something keeps it open, the watchdog ends the hook with exit 0."""
    read_end, write_end = os.pipe()
    try:
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "qcrypt.cli.hook", "libvirt", "stuck", "prepare", "begin", "-"],
            stdin=read_end,
            capture_output=True,
            cwd="/",
            timeout=30,
            check=False,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(hook.__file__).parents[2])},
        )
        elapsed = time.monotonic() - started
    finally:
        os.close(read_end)
        os.close(write_end)
    assert (done.returncode, done.stdout) == (0, b"")
    assert b"domain 'stuck': hook stopped after 2 s (its time limit)" in done.stderr
    assert elapsed < 6.0
