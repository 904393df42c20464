#!/usr/bin/python
# Copyright: qcrypt developers
# GNU General Public License v2.0 or later, hence also v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: qcrypt_scan
short_description: Find images with QEMU's legacy qcow/qcow2 AES encryption on a hypervisor
version_added: "0.1.0"
description:
  - Runs C(qcrypt scan --format json) on the managed host and returns its report.
  - Only image headers and libvirt domain XML files are read. Nothing is ever changed, so the module always
    reports C(changed=false) and runs unchanged in check mode.
  - Besides qcrypt's report, it returns the images that use legacy AES (in the image or in a backing layer) and
    the libvirt domains that use them, which is what the P(qcrypt.qcrypt.migrate#role) role migrates.
options:
  paths:
    description:
      - Files and directories to scan. Directories are walked recursively.
    type: list
    elements: path
    default: [/var/lib/libvirt/images]
  libvirt_xml:
    description:
      - Folder of libvirt domain XML files, used to name the domains that use each image.
      - Set to an empty string to scan images only.
    type: path
    default: /etc/libvirt/qemu
  jobs:
    description:
      - Worker processes inspecting images (qcrypt's C(--jobs)). By default one per CPU.
    type: int
  allow_backing_dirs:
    description:
      - Folders backing files may be in besides each image's own folder (qcrypt's C(--allow-backing-dir)).
      - A backing file elsewhere, one the image's owner cannot read, or a special file is not followed and is
        reported (see RV(refused_backing)).
    type: list
    elements: path
    default: []
  as_facts:
    description:
      - Also return the report as the host fact C(qcrypt_scan).
    type: bool
    default: false
extends_documentation_fragment:
  - qcrypt.qcrypt.qcrypt_cli
attributes:
  check_mode:
    support: full
    description: The scan only reads, so it runs in check mode too.
  diff_mode:
    support: none
    description: Nothing changes, so there is nothing to show.
  facts:
    support: full
    description: With O(as_facts=true) the report is returned as the fact C(qcrypt_scan).
requirements:
  - qcrypt on the managed host (see the P(qcrypt.qcrypt.install#role) role)
  - coreutils C(timeout) on the managed host
author:
  - qcrypt developers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Scan the default image pool and name the domains using each image
  qcrypt.qcrypt.qcrypt_scan:
  register: scan

- name: List the domains that need migrating
  ansible.builtin.debug:
    var: scan.affected_domains

- name: Scan two folders without libvirt, keep the report as a fact
  qcrypt.qcrypt.qcrypt_scan:
    paths:
      - /srv/images
      - /backup/images
    libvirt_xml: ""
    as_facts: true
"""

RETURN = r"""
report:
  description: The document printed by C(qcrypt scan --format json) (see qcrypt's docs/REFERENCE.md, "Report fields", for every field).
  returned: success
  type: dict
  contains:
    images:
      description: One entry per image (path, format, encryption, severity, findings, domains, ...).
      type: list
      elements: dict
    summary:
      description: Counts by encryption, format and severity, and C(legacy).
      type: dict
    domains_with_missing_images:
      description: Domains whose XML declares legacy encryption on an image that does not exist.
      type: list
      elements: dict
      returned: when O(libvirt_xml) is set
summary:
  description: The report's summary.
  returned: success
  type: dict
  sample: {"images": 3, "legacy": 1, "by_severity": {"critical": 1, "ok": 2}}
legacy_images:
  description: Images whose data or backing chain uses legacy AES encryption.
  returned: success
  type: list
  elements: dict
  sample: [{"path": "/var/lib/libvirt/images/web.qcow2", "domains": ["web"], "findings": ["legacy-aes"]}]
affected_domains:
  description: Sorted names of the libvirt domains that use a legacy-encrypted image that exists.
  returned: success
  type: list
  elements: str
  sample: ["web"]
refused_backing:
  description:
    - Images whose backing file qcrypt refused to follow (outside the image's storage, not readable by the
      image's owner, or a special file), with the domains that use them and qcrypt's messages.
  returned: success
  type: list
  elements: dict
  sample: [{"path": "/var/lib/libvirt/images/t.qcow2", "domains": ["t"], "findings": ["backing-not-owner-readable"],
            "messages": ["backing file /root/secret of /var/lib/libvirt/images/t.qcow2 is not readable by ..."]}]
ansible_facts:
  description: With O(as_facts=true).
  returned: when O(as_facts=true)
  type: dict
  contains:
    qcrypt_scan:
      description: The same document as RV(report).
      type: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.qcrypt.qcrypt.plugins.module_utils.qcrypt_cli import (
    COMMON_ARGUMENT_SPEC,
    one_line_error,
    parse_report,
    run_qcrypt,
)

LEGACY_CODES = ("legacy-aes", "legacy-aes-backing")
REFUSED_BACKING_CODES = ("backing-outside-storage", "backing-not-owner-readable", "backing-special-file")


def legacy_images(report):
    """The images whose data or backing chain uses legacy AES, with the domains that use them."""
    found = []
    for image in report.get("images", []):
        codes = [finding.get("code") for finding in image.get("findings", [])]
        if any(code in LEGACY_CODES for code in codes):
            found.append({"path": image.get("path"), "domains": image.get("domains", []), "findings": codes})
    return found


def refused_backing(report):
    """The images whose backing file qcrypt refused to follow, with the domains that use them."""
    found = []
    for image in report.get("images", []):
        refused = [f for f in image.get("findings", []) if f.get("code") in REFUSED_BACKING_CODES]
        if refused:
            found.append({"path": image.get("path"), "domains": image.get("domains", []),
                          "findings": [f.get("code") for f in refused],
                          "messages": [f.get("message") for f in refused]})
    return found


def scan_arguments(params):
    arguments = ["scan", "--format", "json", "--fail-on", "never"]
    if params["jobs"] is not None:
        arguments += ["--jobs", str(params["jobs"])]
    if params["libvirt_xml"]:
        arguments += ["--libvirt-xml", params["libvirt_xml"]]
    for folder in params.get("allow_backing_dirs") or []:
        arguments += ["--allow-backing-dir", folder]
    return arguments + ["--"] + list(params["paths"])


def main():
    argument_spec = {
        "paths": {"type": "list", "elements": "path", "default": ["/var/lib/libvirt/images"]},
        "libvirt_xml": {"type": "path", "default": "/etc/libvirt/qemu"},
        "jobs": {"type": "int"},
        "allow_backing_dirs": {"type": "list", "elements": "path", "default": []},
        "as_facts": {"type": "bool", "default": False},
    }
    argument_spec.update(COMMON_ARGUMENT_SPEC)
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    if not module.params["paths"]:
        module.fail_json(msg="paths must name at least one file or folder")
    if module.params["jobs"] is not None and not 1 <= module.params["jobs"] <= 64:
        module.fail_json(msg="jobs must be between 1 and 64")

    rc, stdout, stderr = run_qcrypt(module, scan_arguments(module.params))
    if rc != 0:
        module.fail_json(msg=one_line_error(stderr, rc), rc=rc, stderr=stderr)
    report = parse_report(module, rc, stdout, stderr)
    legacy = legacy_images(report)
    affected = sorted({name for image in legacy for name in image["domains"]})
    result = {"changed": False, "report": report, "summary": report.get("summary", {}), "legacy_images": legacy,
              "affected_domains": affected, "refused_backing": refused_backing(report)}
    if module.params["as_facts"]:
        result["ansible_facts"] = {"qcrypt_scan": report}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
