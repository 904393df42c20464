"""Is the legacy passphrase right? Legacy AES has no key check: decrypt sampled sectors and judge whether they
look like data (:mod:`qcrypt.audit.plausibility`); a fallback passphrase without its trailing newline.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from qcrypt.audit import plausibility
from qcrypt.crypto.encryption import IvBase
from qcrypt.crypto.secret import wipe as wipe_secret
from qcrypt.crypto.sector import legacy_aes_key
from qcrypt.errors import (
    BadPassphraseError,
    MigrationError,
)
from qcrypt.guest.stream import KnownMasterKey, Opener, QcowReader, Secret
from qcrypt.images.backing import ChainRules
from qcrypt.migrate.options import MigrateOptions
from qcrypt.model.clusters import ClusterKind

UNVERIFIED_OPTION = "--accept-unverified-passphrase"


@dataclass(frozen=True)
class PassphraseCheck:
    """What the legacy passphrase check found: ``verified`` is False when no layer had data to judge it by."""

    summary: str
    verified: bool


def _key_bytes(secret: Secret | None) -> bytes:
    """What a layer's secret is, as bytes to compare (a known master key compares by its key)."""
    if secret is None:
        return b""
    return bytes(secret.key) if isinstance(secret, KnownMasterKey) else bytes(secret)


def check_legacy_passphrase(
    source: str,
    passphrase: bytes | bytearray | None,
    *,
    force: bool,
    accept_unverified: bool = False,
    rules: ChainRules | None = None,
    source_format: str | None = None,
    passphrases: Mapping[str, Secret] | None = None,
    random_option: str = "--force",
) -> PassphraseCheck:
    """Decrypt a sample of clusters of every legacy layer; refuse random-looking plaintext unless forced.
    ``passphrases`` maps a layer's real path to its own passphrase (else ``passphrase``).

    A legacy layer without any data cluster cannot judge the passphrase: when no layer has data, that is
    "unverified", not "verified", and refused (MigrationError, exit 8) unless ``accept_unverified``."""
    opener = Opener(passphrase, passphrases or {}, rules)
    reader = opener.open(source, source_format)
    try:
        verdicts = [(layer.image.path, _judge_layer(layer)) for layer in _legacy_layers(reader)]
    finally:
        reader.close()
    bad = [(path, v) for path, v in verdicts if v.samples and not v.plausible]
    if bad and not force:
        path, verdict = bad[0]
        raise BadPassphraseError(
            f"{path}: the passphrase is probably wrong: {verdict.reason} (legacy AES has no key check). If the "
            f"disk's content really is random (e.g. encrypted inside the guest), rerun with {random_option}"
        )
    # A passphrase counts as checked when some layer it unlocks had data to judge; a layer with its own
    # passphrase and no data leaves that passphrase unchecked, whatever the other layers say.
    judged = {_key_bytes(opener.passphrase_for(path)) for path, v in verdicts if v.samples}
    unjudged = [path for path, v in verdicts if not v.samples and _key_bytes(opener.passphrase_for(path)) not in judged]
    if unjudged and not accept_unverified:
        raise MigrationError(
            f"the passphrase cannot be verified: legacy layer {unjudged[0]} holds no data cluster to check it "
            "against (legacy AES has no key check), so a wrong passphrase would go unnoticed. If you are sure of "
            f"it, rerun with {UNVERIFIED_OPTION}"
        )
    summary = "; ".join(
        v.reason if v.samples else f"{path}: no data cluster to check the passphrase against" for path, v in verdicts
    )
    return PassphraseCheck(summary, verified=not unjudged and not bad)


def check_legacy(
    source: str, passphrase: bytes | bytearray | None, opts: MigrateOptions, *, force: bool
) -> PassphraseCheck:
    return check_legacy_passphrase(
        source,
        passphrase,
        force=force or opts.accept_random_content,
        passphrases=opts.layer_passphrases(),
        accept_unverified=opts.accept_unverified_passphrase,
        rules=opts.rules,
        source_format=opts.source_format,
        random_option=opts.random_content_option,
    )


def has_fallback(opts: MigrateOptions) -> bool:
    return (
        opts.passphrase is not None
        and opts.passphrase_fallback is not None
        and bytes(opts.passphrase_fallback) != bytes(opts.passphrase)
    )


def same_legacy_key(passphrase: bytes | bytearray, other: bytes | bytearray) -> bool:
    """True when both give the same legacy AES key (its first 16 bytes): nothing to choose between them."""
    key, other_key = legacy_aes_key(passphrase), legacy_aes_key(other)
    try:
        return key == other_key
    finally:
        wipe_secret(key)
        wipe_secret(other_key)


def check_legacy_with_fallback(source: str, opts: MigrateOptions) -> tuple[PassphraseCheck, bool]:
    """The plausibility verdict and whether ``opts.passphrase_fallback`` is the one to use.

    The exact passphrase wins when its plaintext looks like a disk; else the fallback when its plaintext
    does; else the exact passphrase again under --force (or the refusal, naming both tries)."""
    fallback = opts.passphrase_fallback
    assert opts.passphrase is not None and fallback is not None
    try:
        return check_legacy(source, opts.passphrase, opts, force=False), False
    except BadPassphraseError as exact_error:
        try:
            return check_legacy(source, fallback, opts, force=False), True
        except BadPassphraseError:
            if opts.force or opts.accept_random_content:
                return check_legacy(source, opts.passphrase, opts, force=True), False
            error = BadPassphraseError(
                f"{exact_error} (tried the passphrase file's exact bytes, and without its trailing newline)"
            )
            error.fallback_tried = True
            raise error from None


def _legacy_layers(reader: object) -> Iterator[QcowReader]:
    while isinstance(reader, QcowReader):
        if reader.encryption is not None and reader.encryption.iv_base is IvBase.GUEST:
            yield reader
        reader = reader.backing


def _encrypted_extents(layer: QcowReader) -> Iterator[tuple[int, int]]:
    """(guest_offset, length) of the layer's own encrypted data: whole clusters and allocated subclusters."""
    cs = layer.cluster_size
    sc_size = cs // 32
    for g, m in layer.image.iter_mappings():
        if m.kind is ClusterKind.NORMAL:
            yield g * cs, min(cs, layer.size - g * cs)
        elif m.kind is ClusterKind.SUBCLUSTERS:
            for i in range(32):
                if m.alloc_bitmap >> i & 1:
                    start = g * cs + i * sc_size
                    yield start, min(sc_size, layer.size - start)


def _judge_layer(layer: QcowReader) -> plausibility.Verdict:
    extents = plausibility.sample(_encrypted_extents(layer))
    return plausibility.judge((off, layer.read(off, min(length, 65536))) for off, length in extents if length > 0)
