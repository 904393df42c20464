#!/usr/bin/python
# Copyright: qcrypt developers
# GNU General Public License v2.0 or later, hence also v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: qcrypt_domain
short_description: Migrate a libvirt domain's legacy-encrypted qcow/qcow2 disks to LUKS
version_added: "0.1.0"
description:
  - Runs C(qcrypt migrate-domain --format json) on the managed host. Every disk of the domain whose image (or a
    backing layer) uses QEMU's legacy AES encryption is migrated to LUKS, verified, and the domain is redefined
    with the new disks; the old XML is saved to a backup file first. Other disks are not touched.
  - The domain must be shut off. A running or paused domain is refused and the task fails; the
    P(qcrypt.qcrypt.migrate#role) role shuts domains down first.
  - A domain that has no legacy disk is left alone and the task reports C(changed=false), so a rerun is a no-op.
  - In check mode, qcrypt's dry run (C(--dry-run)) reports the plan, and nothing is written or defined.
  - In diff mode, the change to the domain XML is shown as a unified diff.
  - Errors fail the task with qcrypt's one-line message.
options:
  name:
    description:
      - Name of the libvirt domain to migrate.
      - Exactly one of O(name) and O(all) is required.
    type: str
    aliases: [domain]
  all:
    description:
      - Migrate every domain on the connection that has an affected disk.
    type: bool
    default: false
  state:
    description:
      - V(migrated) makes sure no disk of the domain uses legacy AES encryption.
    type: str
    choices: [migrated]
    default: migrated
  uri:
    description:
      - libvirt connection URI (qcrypt's C(--connect)).
    type: str
    default: qemu:///system
  to:
    description:
      - Target format. By default qcrypt picks qcow2-LUKS for qcow2 disks and raw LUKS for raw-driver disks.
    type: str
    choices: [qcow2-luks, luks]
  replace:
    description:
      - The new images take the old names (qcrypt keeps the originals as C(NAME.qcrypt-orig)) instead of being
        written beside them (C(NAME.luks.qcow2)).
    type: bool
    default: false
  start:
    description:
      - Start each migrated domain afterwards. The task fails if a migrated domain does not run.
    type: bool
    default: false
  iter_time:
    description:
      - Milliseconds of PBKDF2 for the new LUKS keyslot (qcrypt's default when unset).
    type: int
  passphrase:
    description:
      - Passphrase of the legacy images, used only for disks whose libvirt secret is private or missing.
      - It is given to qcrypt on standard input, never on its command line.
    type: str
  passphrase_file:
    description:
      - File on the managed host holding that passphrase, used byte for byte as cryptsetup's --key-file uses
        a keyfile; when that opens nothing and the file ends in a newline, qcrypt tries it without the newline.
    type: path
  allow_backing_dirs:
    description:
      - Folders backing files may be in besides each image's own folder (qcrypt's C(--allow-backing-dir)). A
        legacy disk whose chain reaches a backing file elsewhere (or one its owner cannot read, or a special
        file) is refused and the task fails.
    type: list
    elements: path
    default: []
  accept_unverified_passphrase:
    description:
      - Migrate a legacy disk even when it holds no data cluster to check its passphrase against
        (qcrypt's C(--accept-unverified-passphrase)). Off by default, so such a disk fails the task.
    type: bool
    default: false
extends_documentation_fragment:
  - qcrypt.qcrypt.qcrypt_cli
attributes:
  check_mode:
    support: full
    description: Check mode runs qcrypt's dry run, which changes nothing and returns the plan.
  diff_mode:
    support: full
    description: The domain XML change, as qcrypt's unified diff.
  idempotent:
    support: full
    description: A domain without legacy disks is left alone (C(changed=false)).
requirements:
  - qcrypt with the C(migrate-domain) command on the managed host
  - coreutils C(timeout) on the managed host
notes:
  - The old images are kept (unless O(replace=true)); dispose of them once the domain is confirmed good.
author:
  - qcrypt developers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Migrate the disks of one shut-off domain
  qcrypt.qcrypt.qcrypt_domain:
    name: web
    state: migrated

- name: Migrate every affected domain, with the passphrase of disks whose secret is private
  qcrypt.qcrypt.qcrypt_domain:
    all: true
    passphrase: "{{ vault_legacy_passphrase }}"
    iter_time: 2000

- name: Show what would change (check mode and diff mode)
  qcrypt.qcrypt.qcrypt_domain:
    name: web
  check_mode: true
  diff: true
"""

RETURN = r"""
domains:
  description: One entry per domain, as qcrypt's C(migrate-domain --format json) reports it.
  returned: always when qcrypt printed its report
  type: list
  elements: dict
  contains:
    name:
      description: Domain name.
      type: str
    status:
      description: V(migrated), V(unchanged), V(planned) (check mode), V(skipped) or V(failed).
      type: str
    reason:
      description: Why the domain was unchanged, skipped or failed (one line), else null.
      type: str
    state:
      description: The domain's state when qcrypt looked at it (V(shut off), V(running), ...), null when it had
        nothing to do.
      type: str
    error:
      description: For a failed or skipped domain, a stable machine-readable C(code) (for example
        V(bad-passphrase), V(no-passphrase), V(image-in-use), V(secret-usage-conflict)), the C(disk) target and
        its C(path) when the problem is a disk's, the C(message) and qcrypt's C(exit_code); else null.
      type: dict
    disks:
      description: The affected disks (target, source, new_path, to, sizes, secret_uuid, secret_created).
      type: list
      elements: dict
    xml_backup:
      description: Where the old domain XML was saved, or null when nothing was defined.
      type: str
    xml_diff:
      description: The XML change as a unified diff ("" when none).
      type: str
    started:
      description: With O(start=true), whether the domain runs afterwards.
      type: bool
  sample:
    - name: web
      status: migrated
      reason: null
      disks:
        - target: vda
          source: /var/lib/libvirt/images/web.qcow2
          new_path: /var/lib/libvirt/images/web.luks.qcow2
          to: qcow2-luks
      xml_backup: /var/lib/qcrypt/backups/web-20261127T160000Z.xml
      xml_diff: "--- web (old)\n+++ web (new)\n..."
      started: null
summary:
  description: How many domains ended in each status.
  returned: always when qcrypt printed its report
  type: dict
  sample: {"migrated": 1, "unchanged": 0, "planned": 0, "skipped": 0, "failed": 0}
rc:
  description: qcrypt's exit status (see qcrypt's docs/REFERENCE.md, "Exit codes").
  returned: always
  type: int
  sample: 0
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.qcrypt.qcrypt.plugins.module_utils.qcrypt_cli import (
    COMMON_ARGUMENT_SPEC,
    one_line_error,
    parse_report,
    run_qcrypt,
)

CHANGING_STATUSES = ("migrated", "planned")
FAILING_STATUSES = ("failed", "skipped")


def migrate_arguments(params, check_mode):
    """The qcrypt command line; a passphrase is only ever referred to as '-' (standard input)."""
    arguments = ["migrate-domain", "--format", "json", "--connect", params["uri"]]
    if check_mode:
        arguments.append("--dry-run")
    if params["to"]:
        arguments += ["--to", params["to"]]
    if params["replace"]:
        arguments.append("--replace")
    if params["start"] and not check_mode:
        arguments.append("--start")
    if params["iter_time"] is not None:
        arguments += ["--iter-time", str(params["iter_time"])]
    if params["passphrase"] is not None:
        arguments += ["--passphrase-file", "-"]
    elif params["passphrase_file"]:
        arguments += ["--passphrase-file", params["passphrase_file"]]
    for folder in params.get("allow_backing_dirs") or []:
        arguments += ["--allow-backing-dir", folder]
    if params.get("accept_unverified_passphrase"):
        arguments.append("--accept-unverified-passphrase")
    if params["all"]:
        return arguments + ["--all"]
    return arguments + ["--", params["name"]]


def problems(domains, start_requested):
    """One line per domain that failed, was skipped, or (with start) was migrated but does not run."""
    lines = []
    for domain in domains:
        if domain.get("status") in FAILING_STATUSES:
            lines.append("%s: %s: %s" % (domain.get("name"), domain.get("status"), domain.get("reason")))
        elif start_requested and domain.get("status") == "migrated" and domain.get("started") is False:
            lines.append("%s: migrated but not running: %s" % (domain.get("name"), domain.get("reason")))
    return lines


def main():
    argument_spec = {
        "name": {"type": "str", "aliases": ["domain"]},
        "all": {"type": "bool", "default": False},
        "state": {"type": "str", "choices": ["migrated"], "default": "migrated"},
        "uri": {"type": "str", "default": "qemu:///system"},
        "to": {"type": "str", "choices": ["qcow2-luks", "luks"]},
        "replace": {"type": "bool", "default": False},
        "start": {"type": "bool", "default": False},
        "iter_time": {"type": "int"},
        "passphrase": {"type": "str", "no_log": True},
        "passphrase_file": {"type": "path", "no_log": False},
        "allow_backing_dirs": {"type": "list", "elements": "path", "default": []},
        "accept_unverified_passphrase": {"type": "bool", "default": False},
    }
    argument_spec.update(COMMON_ARGUMENT_SPEC)
    module = AnsibleModule(
        argument_spec=argument_spec,
        supports_check_mode=True,
        mutually_exclusive=[("name", "all"), ("passphrase", "passphrase_file")],
        required_one_of=[("name", "all")],
    )
    params = module.params
    if params["all"] is False and not params["name"]:
        module.fail_json(msg="one of the following is required: name, all")
    if params["iter_time"] is not None and params["iter_time"] < 1:
        module.fail_json(msg="iter_time must be a positive number of milliseconds")
    if params["passphrase"] == "":
        module.fail_json(msg="passphrase is empty")

    rc, stdout, stderr = run_qcrypt(module, migrate_arguments(params, module.check_mode),
                                    stdin_text=params["passphrase"])
    report = parse_report(module, rc, stdout, stderr)
    domains = report.get("domains") or []
    diffs = [domain["xml_diff"] for domain in domains if domain.get("xml_diff")]
    result = {
        "changed": any(domain.get("status") in CHANGING_STATUSES for domain in domains),
        "domains": domains,
        "summary": report.get("summary", {}),
        "rc": rc,
    }
    if diffs:
        result["diff"] = {"prepared": "\n".join(diffs)}
    lines = problems(domains, params["start"] and not module.check_mode)
    if rc != 0 or lines:
        module.fail_json(msg="; ".join(lines) or one_line_error(stderr, rc), stderr=stderr, **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
