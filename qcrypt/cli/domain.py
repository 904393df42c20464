"""``qcrypt migrate-domain``: fix whole libvirt domains (every legacy-AES disk to LUKS, then the XML)."""

from __future__ import annotations

import contextlib
import json
import shlex
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import click
from tqdm import tqdm

from qcrypt.cli.exit_codes import exit_code_for, handle_errors
from qcrypt.cli.options import allow_backing_dir_opt, chain_rules, format_opt, human_size, progress_bar
from qcrypt.cli.passphrase import get_passphrase
from qcrypt.crypto.secret import wipe
from qcrypt.domain.aftermath import destroyable
from qcrypt.domain.disks import domains_to_fix
from qcrypt.domain.migrate import migrate_domain as fix_domain
from qcrypt.domain.options import (
    DEFAULT_BACKUP_DIR,
    NEW_SECRET,
    PASSPHRASE_FILE,
    DiskPlan,
    DomainOptions,
    DomainOutcome,
)
from qcrypt.errors import DomainActiveError
from qcrypt.libvirt.connection import SHUT_OFF, Connection, open_connection
from qcrypt.plumbing.parallel import tune_malloc_for_streaming

SNAPSHOT_LIMITS = (
    "internal snapshots of a LUKS qcow2 disk: libvirt 9 lists them, but 'virsh snapshot-revert' "
    "and 'snapshot-create' of the shut-off domain fail (libvirt runs qemu-img without the secret), "
    "'snapshot-delete' removes only libvirt's metadata, and a snapshot of the running domain crashed "
    "QEMU 7.2; use qemu-img snapshot with --object secret (docs/GUIDE.md, 'Snapshots')"
)
STATUSES = ("migrated", "unchanged", "planned", "skipped", "failed")
EXIT_SKIPPED = exit_code_for(DomainActiveError("running"))


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@click.command("migrate-domain")
@click.argument("domains", nargs=-1)
@click.option("-c", "--connect", "uri", help="libvirt URI, as virsh -c (default: libvirt's default URI).")
@click.option("--all", "all_domains", is_flag=True, help="Every domain of the connection with an affected disk.")
@click.option("--dry-run", is_flag=True, help="Print the plan (and the XML change as a diff); change nothing.")
@click.option(
    "--to",
    "target",
    type=click.Choice(["qcow2-luks", "luks"]),
    help="Target of every affected disk [default: qcow2-luks, luks for raw-driver disks].",
)
@click.option(
    "--replace",
    is_flag=True,
    help="New images take the old names (originals kept as NAME.qcrypt-orig) instead of NAME.luks.qcow2.",
)
@click.option("--start", is_flag=True, help="Start each fixed domain and report whether it runs.")
@click.option(
    "--iter-time",
    "iter_time_ms",
    type=click.IntRange(1, 60000),
    default=2000,
    show_default=True,
    help="Milliseconds of PBKDF2 per unlock of the new keyslots.",
)
@click.option(
    "--pbkdf-force-iterations",
    "iterations",
    type=click.IntRange(1000, 2**31 - 1),
    default=None,
    help="Use exactly this many PBKDF2 iterations (no benchmark).",
)
@click.option(
    "--passphrase-file",
    type=click.Path(allow_dash=True, dir_okay=False),
    help="Passphrase for disks whose libvirt secret is private or missing ('-' = stdin). Prompted "
    "when needed and stdin is a terminal.",
)
@click.option(
    "--backup-dir",
    default=DEFAULT_BACKUP_DIR,
    show_default=True,
    help="Where the old domain XML is saved before the new one is defined.",
)
@click.option(
    "--output-dir",
    type=click.Path(exists=True, file_okay=False),
    help="Folder for the new image files of block-device disks.",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "api", "virsh"]),
    default="auto",
    show_default=True,
    help="Talk to libvirt through its Python binding (api) or virsh; auto: the binding if installed.",
)
@allow_backing_dir_opt
@click.option(
    "--accept-unverified-passphrase",
    is_flag=True,
    help="Go on when a disk's legacy layers hold no data cluster to check its passphrase against.",
)
@click.option(
    "--accept-random-content",
    is_flag=True,
    help="Go on when a legacy disk's plaintext looks random: its guest content really is random (e.g. "
    "encrypted inside the guest). Without it such a disk is refused as a wrong passphrase.",
)
@format_opt
@click.option(
    "-q", "--quiet", is_flag=True, help="No progress and no table (JSON is still printed; errors still go to stderr)."
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show progress on stderr: a bar on a terminal, else a line (domain, disk, bytes, rate, ETA) "
    "every --progress-interval seconds. [default: on, off with -q]",
)
@click.option(
    "--progress-interval",
    type=click.FloatRange(0, 3600),
    default=10.0,
    show_default=True,
    help="Seconds between two progress lines when stderr is not a terminal.",
)
@handle_errors
def migrate_domain(
    domains: tuple[str, ...],
    uri: str | None,
    all_domains: bool,
    dry_run: bool,
    target: str | None,
    replace: bool,
    start: bool,
    iter_time_ms: int,
    iterations: int | None,
    passphrase_file: str | None,
    backup_dir: str,
    output_dir: str | None,
    backend: str,
    allow_backing_dirs: tuple[str, ...],
    accept_unverified_passphrase: bool,
    accept_random_content: bool,
    output_format: str,
    quiet: bool,
    progress: bool | None,
    progress_interval: float,
) -> None:
    """Migrate every legacy-AES disk of each DOMAIN (shut off) to LUKS and define the new XML, or change nothing.

    Passphrases come from the libvirt secrets the disks name (each backing layer from its own); the new LUKS
    keyslots use the same value, so the same secrets keep working. Everything is checked before anything is
    written; --dry-run runs the same checks and says whether the real run would go through. The old images
    are kept."""
    if bool(domains) == all_domains:
        raise click.UsageError("name one or more domains, or give --all")
    show_progress = (not quiet if progress is None else progress) and not dry_run
    bar_holder: list[Any] = []
    fallback, cached = _fallback_passphrase(passphrase_file, bar_holder)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    tune_malloc_for_streaming(4 * 1024 * 1024)
    conn = open_connection(uri, backend)
    try:
        rules = chain_rules(allow_backing_dirs)
        names = list(dict.fromkeys(domains)) if domains else domains_to_fix(conn, rules)
        opts = DomainOptions(
            to=target,
            replace=replace,
            dry_run=dry_run,
            start=start,
            iter_time_ms=iter_time_ms,
            iterations=iterations,
            backup_dir=backup_dir,
            output_dir=output_dir,
            fallback_passphrase=fallback,
            rules=rules,
            accept_unverified_passphrase=accept_unverified_passphrase,
            accept_random_content=accept_random_content,
            fallback_label=_fallback_label(passphrase_file),
        )
        outcomes = _run_all(
            conn, names, opts, show_progress=show_progress, interval_s=progress_interval, bar_holder=bar_holder
        )
    finally:
        conn.close()
        wipe(*cached)
    if output_format == "json":
        click.echo(json.dumps(as_document(outcomes), indent=2))
    elif not quiet:
        for outcome in outcomes:
            print_outcome(outcome)
        if all_domains and not outcomes:
            click.echo("No domain has a disk with legacy AES encryption.")
        if all_domains or len(outcomes) > 1:
            click.echo(summary_line(outcomes))
    for outcome in outcomes:
        problem = error_line(outcome)
        if problem:
            click.echo(problem, err=True)
    sys.exit(exit_status(outcomes))


