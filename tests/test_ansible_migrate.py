"""The migrate playbook (qcrypt.qcrypt.migrate) against the real libvirtd and QEMU of this machine.

Three inventory names are this machine; each scans its own image folder, so each "host" owns its domains:
hv1 has a domain left by a host upgrade (``<encryption format='qcow'>`` with a readable secret, marked autostart),
hv2 one whose legacy disk has no ``<encryption>`` (the passphrase comes from a vars file), hv3 only a clean
running domain. Oracles: libvirt's own view (``virsh dumpxml``, ``domstate``, secrets), the files' hashes, and
QEMU reading the guest data through the running domain's new disk.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._ansible import Ansible, Run, qcrypt_command
from tests._libvirt import IMAGES_ROOT, Lab, disk_xml, ensure_libvirtd, node_of, qemu_reads, virsh

pytestmark = [pytest.mark.interop, pytest.mark.ansible, pytest.mark.libvirt, pytest.mark.slow, pytest.mark.timeout(900)]

SECRET_VALUE = b"hv1-secret-value"
PASSPHRASE = "hv2-vault-passphrase"
PATTERN = 0x5A
MIB = 1024 * 1024
BACKUP_DIR = Path("/var/lib/qcrypt/backups")


@pytest.fixture
def lab() -> Iterator[Lab]:
    ensure_libvirtd()
    IMAGES_ROOT.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="qcrypt-ansible-test-", dir=IMAGES_ROOT))
    folder.chmod(0o755)
    lab = Lab(folder=folder, prefix=f"qcrypt-ansible-test-{uuid.uuid4().hex[:6]}")
    try:
        yield lab
    finally:
        lab.cleanup()
        for backup in BACKUP_DIR.glob(f"{lab.prefix}-*"):
            with contextlib.suppress(FileNotFoundError):
                backup.unlink()


def host_folder(lab: Lab, host: str) -> Path:
    folder = lab.folder / host
    folder.mkdir(exist_ok=True)
    folder.chmod(0o755)
    return folder


def legacy_disk(lab: Lab, host: str, passphrase: bytes) -> Path:
    """A 16 MiB legacy-AES qcow2 made by qemu-img, with 1 MiB of PATTERN written by qemu-io."""
    host_folder(lab, host)
    pw = lab.passphrase_file(f"{host}.pw", passphrase)
    image = lab.legacy_image(f"{host}/disk.qcow2", pw)
    lab.write(image, PATTERN, 0, MIB, pw=pw)
    return image


def spy(tmp_path: Path) -> tuple[Path, Path]:
    """A qcrypt that logs its command line, then runs the real one (to prove the passphrase is not on it)."""
    log = tmp_path / "qcrypt-argv.log"
    wrapper = tmp_path / "qcrypt-spy"
    wrapper.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{log}'\nexec '{qcrypt_command()}' \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper, log


def source_files(lab: Lab, name: str) -> list[str]:
    return re.findall(r"<source file='([^']+)'", lab.inactive_xml(name))


def state(name: str) -> str:
    return virsh("domstate", name).stdout.strip()


def libvirt_view(lab: Lab, names: list[str], hosts: tuple[str, ...] = ("hv1", "hv2", "hv3")) -> dict[str, object]:
    """What must not change in check mode: the hosts' files, the domains' XML and states, the lab's secrets."""
    folders = [lab.folder / host for host in hosts]
    return {
        "files": {
            p.relative_to(lab.folder).as_posix(): p.stat().st_mtime_ns for folder in folders for p in folder.rglob("*")
        },
        "xml": {n: lab.inactive_xml(n) for n in names},
        "state": {n: state(n) for n in names},
        "secrets": sorted(lab.qcrypt_secrets()),
    }


def host_order(run: Run, hosts: list[str]) -> list[str]:
    """Hosts in the order their task results appear (serial batches: each host's block is contiguous)."""
    order: list[str] = []
    for match in re.finditer(r"^(?:ok|changed|skipping|fatal|included): .*?\[?(hv\d)\]?", run.stdout, re.MULTILINE):
        if match.group(1) in hosts and (not order or order[-1] != match.group(1)):
            order.append(match.group(1))
    return order


