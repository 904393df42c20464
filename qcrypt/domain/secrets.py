"""Each disk's passphrases: from the libvirt secret its layer's ``<encryption>`` names, or the caller's fallback
when a secret is private or missing; new secrets for disks that had none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from qcrypt.crypto.secret import wipe
from qcrypt.domain.options import SECRET_VALUE, DiskPlan, DomainOptions
from qcrypt.errors import (
    PassphraseInputError,
    SecretPrivateError,
)
from qcrypt.libvirt.connection import Connection
from qcrypt.libvirt.domainxml import (
    DomainDisk,
)


@dataclass
class DiskSecrets:
    """One disk's passphrases: ``passphrase`` for its image (and the new keyslot), ``layers`` for backing
    layers whose own ``<encryption>`` names another secret (by the path the XML gives)."""

    passphrase: bytearray = field(repr=False)
    layers: dict[str, bytearray] = field(default_factory=dict, repr=False)

    def by_real_path(self) -> dict[str, bytearray]:
        return {os.path.realpath(path): value for path, value in self.layers.items()}

    def wipe(self) -> None:
        for value in (self.passphrase, *self.layers.values()):
            wipe(value)


def disk_secrets(conn: Connection, disk: DomainDisk, plan: DiskPlan, opts: DomainOptions) -> DiskSecrets:
    """Each layer's passphrase from the secret its own ``<encryption>`` names: the first secret of the chain
    is the disk's (its image and the new keyslot); a backing layer naming another secret gets that one's value.
    A private secret cannot be checked against the image: the caller's fallback passphrase is used instead, and
    the new disk gets a new secret holding it (the private one stays as it is)."""
    top_ref = next((layer.secret for layer in disk.layers if layer.secret), None)
    secrets = DiskSecrets(_disk_passphrase(conn, top_ref, plan, opts))
    try:
        for layer in disk.layers[1:]:
            if layer.path and layer.secret and layer.secret != top_ref:
                uuid = conn.secret_uuid(layer.secret)
                plan.layer_secrets[layer.path] = uuid
                secrets.layers[layer.path] = _layer_passphrase(conn, uuid, layer.path, plan, opts)
    except BaseException:
        secrets.wipe()
        raise
    return secrets


def _disk_passphrase(conn: Connection, ref: str | None, plan: DiskPlan, opts: DomainOptions) -> bytearray:
    if ref:
        uuid = conn.secret_uuid(ref)
        try:
            value = conn.secret_value(uuid)
            plan.secret_uuid, plan.passphrase_from = uuid, SECRET_VALUE
            return value
        except SecretPrivateError as e:
            if plan.xml_only:  # the image is LUKS already and keeps its path: only the XML changes
                plan.secret_uuid = uuid
                plan.notes.append(
                    f"libvirt secret {uuid} is private: qcrypt cannot check that it opens this LUKS "
                    "image (only the XML changes; libvirt says so at start if it does not)"
                )
                return bytearray()
            if opts.fallback_passphrase is None:
                raise PassphraseInputError(
                    f"disk {plan.target}: {e}: give its passphrase with --passphrase-file FILE (or '-' for stdin)"
                ) from e
            plan.old_secret_uuid = uuid
            plan.notes.append(
                f"libvirt secret {uuid} is private: its value cannot be checked against the image, "
                "so the new disk gets a new secret holding the passphrase checked here (the old "
                "secret is left as it is)"
            )
    elif opts.fallback_passphrase is None:
        raise PassphraseInputError(
            f"disk {plan.target} ({plan.source}) names no libvirt secret: give its "
            "passphrase with --passphrase-file FILE (or '-' for stdin)"
        )
    plan.passphrase_from = opts.fallback_label
    assert opts.fallback_passphrase is not None
    return bytearray(opts.fallback_passphrase())


def _layer_passphrase(conn: Connection, uuid: str, path: str, plan: DiskPlan, opts: DomainOptions) -> bytearray:
    try:
        return conn.secret_value(uuid)
    except SecretPrivateError as e:
        if opts.fallback_passphrase is None:
            raise PassphraseInputError(
                f"disk {plan.target}: backing layer {path}: {e}: give its passphrase with "
                "--passphrase-file FILE (or '-' for stdin)"
            ) from e
    plan.notes.append(
        f"backing layer {path}: its libvirt secret {uuid} is private: the {opts.fallback_label} is used for it"
    )
    return bytearray(opts.fallback_passphrase())
