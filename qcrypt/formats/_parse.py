"""The single choke point between construct and the rest of qcrypt.

Every on-disk structure is parsed through :func:`parse` (or :func:`parse_bytes`), which turns
``construct.ConstructError`` and short reads into :class:`qcrypt.FormatError` naming the file and the field.
"""

from __future__ import annotations

from typing import Any, BinaryIO

import construct

from qcrypt.errors import FormatError
from qcrypt.plumbing.files import read_at_offset


def _field_from(error: construct.ConstructError) -> str | None:
    path = getattr(error, "path", None)
    if not path:
        return None
    # construct paths look like "(parsing) -> header -> magic"
    return path.replace("(parsing)", "").replace(" -> ", ".").strip(" .") or None


def parse_bytes(struct: construct.Construct, data: bytes, *, path: str, what: str) -> Any:
    """Parse ``data`` with ``struct``; any failure becomes a FormatError about ``what`` in ``path``."""
    try:
        return struct.parse(data)
    except (construct.ConstructError, UnicodeDecodeError) as e:
        field = _field_from(e) if isinstance(e, construct.ConstructError) else None
        name = f"{what}.{field}" if field else what
        raise FormatError("malformed or truncated structure", path=path, field=name) from e


def read_exact(fh: BinaryIO, offset: int, length: int, *, path: str, what: str, file_size: int) -> bytes:
    """Read ``length`` bytes at ``offset``, checking the range against ``file_size`` first."""
    if offset < 0 or length < 0 or offset + length > file_size:
        raise FormatError(
            f"points outside the file (offset {offset}, length {length}, file size {file_size})",
            path=path,
            field=what,
        )
    data = read_at_offset(fh, length, offset)
    if len(data) != length:
        raise FormatError(f"short read at offset {offset}", path=path, field=what)
    return data


def parse(
    struct: construct.Construct,
    fh: BinaryIO,
    offset: int,
    length: int,
    *,
    path: str,
    what: str,
    file_size: int,
) -> Any:
    """Read ``length`` bytes at ``offset`` (bounds-checked) and parse them with ``struct``."""
    return parse_bytes(
        struct, read_exact(fh, offset, length, path=path, what=what, file_size=file_size), path=path, what=what
    )
