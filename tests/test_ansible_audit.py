"""The audit playbook (qcrypt.qcrypt.audit) and the qcrypt_scan module, run by a real ansible-core.

Several inventory names point at this machine, each with its own image folder and libvirt XML folder, so one run
exercises a multi-host fleet report: a host with legacy disks, a clean host whose XML names a missing legacy
image, a host whose scan fails and one that is unreachable. The expected legacy images come from how qemu-img
made them and from ``qemu-img info --backing-chain`` (never from qcrypt's own reader).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests import _images as img
from tests._ansible import Ansible, qcrypt_command

pytestmark = [pytest.mark.interop, pytest.mark.ansible]

PASSPHRASE = "audit-passphrase"
MIB = 1024 * 1024
PREFIX = "qcrypt-ansible-test-"


def domain_xml(name: str, disks: list[tuple[Path, str]], *, encryption: str | None = None) -> str:
    """A minimal domain; each disk is (image path, driver type); ``encryption`` declares <encryption format=>."""
    devices = []
    for index, (path, driver) in enumerate(disks):
        secret = f"<secret type='passphrase' uuid='00000000-0000-4000-8000-{index:012d}'/>"
        declared = f"<encryption format='{encryption}'>{secret}</encryption>" if encryption else ""
        devices.append(
            f"<disk type='file' device='disk'><driver name='qemu' type='{driver}'/>"
            f"<source file='{path}'/>{declared}<target dev='vd{chr(97 + index)}' bus='virtio'/></disk>"
        )
    return (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
        f"<os><type arch='x86_64'>hvm</type></os><devices>{''.join(devices)}</devices></domain>"
    )


def legacy_by_qemu_img(path: Path) -> bool:
    """True when qemu-img says the image or a layer below it uses AES (legacy) encryption."""
    done = subprocess.run(
        [img.tool("qemu-img"), "info", "--output=json", "--backing-chain", "-U", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return any(
        layer.get("format-specific", {}).get("data", {}).get("encrypt", {}).get("format") == "aes"
        or (layer.get("encrypted") and layer.get("format") == "qcow")
        for layer in json.loads(done.stdout)
    )


@pytest.fixture
def fleet(tmp_path: Path) -> dict[str, dict[str, object]]:
    """hv1: two domains on legacy disks (one through a backing chain) and one clean; hv2: clean images, an image
    whose backing file is a root-only file outside its folder, and an XML declaring format='qcow' on an image
    that is gone; hv3: its scan fails; hv4: unreachable."""
    hv1, hv2 = tmp_path / "hv1", tmp_path / "hv2"
    for host in (hv1, hv2):
        (host / "images").mkdir(parents=True)
        (host / "xml").mkdir()
    web = img.make_qcow2(hv1 / "images" / "web.qcow2", 4 * MIB, encrypt="aes", passphrase=PASSPHRASE)
    img.write_pattern(web, 0, MIB, 0x33)
    base = img.make_qcow2(hv1 / "images" / "base.qcow2", 4 * MIB, encrypt="aes", passphrase=PASSPHRASE)
    overlay = img.make_qcow2(hv1 / "images" / "app.qcow2", 4 * MIB, backing=base)
    plain = img.make_qcow2(hv1 / "images" / "db.qcow2", 4 * MIB)
    img.make_qcow1(hv1 / "images" / "orphan.qcow", 2 * MIB, passphrase=PASSPHRASE)
    (hv1 / "xml" / f"{PREFIX}web.xml").write_text(domain_xml(f"{PREFIX}web", [(web.path, "qcow2")], encryption="qcow"))
    (hv1 / "xml" / f"{PREFIX}app.xml").write_text(domain_xml(f"{PREFIX}app", [(overlay.path, "qcow2")]))
    (hv1 / "xml" / f"{PREFIX}db.xml").write_text(domain_xml(f"{PREFIX}db", [(plain.path, "qcow2")]))
    img.fixture_path("luks-qcow2-v3-c64k.qcow2", hv2 / "images")  # made by qemu-img (LUKS key derivation is slow)
    img.make_qcow2(hv2 / "images" / "plain.qcow2", 4 * MIB)
    host_file = tmp_path / "host-secret"
    host_file.write_bytes(b"HOST-SECRET" * 100)
    host_file.chmod(0o600)
    img.run(
        [
            img.tool("qemu-img"),
            "create",
            "-q",
            "-u",
            "-f",
            "qcow2",
            "-b",
            str(host_file),
            "-F",
            "raw",
            str(hv2 / "images" / "evil.qcow2"),
            "1M",
        ]
    )
    (hv2 / "xml" / f"{PREFIX}gone.xml").write_text(
        domain_xml(f"{PREFIX}gone", [(hv2 / "images" / "deleted.qcow2", "qcow2")], encryption="qcow")
    )
    return {
        "hv1": {"qcrypt_scan_paths": [str(hv1 / "images")], "qcrypt_libvirt_xml": str(hv1 / "xml")},
        "hv2": {"qcrypt_scan_paths": [str(hv2 / "images")], "qcrypt_libvirt_xml": str(hv2 / "xml")},
        "hv3": {"qcrypt_scan_paths": [str(tmp_path / "no-such-folder")], "qcrypt_libvirt_xml": ""},
        "hv4": {
            "ansible_connection": "ssh",
            "ansible_host": "127.0.0.1",
            "ansible_port": 9,
            "ansible_ssh_common_args": "-o ConnectTimeout=5 -o BatchMode=yes -o StrictHostKeyChecking=no",
        },
    }


def test_audit_writes_one_fleet_report(tmp_path: Path, fleet: dict[str, dict[str, object]]) -> None:
    ansible = Ansible(tmp_path / "ansible")
    inventory = ansible.inventory(fleet)
    reports = tmp_path / "reports"
    run = ansible.playbook("qcrypt.qcrypt.audit", inventory, "-e", f"qcrypt_report_dir={reports}")

    # hv3 and hv4 could not be scanned: the report is written anyway, then the playbook fails.
    assert run.rc != 0, run.explain()
    assert "2 host(s) could not be scanned" in run.stdout, run.explain()
    report = json.loads((reports / "fleet-report.json").read_text())
    hosts = {entry["host"]: entry for entry in report["hosts"]}
    assert list(hosts) == ["hv1", "hv2", "hv3", "hv4"]

    hv1_images = sorted(Path(str(fleet["hv1"]["qcrypt_scan_paths"][0])).iterdir())  # type: ignore[index]
    expected_legacy = sorted(str(p) for p in hv1_images if legacy_by_qemu_img(p))
    assert len(expected_legacy) == 4  # web, base, app (through its backing file), orphan (qcow v1)
    assert sorted(image["path"] for image in hosts["hv1"]["legacy"]) == expected_legacy
    assert hosts["hv1"]["legacy_images"] == 4 and hosts["hv1"]["images"] == 5
    assert hosts["hv1"]["affected_domains"] == [f"{PREFIX}app", f"{PREFIX}web"]
    assert hosts["hv1"]["status"] == "scanned" and hosts["hv1"]["error"] is None

    hv2_images = sorted(Path(str(fleet["hv2"]["qcrypt_scan_paths"][0])).iterdir())  # type: ignore[index]
    assert not any(legacy_by_qemu_img(p) for p in hv2_images)
    assert hosts["hv2"]["legacy_images"] == 0 and hosts["hv2"]["affected_domains"] == []
    assert [m["domain"] for m in hosts["hv2"]["domains_with_missing_images"]] == [f"{PREFIX}gone"]

    assert hosts["hv3"]["status"] == "failed" and "no-such-folder" in hosts["hv3"]["error"]
    assert hosts["hv3"]["error"].count("\n") == 0
    assert hosts["hv4"]["status"] == "failed"
    (refused,) = hosts["hv2"]["refused_backing"]
    assert refused["path"].endswith("/evil.qcow2") and refused["findings"] == ["backing-outside-storage"]
    assert f"--allow-backing-dir {tmp_path}" in refused["messages"][0]
    assert report["totals"] == {
        "hosts": 4,
        "hosts_failed": 2,
        "hosts_affected": 2,
        "images": 8,
        "legacy_images": 4,
        "affected_domains": 2,
        "domains_with_missing_images": 1,
        "refused_backing": 1,
    }

    markdown = (reports / "fleet-report.md").read_text()
    assert f"| hv1 | scanned | 5 | 4 | 4 | 0 | {PREFIX}app, {PREFIX}web | - |" in markdown
    assert f"| hv2 | scanned | 3 | 0 | 0 | 1 | - | {PREFIX}gone |" in markdown  # evil.qcow2: a warning
    assert "## Backing files not followed" in markdown
    assert f"| hv2 | {refused['path']} | - | backing-outside-storage | backing file {tmp_path}" in markdown
    assert "HOST-SECRET" not in markdown
    assert "| hv3 | failed: Error: " in markdown
    assert f"| hv1 | {expected_legacy[0]} |" in markdown
    # the base is app's through its overlay's header alone (the XML has no <backingStore>): never "-"
    base = next(image for image in hosts["hv1"]["legacy"] if image["path"].endswith("/base.qcow2"))
    assert base["domains"] == [f"{PREFIX}app"]
    assert f"| hv1 | {base['path']} | {PREFIX}app | legacy-aes |" in markdown
    assert run.recap["hv1"]["changed"] == 0 and run.recap["hv1"]["failed"] == 0


def test_audit_check_mode_writes_nothing(tmp_path: Path, fleet: dict[str, dict[str, object]]) -> None:
    ansible = Ansible(tmp_path / "ansible")
    inventory = ansible.inventory({"hv1": fleet["hv1"], "hv2": fleet["hv2"]})
    reports = tmp_path / "reports"
    run = ansible.playbook("qcrypt.qcrypt.audit", inventory, "--check", "-e", f"qcrypt_report_dir={reports}")
    assert run.rc == 0, run.explain()
    assert not reports.exists()
    # The scan ran for real in check mode: the report shown on screen has hv1's counts.
    assert f"| hv1 | scanned | 5 | 4 | 4 | 0 | {PREFIX}app, {PREFIX}web | - |" in run.stdout, run.explain()


def test_scan_module_result_and_facts(tmp_path: Path, fleet: dict[str, dict[str, object]]) -> None:
    ansible = Ansible(tmp_path / "ansible")
    hv1 = fleet["hv1"]
    args = {"paths": hv1["qcrypt_scan_paths"], "libvirt_xml": hv1["qcrypt_libvirt_xml"], "as_facts": True, "jobs": 1}
    result = ansible.module("qcrypt.qcrypt.qcrypt_scan", {**args, "executable": qcrypt_command()})
    assert result["changed"] is False and not result.get("failed"), result["_stdout"]
    assert result["affected_domains"] == [f"{PREFIX}app", f"{PREFIX}web"]
    assert result["ansible_facts"]["qcrypt_scan"]["summary"] == result["summary"]
    assert result["summary"]["legacy"] == 4
    web = next(i for i in result["legacy_images"] if i["path"].endswith("/web.qcow2"))
    assert web == {"path": web["path"], "domains": [f"{PREFIX}web"], "findings": ["legacy-aes"]}


def test_scan_module_error_is_one_line(tmp_path: Path) -> None:
    ansible = Ansible(tmp_path / "ansible")
    result = ansible.module(
        "qcrypt.qcrypt.qcrypt_scan",
        {"paths": [str(tmp_path / "absent")], "libvirt_xml": "", "executable": qcrypt_command()},
    )
    assert result["failed"] is True
    assert result["msg"] == f"Error: Invalid value for 'PATHS...': Path '{tmp_path / 'absent'}' does not exist."
    assert result["rc"] == 2


def test_module_timeout_stops_the_command(tmp_path: Path) -> None:
    """A qcrypt that hangs is stopped after ``timeout`` seconds, with its whole process group."""
    pid_file = tmp_path / "pid"
    hanging = tmp_path / "hanging-qcrypt"
    hanging.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nsleep 300 &\necho $! >> {pid_file}\nwait\n")
    hanging.chmod(0o755)
    ansible = Ansible(tmp_path / "ansible")
    result = ansible.module(
        "qcrypt.qcrypt.qcrypt_scan",
        {"paths": [str(tmp_path)], "libvirt_xml": "", "executable": str(hanging), "timeout": 2},
    )
    assert result["failed"] is True
    assert result["msg"] == "qcrypt scan did not finish within 2 s and was stopped"
    for pid in pid_file.read_text().split():
        assert _gone_or_zombie(int(pid)), f"process {pid} survived the timeout"


def _gone_or_zombie(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie that init has not reaped yet counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_scan_module_refused_backing_and_allowed_folders(tmp_path: Path, fleet: dict[str, dict[str, object]]) -> None:
    ansible = Ansible(tmp_path / "ansible")
    args = {"paths": fleet["hv2"]["qcrypt_scan_paths"], "libvirt_xml": "", "executable": qcrypt_command()}
    result = ansible.module("qcrypt.qcrypt.qcrypt_scan", args)
    assert [Path(i["path"]).name for i in result["refused_backing"]] == ["evil.qcow2"], result["_stdout"]
    allowed = ansible.module("qcrypt.qcrypt.qcrypt_scan", {**args, "allow_backing_dirs": [str(tmp_path)]})
    assert allowed["refused_backing"] == [], allowed["_stdout"]
    evil = next(i for i in allowed["report"]["images"] if i["path"].endswith("/evil.qcow2"))
    assert evil["backing_chain"][0]["path"] == str(tmp_path / "host-secret")  # root owns it: root may read it
