"""Output files that appear whole or not at all.

Every file the toolkit writes for a user (npz arrays, PNGs, JSON reports,
safetensors, exported pipeline folders) goes through this module: it is
written under a private temporary name in the destination folder (same
filesystem, so the final `os.replace` is atomic) and renamed into place only
once complete. A failure part-way (a full disk, a kill, Ctrl-C) leaves the
previous file, or nothing; never a truncated file that a retry then refuses to
overwrite. Temporary names come from `tempfile` (unique, created exclusively),
so they can never collide with, or delete, a file the user made.

Files are given the permissions an ordinary `open()` would (0666 / 0777 for
folders, less the umask), not `tempfile`'s private 0600.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_folder",
    "atomic_path",
    "dumps",
    "strict_json",
    "write_bytes",
    "write_json",
    "write_npz",
    "write_png",
    "write_text",
]


def _umask() -> int:
    # os.umask can only be read by setting it; restore at once (no threads write files here).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a private temporary path next to `path`; renames it onto `path` on success.

    The caller writes the temporary path completely (by any library that takes a
    file name). On an exception the temporary file is removed and `path` is
    untouched. The parent folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename in (None, str(tmp)):  # name the file the user asked for
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes UTF-8 `text` to `path` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def strict_json(payload: Any) -> Any:
    """`payload` with every non-finite float as the string "inf", "-inf" or "nan".

    JSON has no such numbers; Python's bare `Infinity`/`NaN` literals break strict
    readers. The strings match integrity.json's convention (`"psnr": "inf"`).
    """
    if isinstance(payload, float) and not math.isfinite(payload):
        return "nan" if math.isnan(payload) else ("inf" if payload > 0 else "-inf")
    if isinstance(payload, np.generic):
        return strict_json(payload.item())
    if isinstance(payload, dict):
        return {k: strict_json(v) for k, v in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [strict_json(v) for v in payload]
    return payload


def dumps(payload: Any, **dumps_kwargs: Any) -> str:
    """Strict JSON text of `payload` (see `strict_json`); other values through `default`."""
    return json.dumps(strict_json(payload), allow_nan=False, **dumps_kwargs)


def write_json(path: str | os.PathLike, payload: Any, **dumps_kwargs: Any) -> Path:
    """Writes strict JSON (non-finite floats as strings) atomically; default indent 2."""
    dumps_kwargs.setdefault("indent", 2)
    return write_text(path, dumps(payload, **dumps_kwargs) + "\n")


def write_npz(path: str | os.PathLike, *, compressed: bool = False, **arrays: np.ndarray) -> Path:
    """`np.savez[_compressed](path, **arrays)` atomically (the exact name; no '.npz' added)."""
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return write_bytes(path, buffer.getvalue())


def write_png(path: str | os.PathLike, image: Any) -> Path:
    """Writes a PIL image as PNG atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return write_bytes(path, buffer.getvalue())


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yields a private temporary folder next to `out`; renames it onto `out` on success.

    `out` must not exist, or be an empty folder (then it is replaced). On an
    exception the temporary folder (created here, so ours to delete) is
    removed and `out` is left as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if out.is_dir():
            out.rmdir()  # empty, checked by the caller; rmdir refuses anything else
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
