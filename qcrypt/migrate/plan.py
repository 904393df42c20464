"""Planning a migration: inspect the source, refuse what must not be copied, decide the chain and the snapshots
that go along, before any passphrase is tried or byte written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from qcrypt.audit import grading
from qcrypt.audit.inspect import inspect_image
from qcrypt.audit.report import ImageReport
from qcrypt.errors import (
    MigrationError,
)
from qcrypt.images.backing import BackingRefusedError, resolve_backing
from qcrypt.images.qcow2_reader import QCow2Image
from qcrypt.migrate.luks_output import refuse_unreadable_source
from qcrypt.migrate.options import TARGETS, MigrateOptions
from qcrypt.model import findings as F
from qcrypt.model.clusters import Snapshot
from qcrypt.model.encryption import Encryption


def new_luks_weaknesses(report: ImageReport, opts: MigrateOptions) -> list[F.Finding]:
    """What the scanner would grade in the LUKS container this migration creates (none when it creates none:
    another target, or a LUKS source whose header and keyslots carry over unchanged)."""
    if opts.target not in ("luks", "qcow2-luks") or report.encryption is Encryption.LUKS1:
        return []
    key_bits = opts.key_bits or (512 if "xts" in opts.cipher else 256)
    return grading.grade_new_luks(opts.cipher, opts.hash_name, key_bits, opts.iterations)


def refuse_weak_settings(report: ImageReport, opts: MigrateOptions) -> None:
    """MigrationError when the new container would carry a scanner finding and ``opts.allow_weak`` is off."""
    weak = new_luks_weaknesses(report, opts)
    if weak and not opts.allow_weak:
        raise MigrationError(
            "refusing to create a LUKS container that 'qcrypt scan' grades as weak: "
            + "; ".join(f"{f.code} ({f.message})" for f in weak)
            + ". Use the defaults (aes-xts-plain64, 512-bit key, sha256), or rerun with --allow-weak"
        )


@dataclass
class Plan:
    source: str
    report: ImageReport
    final_path: str
    keep_backing: str | None
    backing_format: str | None
    snapshots: list[Snapshot]


def plan(source: str, opts: MigrateOptions) -> Plan:
    if opts.target not in TARGETS:
        raise MigrationError(f"unknown target {opts.target!r} (choose from {', '.join(TARGETS)})")
    report = inspect_image(source, rules=opts.rules, declared_format=opts.source_format)
    refuse_unreadable_source(source, report)
    refused = report.refused_backing()
    if refused:  # never copy a file its owner could not read, a device or a host file into the output
        raise BackingRefusedError(refused)
    if report.encryption is Encryption.LUKS2:
        raise MigrationError(f"{source} is LUKS2, which qcrypt cannot unlock; use cryptsetup")
    refuse_weak_settings(report, opts)
    final_path = os.path.realpath(source) if opts.replace else opts.output  # --replace acts on the real file
    if not final_path:
        raise MigrationError("an output path is required (-o OUT), or --replace")
    if not opts.replace:
        _refuse_output_over_inputs(final_path, [source, *report.chain_paths])
    _check_layer_passphrases(source, report, opts)
    keep_backing, backing_format, snapshots = _chain_plan(source, report, opts)
    if keep_backing:
        keep_backing = backing_name_for(source, keep_backing, final_path)
    return Plan(source, report, final_path, keep_backing, backing_format, snapshots)


def _check_layer_passphrases(source: str, report: ImageReport, opts: MigrateOptions) -> None:
    """Every path given a passphrase of its own must be a layer of the source's chain (a typo would otherwise
    silently fall back to the default passphrase)."""
    layers = {os.path.realpath(path) for path in [source, *report.chain_paths]}
    strangers = [path for path in opts.passphrases if os.path.realpath(path) not in layers]
    if strangers:
        raise MigrationError(
            f"{strangers[0]} is given a passphrase but is not a layer of {source}'s chain "
            f"(layers: {', '.join([source, *report.chain_paths])})"
        )


def backing_name_for(source: str, backing_file: str, output: str) -> str:
    """The backing name to write into ``output`` so that it opens the same base as ``source`` does.

    Relative names resolve against the image's own folder (as in QEMU): when the output lives elsewhere,
    the name is rewritten relative to the output's folder."""
    base = resolve_backing(source, backing_file)
    if base is None or os.path.isabs(backing_file):
        return backing_file
    output_dir = os.path.dirname(os.path.abspath(output))
    if os.path.samefile(output_dir, os.path.dirname(os.path.abspath(source)) or "."):
        return backing_file
    rewritten = os.path.relpath(os.path.realpath(base), os.path.realpath(output_dir))
    if not _same_file(os.path.join(output_dir, rewritten), base):
        raise MigrationError(f"cannot name backing file {base} relative to {output_dir}")
    return rewritten


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _refuse_output_over_inputs(output: str, inputs: list[str]) -> None:
    """Whatever path leads there (symlinks, hard links), the output must not be the source or a backing layer."""
    for path in inputs:
        if _same_file(output, path):
            what = "the source" if path == inputs[0] else f"backing layer {path}"
            raise MigrationError(f"the output would overwrite {what}; use --replace to swap the source safely")


def _chain_plan(
    source: str, report: ImageReport, opts: MigrateOptions
) -> tuple[str | None, str | None, list[Snapshot]]:
    snapshots: list[Snapshot] = []
    backing_format = None
    if report.format == "qcow2":
        with QCow2Image.open(source) as image:
            snapshots = image.snapshots()
            backing_format = image.backing_format
    qcow2_target = opts.target in ("qcow2", "qcow2-luks")
    if not report.backing_file or not qcow2_target or opts.flatten:
        if snapshots and report.backing_file and qcow2_target:
            raise MigrationError(
                "--flatten of an overlay with internal snapshots is not supported: "
                "delete the snapshots or migrate without --flatten"
            )
        return None, None, snapshots if qcow2_target else []
    legacy = [layer.path for layer in report.backing_chain if layer.encryption is Encryption.LEGACY_AES]
    if legacy:
        raise MigrationError(
            f"backing layer {legacy[0]} uses legacy AES encryption too: add --flatten to fold the chain into "
            "one standalone image, or migrate each layer from the base up and rebase the overlays"
        )
    return report.backing_file, backing_format, snapshots
