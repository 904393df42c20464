"""Everything a run checks before it writes (and all a dry run does): each passphrase against its image or
layer, lock holders, secret usages, leftovers, free space.
"""

from __future__ import annotations

import os

from qcrypt.audit.report import ImageReport
from qcrypt.crypto.secret import wipe, without_line_ending
from qcrypt.domain.options import RANDOM_CONTENT_OPTION, SECRET_VALUE, DiskPlan, DomainOptions
from qcrypt.domain.secrets import DiskSecrets
from qcrypt.errors import (
    BadPassphraseError,
    MigrationError,
    SecretConflictError,
)
from qcrypt.libvirt.connection import Connection
from qcrypt.migrate.passphrase_check import check_legacy_passphrase
from qcrypt.plumbing.locking import refuse_if_in_use
from qcrypt.plumbing.outputs import leftover_temps


def precheck_disk(
    conn: Connection,
    plan: DiskPlan,
    report: ImageReport,
    secrets: DiskSecrets,
    opts: DomainOptions,
    *,
    check_locks: bool,
) -> None:
    """Check, without writing, what would stop the migration of one disk: each passphrase against its image
    (or layer), who holds the image's locks, temporary files of another run, and the usage a new secret needs.
    Raises the error the real run would raise; notes what the operator should know in ``plan.notes``."""
    if plan.xml_only:
        if plan.passphrase_from is not None:  # None: a private secret, named in the plan's notes
            check_xml_only_passphrase(plan, report, secrets.passphrase)
    else:
        chain = [plan.source, *report.chain_paths]
        layers = {os.path.realpath(path) for path in chain}
        strangers = [path for path in secrets.layers if os.path.realpath(path) not in layers]
        if strangers:  # the XML's <backingStore> names a file the image's chain does not reach
            raise MigrationError(
                f"the XML's <backingStore> names {strangers[0]} with a secret of its own, but it "
                f"is not a layer of {plan.source}'s chain (layers: {', '.join(chain)})"
            )
        _check_legacy_passphrases(plan, secrets, opts)
        if check_locks:
            for path in [plan.source, *report.chain_paths]:
                refuse_if_in_use(path)
        _check_leftovers(plan)
    if plan.secret_uuid is None:
        check_secret_usage(conn, plan)


def _check_legacy_passphrases(plan: DiskPlan, secrets: DiskSecrets, opts: DomainOptions) -> None:
    fallback = file_fallback(plan, secrets.passphrase)

    def check(passphrase: bytearray) -> bool:
        return check_legacy_passphrase(
            plan.source,
            passphrase,
            force=opts.accept_random_content,
            accept_unverified=opts.accept_unverified_passphrase,
            rules=plan.rules,
            source_format=plan.source_format,
            passphrases=secrets.by_real_path(),
            random_option=RANDOM_CONTENT_OPTION,
        ).verified

    try:
        try:
            plan.passphrase_verified = check(secrets.passphrase)
        except BadPassphraseError as exact_error:
            if fallback is None or bytes(fallback) == bytes(secrets.passphrase):
                raise
            try:
                plan.passphrase_verified = check(fallback)
            except BadPassphraseError:
                raise BadPassphraseError(
                    f"{exact_error} (tried the {opts.fallback_label}'s exact bytes, and without its trailing newline)"
                ) from None
            use_fallback(plan, secrets.passphrase, fallback)
    finally:
        if fallback is not None:
            wipe(fallback)


def _check_leftovers(plan: DiskPlan) -> None:
    """Temporary files of other runs for the new image: a killed run's are removed by the real run; one whose
    process still runs is left alone (that run's lock on the source stops this one, see precheck_disk)."""
    final = os.path.realpath(plan.source) if plan.replace else plan.new_path
    for path, pid, alive in leftover_temps(final):
        if alive:
            plan.notes.append(
                f"temporary file {path} belongs to process {pid}, which still runs: the real run leaves it"
            )
        else:
            plan.notes.append(f"leftover temporary file {path} of a killed run (PID {pid}): the real run removes it")


def check_secret_usage(conn: Connection, plan: DiskPlan) -> None:
    """A new secret for the new image needs the usage 'volume NEW_PATH': refuse now (before any copy) when a
    secret has it already, naming the domains that use that secret."""
    holder = conn.secret_by_usage(plan.new_path)
    if holder is None:
        return
    if holder == plan.old_secret_uuid:
        how = (
            "qcrypt cannot prove it opens the image, nor define a second secret for the same path"
            if plan.xml_only
            else "rerun without --replace (the new image then gets a name, and a secret, of its own)"
        )
        raise SecretConflictError(
            f"the disk's own libvirt secret {holder} is private and its usage is volume "
            f"{plan.new_path}, the new image's path: {how}"
        )
    users = [name for name in conn.domain_names() if holder in conn.inactive_xml(name)]
    if users:
        raise SecretConflictError(
            f"libvirt secret {holder} already has usage volume {plan.new_path}, which a new "
            f"secret for the new image needs, and domain {', '.join(users)} uses it: "
            f"look at it (virsh secret-dumpxml {holder}) before anything else"
        )
    raise SecretConflictError(
        f"libvirt secret {holder} already has usage volume {plan.new_path} (left by an "
        f"earlier run?), which a new secret for the new image needs; no domain uses it: "
        f"remove it with 'virsh secret-undefine {holder}', then rerun"
    )


def file_fallback(plan: DiskPlan, passphrase: bytearray) -> bytearray | None:
    """For a passphrase from the caller (file, stdin, prompt): its content without the trailing newline
    (tried second)."""
    return without_line_ending(passphrase) if plan.passphrase_from not in (None, SECRET_VALUE) else None


def use_fallback(plan: DiskPlan, passphrase: bytearray, fallback: bytearray) -> None:
    """The file's content without its newline opened the image: the new keyslot and secret take that value."""
    passphrase[:] = fallback
    plan.passphrase_from = f"{plan.passphrase_from} without its trailing newline"


def check_xml_only_passphrase(plan: DiskPlan, report: ImageReport, passphrase: bytearray) -> None:
    fallback = file_fallback(plan, passphrase)
    try:
        check_luks_passphrase(plan.source, report, passphrase)
    except BadPassphraseError:
        if fallback is None:
            raise
        check_luks_passphrase(plan.source, report, fallback)
        use_fallback(plan, passphrase, fallback)
    finally:
        if fallback is not None:
            wipe(fallback)


def check_luks_passphrase(path: str, report: ImageReport, passphrase: bytearray) -> None:
    """Raise BadPassphraseError unless ``passphrase`` opens a keyslot of the LUKS image at ``path``."""
    from qcrypt.migrate.luks_output import source_luks

    opened = source_luks(path, report, bytes(passphrase))
    if opened:
        master_key = opened[2]
        wipe(master_key)
