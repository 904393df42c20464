"""Test-image factory: build qcow/qcow2/LUKS images with the real tools and unpack the committed fixtures.

Used by ``scripts/make-fixtures`` (which regenerates ``tests/fixtures/``) and by interop tests. Standard library
only: this module must stay importable without pytest, construct or qcrypt itself.

Secrets never appear on a command line. Every tool call that needs a passphrase gets a private temporary file
holding its UTF-8 bytes **without** a trailing newline (QEMU ``--object secret,id=secN,file=F`` and cryptsetup
``--key-file F`` both use the file's exact bytes). Encrypted images are always opened with ``--image-opts``
(docs/FORMATS.md Pitfall 25), including the keys of encrypted backing files (``backing.encrypt.key-secret=``).

Public API
----------
Opening images
    ``Image(path, fmt, passphrase=None, backing=None)``: what a tool needs to open an image; ``fmt`` is one of
    ``qcow2 | qcow | luks | raw``; ``backing`` is needed only when a backing layer is encrypted.
    ``ImageToolError``: a tool failed (message = displayed argv, which holds no secret, plus stderr).
    ``tool(name) -> str``: absolute path of ``qemu-img``, ``qemu-io`` or ``cryptsetup``.
    ``run(argv, *, retry_cpu_usage=False) -> str``: run a tool, return stdout. With ``retry_cpu_usage`` it
    retries (CPU_USAGE_ATTEMPTS) on QEMU's flaky "Unable to get accurate CPU usage" (LUKS PBKDF calibration).
    ``record_commands() -> ContextManager[list[str]]``: collect every command run (directories stripped);
    ``record_note(text)`` adds a non-tool step (e.g. a header edit) to those logs.
Creating
    ``make_qcow2(path, size, *, version=3, cluster_size=65536, extended_l2=False, encrypt=None|"aes"|"luks",
    passphrase=None, backing=None, compression_type=None, luks_opts=None) -> Image``
    ``make_qcow1(path, size, *, passphrase=None, backing=None) -> Image``
    ``make_luks_qemu(path, payload_bytes, *, passphrase, luks_opts=None) -> Image`` (``qemu-img create -f
    luks``, iter-time 10; the payload is a hole that reads as garbage until written: see ``zero_fill``)
    ``make_luks_cryptsetup(path, payload_bytes, *, cipher, key_bits, hash_name, passphrase) -> Image``
    (LUKS1, ``--pbkdf-force-iterations 1000``; payload left as a hole too)
    ``make_luks2(path, payload_bytes, *, passphrase, pbkdf="pbkdf2"|"argon2id", cipher="aes-xts-plain64",
    key_bits=256) -> Image`` (QEMU cannot open LUKS2, so its payload is never written)
Writing guest data (one qemu-io process per call)
    ``qemu_io(image, *commands) -> str``
    ``write_pattern(image, offset, length, pattern_byte)``, ``write_data(image, offset, data)``,
    ``write_compressed(image, offset, data)`` (cluster-aligned, one cluster), ``write_zeroes(image, offset,
    length, *, unmap=False)``, ``zero_fill(image, length)`` (writes real zero plaintext: raw LUKS payloads)
    ``Write(kind, offset, length, tag)``; ``sector_pattern(guest_offset, length, tag) -> bytes``
    ``fill_plan(virtual_size, cluster_size, *, compressed=True, zeroes=True) -> list[Write]``
    ``apply_writes(image, writes)``; ``fill_image(image, virtual_size, cluster_size, **plan_options)``
    ``snapshot(image, name)`` (``qemu-img snapshot -c`` through ``--image-opts``)
Inspecting
    ``plaintext_sha256(image, *, snapshot_name=None) -> str`` (the oracle: ``qemu-img convert -O raw``)
    ``qemu_img_info(path) -> dict`` (no key needed), ``luks_dump(path) -> dict`` (parsed ``cryptsetup
    luksDump``), ``luks_from_qemu_info(encrypt) -> dict`` (same keys, for LUKS inside qcow2)
    ``set_incompatible_bits(path, mask)``: OR ``mask`` into a qcow2 v3 header's incompatible_features
Committed fixtures
    ``FIXTURES_DIR``, ``manifest() -> dict``, ``fixture_path(name, tmp_dir) -> Path`` (gunzips the fixture and
    its backing chain into ``tmp_dir``), ``fixture_image(name, tmp_dir) -> Image``, ``expected_plaintext(name)
    -> bytes`` (guest view rebuilt in Python from the manifest's ``writes``; no tool needed),
    ``render_writes(writes, base) -> bytes``, ``normalized_info(info, name, backing_name) -> dict``,
    ``gzip_file(src, dst)``, ``gunzip_sparse(src, dst)``.

Guest data layout (``fill_plan``): every written 512-byte sector starts with a text label naming its tag and
its **guest** offset, followed by a counter, so a sector decrypted with a wrong IV (legacy AES = guest sector,
qcow2-LUKS = host sector, raw LUKS = payload sector; docs/FORMATS.md Pitfall 1) or read from the wrong place is
obvious. Most writes sit at non-zero, non-cluster-aligned offsets; sector 0 is an MBR look-alike (0x55AA).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"
MANIFEST_NAME = "manifest.json"
SECTOR_BYTES = 512
_TOOL_PATH = "/usr/bin:/usr/sbin:/bin:/sbin"
_CPU_USAGE_ERROR = "Unable to get accurate CPU usage"
# QEMU 7.2's LUKS PBKDF calibration times its first 2^15 PBKDF2 rounds with getrusage(RUSAGE_THREAD); on a fast,
# quiet machine they can finish before the scheduler has accounted any CPU time to the thread, and qemu-img then
# fails with "Unable to get accurate CPU usage" (a known QEMU bug, later fixed upstream by retrying). Measured
# here: 25 of 40 plain `qemu-img create -f luks ... iter-time=10` runs failed. A failed try costs a few ms, so
# retry often enough that 0.7^40 makes a spurious failure negligible.
CPU_USAGE_ATTEMPTS = 40
_QEMU_LUKS_ITER_TIME_MS = 10
_CRYPTSETUP_ITERATIONS = 1000
_ARGON2_MEMORY_KIB = 32
_ARGON2_TIME_COST = 4
_COPY_CHUNK_BYTES = 1 << 16
_LUKS_FORMAT_SPARE_BYTES = 20 << 20  # enough for any LUKS1 header and a default LUKS2 header
_INCOMPAT_OFFSET = 72
_LUKS1_PHDR_BYTES = 592
_LUKS1_PAYLOAD_OFFSET = 104
_LUKS1_KEY_BYTES_OFFSET = 108
_LUKS1_SLOTS_OFFSET = 208
_LUKS1_SLOT_BYTES = 48
_LUKS1_SLOT_DISABLED = 0x0000DEAD
_LUKS2_METADATA_SIZE = "16k"
_TOOL_TIMEOUT_S = 300  # no tool call may hang a test run
_QCOW2_CRYPTO_HEADER_EXT = 0x0537BE77
_LUKS1_MAGIC = b"LUKS\xba\xbe"
_DRIVER_KEY_OPTION = {"qcow2": "encrypt.key-secret", "qcow": "encrypt.key-secret", "luks": "key-secret"}

_recorders: list[list[str]] = []


class ImageToolError(RuntimeError):
    """A qemu-img / qemu-io / cryptsetup invocation failed; ``stderr`` holds the tool's own message."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


