"""The on-disk cache of generated training and evaluation arrays, keyed by what produced them.

θ0's generations (training x0, ESD trajectories, evaluation images) are built
once and stored in `<workdir>/cache/` as `<name>-<key>.npz`, where the key is a
hash of everything that produced them (`cache_key`: model files via
`model_key`, prompts, sampler settings, seed). A resumed or repeated run reuses
them and a changed setting can never pick up stale data. Files are written
atomically by process 0 (`load_or_build`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import jax
import numpy as np

from unlearn_jax.atomic_files import write_npz
from unlearn_jax.models.weights import find_weight_files

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the content of a cached array changes meaning


def model_identity(path: str | os.PathLike) -> dict:
    """What identifies a model folder's (or single file's) content cheaply: its path and
    weight files' sizes/times."""
    folder = Path(path).expanduser().absolute()
    if folder.is_file():
        stat = folder.stat()
        return {"path": str(folder), "files": {folder.name: [stat.st_size, stat.st_mtime_ns]}}
    files = {}
    for component in ("unet", "vae", "text_encoder"):
        for f in find_weight_files(folder / component):
            stat = f.stat()
            files[f"{component}/{f.name}"] = [stat.st_size, stat.st_mtime_ns]
    return {"path": str(folder), "files": files}


def model_key(path: str | os.PathLike) -> dict | str:
    """What identifies a model in cache keys: a folder's `model_identity`, or a hub id's name
    (a hub snapshot is immutable)."""
    return model_identity(path) if Path(path).expanduser().exists() else str(path)


def cache_key(**fields) -> str:
    """A short hex digest of the JSON of `fields` (sorted keys)."""
    payload = json.dumps({"version": CACHE_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_or_build(cache_dir: Path | None, name: str, key: str, build) -> dict[str, np.ndarray]:
    """The arrays cached as `<cache_dir>/<name>-<key>.npz`, or `build()`, cached atomically."""
    path = None if cache_dir is None else Path(cache_dir) / f"{name}-{key}.npz"
    if path is not None and path.is_file():
        with np.load(path) as data:
            log.info("using cached %s from %s", name, path)
            return {k: data[k] for k in data.files}
    arrays = build()
    if path is not None and jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_npz(path, **arrays)
    return arrays
