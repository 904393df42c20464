"""``qcrypt migrate``: legacy AES (or any readable) image -> LUKS1, qcow2-LUKS, qcow2 or raw."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import click

from qcrypt import limits
from qcrypt import scan as scanner
from qcrypt.cli.main import handle_errors
from qcrypt.cli.options import human_size, progress_bar
from qcrypt.cli.passphrase import get_passphrase, wipe
from qcrypt.crypto.kdf import set_max_pbkdf2_seconds
from qcrypt.migrate import TARGETS, MigrateOptions, MigrateResult
from qcrypt.migrate import migrate as run_migration
from qcrypt.parallel import DEFAULT_STALL_SECONDS, tune_malloc_for_streaming

CIPHERS = ("aes-xts-plain64", "aes-cbc-essiv:sha256", "aes-cbc-plain64")
HASHES = ("sha256", "sha512", "sha1")


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@click.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("--to", "target", type=click.Choice(TARGETS), required=True,
              help="luks: raw LUKS1 (QEMU and dm-crypt); qcow2-luks: qcow2 with LUKS inside; qcow2/raw: plaintext.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output path (not with --replace).")
@click.option("--passphrase-file", type=click.Path(allow_dash=True, dir_okay=False),
              help="Source passphrase file ('-' = stdin). Prompted when missing and stdin is a terminal.")
@click.option("--new-passphrase-file", type=click.Path(allow_dash=True, dir_okay=False),
              help="Passphrase for the new LUKS keyslot (default: the source passphrase).")
@click.option("--cipher", type=click.Choice(CIPHERS), default="aes-xts-plain64", show_default=True)
@click.option("--key-size", "key_bits", type=click.Choice(["128", "256", "512"]), default=None,
              help="Master key bits [default: 512 for XTS, 256 for CBC].")
@click.option("--hash", "hash_name", type=click.Choice(HASHES), default="sha256", show_default=True,
              help="PBKDF2 and anti-forensic splitter hash.")
@click.option("--iter-time", "iter_time_ms", type=click.IntRange(1, 60000), default=2000, show_default=True,
              help="Milliseconds of PBKDF2 per unlock (as cryptsetup); at least 1000 iterations.")
@click.option("--pbkdf-force-iterations", "iterations", type=click.IntRange(1000, 2**31 - 1), default=None,
              help="Use exactly this many PBKDF2 iterations (no benchmark).")
@click.option("--flatten", is_flag=True, help="Fold the backing chain into one standalone image.")
@click.option("--force", is_flag=True,
              help="Overwrite an existing output; accept a legacy passphrase whose plaintext looks random.")
@click.option("--replace", is_flag=True,
              help="Put the verified output under SOURCE's name; keep the original as SOURCE.qcrypt-orig.")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=None,
              help="Worker processes [default: one per CPU, at most 8].")
@click.option("--stall-timeout", "stall_seconds", type=click.FloatRange(1, 86400), default=DEFAULT_STALL_SECONDS,
              show_default=True, help="Seconds without progress after which a worker counts as stuck (exit 12).")
@click.option("--max-pbkdf2-seconds", "max_pbkdf2_seconds", type=click.FloatRange(1, 86400),
              default=limits.MAX_PBKDF2_SECONDS, show_default=True,
              help="Skip a source keyslot whose PBKDF2 would take longer than this here (its header sets the cost).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@click.option("--timings", is_flag=True, help="Print the seconds each phase took to stderr (also with -q).")
@handle_errors
def migrate(source: str, target: str, output: str | None, passphrase_file: str | None,
            new_passphrase_file: str | None, cipher: str, key_bits: str | None, hash_name: str, iter_time_ms: int,
            iterations: int | None, flatten: bool, force: bool, replace: bool, jobs: int | None, stall_seconds: float,
            max_pbkdf2_seconds: float, quiet: bool, timings: bool) -> None:
    """Decrypt SOURCE and write it as --to says, verified, atomically; SOURCE is never modified."""
    if replace and output:
        raise click.UsageError("--replace puts the output under SOURCE's name: do not give -o")
    if passphrase_file == "-" and new_passphrase_file == "-":
        raise click.UsageError("only one passphrase can come from stdin")
    set_max_pbkdf2_seconds(max_pbkdf2_seconds)
    report = scanner.inspect(source)
    encrypted = report["encryption"] != "none" or any(
        layer["encryption"] != "none" for layer in report.get("backing_chain", []))
    passphrase = get_passphrase(passphrase_file, what="source passphrase") if encrypted else None
    new_passphrase = None
    if target in ("luks", "qcow2-luks") and (new_passphrase_file or not encrypted):
        new_passphrase = get_passphrase(new_passphrase_file, what="new LUKS passphrase",
                                        option="--new-passphrase-file", confirm=True)
    opts = MigrateOptions(
        target=target, output=output, passphrase=passphrase, new_passphrase=new_passphrase, cipher=cipher,
        key_bits=int(key_bits) if key_bits else None, hash_name=hash_name, iter_time_ms=iter_time_ms,
        iterations=iterations, flatten=flatten, force=force, replace=replace, workers=jobs,
        stall_seconds=stall_seconds,
    )
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    tune_malloc_for_streaming(opts.chunk_bytes)
    total = report["virtual_size"] if target in ("luks", "raw") else _allocated_estimate(source, report)
    try:
        with progress_bar(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                          disable=True if quiet else None, desc="migrating", leave=False) as bar:
            opts.progress = bar.update
            result = run_migration(source, opts)
    finally:
        wipe(passphrase, new_passphrase)
    if not quiet:
        print_result(result, report, passphrase_file)
    if timings:
        click.echo(format_timings(result.phase_seconds), err=True)


def format_timings(phase_seconds: dict[str, float]) -> str:
    """One line: ``timings: plan 0.05 s, ..., commit 0.00 s (total 1.23 s)``."""
    phases = ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in phase_seconds.items())
    return f"timings: {phases} (total {sum(phase_seconds.values()):.2f} s)"


def _allocated_estimate(source: str, report: dict[str, Any]) -> int | None:
    """Bytes a qcow2 target will process (allocated data of the source, snapshots aside), for the ETA."""
    if report["format"] not in ("qcow", "qcow2"):
        return report["virtual_size"]
    return scanner.allocated_bytes_of(source)


def print_result(r: MigrateResult, source_report: dict[str, Any], passphrase_file: str | None) -> None:
    kind = {"luks": "raw LUKS1", "qcow2-luks": "qcow2 with LUKS1", "qcow2": "qcow2 (unencrypted)",
            "raw": "raw (unencrypted)"}[r.target]
    checked = "verified by reading it back." if r.verified else "NOT verified."
    click.echo(f"Migrated {r.source} ({source_report['format']}, {source_report['encryption']}) -> {r.output} "
               f"({kind}): {human_size(r.virtual_size)} virtual, {human_size(r.data_bytes)} processed, {checked}")
    if r.original_kept:
        click.echo(f"The original is kept as {r.original_kept}. Once the VM runs from the new image, destroy it "
                   f"with 'shred -u {r.original_kept}' (or blkdiscard on thin storage): its legacy ciphertext "
                   "is weakly protected and stays readable with the old passphrase.")
    if r.backing_file:
        click.echo(f"Backing file kept: {r.backing_file}")
    if r.snapshots:
        click.echo(f"Internal snapshots kept: {', '.join(r.snapshots)}")
    if r.luks:
        _print_luks(r)
    if r.target in ("qcow2", "raw") and source_report["encryption"] != "none":
        click.echo("The output is NOT encrypted: remove <encryption> from the domain's <disk>.")


def _print_luks(r: MigrateResult) -> None:
    assert r.luks is not None
    slots = [s for s in r.luks["keyslots"] if s["active"]]
    carried = " (master key, UUID and keyslots carried over)" if r.luks_carried_over else ""
    click.echo(f"LUKS1 {r.luks['uuid']}: {r.luks['cipher']}, {r.luks['key_bits']}-bit key, hash {r.luks['hash']}, "
               f"payload offset {r.luks['payload_offset']} sectors, active keyslot(s) "
               f"{', '.join(str(s['index']) for s in slots)} ({slots[0]['iterations']} PBKDF2 iterations){carried}")
    driver = "raw" if r.target == "luks" else "qcow2"
    click.echo("libvirt: in the domain's <disk>, use")
    click.echo(f"  <driver name='qemu' type='{driver}'/>")
    click.echo("  <encryption format='luks'><secret type='passphrase' uuid='...'/></encryption>")
    click.echo("  (the same libvirt secret works if the keyslot uses the source passphrase)")
    opts = (f"driver=luks,file.filename={r.output},key-secret=sec0" if r.target == "luks"
            else f"driver=qcow2,file.filename={r.output},encrypt.key-secret=sec0")
    click.echo(f"qemu-img: qemu-img info --object secret,id=sec0,file=PASSPHRASE_FILE --image-opts {opts}")