def _fallback_label(path: str | None) -> str:
    if path is None:
        return "prompt"
    return "standard input" if path == "-" else PASSPHRASE_FILE


def _fallback_passphrase(
    path: str | None, bar_holder: list[Any]
) -> tuple[Callable[[], bytearray] | None, list[bytearray]]:
    """Read the fallback passphrase once, when a disk first needs it; None when there is no way to get one.
    A prompt clears the progress bar first (and it is drawn again after)."""
    if path is None and not sys.stdin.isatty():
        return None, []
    cached: list[bytearray] = []

    def get() -> bytearray:
        if not cached:
            with tqdm.external_write_mode(file=sys.stderr) if bar_holder else contextlib.nullcontext():
                cached.append(
                    get_passphrase(path, what="passphrase for disks whose libvirt secret is private or missing")
                )
        return bytearray(cached[0])

    return get, cached


class ProgressLines:
    """Progress for stderr that is not a terminal (cron, nohup, Ansible): one line when a disk starts, then at
    most one every ``interval_s`` seconds, and one when it is done."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.what: str | None = None
        self.total, self.done, self.started, self.last = 0, 0, 0.0, 0.0

    def start_disk(self, domain: str, plan: DiskPlan) -> None:
        self.finish()
        self.what, self.total, self.done = f"domain {domain} disk {plan.target} ({plan.source})", plan.work_bytes, 0
        self.started = self.last = time.monotonic()
        self._line()

    def update(self, n_bytes: int) -> None:
        self.done += n_bytes
        now = time.monotonic()
        if self.what is not None and now - self.last >= self.interval_s:
            self.last = now
            self._line()

    def finish(self) -> None:
        if self.what is not None:
            self._line(done=True)
            self.what = None

    def _line(self, *, done: bool = False) -> None:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        shown = min(self.done, self.total) if self.total else self.done
        percent = f" ({100 * shown // self.total}%)" if self.total else ""
        if done:
            tail = f"done in {elapsed:.0f} s"
        elif rate > 0 and self.total:
            tail = f"ETA {max(self.total - shown, 0) / rate:.0f} s"
        else:
            tail = "ETA unknown"
        click.echo(
            f"qcrypt: migrating {self.what}: {human_size(shown)} of {human_size(self.total)}{percent}, "
            f"{human_size(int(rate))}/s, {tail}",
            err=True,
        )


def _run_all(
    conn: Connection,
    names: list[str],
    opts: DomainOptions,
    *,
    show_progress: bool,
    interval_s: float = 10.0,
    bar_holder: list[Any] | None = None,
) -> list[DomainOutcome]:
    if show_progress and not sys.stderr.isatty():
        lines = ProgressLines(interval_s)
        opts.progress, opts.on_disk = lines.update, lines.start_disk
        try:
            return [fix_domain(conn, name, opts) for name in names]
        finally:
            lines.finish()
    total = None
    if show_progress:
        planned = [fix_domain(conn, name, _planning(opts)) for name in names]
        total = sum(d.work_bytes for o in planned for d in o.disks) or None
    with progress_bar(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="migrating",
        leave=False,
        disable=True if not show_progress else None,
    ) as bar:
        opts.progress = bar.update
        if bar_holder is not None and show_progress:
            bar_holder.append(bar)
        return [fix_domain(conn, name, opts) for name in names]


def _planning(opts: DomainOptions) -> DomainOptions:
    return DomainOptions(
        to=opts.to,
        replace=opts.replace,
        dry_run=True,
        iter_time_ms=opts.iter_time_ms,
        iterations=opts.iterations,
        backup_dir=opts.backup_dir,
        output_dir=opts.output_dir,
        rules=opts.rules,
        precheck=False,
    )


def exit_status(outcomes: list[DomainOutcome]) -> int:
    """Worst wins: a failure's own exit code, else 11 for a skipped (running/paused) domain or a dry run of
    one (the real run would be refused until it is shut off), else 0."""
    for outcome in outcomes:
        if outcome.status == "failed" and outcome.error is not None:
            return exit_code_for(outcome.error)
    return EXIT_SKIPPED if any(o.status == "skipped" or _planned_while_active(o) for o in outcomes) else 0


def _planned_while_active(outcome: DomainOutcome) -> bool:
    return outcome.status == "planned" and outcome.state not in (None, SHUT_OFF)


def error_line(outcome: DomainOutcome) -> str | None:
    """The stderr line of a domain that failed, was skipped, or could only be planned because it runs: the
    domain, the disk target and its image when the problem is a disk's, and what happened."""
    if outcome.status not in ("failed", "skipped") and not _planned_while_active(outcome):
        return None
    where = f"domain {outcome.name}"
    if outcome.error_disk:
        where += f" disk {outcome.error_disk}" + (f" ({outcome.error_path})" if outcome.error_path else "")
    kind = "error" if outcome.status == "failed" else "warning"
    reason = outcome.reason or ""
    if outcome.error_disk:  # the disk is named once, with its image
        reason = reason.removeprefix(f"disk {outcome.error_disk}: ")
    return f"qcrypt: {kind}: {where}: {outcome.status}: {reason}"