def test_audit_then_migrate_host_by_host(lab: Lab, tmp_path: Path) -> None:
    web, app, clean = (f"{lab.prefix}-hv1-web", f"{lab.prefix}-hv2-app", f"{lab.prefix}-hv3-db")
    secret = lab.secret(SECRET_VALUE)
    hv1_disk = legacy_disk(lab, "hv1", SECRET_VALUE)
    lab.define_as_after_upgrade(web, [disk_xml("vda", hv1_disk, encryption="qcow", secret=secret)])
    virsh("autostart", web)
    hv2_disk = legacy_disk(lab, "hv2", PASSPHRASE.encode())
    lab.define(app, [disk_xml("vda", hv2_disk)])
    host_folder(lab, "hv3")
    lab.define(clean, [disk_xml("vda", lab.plain_image("hv3/db.qcow2"))])
    virsh("start", clean)
    clean_xml = lab.inactive_xml(clean)

    executable, argv_log = spy(tmp_path)
    ansible = Ansible(tmp_path / "ansible")
    inventory = ansible.inventory(
        {host: {"qcrypt_scan_paths": [str(host_folder(lab, host))]} for host in ("hv1", "hv2", "hv3")},
        {"qcrypt_executable": str(executable)},
    )
    vault = ansible.vars_file(
        "vault.json", {"qcrypt_passphrase": PASSPHRASE, "qcrypt_iter_time": 100, "qcrypt_start_after": "autostart"}
    )

    # 1. The audit names each host's broken domain.
    reports = tmp_path / "reports"
    audit = ansible.playbook("qcrypt.qcrypt.audit", inventory, "-e", f"qcrypt_report_dir={reports}")
    assert audit.rc == 0, audit.explain()
    markdown = (reports / "fleet-report.md").read_text()
    assert re.search(rf"^\| hv1 \| scanned \| 1 \| 1 \| 1 \| 0 \| {web} \|", markdown, re.MULTILINE), markdown
    assert re.search(rf"^\| hv2 \| scanned \| 1 \| 1 \| 1 \| 0 \| {app} \|", markdown, re.MULTILINE), markdown
    assert re.search(r"^\| hv3 \| scanned \| 1 \| 0 \| 0 \| 0 \| - \|", markdown, re.MULTILINE), markdown

    # 2. Check mode: the plan and the XML diff, and nothing done.
    before = libvirt_view(lab, [web, app, clean])
    check = ansible.playbook("qcrypt.qcrypt.migrate", inventory, "-e", f"@{vault}", "--check", "--diff")
    assert check.rc == 0, check.explain()
    assert check.recap["hv1"]["changed"] == 1 and check.recap["hv2"]["changed"] == 1, check.explain()
    assert check.recap["hv3"]["changed"] == 0, check.explain()
    assert '+        <encryption format="luks">' in check.stdout, check.explain()
    assert f'-      <source file="{hv2_disk}" />' in check.stdout, check.explain()
    assert libvirt_view(lab, [web, app, clean]) == before

    # 3. The real run, one host per batch.
    run = ansible.playbook("qcrypt.qcrypt.migrate", inventory, "-e", f"@{vault}", "-v")
    assert run.rc == 0, run.explain()
    assert host_order(run, ["hv1", "hv2", "hv3"]) == ["hv1", "hv2", "hv3"], run.explain()
    assert run.recap["hv1"]["changed"] == 2 and run.recap["hv2"]["changed"] == 1, run.explain()  # hv1: migrate+start
    assert run.recap["hv3"]["changed"] == 0, run.explain()
    # hv1's domain (autostart) runs on its new disk, and QEMU reads the data written before the migration.
    new_web_disk = source_files(lab, web)
    assert new_web_disk == [str(hv1_disk.with_name("disk.luks.qcow2"))]
    web_xml = lab.inactive_xml(web)
    assert "<encryption format='luks'" in web_xml and f"uuid='{secret}'" in web_xml, web_xml
    assert state(web) == "running"
    assert qemu_reads(web, node_of(web, Path(new_web_disk[0])), PATTERN, 0, MIB)
    # hv2's domain (not autostart) was migrated with the vault passphrase and left shut off.
    assert source_files(lab, app) == [str(hv2_disk.with_name("disk.luks.qcow2"))]
    assert state(app) == "shut off"
    # hv3's clean domain was not touched.
    assert state(clean) == "running" and lab.inactive_xml(clean) == clean_xml
    # The passphrase went to qcrypt on stdin: never on its command line, never in Ansible's output.
    argv = argv_log.read_text()
    assert "migrate-domain" in argv and "--passphrase-file -" in argv
    for text in (argv, run.stdout, run.stderr, check.stdout, check.stderr):
        assert PASSPHRASE not in text and SECRET_VALUE.decode() not in text

    # 4. A second run and check mode again: nothing to do.
    again = ansible.playbook("qcrypt.qcrypt.migrate", inventory, "-e", f"@{vault}")
    assert again.rc == 0 and again.total("changed") == 0, again.explain()
    check_again = ansible.playbook("qcrypt.qcrypt.migrate", inventory, "-e", f"@{vault}", "--check")
    assert check_again.rc == 0 and check_again.total("changed") == 0, check_again.explain()
    assert state(web) == "running"