@dataclass(frozen=True)
class Image:
    """How to open an image: path, QEMU driver name, passphrase, and the (encrypted) backing layer if any."""

    path: Path
    fmt: str
    passphrase: str | None = None
    backing: Image | None = None

    def __repr__(self) -> str:  # never show the passphrase
        locked = "set" if self.passphrase is not None else "none"
        return f"Image(path={str(self.path)!r}, fmt={self.fmt!r}, passphrase={locked}, backing={self.backing!r})"


@dataclass(frozen=True)
class Write:
    """One guest write: kind is ``data`` (``sector_pattern``), ``compressed`` (one whole cluster) or ``zero``."""

    kind: str
    offset: int
    length: int
    tag: str

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "offset": self.offset, "length": self.length, "tag": self.tag}

    @classmethod
    def from_dict(cls, item: dict[str, Any]) -> Write:
        return cls(item["kind"], item["offset"], item["length"], item["tag"])


# --------------------------------------------------------------------------------------------------------------
# running tools


def tool(name: str) -> str:
    """Absolute path of a tool, looked up in PATH and then in /usr/bin, /usr/sbin."""
    found = shutil.which(name) or shutil.which(name, path=_TOOL_PATH)
    if found is None:
        raise ImageToolError(f"{name} is not installed")
    return found


def _display(argv: Sequence[str]) -> str:
    """The command line as shown in logs and manifests: directories of absolute paths stripped."""
    return shlex.join(re.sub(r"(?<![\w.])/(?:[^\s,=/]+/)+", "", arg) for arg in argv)


@contextlib.contextmanager
def record_commands() -> Iterator[list[str]]:
    """Collect the displayed form of every command run inside the ``with`` block."""
    log: list[str] = []
    _recorders.append(log)
    try:
        yield log
    finally:
        _recorders.remove(log)


def record_note(text: str) -> None:
    """Add a non-tool step (e.g. a header edit done in Python) to the active ``record_commands`` logs."""
    for log in _recorders:
        log.append(f"# {text}")


def run(argv: Sequence[str], *, retry_cpu_usage: bool = False) -> str:
    """Run a tool and return its stdout; raise ImageToolError with its stderr on failure."""
    attempts = CPU_USAGE_ATTEMPTS if retry_cpu_usage else 1
    for log in _recorders:
        log.append(_display(argv))
    for attempt in range(1, attempts + 1):
        proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=_TOOL_TIMEOUT_S)
        if proc.returncode == 0:
            return proc.stdout
        if attempt < attempts and _CPU_USAGE_ERROR in proc.stderr:
            continue
        break
    stderr = proc.stderr.strip()
    raise ImageToolError(f"{_display(argv)} failed (exit {proc.returncode}): {stderr}", stderr)


