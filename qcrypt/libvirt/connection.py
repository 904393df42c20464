"""A libvirt connection for ``migrate-domain``: the Python binding where it is importable, else ``virsh``.

Both offer the same few requests with the same behaviour and errors (:class:`qcrypt.errors.LibvirtError`).
Secret values never pass through argv: the binding hands them over in memory, ``virsh`` reads them from its
standard input (``--file /dev/stdin``). Every ``virsh`` call has a timeout.
"""

from __future__ import annotations

import base64
import binascii
import re
import shutil
import subprocess
from typing import Any, Protocol
from xml.sax.saxutils import escape

from qcrypt.errors import LibvirtError, SecretPrivateError

VIRSH_TIMEOUT_S = 60.0
START_TIMEOUT_S = 120.0
SHUT_OFF = "shut off"
_STATES = {
    0: "no state",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "in shutdown",
    5: SHUT_OFF,
    6: "crashed",
    7: "pmsuspended",
}  # virDomainState, named as virsh domstate names them
_UUID = re.compile(r"\b([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\b")


class Connection(Protocol):
    """What ``migrate-domain`` asks of libvirt."""

    backend: str  # "api" | "virsh"

    def domain_names(self) -> list[str]: ...
    def domain_state(self, name: str) -> str: ...
    def inactive_xml(self, name: str) -> str: ...
    def define_xml(self, xml: str) -> None: ...
    def start(self, name: str) -> None: ...
    def secret_uuid(self, ref: str) -> str: ...
    def secret_value(self, uuid: str) -> bytearray: ...
    def secret_by_usage(self, volume: str) -> str | None: ...
    def create_volume_secret(self, volume: str, value: bytes) -> str: ...
    def undefine_secret(self, uuid: str) -> None: ...
    def snapshot_names(self, name: str) -> list[str]: ...
    def snapshot_xml(self, name: str, snapshot: str) -> str: ...
    def current_snapshot(self, name: str) -> str | None: ...
    def redefine_snapshot(self, name: str, xml: str, *, current: bool) -> None: ...
    def close(self) -> None: ...


def volume_secret_xml(volume: str) -> str:
    """A persistent, private secret for the LUKS volume at ``volume``: its value cannot be read back."""
    return (
        f"<secret ephemeral='no' private='yes'><description>qcrypt migrate-domain: {escape(volume)}"
        f"</description><usage type='volume'><volume>{escape(volume)}</volume></usage></secret>"
    )


def split_ref(ref: str) -> tuple[str, str]:
    """("uuid", X) or ("usage", Y) from the model's ``DiskLayer.secret`` text."""
    kind, _, value = ref.partition(" ")
    if kind not in ("uuid", "usage") or not value:
        raise LibvirtError(f"unusable secret reference {ref!r}")
    return kind, value


def open_connection(uri: str | None, backend: str = "auto") -> Connection:
    """``backend``: "api" (the libvirt Python binding), "virsh", or "auto" (the binding when importable)."""
    if backend == "auto":
        backend = "api" if binding_available() else "virsh"
    if backend == "api":
        return ApiConnection(uri)
    if backend == "virsh":
        return VirshConnection(uri)
    raise LibvirtError(f"unknown libvirt backend {backend!r} (api, virsh or auto)")


def binding_available() -> bool:
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return False
    return True


# -- virsh --------------------------------------------------------------------------------------------------------