def summary_line(outcomes: list[DomainOutcome]) -> str:
    counts = ", ".join(f"{sum(o.status == status for o in outcomes)} {status}" for status in STATUSES)
    return f"{len(outcomes)} domain{'s' if len(outcomes) != 1 else ''}: {counts}"


def as_document(outcomes: list[DomainOutcome]) -> dict[str, Any]:
    documents = []
    for outcome in outcomes:
        document = outcome.as_dict()
        if document["error"] is not None and outcome.error is not None:
            document["error"]["exit_code"] = exit_code_for(outcome.error)
        documents.append(document)
    return {"domains": documents, "summary": {status: sum(o.status == status for o in outcomes) for status in STATUSES}}


# -- the table ---------------------------------------------------------------------------------------------------


def print_outcome(o: DomainOutcome) -> None:
    click.echo(f"domain {o.name}: {o.status}" + (f" ({o.reason})" if o.reason else ""))
    for d in o.disks:
        sizes = f"{human_size(d.virtual_size)} virtual, {human_size(d.allocated_size)} allocated"
        how = "flattened, " if d.flatten else ""
        if d.xml_only:
            click.echo(f"  {d.target}: {d.source} is {d.to} already: only the XML changes (format='luks')")
        else:
            click.echo(f"  {d.target}: {d.source} -> {d.new_path} ({d.to}, {how}{sizes})")
        if d.passphrase_verified is False:
            click.echo(
                "      the legacy passphrase was NOT verified (no data cluster to check it against; "
                "accepted with --accept-unverified-passphrase)"
            )
        if d.secret_uuid:
            made = "new secret" if d.secret_created else "existing secret"
            uuid = "" if d.secret_uuid == NEW_SECRET else f" {d.secret_uuid}"
            frm = f", passphrase from the {d.passphrase_from}" if d.passphrase_from else ""
            click.echo(f"      {made}{uuid}{frm}")
        for layer, uuid in d.layer_secrets.items():
            click.echo(f"      backing layer {layer}: its own secret {uuid}")
        for note in d.notes:
            click.echo(f"      note: {note}")
    for problem in o.undo_errors:
        click.echo(f"  NOT undone: {problem}")
    for snap in o.snapshots:
        saved = f" (old snapshot XML saved to {snap.backup})" if snap.backup else ""
        click.echo(f"  snapshot {snap.name}: {snap.status}: {snap.detail}{saved}")
    if o.snapshots and o.status in ("planned", "migrated"):
        click.echo(f"  {SNAPSHOT_LIMITS}")
    if o.status == "planned":
        _print_plan(o)
    if o.status == "migrated":
        _print_done(o)