@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    """A private temporary directory (secret files, pattern files, raw dumps), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="qcrypt-img-") as name:
        os.chmod(name, 0o700)
        yield Path(name)


def _write_secret(directory: Path, secret_id: str, passphrase: str) -> Path:
    """Write the passphrase bytes (no trailing newline) to a mode-0600 file and return its path."""
    path = directory / f"{secret_id}.pw"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(passphrase.encode("utf-8"))
    return path


def _opt_path(path: Path) -> str:
    """A path as a value inside a QEMU option string (commas are doubled)."""
    return str(path).replace(",", ",,")


def _open_args(image: Image, scratch: Path) -> list[str]:
    """``--object secret`` arguments plus ``--image-opts OPTS`` opening ``image`` and its encrypted backings."""
    objects: list[str] = []
    opts = [f"driver={image.fmt}", f"file.filename={_opt_path(image.path)}"]
    layer: Image | None = image
    prefix = ""
    while layer is not None:
        if layer.passphrase is not None:
            secret_id = f"sec{len(objects) // 2}"
            secret_file = _write_secret(scratch, secret_id, layer.passphrase)
            objects += ["--object", f"secret,id={secret_id},file={_opt_path(secret_file)}"]
            opts.append(f"{prefix}{_DRIVER_KEY_OPTION[layer.fmt]}={secret_id}")
        layer = layer.backing
        prefix += "backing."
    return [*objects, "--image-opts", ",".join(opts)]


# --------------------------------------------------------------------------------------------------------------
# creating images


def _key_options(passphrase: str | None, scratch: Path, prefix: str) -> tuple[list[str], list[str]]:
    """(``--object`` args, ``-o`` items) giving QEMU the secret ``sec0`` for a new encrypted image."""
    if passphrase is None:
        raise ImageToolError("an encrypted image needs a passphrase")
    secret_file = _write_secret(scratch, "sec0", passphrase)
    return ["--object", f"secret,id=sec0,file={_opt_path(secret_file)}"], [f"{prefix}key-secret=sec0"]


def _backing_args(path: Path, backing: Image | None) -> list[str]:
    """``-b NAME -F FMT`` with the backing name relative to the new image's directory."""
    if backing is None:
        return []
    relative = os.path.relpath(backing.path, start=path.parent)
    return ["-b", relative, "-F", backing.fmt]


def make_qcow2(
    path: Path,
    size: int,
    *,
    version: int = 3,
    cluster_size: int = 65536,
    extended_l2: bool = False,
    encrypt: str | None = None,
    passphrase: str | None = None,
    backing: Image | None = None,
    compression_type: str | None = None,
    luks_opts: dict[str, str] | None = None,
) -> Image:
    """``qemu-img create -f qcow2``; ``encrypt`` is None, "aes" (legacy) or "luks" (iter-time 10 ms)."""
    options = [f"compat={'0.10' if version == 2 else '1.1'}", f"cluster_size={cluster_size}"]
    if extended_l2:
        options.append("extended_l2=on")
    if compression_type is not None:
        options.append(f"compression_type={compression_type}")
    with _scratch_dir() as scratch:
        objects: list[str] = []
        if encrypt is not None:
            objects, key_items = _key_options(passphrase, scratch, "encrypt.")
            options += [f"encrypt.format={encrypt}", *key_items]
        if encrypt == "luks":
            options.append(f"encrypt.iter-time={_QEMU_LUKS_ITER_TIME_MS}")
            options += [f"encrypt.{key}={value}" for key, value in (luks_opts or {}).items()]
        argv = [tool("qemu-img"), "create", "-q", "-f", "qcow2", *objects, *_backing_args(path, backing)]
        run([*argv, "-o", ",".join(options), str(path), str(size)], retry_cpu_usage=encrypt == "luks")
    return Image(Path(path), "qcow2", passphrase if encrypt else None, _encrypted_backing(backing))


def _encrypted_backing(backing: Image | None) -> Image | None:
    """The backing to remember for opening: only needed when some layer below is encrypted."""
    layer = backing
    while layer is not None:
        if layer.passphrase is not None:
            return backing
        layer = layer.backing
    return None


def make_qcow1(path: Path, size: int, *, passphrase: str | None = None, backing: Image | None = None) -> Image:
    """``qemu-img create -f qcow``, legacy AES (``encrypt.format=aes``) when a passphrase is given."""
    with _scratch_dir() as scratch:
        objects: list[str] = []
        options: list[str] = []
        if passphrase is not None:
            objects, key_items = _key_options(passphrase, scratch, "encrypt.")
            options = ["encrypt.format=aes", *key_items]
        argv = [tool("qemu-img"), "create", "-q", "-f", "qcow", *objects, *_backing_args(path, backing)]
        run([*argv, *(["-o", ",".join(options)] if options else []), str(path), str(size)])
    return Image(Path(path), "qcow", passphrase, _encrypted_backing(backing))


def make_luks_qemu(
    path: Path, payload_bytes: int, *, passphrase: str, luks_opts: dict[str, str] | None = None
) -> Image:
    """``qemu-img create -f luks`` (payload offset 4040 sectors for 512-bit keys). The payload is a hole."""
    with _scratch_dir() as scratch:
        objects, key_items = _key_options(passphrase, scratch, "")
        options = [*key_items, f"iter-time={_QEMU_LUKS_ITER_TIME_MS}"]
        options += [f"{key}={value}" for key, value in (luks_opts or {}).items()]
        argv = [tool("qemu-img"), "create", "-q", "-f", "luks", *objects, "-o", ",".join(options)]
        run([*argv, str(path), str(payload_bytes)], retry_cpu_usage=True)
    return Image(Path(path), "luks", passphrase)


