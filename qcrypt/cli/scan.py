"""``qcrypt scan``: audit files and directories for legacy encryption and weak LUKS settings."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from qcrypt.audit import walk
from qcrypt.audit.report import ImageReport, ScanSummary
from qcrypt.cli.exit_codes import EXIT_FINDINGS, handle_errors
from qcrypt.cli.options import allow_backing_dir_opt, chain_rules, human_size, progress_bar, style_severity
from qcrypt.model.findings import Severity
from qcrypt.plumbing.parallel import default_workers

FAIL_ON = ("critical", "warning", "info", "never")


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "json", "prometheus"]),
    default="table",
    show_default=True,
    help="table for people, json for tools, prometheus for node_exporter.",
)
@click.option(
    "--fail-on",
    type=click.Choice(FAIL_ON),
    default="critical",
    show_default=True,
    help="Exit 1 if any image is at or above this severity.",
)
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(1, 64),
    default=None,
    help="Worker processes inspecting images [default: one per CPU].",
)
@click.option(
    "--libvirt-xml",
    "libvirt_dir",
    type=click.Path(exists=True, file_okay=False),
    help="Folder of libvirt domain XML files: name the domains using each image.",
)
@click.option("-q", "--quiet", is_flag=True, help="Print only findings (table format), nothing for clean images.")
@allow_backing_dir_opt
@handle_errors
def scan(
    paths: tuple[str, ...],
    output_format: str,
    fail_on: str,
    jobs: int | None,
    libvirt_dir: str | None,
    quiet: bool,
    allow_backing_dirs: tuple[str, ...],
) -> None:
    """Find legacy-encrypted images (also in backing chains) and grade LUKS settings.

    Reads headers only: no passphrase is needed and nothing is written. With --libvirt-xml, a disk's format is
    the one its domain XML declares (a raw disk is never parsed as an image).
    """
    rules = chain_rules(allow_backing_dirs)
    declared: dict[str, str] = {}
    if libvirt_dir:
        from qcrypt.libvirt import xmldir

        declared, rules = xmldir.declared_formats(libvirt_dir, rules)
    files = list(walk.iter_files(paths))
    with progress_bar(total=len(files), unit="img", leave=False) as bar:
        reports = walk.scan_files(
            files,
            jobs=jobs or default_workers(),
            progress=lambda _report: bar.update(),
            rules=rules,
            declared=declared,
            named=paths,
        )
    domains_without_image: list[dict[str, Any]] = []  # JSON form
    if libvirt_dir:
        domains_without_image = [m.to_json() for m in xmldir.annotate_reports(reports, libvirt_dir)]
    summary = ScanSummary.of(reports).to_json()
    should_exit = should_fail(reports, fail_on)
    documents = [r.to_json() for r in reports]  # the JSON edge: the printers below read this form
    if output_format == "json":
        document: dict[str, Any] = {"images": documents, "summary": summary}
        if libvirt_dir:
            document["domains_with_missing_images"] = domains_without_image
        click.echo(json.dumps(document, indent=2))
    elif output_format == "prometheus":
        click.echo(prometheus(reports), nl=False)
    elif quiet:
        print_findings(documents, domains_without_image)
    else:
        print_table(documents, summary, domains_without_image)
    if should_exit or (domains_without_image and fail_on != "never"):
        sys.exit(EXIT_FINDINGS)


def should_fail(reports: list[ImageReport], fail_on: str) -> bool:
    if fail_on == "never":
        return False
    threshold = Severity(fail_on).rank
    return any(r.severity.rank >= threshold for r in reports)


def _codes(report: dict[str, Any]) -> str:
    return ",".join(f["code"] for f in report["findings"]) or "-"


def print_table(reports: list[dict[str, Any]], summary: dict[str, Any], missing_domains: list[dict[str, Any]]) -> None:
    click.echo(f"{'SEVERITY':<8}  {'ENCRYPTION':<14}  {'FORMAT':<6}  {'SIZE':>10}  PATH  [FINDINGS]")
    for r in reports:
        domains = f"  domains={','.join(r['domains'])}" if r.get("domains") else ""
        click.echo(
            f"{style_severity(r['severity'])}  {r['encryption']:<14}  {r['format']:<6}  "
            f"{human_size(r['virtual_size']):>10}  {r['path']}  [{_codes(r)}]{domains}"
        )
    for d in missing_domains:
        click.echo(
            f"{style_severity('critical')}  domain {d['domain']} disk {d['target']}: "
            f"<encryption format='{d['encryption']}'> on missing image {d['path']}"
        )
    by_sev = ", ".join(f"{k}={v}" for k, v in sorted(summary["by_severity"].items()))
    click.echo(f"\n{summary['images']} image(s); {summary['legacy']} with legacy AES encryption; {by_sev}")


def print_findings(reports: list[dict[str, Any]], missing_domains: list[dict[str, Any]]) -> None:
    for r in reports:
        for f in r["findings"]:
            click.echo(f"{r['path']}: {f['severity']}: {f['code']}: {f['message']}")
    for d in missing_domains:
        click.echo(
            f"{d['path']}: critical: legacy-aes: domain {d['domain']} disk {d['target']} declares "
            f"<encryption format='{d['encryption']}'> but the image is missing"
        )


def _label(value: object) -> str:
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus(reports: list[ImageReport]) -> str:
    """node_exporter textfile-collector metrics."""
    lines = [
        "# HELP qcrypt_images Images scanned, by encryption and severity.",
        "# TYPE qcrypt_images gauge",
    ]
    counts: dict[tuple[str, str], int] = {}
    for r in reports:
        key = (r.encryption.value, r.severity.value)
        counts[key] = counts.get(key, 0) + 1
    for (enc, sev), n in sorted(counts.items()):
        lines.append(f'qcrypt_images{{encryption="{_label(enc)}",severity="{_label(sev)}"}} {n}')
    lines += [
        "# HELP qcrypt_legacy_images Images whose data or backing chain uses legacy qcow AES encryption.",
        "# TYPE qcrypt_legacy_images gauge",
        f"qcrypt_legacy_images {sum(1 for r in reports if r.has_legacy)}",
        "# HELP qcrypt_image_info One series per image (value 1).",
        "# TYPE qcrypt_image_info gauge",
    ]
    for r in reports:
        codes = ",".join(f.code for f in r.findings) or "-"
        lines.append(
            f'qcrypt_image_info{{path="{_label(r.path)}",format="{_label(r.format)}",'
            f'encryption="{_label(r.encryption.value)}",severity="{_label(r.severity.value)}",'
            f'findings="{_label(codes)}"}} 1'
        )
    lines += [
        "# HELP qcrypt_scan_timestamp_seconds When this scan finished.",
        "# TYPE qcrypt_scan_timestamp_seconds gauge",
        f"qcrypt_scan_timestamp_seconds {time.time():.0f}",
    ]
    return "\n".join(lines) + "\n"
