"""Running qcrypt's command line as an operator does (a subprocess), and the peers that judge its outputs:
qemu-img compare/check and cryptsetup, with passphrase files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests._tools import require_tool

TOOL_TIMEOUT = 120


def qcrypt(
    *args: str, stdin: bytes | None = None, check: bool = True, timeout: float = 120, **kw: object
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "qcrypt", *args], input=stdin, capture_output=True, timeout=timeout, **kw
    )
    if check and result.returncode != 0:
        raise AssertionError(f"qcrypt {' '.join(args)} exited {result.returncode}: {result.stderr.decode()}")
    return result


def secret_file(tmp: Path, name: str, passphrase: str, newline: bool = False) -> Path:
    path = tmp / name
    path.write_bytes(passphrase.encode() + (b"\n" if newline else b""))
    return path


def image_opts(path: Path, fmt: str, secret: bool | str, secret_id: str = "s") -> str:
    """secret: True = the image is encrypted; "backing" = its backing file is; "both"."""
    if fmt == "luks":
        return f"driver=luks,file.filename={path},key-secret={secret_id}"
    opts = f"driver={fmt},file.filename={path}"
    if secret in (True, "both"):
        opts += f",encrypt.key-secret={secret_id}"
    if secret in ("backing", "both"):
        opts += f",backing.encrypt.key-secret={secret_id}"
    return opts


def qemu_compare(
    a: tuple[Path, str, bool | str], b: tuple[Path, str, bool | str], pw: Path, pw_a: Path | None = None
) -> None:
    """qemu-img compare of two guest views; ``b`` opens with ``pw``, ``a`` with ``pw_a`` (default ``pw``)."""
    objects = ["--object", f"secret,id=s,file={pw}", "--object", f"secret,id=a,file={pw_a or pw}"]
    out = subprocess.run(
        [require_tool("qemu-img"), "compare", *objects, "--image-opts", image_opts(*a, secret_id="a"), image_opts(*b)],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
    )
    assert out.returncode == 0 and "identical" in out.stdout, out.stdout + out.stderr


def qemu_check(path: Path, pw: Path | None) -> dict[str, object]:
    args = [require_tool("qemu-img"), "check", "--output=json"]
    if pw:
        args += [
            "--object",
            f"secret,id=s,file={pw}",
            "--image-opts",
            f"driver=qcow2,file.filename={path},encrypt.key-secret=s",
        ]
    else:
        args.append(str(path))
    out = subprocess.run(args, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0
    return report


def cryptsetup(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("cryptsetup"), *args], capture_output=True, text=True, timeout=TOOL_TIMEOUT)