def _cryptsetup_format(path: Path, passphrase: str, payload_bytes: int, options: list[str]) -> None:
    """luksFormat a sparse file, then cut it to payload offset + ``payload_bytes``."""
    record_note(f"python: create {path.name} as a sparse file of {_LUKS_FORMAT_SPARE_BYTES + payload_bytes} bytes")
    with open(path, "wb") as handle:
        handle.truncate(_LUKS_FORMAT_SPARE_BYTES + payload_bytes)
    with _scratch_dir() as scratch:
        key_file = _write_secret(scratch, "key", passphrase)
        argv = [tool("cryptsetup"), "luksFormat", "--batch-mode", *options, "--key-file", str(key_file)]
        run([*argv, str(path)])
    file_bytes = luks_dump(path)["payload_offset"] * SECTOR_BYTES + payload_bytes
    record_note(f"python: truncate {path.name} to payload offset + {payload_bytes} = {file_bytes} bytes")
    with open(path, "r+b") as handle:
        handle.truncate(file_bytes)


def make_luks_cryptsetup(
    path: Path,
    payload_bytes: int,
    *,
    cipher: str,
    key_bits: int,
    hash_name: str,
    passphrase: str,
    scrub_disabled_slots: bool = True,
) -> Image:
    """``cryptsetup luksFormat --type luks1`` (1000 iterations). The payload is a hole until ``zero_fill``.

    cryptsetup fills all 8 key-material areas with random bytes (up to 2 MiB that gzip cannot shrink); with
    ``scrub_disabled_slots`` the areas of disabled slots are zeroed afterwards (nothing ever reads them)."""
    options = ["--type", "luks1", "--pbkdf-force-iterations", str(_CRYPTSETUP_ITERATIONS)]
    options += ["--cipher", cipher, "--key-size", str(key_bits), "--hash", hash_name]
    _cryptsetup_format(Path(path), passphrase, payload_bytes, options)
    if scrub_disabled_slots:
        zero_disabled_luks1_slots(Path(path))
    return Image(Path(path), "luks", passphrase)


def zero_disabled_luks1_slots(path: Path) -> None:
    """Zero the key-material areas of disabled LUKS1 slots (each up to the next slot or the payload)."""
    record_note(f"python: zero the key material of disabled LUKS1 keyslots in {Path(path).name}")
    with open(path, "r+b") as handle:
        header = handle.read(_LUKS1_PHDR_BYTES)
        (payload_offset,) = struct.unpack_from(">I", header, _LUKS1_PAYLOAD_OFFSET)
        slots = [struct.unpack_from(">I4x32xI", header, _LUKS1_SLOTS_OFFSET + _LUKS1_SLOT_BYTES * i) for i in range(8)]
        starts = [*sorted(offset for _, offset in slots), payload_offset]
        for active, offset in slots:
            if active == _LUKS1_SLOT_DISABLED:
                end = next(start for start in starts if start > offset)
                handle.seek(offset * SECTOR_BYTES)
                handle.write(bytes((end - offset) * SECTOR_BYTES))