class VirshConnection:
    backend = "virsh"

    def __init__(self, uri: str | None) -> None:
        self.virsh = shutil.which("virsh") or shutil.which("virsh", path="/usr/bin:/usr/sbin:/bin")
        if not self.virsh:
            raise LibvirtError(
                "neither the libvirt Python binding nor virsh is installed (apt install libvirt-clients)"
            )
        self.uri = uri
        self.run("uri")  # fail early, with libvirt's reason, when the daemon does not answer

    def run(
        self, *args: str, stdin: bytes | None = None, timeout: float = VIRSH_TIMEOUT_S, secret_output: bool = False
    ) -> str:
        """virsh's stdout; LibvirtError with its first error line on failure (never the stdout of a
        request that prints a secret)."""
        words = [self.virsh or "virsh", *(["-c", self.uri] if self.uri else []), *args]
        try:
            done = subprocess.run(
                words, input=stdin if stdin is not None else b"", capture_output=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as e:
            raise LibvirtError(f"virsh {args[0]} did not answer within {timeout:.0f} s") from e
        if done.returncode != 0:
            raise LibvirtError(_virsh_error(args[0], done.stderr.decode("utf-8", "replace")))
        if secret_output:
            return done.stdout.decode("ascii", "replace")
        return done.stdout.decode("utf-8", "replace")

    def domain_names(self) -> list[str]:
        return [line.strip() for line in self.run("list", "--all", "--name").splitlines() if line.strip()]

    def domain_state(self, name: str) -> str:
        return self.run("domstate", "--domain", name).strip().splitlines()[0]

    def inactive_xml(self, name: str) -> str:
        return self.run("dumpxml", "--inactive", "--security-info", "--domain", name)

    def define_xml(self, xml: str) -> None:
        self.run("define", "--file", "/dev/stdin", stdin=xml.encode("utf-8"))

    def start(self, name: str) -> None:
        self.run("start", "--domain", name, timeout=START_TIMEOUT_S)

    def secret_uuid(self, ref: str) -> str:
        kind, value = split_ref(ref)
        if kind == "uuid":
            return value
        found = self.secret_by_usage(value)
        if found is None:
            raise LibvirtError(f"no libvirt secret with usage volume {value}")
        return found

    def secret_by_usage(self, volume: str) -> str | None:
        for line in self.run("secret-list").splitlines():
            uuid, _, usage = line.strip().partition(" ")
            if _UUID.fullmatch(uuid) and usage.strip() == f"volume {volume}":
                return uuid
        return None

    def secret_value(self, uuid: str) -> bytearray:
        try:
            text = self.run("secret-get-value", "--secret", uuid, secret_output=True)
        except LibvirtError as e:
            if "private" in str(e):
                raise SecretPrivateError(f"libvirt secret {uuid} is private: its value cannot be read") from e
            raise
        try:
            return bytearray(base64.b64decode(text.strip(), validate=True))
        except binascii.Error as e:
            raise LibvirtError(f"virsh secret-get-value {uuid}: not base64") from e

    def create_volume_secret(self, volume: str, value: bytes) -> str:
        out = self.run("secret-define", "--file", "/dev/stdin", stdin=volume_secret_xml(volume).encode("utf-8"))
        found = _UUID.search(out)
        if not found:
            raise LibvirtError(f"virsh secret-define printed no UUID: {out.strip()[:200]}")
        uuid = found.group(1)
        try:
            self.run("secret-set-value", "--secret", uuid, "--file", "/dev/stdin", "--plain", stdin=bytes(value))
        except LibvirtError:
            self.undefine_secret(uuid)
            raise
        return uuid

    def undefine_secret(self, uuid: str) -> None:
        self.run("secret-undefine", "--secret", uuid)

    def snapshot_names(self, name: str) -> list[str]:
        out = self.run("snapshot-list", "--domain", name, "--name", "--topological")
        return [line.strip() for line in out.splitlines() if line.strip()]

    def snapshot_xml(self, name: str, snapshot: str) -> str:
        return self.run("snapshot-dumpxml", "--domain", name, "--snapshotname", snapshot, "--security-info")

    def current_snapshot(self, name: str) -> str | None:
        try:
            return self.run("snapshot-current", "--domain", name, "--name").strip() or None
        except LibvirtError as e:
            if "no current snapshot" in str(e) or "not have a current snapshot" in str(e):
                return None
            raise

    def redefine_snapshot(self, name: str, xml: str, *, current: bool) -> None:
        self.run(
            "snapshot-create",
            "--domain",
            name,
            "--xmlfile",
            "/dev/stdin",
            "--redefine",
            *(["--current"] if current else []),
            stdin=xml.encode("utf-8"),
        )

    def close(self) -> None:
        return


def _virsh_error(command: str, stderr: str) -> str:
    """virsh's error lines ("error: what failed", "error: why"), joined into one line."""
    lines = [line.strip().removeprefix("error: ") for line in stderr.splitlines() if line.strip()]
    return f"virsh {command}: {': '.join(dict.fromkeys(lines[:3])) or 'failed without a message'}"


# -- the Python binding -----------------------------------------------------------------------------------------


class ApiConnection:
    backend = "api"

    def __init__(self, uri: str | None) -> None:
        import libvirt

        self.libvirt: Any = libvirt
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # no C-level printing to stderr
        try:
            self.conn = libvirt.open(uri)
        except libvirt.libvirtError as e:
            raise LibvirtError(f"cannot connect to libvirt{f' at {uri}' if uri else ''}: {_api_text(e)}") from e

    def _call(self, what: str, func: Any, *args: Any) -> Any:
        try:
            return func(*args)
        except self.libvirt.libvirtError as e:
            raise LibvirtError(f"{what}: {_api_text(e)}") from e

    def _domain(self, name: str) -> Any:
        return self._call(f"domain {name}", self.conn.lookupByName, name)

    def domain_names(self) -> list[str]:
        return sorted(d.name() for d in self._call("listing domains", self.conn.listAllDomains, 0))

    def domain_state(self, name: str) -> str:
        state = self._call(f"domain {name}", self._domain(name).state)[0]
        return _STATES.get(state, f"state {state}")

    def inactive_xml(self, name: str) -> str:
        flags = self.libvirt.VIR_DOMAIN_XML_INACTIVE | self.libvirt.VIR_DOMAIN_XML_SECURE
        return self._call(f"domain {name}", self._domain(name).XMLDesc, flags)

    def define_xml(self, xml: str) -> None:
        self._call("define", self.conn.defineXML, xml)

    def start(self, name: str) -> None:
        self._call(f"start {name}", self._domain(name).create)

    def secret_uuid(self, ref: str) -> str:
        kind, value = split_ref(ref)
        if kind == "uuid":
            return value
        secret = self._call(
            f"secret with usage volume {value}",
            self.conn.secretLookupByUsage,
            self.libvirt.VIR_SECRET_USAGE_TYPE_VOLUME,
            value,
        )
        return secret.UUIDString()

    def secret_by_usage(self, volume: str) -> str | None:
        try:
            secret = self.conn.secretLookupByUsage(self.libvirt.VIR_SECRET_USAGE_TYPE_VOLUME, volume)
        except self.libvirt.libvirtError as e:
            if e.get_error_code() == self.libvirt.VIR_ERR_NO_SECRET:
                return None
            raise LibvirtError(f"secret with usage volume {volume}: {_api_text(e)}") from e
        return secret.UUIDString()

    def secret_value(self, uuid: str) -> bytearray:
        secret = self._call(f"libvirt secret {uuid}", self.conn.secretLookupByUUIDString, uuid)
        try:
            return bytearray(secret.value())
        except self.libvirt.libvirtError as e:
            if "private" in _api_text(e):
                raise SecretPrivateError(f"libvirt secret {uuid} is private: its value cannot be read") from e
            raise LibvirtError(f"libvirt secret {uuid}: {_api_text(e)}") from e

    def create_volume_secret(self, volume: str, value: bytes) -> str:
        secret = self._call("secret define", self.conn.secretDefineXML, volume_secret_xml(volume))
        try:
            self._call("secret set value", secret.setValue, bytes(value))
        except LibvirtError:
            secret.undefine()
            raise
        return secret.UUIDString()

    def undefine_secret(self, uuid: str) -> None:
        secret = self._call(f"libvirt secret {uuid}", self.conn.secretLookupByUUIDString, uuid)
        self._call(f"secret undefine {uuid}", secret.undefine)

    def snapshot_names(self, name: str) -> list[str]:
        flags = self.libvirt.VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL
        return [s.getName() for s in self._call(f"snapshots of {name}", self._domain(name).listAllSnapshots, flags)]

    def snapshot_xml(self, name: str, snapshot: str) -> str:
        found = self._call(f"snapshot {snapshot} of {name}", self._domain(name).snapshotLookupByName, snapshot, 0)
        return self._call(
            f"snapshot {snapshot} of {name}", found.getXMLDesc, self.libvirt.VIR_DOMAIN_SNAPSHOT_XML_SECURE
        )

    def current_snapshot(self, name: str) -> str | None:
        domain = self._domain(name)
        if not self._call(f"snapshots of {name}", domain.hasCurrentSnapshot, 0):
            return None
        return self._call(f"snapshots of {name}", domain.snapshotCurrent, 0).getName()

    def redefine_snapshot(self, name: str, xml: str, *, current: bool) -> None:
        flags = self.libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
        if current:
            flags |= self.libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
        self._call(f"snapshot redefine of {name}", self._domain(name).snapshotCreateXML, xml, flags)

    def close(self) -> None:
        try:
            self.conn.close()
        except self.libvirt.libvirtError:
            return


def _api_text(e: Exception) -> str:
    text = e.get_error_message() if hasattr(e, "get_error_message") else str(e)
    return " ".join(str(text).split())
