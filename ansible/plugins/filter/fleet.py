# Copyright: qcrypt developers
# GNU General Public License v2.0 or later, hence also v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters turning per-host ``qcrypt_scan`` results into one fleet report (a dict, and a Markdown page)."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

NOT_SCANNED = "not scanned (host unreachable or skipped)"


def _host_entry(host, result):
    """One host's line of the report, from its registered ``qcrypt_scan`` result (or the lack of one)."""
    entry = {"host": host, "status": "scanned", "error": None, "images": 0, "legacy_images": 0,
             "by_severity": {}, "affected_domains": [], "domains_with_missing_images": [], "legacy": [],
             "refused_backing": []}
    if not isinstance(result, dict) or not result:
        entry.update(status="failed", error=NOT_SCANNED)
        return entry
    if result.get("failed") or "report" not in result:
        entry.update(status="failed", error=result.get("msg") or NOT_SCANNED)
        return entry
    summary = result.get("summary") or {}
    missing = result["report"].get("domains_with_missing_images") or []
    entry.update(
        images=summary.get("images", 0),
        legacy_images=summary.get("legacy", 0),
        by_severity=dict(summary.get("by_severity") or {}),
        affected_domains=list(result.get("affected_domains") or []),
        domains_with_missing_images=[dict(item) for item in missing],
        legacy=[dict(image) for image in result.get("legacy_images") or []],
        refused_backing=[dict(image) for image in result.get("refused_backing") or []],
    )
    return entry


def fleet_report(hostvars, hosts, variable="qcrypt_audit_scan", generated_at=None):
    """The fleet report: one entry per host of ``hosts`` (from ``hostvars[host][variable]``) and totals."""
    if isinstance(hosts, str):
        raise AnsibleFilterError("fleet_report: hosts must be a list of inventory names")
    entries = []
    for host in hosts:
        try:
            host_vars = hostvars[host]
        except KeyError:
            host_vars = {}
        entries.append(_host_entry(str(host), host_vars.get(variable)))
    totals = {
        "hosts": len(entries),
        "hosts_failed": sum(1 for e in entries if e["status"] == "failed"),
        "hosts_affected": sum(1 for e in entries if e["legacy_images"] or e["domains_with_missing_images"]),
        "images": sum(e["images"] for e in entries),
        "legacy_images": sum(e["legacy_images"] for e in entries),
        "affected_domains": sum(len(e["affected_domains"]) for e in entries),
        "domains_with_missing_images": sum(len(e["domains_with_missing_images"]) for e in entries),
        "refused_backing": sum(len(e["refused_backing"]) for e in entries),
    }
    return {"generated_at": generated_at, "hosts": entries, "totals": totals}


def _cell(value):
    """A Markdown table cell: pipes escaped, line breaks flattened, '-' for nothing."""
    text = str(value) if value not in (None, "", []) else "-"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _names(values):
    return ", ".join(str(v) for v in values) if values else "-"


def _host_rows(report):
    rows = ["| host | status | images | legacy images | critical | warning | affected domains "
            "| domains with missing images |",
            "|---|---|---:|---:|---:|---:|---|---|"]
    for e in report["hosts"]:
        missing = [m.get("domain") for m in e["domains_with_missing_images"]]
        status = e["status"] if not e["error"] else "%s: %s" % (e["status"], e["error"])
        rows.append("| %s | %s | %d | %d | %d | %d | %s | %s |" % (
            _cell(e["host"]), _cell(status), e["images"], e["legacy_images"],
            e["by_severity"].get("critical", 0), e["by_severity"].get("warning", 0),
            _cell(_names(e["affected_domains"])), _cell(_names(missing))))
    t = report["totals"]
    rows.append("| **total** | %d failed | %d | %d | %d | %d | %d | %d |" % (
        t["hosts_failed"], t["images"], t["legacy_images"],
        sum(e["by_severity"].get("critical", 0) for e in report["hosts"]),
        sum(e["by_severity"].get("warning", 0) for e in report["hosts"]),
        t["affected_domains"], t["domains_with_missing_images"]))
    return rows


def _image_rows(report):
    rows = ["| host | image | domains | findings |", "|---|---|---|---|"]
    for e in report["hosts"]:
        for image in e["legacy"]:
            cells = (e["host"], image.get("path"), _names(image.get("domains")), _names(image.get("findings")))
            rows.append("| %s | %s | %s | %s |" % tuple(_cell(c) for c in cells))
        for m in e["domains_with_missing_images"]:
            rows.append("| %s | %s (missing) | %s | legacy XML encryption (%s) on disk %s |" % (
                _cell(e["host"]), _cell(m.get("path")), _cell(m.get("domain")), _cell(m.get("encryption")),
                _cell(m.get("target"))))
    return rows


def _refused_rows(report):
    rows = ["| host | image | domains | findings | message |", "|---|---|---|---|---|"]
    for e in report["hosts"]:
        for image in e.get("refused_backing") or []:
            cells = (e["host"], image.get("path"), _names(image.get("domains")), _names(image.get("findings")),
                     " / ".join(str(m) for m in image.get("messages") or []))
            rows.append("| %s | %s | %s | %s | %s |" % tuple(_cell(c) for c in cells))
    return rows


def fleet_markdown(report):
    """The fleet report as a Markdown page: per-host counts, then every legacy image and its domains."""
    t = report["totals"]
    lines = ["# qcrypt fleet report", ""]
    if report.get("generated_at"):
        lines += ["Generated %s." % report["generated_at"], ""]
    lines += ["%d host(s): %d with legacy encryption, %d not scanned; %d legacy image(s) of %d; "
              "%d affected domain(s)." % (t["hosts"], t["hosts_affected"], t["hosts_failed"], t["legacy_images"],
                                          t["images"], t["affected_domains"]), ""]
    lines += _host_rows(report)
    image_rows = _image_rows(report)
    if len(image_rows) > 2:
        lines += ["", "## Legacy-encrypted images", ""] + image_rows
    refused_rows = _refused_rows(report)
    if len(refused_rows) > 2:
        lines += ["", "## Backing files not followed", "",
                  "qcrypt refused these images' backing files (outside the image's storage, not readable by the "
                  "image's owner, or a special file): check each image before migrating it.", ""] + refused_rows
    return "\n".join(lines) + "\n"


class FilterModule:
    """qcrypt fleet report filters."""

    def filters(self):
        return {"fleet_report": fleet_report, "fleet_markdown": fleet_markdown}