def _print_plan(o: DomainOutcome) -> None:
    for line in o.space:
        click.echo(f"  free space: {line}")
    if o.estimated_seconds is not None:
        click.echo(f"  estimated time: about {o.estimated_seconds:.0f} s")
    click.echo("  XML change:")
    for line in o.xml_diff.splitlines():
        click.echo(f"    {line}")
    click.echo("  checked: " + ", ".join(_checks(o)))
    click.echo("  dry run: nothing was written or defined")


def _checks(o: DomainOutcome) -> list[str]:
    """What the dry run checked, as the real run would before writing."""
    checks = [
        "each passphrase against its image or layer",
        "secret values readable (or replaced by a new secret)",
        "secret usages free",
        "free space",
        "temporary files of other runs",
    ]
    if o.state == SHUT_OFF:
        checks.append("no process holds the images' locks")
    else:
        checks.append(f"image locks NOT checked (the domain is {o.state}; the real run checks them)")
    return checks


def _print_done(o: DomainOutcome) -> None:
    click.echo(f"  old XML saved to {o.xml_backup}")
    old = [path for d in o.disks for path in d.old_images]
    free = destroyable(o)
    unchecked = [path for d in o.disks for path in d.unchecked_images if path not in d.image_users]
    if old:
        click.echo(f"  old images kept: {', '.join(old)}")
    for d in o.disks:
        for path, users in d.image_users.items():
            click.echo(f"  still in use, keep: {path} (used by {', '.join(users)})")
    if o.users_checked:
        click.echo(f"  other users looked for in: {'; '.join(o.users_checked)}")
    for problem in o.users_unknown:
        click.echo(f"  other users not known: {problem}: qcrypt gives no command to destroy the old images")
    if free:
        click.echo(
            "  once the VM is confirmed good, destroy them (their legacy ciphertext stays readable with the "
            f"old passphrase): shred -u {' '.join(shlex.quote(p) for p in free)} (or blkdiscard on thin "
            "storage)"
        )
    if unchecked:
        click.echo(
            f"  not checked to be the files qcrypt read (a backing layer, a block device, or a name that "
            f"changed since): {', '.join(unchecked)}: qcrypt gives no command to destroy these; check what "
            "each one is (ls -l, qcrypt info) and who else uses it first"
        )
    if old:
        click.echo(
            "  images in other folders, or on other hosts, may use them too: 'qcrypt scan --libvirt-xml "
            "/etc/libvirt/qemu FOLDER...' names the domains using each image"
        )
    if o.record:
        click.echo(f"  record: {o.record}")
    if o.started is True:
        click.echo("  started: the domain is running")
    elif o.started is False:
        click.echo(f"  started: NO: {o.start_error or 'the domain is not running'}")
