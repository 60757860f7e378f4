"""Writing files: the one atomic writer and the one JSON cleaner of ngdiag.

Every file ngdiag writes goes through :func:`atomic_write` (a temporary file in the same folder,
flushed to disk, renamed over the target), so that a reader, or a run killed mid-write, never
sees a partial file; every JSON document goes through :func:`json_safe`, so that numpy numbers
become plain numbers and a non-finite float becomes ``null`` (``json`` would write ``NaN``, which
is not JSON).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "atomic_write_text", "json_safe"]


def atomic_write(path, writer: Callable[[str], None]) -> Path:
    """Write ``path`` through ``writer(tmp_path)``, flush it to disk and rename it over ``path``.

    The temporary file lies in the same folder (``.NAME.XXXX.tmp``) and is removed on any failure,
    leaving an existing ``path`` untouched. The file gets the permissions of a new file (``0o666``
    less the umask). The rename replaces a symbolic link at ``path`` itself, never the file it
    points to. Returns ``path``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path, text: str) -> Path:
    """:func:`atomic_write` of UTF-8 ``text`` (``\\n`` line ends on every platform)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)

    return atomic_write(path, write)


def json_safe(value):
    """``value`` with only plain JSON types: ready for ``json.dumps``.

    numpy scalars and arrays (anything numpy-like with ``tolist``) become Python numbers and lists,
    a non-finite float (``nan``, ``inf``) becomes ``None``, tuples become lists, and dicts and lists
    are cleaned recursively; everything else is returned unchanged.
    """
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if not isinstance(value, (str, bytes, int)) and callable(getattr(value, "tolist", None)):
        return json_safe(value.tolist())
    return value