def test_first_failure_stops_the_rollout(lab: Lab, tmp_path: Path) -> None:
    """Batches of two hosts: hv1's passphrase is wrong, so qcrypt refuses and the task fails with its one-line
    message. Nothing changes anywhere: hv1 keeps its old disk and XML, hv2 (same batch; Ansible runs the included
    per-domain tasks host after host) is stopped before its turn, and the next batch (hv3) never starts. Without
    any_errors_fatal and max_fail_percentage 0, Ansible would go on with hv2 and hv3 (a batch not entirely
    failed does not stop a play)."""
    names = {host: f"{lab.prefix}-{host}-vm" for host in ("hv1", "hv2", "hv3")}
    for host, name in names.items():
        right = b"the-right-one" if host == "hv1" else PASSPHRASE.encode()
        lab.define(name, [disk_xml("vda", legacy_disk(lab, host, right))])
    ansible = Ansible(tmp_path / "ansible")
    inventory = ansible.inventory({host: {"qcrypt_scan_paths": [str(host_folder(lab, host))]} for host in names})
    vault = ansible.vars_file(
        "vault.json",
        {
            "qcrypt_passphrase": PASSPHRASE,
            "qcrypt_iter_time": 100,
            "qcrypt_passphrases": {names["hv1"]: "a-wrong-passphrase"},
            "qcrypt_serial": 2,
        },
    )
    before = libvirt_view(lab, list(names.values()))

    run = ansible.playbook("qcrypt.qcrypt.migrate", inventory, "-e", f"@{vault}")
    assert run.rc != 0, run.explain()
    assert run.recap["hv1"]["failed"] == 1, run.explain()
    assert "hv3" not in run.recap or run.recap["hv3"]["ok"] == 0, run.explain()
    failure = re.search(r"^fatal: \[hv1\]: FAILED! => .*\"msg\": \"([^\"]*)\"", run.stdout, re.MULTILINE)
    assert failure and failure.group(1).startswith(f"{names['hv1']}: failed: "), run.explain()
    assert "passphrase" in failure.group(1)
    after = libvirt_view(lab, list(names.values()))
    if run.recap["hv2"]["changed"]:
        # Ansible includes the per-domain tasks of a batch's hosts in the order their include results came back,
        # which is not always host order: hv2's turn may come before hv1's. Then hv2 is migrated whole, never half.
        assert "hv2/disk.luks.qcow2" in after["files"] and "disk.luks.qcow2" in after["xml"][names["hv2"]], (
            run.explain()
        )
        assert len(set(after["secrets"]) - set(before["secrets"])) <= 1, run.explain()  # hv2's new secret
        after["secrets"] = before["secrets"]
        for view in (before, after):
            view["files"] = {k: v for k, v in view["files"].items() if not k.startswith("hv2/")}
            view["xml"] = {k: v for k, v in view["xml"].items() if k != names["hv2"]}
    assert after == before, run.explain()  # hv1 unchanged, and the next batch (hv3) never started
    assert "a-wrong-passphrase" not in run.stdout + run.stderr


def test_running_domain_is_shut_down_and_started_again(lab: Lab, tmp_path: Path) -> None:
    """A domain that ignores the ACPI shutdown (no guest OS): without force the host fails after the timeout;
    with force it is forced off, then started again because it was running."""
    name = f"{lab.prefix}-hv1-db"
    host_folder(lab, "hv1")
    lab.define(name, [disk_xml("vda", lab.plain_image("hv1/db.qcow2"))])
    virsh("start", name)
    ansible = Ansible(tmp_path / "ansible")
    inventory = ansible.inventory(
        {"hv1": {"qcrypt_migrate_domains": [name], "qcrypt_shutdown_timeout": 3, "qcrypt_shutdown_poll": 1}}
    )

    refused = ansible.playbook("qcrypt.qcrypt.migrate", inventory)
    assert refused.rc != 0 and refused.recap["hv1"]["failed"] == 1, refused.explain()
    assert f"{name} did not shut down within 3 s (state: running)" in refused.stdout, refused.explain()
    assert state(name) == "running"

    forced = ansible.playbook("qcrypt.qcrypt.migrate", inventory, "-e", '{"qcrypt_force_off_after_timeout": true}')
    assert forced.rc == 0, forced.explain()
    assert re.search(rf"TASK \[qcrypt.qcrypt.migrate : Force {name} off\] \*+\nchanged: \[hv1\]", forced.stdout)
    # Its disk is clean: qcrypt_domain reports no change.
    assert re.search(rf"TASK \[qcrypt.qcrypt.migrate : Migrate the disks of {name}\] \*+\nok: \[hv1\]", forced.stdout)
    assert re.search(rf"TASK \[qcrypt.qcrypt.migrate : Start {name}\] \*+\nchanged: \[hv1\]", forced.stdout)
    assert state(name) == "running"


def test_domain_module_errors_are_one_line(tmp_path: Path) -> None:
    """qcrypt's own message becomes the task's msg; a usage error (name and all) never reaches qcrypt."""
    ensure_libvirtd()
    ansible = Ansible(tmp_path / "ansible")
    missing = f"qcrypt-ansible-test-{uuid.uuid4().hex[:6]}-nosuch"
    result = ansible.module("qcrypt.qcrypt.qcrypt_domain", {"name": missing, "executable": qcrypt_command()})
    assert result["failed"] is True and result["rc"] == 13, result["_stdout"]
    assert result["msg"] == (
        f"{missing}: failed: domain {missing}: Domain not found: no domain with matching name '{missing}'"
    )
    assert result["domains"][0]["status"] == "failed" and result["changed"] is False
    both = ansible.module("qcrypt.qcrypt.qcrypt_domain", {"name": missing, "all": True})
    assert both["failed"] is True and both["msg"] == "parameters are mutually exclusive: name|all"
