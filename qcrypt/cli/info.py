"""``qcrypt info``: everything about one image (container, encryption, layout, LUKS parameters)."""

from __future__ import annotations

import json
from typing import Any

import click

from qcrypt.audit.describe import describe
from qcrypt.cli.exit_codes import handle_errors
from qcrypt.cli.options import SEVERITY_COLOURS, allow_backing_dir_opt, chain_rules, format_opt, human_size


@click.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@format_opt
@allow_backing_dir_opt
@handle_errors
def info(image: str, output_format: str, allow_backing_dirs: tuple[str, ...]) -> None:
    """Describe IMAGE: format, encryption, findings, layout, snapshots, backing chain, LUKS keyslots."""
    report = describe(image, rules=chain_rules(allow_backing_dirs)).to_json()  # the JSON edge
    if output_format == "json":
        click.echo(json.dumps(report, indent=2))
    else:
        print_info(report)


def _row(name: str, value: object) -> None:
    click.echo(f"{name + ':':<22}{value}")


def print_info(r: dict[str, Any]) -> None:
    _row("image", r["path"])
    version = f" (version {r['format_version']})" if r["format_version"] is not None else ""
    _row("format", f"{r['format']}{version}")
    _row("virtual size", f"{human_size(r['virtual_size'])} ({r['virtual_size']} bytes)")
    _row("encryption", r["encryption"])
    _row("severity", click.style(r["severity"], fg=SEVERITY_COLOURS.get(r["severity"])))
    if r["cluster_size"]:
        _row("cluster size", r["cluster_size"])
        allocated = r["allocated_bytes"]
        _row(
            "allocated",
            "unknown (see findings)" if allocated is None else f"{human_size(allocated)} ({allocated} bytes)",
        )
    if r.get("features"):
        for mask, names in r["features"].items():
            if names:
                _row(f"{mask} features", ", ".join(names))
    if r["backing_file"]:
        fmt = f" (format {r['backing_format']})" if r.get("backing_format") else ""
        _row("backing file", f"{r['backing_file']}{fmt}")
        for depth, layer in enumerate(r["backing_chain"], 1):
            _row(f"  layer {depth}", f"{layer['path']} [{layer['format']}, {layer['encryption']}]")
    for snap in r["snapshots"]:
        _row("snapshot", f"{snap['id']} {snap['name']!r} ({human_size(snap['virtual_size'])})")
    if r.get("luks"):
        _print_luks(r["luks"])
    for f in r["findings"]:
        _row("finding", f"{f['severity']}: {f['code']}: {f['message']}")


def _print_luks(luks: dict[str, Any]) -> None:
    for key in ("version", "uuid", "cipher", "hash", "key_bits", "payload_offset", "mk_iterations"):
        if luks.get(key) is not None:
            _row(f"luks {key}", luks[key])
    for slot in luks.get("keyslots", []):
        if slot.get("active", True):
            detail = {k: v for k, v in slot.items() if k not in ("index", "active")}
            _row(f"luks keyslot {slot['index']}", ", ".join(f"{k}={v}" for k, v in detail.items()))
