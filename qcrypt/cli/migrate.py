"""``qcrypt migrate``: legacy AES (or any readable) image -> LUKS1, qcow2-LUKS, qcow2 or raw."""

from __future__ import annotations

import os
import signal
from types import FrameType

import click

from qcrypt.audit.describe import allocated_estimate
from qcrypt.audit.inspect import inspect_image
from qcrypt.audit.report import ImageReport
from qcrypt.cli.exit_codes import handle_errors
from qcrypt.cli.options import allow_backing_dir_opt, chain_rules, human_size, progress_bar
from qcrypt.cli.passphrase import get_passphrase, without_line_ending
from qcrypt.crypto.kdf import set_max_pbkdf2_seconds
from qcrypt.crypto.secret import wipe
from qcrypt.images.backing import BackingRefusedError
from qcrypt.migrate.luks_output import refuse_unreadable_source
from qcrypt.migrate.options import TARGETS, MigrateOptions, MigrateResult
from qcrypt.migrate.plan import refuse_weak_settings
from qcrypt.migrate.run import migrate as run_migration
from qcrypt.model.encryption import Encryption
from qcrypt.plumbing import limits
from qcrypt.plumbing.parallel import DEFAULT_STALL_SECONDS, tune_malloc_for_streaming

CIPHERS = ("aes-xts-plain64", "aes-cbc-essiv:sha256", "aes-cbc-plain64")
HASHES = ("sha256", "sha512", "sha1")


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@click.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--to",
    "target",
    type=click.Choice(TARGETS),
    required=True,
    help="luks: raw LUKS1 (QEMU and dm-crypt); qcow2-luks: qcow2 with LUKS inside; qcow2/raw: plaintext.",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output path (not with --replace).")