def relayout_luks1(path: Path, slot_offsets: Sequence[int], payload_offset: int) -> None:
    """Rewrite a raw LUKS1 file as an older cryptsetup would have laid it out: keyslot ``i``'s key material moved
    to sector ``slot_offsets[i]`` and the payload to sector ``payload_offset`` (raw LUKS IVs count from the
    payload, so moved ciphertext still decrypts). Used for layouts today's cryptsetup no longer writes."""
    record_note(
        f"python: move {Path(path).name}'s keyslots to sectors {list(slot_offsets)} and its payload to "
        f"sector {payload_offset}"
    )
    with open(path, "r+b") as handle:
        data = bytearray(handle.read())
        (old_payload,) = struct.unpack_from(">I", data, _LUKS1_PAYLOAD_OFFSET)
        (key_bytes,) = struct.unpack_from(">I", data, _LUKS1_KEY_BYTES_OFFSET)
        material = -(-key_bytes * 4000 // SECTOR_BYTES) * SECTOR_BYTES
        out = bytearray(payload_offset * SECTOR_BYTES)
        out[:_LUKS1_PHDR_BYTES] = data[:_LUKS1_PHDR_BYTES]
        for index, new_offset in enumerate(slot_offsets):
            field = _LUKS1_SLOTS_OFFSET + _LUKS1_SLOT_BYTES * index + 40
            (old_offset,) = struct.unpack_from(">I", data, field)
            start = old_offset * SECTOR_BYTES
            out[new_offset * SECTOR_BYTES : new_offset * SECTOR_BYTES + material] = data[start : start + material]
            struct.pack_into(">I", out, field, new_offset)
        struct.pack_into(">I", out, _LUKS1_PAYLOAD_OFFSET, payload_offset)
        out += data[old_payload * SECTOR_BYTES :]
        handle.seek(0)
        handle.write(out)
        handle.truncate(len(out))


def make_luks2(
    path: Path,
    payload_bytes: int,
    *,
    passphrase: str,
    pbkdf: str = "pbkdf2",
    cipher: str = "aes-xts-plain64",
    key_bits: int = 256,
) -> Image:
    """``cryptsetup luksFormat --type luks2`` with pbkdf2 (1000 iterations) or argon2id (32 KiB, 4 passes).

    The keyslots area is shrunk to one slot (cryptsetup fills it with random bytes; the default is 16 MiB)."""
    options = ["--type", "luks2", "--cipher", cipher, "--key-size", str(key_bits), "--pbkdf", pbkdf]
    options += ["--luks2-metadata-size", _LUKS2_METADATA_SIZE, "--luks2-keyslots-size", _luks2_area(key_bits)]
    if pbkdf == "pbkdf2":
        options += ["--hash", "sha256", "--pbkdf-force-iterations", str(_CRYPTSETUP_ITERATIONS)]
    else:
        options += ["--pbkdf-memory", str(_ARGON2_MEMORY_KIB), "--pbkdf-parallel", "1"]
        options += ["--pbkdf-force-iterations", str(_ARGON2_TIME_COST)]
    _cryptsetup_format(Path(path), passphrase, payload_bytes, options)
    return Image(Path(path), "luks", passphrase)


def _luks2_area(key_bits: int) -> str:
    """Keyslots-area size for exactly one slot: AF material (4000 stripes) rounded up to 4 KiB."""
    material_bytes = key_bits // 8 * 4000
    return f"{-(-material_bytes // 4096) * 4}k"


# --------------------------------------------------------------------------------------------------------------
# writing guest data


def qemu_io(image: Image, *commands: str) -> str:
    """Run ``qemu-io`` on ``image`` with each command given as ``-c``; return stdout."""
    with _scratch_dir() as scratch:
        return _qemu_io_in(image, scratch, list(commands))


def _qemu_io_in(image: Image, scratch: Path, commands: list[str]) -> str:
    argv = [tool("qemu-io"), *_open_args(image, scratch)]
    for command in commands:
        argv += ["-c", command]
    return run(argv)


def write_pattern(image: Image, offset: int, length: int, pattern_byte: int) -> None:
    """Fill ``length`` guest bytes at ``offset`` with one byte value (``qemu-io write -P``)."""
    qemu_io(image, f"write -q -P {pattern_byte:#x} {offset} {length}")


def write_data(image: Image, offset: int, data: bytes) -> None:
    """Write exact bytes at a guest offset (``qemu-io write -s FILE``)."""
    apply_writes(image, [], raw=[(offset, data, False)])


def write_compressed(image: Image, offset: int, data: bytes) -> None:
    """Write one whole cluster compressed (``qemu-io write -c``); ``offset`` must be cluster-aligned."""
    apply_writes(image, [], raw=[(offset, data, True)])


def write_zeroes(image: Image, offset: int, length: int, *, unmap: bool = False) -> None:
    """``qemu-io write -z`` (v3 qcow2: zero-flag clusters; keeps the stale host cluster unless ``unmap``)."""
    qemu_io(image, f"write -q -z{'u' if unmap else ''} {offset} {length}")


def zero_fill(image: Image, length: int) -> None:
    """Write real zero plaintext over ``[0, length)``: raw LUKS holes would otherwise decrypt to garbage."""
    write_pattern(image, 0, length, 0)


def sector_pattern(guest_offset: int, length: int, tag: str) -> bytes:
    """Deterministic data: each 512-byte sector = label (tag, guest offset) + byte counter seeded by sector."""
    out = bytearray()
    first_sector = guest_offset // SECTOR_BYTES
    for index in range(-(-length // SECTOR_BYTES)):
        sector = first_sector + index
        label = f"qcrypt-fixture tag={tag} guest=0x{sector * SECTOR_BYTES:x}\n".encode()
        counter = bytes((sector + i) & 0xFF for i in range(SECTOR_BYTES - len(label)))
        out += label + counter
    return bytes(out[:length])


def _mbr_sector() -> bytes:
    """An MBR look-alike: label text, then the 0x55AA boot signature at bytes 510-511."""
    text = sector_pattern(0, 446, "mbr")
    return text + bytes(64) + b"\x55\xaa"


def write_payload(write: Write) -> bytes:
    """The bytes a ``data``/``compressed`` Write puts at its offset."""
    if write.tag == "mbr" and write.offset == 0 and write.length == SECTOR_BYTES:
        return _mbr_sector()
    return sector_pattern(write.offset, write.length, write.tag)


def fill_plan(virtual_size: int, cluster_size: int, *, compressed: bool = True, zeroes: bool = True) -> list[Write]:
    """Writes for a test image: MBR sector, data at odd offsets, a cluster-straddling run, one compressed cluster,
    a zeroed cluster that was allocated first (v3: ZERO_ALLOC with stale data), a zeroed hole (ZERO_PLAIN) and the
    last sector. Items that do not fit, or would overlap an earlier one, are dropped."""
    size, cs = virtual_size, cluster_size
    candidates = [
        (Write("data", 0, SECTOR_BYTES, "mbr"), None),
        (Write("data", cs + 3 * SECTOR_BYTES, 2 * SECTOR_BYTES, "a"), None),
        (Write("data", 2 * cs - 2 * SECTOR_BYTES, 4 * SECTOR_BYTES, "b"), None),
        (Write("data", size // 2 + 5 * SECTOR_BYTES, 17 * SECTOR_BYTES, "c"), None),
    ]
    if compressed:
        candidates.append((Write("compressed", _align_down(size * 3 // 4, cs), cs, "z"), None))
    if zeroes:
        stale = _align_down(size * 5 // 8, cs)
        candidates.append((Write("data", stale, cs, "stale"), Write("zero", stale, cs, "zero-alloc")))
        candidates.append((Write("zero", _align_down(size * 7 // 8, cs), cs, "zero-plain"), None))
    candidates.append((Write("data", size - SECTOR_BYTES, SECTOR_BYTES, "end"), None))
    return _non_overlapping(candidates, size, cs)


def _align_down(value: int, alignment: int) -> int:
    return value - value % alignment


def _non_overlapping(candidates: list[tuple[Write, Write | None]], size: int, cs: int) -> list[Write]:
    """Keep candidates inside the disk whose cluster range (whole-cluster ops) or byte range is still free."""
    taken: list[tuple[int, int]] = []
    plan: list[Write] = []
    for first, follow_up in candidates:
        start, end = first.offset, first.offset + first.length
        if first.kind != "data" or follow_up is not None:
            start, end = _align_down(start, cs), _align_down(end + cs - 1, cs)
        if end > size or any(start < t_end and t_start < end for t_start, t_end in taken):
            continue
        taken.append((start, end))
        plan += [first] if follow_up is None else [first, follow_up]
    return plan


def apply_writes(image: Image, writes: Sequence[Write], *, raw: Sequence[tuple[int, bytes, bool]] = ()) -> None:
    """Perform ``writes`` in order, then ``raw`` (offset, bytes, compressed) items, in one qemu-io process."""
    with _scratch_dir() as scratch:
        commands: list[str] = []
        for write in writes:
            if write.kind == "zero":
                commands.append(f"write -q -z {write.offset} {write.length}")
            else:
                data = write_payload(write)
                commands.append(_data_command(scratch, write.offset, data, write.kind == "compressed"))
        for offset, data, is_compressed in raw:
            commands.append(_data_command(scratch, offset, data, is_compressed))
        _qemu_io_in(image, scratch, commands)


def _data_command(scratch: Path, offset: int, data: bytes, compressed: bool) -> str:
    """A qemu-io ``write -s FILE`` command; the data goes to a new file in ``scratch``."""
    source = scratch / f"data{len(list(scratch.glob('data*.bin')))}.bin"
    source.write_bytes(data)
    return f"write -q{' -c' if compressed else ''} -s {source} {offset} {len(data)}"


def fill_image(image: Image, virtual_size: int, cluster_size: int, **plan_options: bool) -> list[Write]:
    """Apply ``fill_plan(virtual_size, cluster_size, **plan_options)`` to ``image`` and return the plan."""
    plan = fill_plan(virtual_size, cluster_size, **plan_options)
    apply_writes(image, plan)
    return plan


def snapshot(image: Image, name: str) -> None:
    """Create an internal snapshot (``qemu-img snapshot -c``; legacy images need the key, hence image-opts)."""
    with _scratch_dir() as scratch:
        run([tool("qemu-img"), "snapshot", "-c", name, *_open_args(image, scratch)])


def set_incompatible_bits(path: Path, mask: int) -> None:
    """OR ``mask`` into the incompatible_features field (offset 72) of a qcow2 v3 header."""
    record_note(f"python: OR {mask:#x} into incompatible_features (offset {_INCOMPAT_OFFSET}) of {Path(path).name}")
    with open(path, "r+b") as handle:
        handle.seek(_INCOMPAT_OFFSET)
        (current,) = struct.unpack(">Q", handle.read(8))
        handle.seek(_INCOMPAT_OFFSET)
        handle.write(struct.pack(">Q", current | mask))


# --------------------------------------------------------------------------------------------------------------
# inspecting


def plaintext_sha256(image: Image, *, snapshot_name: str | None = None) -> str:
    """SHA-256 of the guest view as QEMU reads it (``qemu-img convert -O raw`` to a temporary file)."""
    with _scratch_dir() as scratch:
        dump = scratch / "plain.raw"
        snapshot_args = ["-l", f"snapshot.name={snapshot_name}"] if snapshot_name else []
        run([tool("qemu-img"), "convert", *snapshot_args, *_open_args(image, scratch), "-O", "raw", str(dump)])
        return file_sha256(dump)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_COPY_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def qemu_img_info(path: Path) -> dict[str, Any]:
    """``qemu-img info --output=json`` (format probed; encrypted images need no key for this)."""
    return json.loads(run([tool("qemu-img"), "info", "--output=json", str(path)]))


def normalized_info(info: dict[str, Any], name: str, backing_name: str | None) -> dict[str, Any]:
    """qemu-img info without host-dependent fields: actual-size dropped, file names replaced by fixture names."""
    info = dict(info)
    info.pop("actual-size", None)
    info["filename"] = name
    if "full-backing-filename" in info:
        info["full-backing-filename"] = backing_name
    return info


def render_writes(writes: Sequence[Write], base: bytes) -> bytes:
    """The guest view after applying ``writes`` in order over ``base`` (a pure-Python model of the image)."""
    view = bytearray(base)
    for write in writes:
        data = bytes(write.length) if write.kind == "zero" else write_payload(write)
        view[write.offset : write.offset + write.length] = data
    return bytes(view)


def luks_dump(path: Path) -> dict[str, Any]:
    """Parsed ``cryptsetup luksDump``: version, cipher, hash, key_bits, payload_offset (sectors),
    mk_iterations, uuid, keyslots (enabled slots only); LUKS2 adds sector_size and per-slot kdf."""
    text = run([tool("cryptsetup"), "luksDump", str(path)])
    fields = _dump_fields(text)
    if fields.get("Version") == "2":
        metadata = json.loads(run([tool("cryptsetup"), "luksDump", "--dump-json-metadata", str(path)]))
        return _luks2_summary(metadata, fields["UUID"])
    return _luks1_summary(fields, text)


def luks_header_file(path: Path, scratch: Path) -> Path:
    """A file cryptsetup can read: ``path`` itself for raw LUKS; for qcow2 with LUKS, the LUKS header region
    (qcow2 header extension 0x0537be77, parsed here with struct) copied into a sparse file in ``scratch``."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
        if head.startswith(_LUKS1_MAGIC):
            return Path(path)
        (version,) = struct.unpack_from(">I", head, 4)
        position = struct.unpack_from(">I", head, 100)[0] if version >= 3 else 72
        while True:
            ext_type, ext_len = struct.unpack_from(">II", head, position)
            if ext_type == 0:
                raise ImageToolError(f"{path}: no LUKS header extension")
            if ext_type == _QCOW2_CRYPTO_HEADER_EXT:
                region_offset, region_bytes = struct.unpack_from(">QQ", head, position + 8)
                break
            position += 8 + -(-ext_len // 8) * 8
        handle.seek(region_offset)
        region = handle.read(region_bytes)
    copy = Path(scratch) / f"{Path(path).name}.luks-header"
    with open(copy, "wb") as out:
        out.write(region)
        out.truncate(region_bytes + (1 << 20))  # cryptsetup wants a device larger than the header
    return copy


def luks_master_key(path: Path, passphrase: str) -> bytes:
    """The master key as ``cryptsetup luksDump --dump-master-key`` shows it (passphrase on a key file)."""
    with _scratch_dir() as scratch:
        key_file = _write_secret(scratch, "key", passphrase)
        text = run(
            [
                tool("cryptsetup"),
                "luksDump",
                "--dump-master-key",
                "-q",
                "--batch-mode",
                "--key-file",
                str(key_file),
                str(luks_header_file(path, scratch)),
            ]
        )
    dump = text.split("MK dump:", 1)[1]
    hex_lines: list[str] = []
    for index, line in enumerate(dump.splitlines()):
        if index and not line.startswith(("\t", " ")):
            break
        hex_lines.append(line)
    return bytes.fromhex("".join(hex_lines).replace(" ", "").replace("\t", ""))


def luks_dump_text(path: Path) -> str:
    """Raw ``cryptsetup luksDump`` text of a raw LUKS file or of the LUKS header inside a qcow2."""
    with _scratch_dir() as scratch:
        return run([tool("cryptsetup"), "luksDump", str(luks_header_file(path, scratch))])


def _dump_fields(text: str) -> dict[str, str]:
    """Top-level ``Name: value`` lines of a luksDump (first occurrence wins)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and not line.startswith(("\t", " ")):
            fields.setdefault(name.strip(), value.strip())
    return fields


def _luks1_summary(fields: dict[str, str], text: str) -> dict[str, Any]:
    slots = []
    for match in re.finditer(r"Key Slot (\d): ENABLED\n((?:\t.*\n?)+)", text):
        slot = _dump_fields(match.group(2).replace("\t", ""))
        slots.append(
            {
                "slot": int(match.group(1)),
                "iterations": int(slot["Iterations"]),
                "key_material_offset": int(slot["Key material offset"]),
                "stripes": int(slot["AF stripes"]),
            }
        )
    return {
        "version": 1,
        "cipher": f"{fields['Cipher name']}-{fields['Cipher mode']}",
        "hash": fields["Hash spec"],
        "key_bits": int(fields["MK bits"]),
        "payload_offset": int(fields["Payload offset"]),
        "mk_iterations": int(fields["MK iterations"]),
        "uuid": fields["UUID"],
        "keyslots": slots,
    }


def _luks2_summary(metadata: dict[str, Any], uuid: str) -> dict[str, Any]:
    segment = metadata["segments"]["0"]
    digest = metadata["digests"]["0"]
    slots = []
    for number, slot in sorted(metadata["keyslots"].items()):
        kdf = dict(slot["kdf"])
        kdf.pop("salt", None)
        slots.append({"slot": int(number), "kdf": kdf, "af_hash": slot["af"]["hash"]})
    first_slot = metadata["keyslots"][min(metadata["keyslots"])]
    return {
        "version": 2,
        "cipher": segment["encryption"],
        "hash": digest["hash"],
        "key_bits": first_slot["key_size"] * 8,
        "payload_offset": int(segment["offset"]) // SECTOR_BYTES,
        "mk_iterations": digest["iterations"],
        "uuid": uuid,
        "sector_size": segment["sector_size"],
        "keyslots": slots,
    }


def luks_from_qemu_info(encrypt: dict[str, Any]) -> dict[str, Any]:
    """The ``luks_dump`` keys, built from qemu-img info's ``encrypt``/``format-specific`` LUKS block."""
    alg, _, alg_bits = encrypt["cipher-alg"].partition("-")
    mode = encrypt["cipher-mode"]
    ivgen = encrypt["ivgen-alg"]
    if ivgen == "essiv":
        ivgen += f":{encrypt['ivgen-hash-alg']}"
    slots = [
        {
            "slot": index,
            "iterations": slot["iters"],
            "key_material_offset": slot["key-offset"] // SECTOR_BYTES,
            "stripes": slot["stripes"],
        }
        for index, slot in enumerate(encrypt["slots"])
        if slot["active"]
    ]
    return {
        "version": 1,
        "cipher": f"{alg}-{mode}-{ivgen}",
        "hash": encrypt["hash-alg"],
        "key_bits": int(alg_bits) * (2 if mode == "xts" else 1),
        "payload_offset": encrypt["payload-offset"] // SECTOR_BYTES,
        "mk_iterations": encrypt["master-key-iters"],
        "uuid": encrypt["uuid"],
        "keyslots": slots,
    }


# --------------------------------------------------------------------------------------------------------------
# committed fixtures


def manifest(fixtures_dir: Path = FIXTURES_DIR) -> dict[str, Any]:
    """The parsed ``tests/fixtures/manifest.json`` (a fresh copy each call)."""
    return json.loads((fixtures_dir / MANIFEST_NAME).read_text(encoding="utf-8"))


def fixture_path(name: str, tmp_dir: Path | str, *, fixtures_dir: Path = FIXTURES_DIR) -> Path:
    """Gunzip fixture ``name`` (and its backing files) into ``tmp_dir``; return the image path."""
    entries = manifest(fixtures_dir)["fixtures"]
    target = Path(tmp_dir) / name
    current: str | None = name
    while current is not None:
        entry = entries[current]
        destination = Path(tmp_dir) / entry["name"]
        if not destination.exists():
            gunzip_sparse(fixtures_dir / entry["file"], destination)
        current = entry["backing_file"]
    return target


def fixture_image(name: str, tmp_dir: Path | str, *, fixtures_dir: Path = FIXTURES_DIR) -> Image:
    """Unpack fixture ``name`` like ``fixture_path`` and describe how to open it (keys of encrypted backings)."""
    entries = manifest(fixtures_dir)["fixtures"]
    fixture_path(name, tmp_dir, fixtures_dir=fixtures_dir)
    return _entry_image(entries, name, Path(tmp_dir))


def _entry_image(entries: dict[str, Any], name: str, tmp_dir: Path) -> Image:
    entry = entries[name]
    backing = _entry_image(entries, entry["backing_file"], tmp_dir) if entry["backing_file"] else None
    driver = "luks" if entry["format"] == "luks" else entry["format"]
    return Image(tmp_dir / name, driver, entry["passphrase"], _encrypted_backing(backing))


def expected_plaintext(name: str, *, fixtures_dir: Path = FIXTURES_DIR) -> bytes:
    """Guest view of fixture ``name`` rebuilt from the manifest's ``writes`` (and its backing file's).

    Only valid when the entry's ``plaintext_from_writes`` is true; compare with ``plaintext_sha256``."""
    entries = manifest(fixtures_dir)["fixtures"]
    entry = entries[name]
    if not entry["plaintext_from_writes"]:
        raise ValueError(f"{name}: guest view is not determined by its writes")
    size = entry["virtual_size"]
    base = expected_plaintext(entry["backing_file"], fixtures_dir=fixtures_dir) if entry["backing_file"] else b""
    base = base[:size].ljust(size, b"\0")
    return render_writes([Write.from_dict(item) for item in entry["writes"]], base)


def gzip_file(src: Path, dst: Path) -> None:
    """Gzip ``src`` to ``dst`` reproducibly (no name, mtime 0, level 9)."""
    with (
        open(src, "rb") as source,
        open(dst, "wb") as raw_out,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw_out, mtime=0, compresslevel=9) as out,
    ):
        shutil.copyfileobj(source, out, _COPY_CHUNK_BYTES)


def gunzip_sparse(src: Path, dst: Path) -> None:
    """Gunzip ``src`` to ``dst``, leaving all-zero 64 KiB blocks as holes (LUKS2 headers are mostly zeros)."""
    zero_block = bytes(_COPY_CHUNK_BYTES)
    with gzip.open(src, "rb") as source, open(dst, "wb") as out:
        while block := source.read(_COPY_CHUNK_BYTES):
            if block == zero_block[: len(block)]:
                out.seek(len(block), os.SEEK_CUR)
            else:
                out.write(block)
        out.truncate()