@click.option(
    "--passphrase-file",
    type=click.Path(allow_dash=True, dir_okay=False),
    help="Source passphrase file ('-' = stdin). Prompted when missing and stdin is a terminal.",
)
@click.option(
    "--layer-passphrase-file",
    "layer_passphrase_files",
    nargs=2,
    multiple=True,
    metavar="LAYER FILE",
    type=(click.Path(exists=True, dir_okay=False), click.Path(allow_dash=True, dir_okay=False)),
    help="Passphrase file for one layer of SOURCE's backing chain (or SOURCE itself); repeat it per "
    "layer. Layers not named use --passphrase-file.",
)
@click.option(
    "--new-passphrase-file",
    type=click.Path(allow_dash=True, dir_okay=False),
    help="Passphrase for the new LUKS keyslot (default: the source passphrase).",
)
@click.option("--cipher", type=click.Choice(CIPHERS), default="aes-xts-plain64", show_default=True)
@click.option(
    "--key-size",
    "key_bits",
    type=click.Choice(["128", "256", "512"]),
    default=None,
    help="Master key bits [default: 512 for XTS, 256 for CBC].",
)
@click.option(
    "--hash",
    "hash_name",
    type=click.Choice(HASHES),
    default="sha256",
    show_default=True,
    help="PBKDF2 and anti-forensic splitter hash.",
)
@click.option(
    "--iter-time",
    "iter_time_ms",
    type=click.IntRange(1, 60000),
    default=2000,
    show_default=True,
    help="Milliseconds of PBKDF2 per unlock (as cryptsetup); at least 1000 iterations.",
)
@click.option(
    "--pbkdf-force-iterations",
    "iterations",
    type=click.IntRange(1000, 2**31 - 1),
    default=None,
    help="Use exactly this many PBKDF2 iterations (no benchmark).",
)
@click.option(
    "--allow-weak",
    is_flag=True,
    help="Create the LUKS container even with settings 'qcrypt scan' grades as weak (CBC with plain "
    "IVs, SHA-1, keys under AES-256); refused otherwise.",
)
@click.option("--flatten", is_flag=True, help="Fold the backing chain into one standalone image.")
@click.option(
    "--force",
    is_flag=True,
    help="Overwrite an existing output; accept a legacy passphrase whose plaintext looks random.",
)
@click.option(
    "--replace",
    is_flag=True,
    help="Put the verified output under SOURCE's name; keep the original as SOURCE.qcrypt-orig.",
)
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(1, 64),
    default=None,
    help="Worker processes [default: one per CPU, at most 8; one more while LUKS data is written past the page cache].",
)
@click.option(
    "--stall-timeout",
    "stall_seconds",
    type=click.FloatRange(1, 86400),
    default=DEFAULT_STALL_SECONDS,
    show_default=True,
    help="Seconds without progress after which a worker counts as stuck (exit 12).",
)
@click.option(
    "--max-pbkdf2-seconds",
    "max_pbkdf2_seconds",
    type=click.FloatRange(1, 86400),
    default=limits.MAX_PBKDF2_SECONDS,
    show_default=True,
    help="Skip a source keyslot whose PBKDF2 would take longer than this here (its header sets the cost).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@click.option("--timings", is_flag=True, help="Print the seconds each phase took to stderr (also with -q).")
@allow_backing_dir_opt
@click.option(
    "--accept-unverified-passphrase",
    is_flag=True,
    help="Go on when the legacy layers hold no data cluster to check the passphrase against.",
)
@handle_errors
def migrate(
    source: str,
    target: str,
    output: str | None,
    passphrase_file: str | None,
    layer_passphrase_files: tuple[tuple[str, str], ...],
    new_passphrase_file: str | None,
    cipher: str,
    key_bits: str | None,
    hash_name: str,
    iter_time_ms: int,
    iterations: int | None,
    allow_weak: bool,
    flatten: bool,
    force: bool,
    replace: bool,
    jobs: int | None,
    stall_seconds: float,
    max_pbkdf2_seconds: float,
    quiet: bool,
    timings: bool,
    allow_backing_dirs: tuple[str, ...],
    accept_unverified_passphrase: bool,
) -> None:
    """Decrypt SOURCE and write it as --to says, verified, atomically; SOURCE is never modified."""
    if replace and output:
        raise click.UsageError("--replace puts the output under SOURCE's name: do not give -o")
    files = [passphrase_file, new_passphrase_file, *(file for _layer, file in layer_passphrase_files)]
    if files.count("-") > 1:
        raise click.UsageError("only one passphrase can come from stdin")
    set_max_pbkdf2_seconds(max_pbkdf2_seconds)
    rules = chain_rules(allow_backing_dirs)
    report = inspect_image(source, rules=rules)
    refuse_unreadable_source(source, report)  # before asking for any passphrase; the error info and scan show
    refused = report.refused_backing()
    if refused:  # before asking for any passphrase
        raise BackingRefusedError(refused)
    refuse_weak_settings(
        report,
        MigrateOptions(  # before any passphrase is asked for
            target=target,
            cipher=cipher,
            key_bits=int(key_bits) if key_bits else None,
            hash_name=hash_name,
            iterations=iterations,
            allow_weak=allow_weak,
        ),
    )
    own = {os.path.realpath(layer) for layer, _file in layer_passphrase_files}
    needs_default = passphrase_file is not None or any(
        os.path.realpath(path) not in own for path in report.encrypted_paths
    )
    passphrase = layer_passphrases = new_passphrase = fallback = None
    try:
        passphrase = get_passphrase(passphrase_file, what="source passphrase") if needs_default else None
        fallback = without_line_ending(passphrase) if passphrase is not None and passphrase_file else None
        layer_passphrases = {
            layer: get_passphrase(file, what=f"passphrase of {layer}", option="--layer-passphrase-file LAYER")
            for layer, file in layer_passphrase_files
        }
        top_passphrase = next(
            (
                secret
                for layer, secret in layer_passphrases.items()
                if os.path.realpath(layer) == os.path.realpath(source)
            ),
            passphrase,
        )
        if target in ("luks", "qcow2-luks") and (new_passphrase_file or top_passphrase is None):
            new_passphrase = get_passphrase(
                new_passphrase_file, what="new LUKS passphrase", option="--new-passphrase-file", confirm=True
            )
            if new_passphrase_file and without_line_ending(new_passphrase) is not None:
                _note_newline_kept(new_passphrase_file)
    except BaseException:
        wipe(passphrase, fallback, new_passphrase, *(layer_passphrases or {}).values())
        raise
    opts = MigrateOptions(
        target=target,
        output=output,
        passphrase=passphrase,
        passphrase_fallback=fallback,
        passphrases=layer_passphrases,
        new_passphrase=new_passphrase,
        cipher=cipher,
        key_bits=int(key_bits) if key_bits else None,
        hash_name=hash_name,
        iter_time_ms=iter_time_ms,
        iterations=iterations,
        allow_weak=allow_weak,
        flatten=flatten,
        force=force,
        replace=replace,
        workers=jobs,
        stall_seconds=stall_seconds,
        rules=rules,
        accept_unverified_passphrase=accept_unverified_passphrase,
    )
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    tune_malloc_for_streaming(opts.chunk_bytes)
    total = report.virtual_size if target in ("luks", "raw") else allocated_estimate(report)
    try:
        with progress_bar(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=True if quiet else None,
            desc="migrating",
            leave=False,
        ) as bar:
            opts.progress = bar.update
            result = run_migration(source, opts)
    finally:
        wipe(passphrase, fallback, new_passphrase, *layer_passphrases.values())
    if (
        fallback is not None
        and result.luks
        and not result.luks_carried_over
        and new_passphrase is None
        and not result.passphrase_fallback_used
    ):
        _note_newline_kept(str(passphrase_file))
    if result.weak_findings:
        click.echo(
            "qcrypt: warning: --allow-weak: the new LUKS container has settings 'qcrypt scan' grades as "
            f"weak: {', '.join(f.code for f in result.weak_findings)}",
            err=True,
        )
    if result.passphrase_fallback_used:
        click.echo(
            f"qcrypt: note: {source} opened with {passphrase_file} WITHOUT its trailing newline; every byte "
            "of it opened nothing. cryptsetup --key-file and QEMU's secret,file= use every byte: write the "
            "file without the newline (printf %s) before giving it to them",
            err=True,
        )
    if not quiet:
        print_result(result, report, passphrase_file)
    if timings:
        click.echo(format_timings(result.phase_seconds), err=True)


def _note_newline_kept(path: str) -> None:
    click.echo(
        f"qcrypt: note: the new keyslot's passphrase is every byte of {path}, its trailing newline "
        "included (as cryptsetup --key-file and QEMU's secret,file= read it)",
        err=True,
    )


def format_timings(phase_seconds: dict[str, float]) -> str:
    """One line: ``timings: plan 0.05 s, ..., commit 0.00 s (total 1.23 s)``."""
    phases = ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in phase_seconds.items())
    return f"timings: {phases} (total {sum(phase_seconds.values()):.2f} s)"


def print_result(r: MigrateResult, source_report: ImageReport, passphrase_file: str | None) -> None:
    kind = {
        "luks": "raw LUKS1",
        "qcow2-luks": "qcow2 with LUKS1",
        "qcow2": "qcow2 (unencrypted)",
        "raw": "raw (unencrypted)",
    }[r.target]
    checked = "verified by reading it back." if r.verified else "NOT verified."
    click.echo(
        f"Migrated {r.source} ({source_report.format}, {source_report.encryption}) -> {r.output} "
        f"({kind}): {human_size(r.virtual_size)} virtual, {human_size(r.data_bytes)} processed, {checked}"
    )
    if r.original_kept and r.original_changed:
        click.echo(
            f"The original was kept as {r.original_kept}, but that name no longer holds the file qcrypt read "
            "(it was renamed or replaced since): qcrypt gives no command to destroy it; check what it is "
            "first."
        )
    elif r.original_kept:
        click.echo(
            f"The original is kept as {r.original_kept}. Once the VM runs from the new image, destroy it "
            f"with 'shred -u {r.original_kept}' (or blkdiscard on thin storage): its legacy ciphertext "
            "is weakly protected and stays readable with the old passphrase."
        )
    if r.passphrase_verified is False:
        click.echo(
            f"The legacy passphrase was NOT verified ({r.plausibility}): check the guest's data before "
            "destroying the original."
        )
    if r.backing_file:
        click.echo(f"Backing file kept: {r.backing_file}")
    if r.snapshots:
        click.echo(f"Internal snapshots kept: {', '.join(r.snapshots)}")
    if r.luks:
        _print_luks(r)
    if r.target in ("qcow2", "raw") and source_report.encryption is not Encryption.NONE:
        click.echo("The output is NOT encrypted: remove <encryption> from the domain's <disk>.")


def _print_luks(r: MigrateResult) -> None:
    assert r.luks is not None
    slots = [s for s in r.luks["keyslots"] if s["active"]]
    carried = " (master key, UUID and keyslots carried over)" if r.luks_carried_over else ""
    click.echo(
        f"LUKS1 {r.luks['uuid']}: {r.luks['cipher']}, {r.luks['key_bits']}-bit key, hash {r.luks['hash']}, "
        f"payload offset {r.luks['payload_offset']} sectors, active keyslot(s) "
        f"{', '.join(str(s['index']) for s in slots)} ({slots[0]['iterations']} PBKDF2 iterations){carried}"
    )
    driver = "raw" if r.target == "luks" else "qcow2"
    click.echo("libvirt: in the domain's <disk>, use")
    click.echo(f"  <driver name='qemu' type='{driver}'/>")
    click.echo("  <encryption format='luks'><secret type='passphrase' uuid='...'/></encryption>")
    click.echo("  (the same libvirt secret works if the keyslot uses the source passphrase)")
    opts = (
        f"driver=luks,file.filename={r.output},key-secret=sec0"
        if r.target == "luks"
        else f"driver=qcow2,file.filename={r.output},encrypt.key-secret=sec0"
    )
    click.echo(f"qemu-img: qemu-img info --object secret,id=sec0,file=PASSPHRASE_FILE --image-opts {opts}")
