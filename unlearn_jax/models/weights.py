"""Reading and writing one diffusers component's weight files, torch-free.

A diffusers component folder (`unet/`, `vae/`, `text_encoder/`) holds its
weights as `diffusion_pytorch_model.safetensors` or `model.safetensors`,
optionally sharded behind a `*.safetensors.index.json`, optionally with a
variant infix (`diffusion_pytorch_model.fp16.safetensors`). Older folders ship
only pickled `.bin` files: those run arbitrary code when unpickled, so they are
refused unless the user opts in with `allow_pickle=True`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from unlearn_jax.atomic_files import atomic_path

# Stem of the weights file for each component kind; diffusers models use the
# first, transformers models (text encoders) the second.
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")


class MissingWeightsError(FileNotFoundError):
    """A component folder has no weights we can (or may) read."""


def _with_variant(name: str, variant: str | None) -> str:
    if not variant:
        return name
    stem, ext = name.split(".", 1)
    return f"{stem}.{variant}.{ext}"


class CorruptWeightsError(ValueError):
    """A weights file exists but cannot be read (truncated download, wrong format)."""


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except MemoryError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError, not an OSError
        raise CorruptWeightsError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it is "
            "probably truncated or corrupt. Fix: download or copy that file again."
        ) from e


def find_weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """Returns the safetensors files holding a component's weights (one, or all shards)."""
    for stem in WEIGHT_STEMS:
        single = folder / _with_variant(f"{stem}.safetensors", variant)
        if single.is_file():
            return [single]
        index = folder / _with_variant(f"{stem}.safetensors.index.json", variant)
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = [folder / name for name in sorted(set(weight_map.values()))]
            absent = [str(s) for s in shards if not s.is_file()]
            if absent:
                raise MissingWeightsError(
                    f"{index} lists shards that are not on disk: {', '.join(absent)}. "
                    "Fix: copy the complete folder (all shards) again."
                )
            return shards
    return []


def read_component_weights(
    folder: str | Path, *, variant: str | None = None, allow_pickle: bool = False
) -> tuple[dict[str, np.ndarray], str]:
    """Reads all tensors of one component folder.

    Args:
      folder: e.g. `<pipeline>/unet`.
      variant: weight-file variant such as "fp16" (diffusers' `variant=`); components
        without such a file use their plain weights file.
      allow_pickle: permit `.bin` pickles (they can execute code when loaded).

    Returns:
      (PyTorch key -> numpy array in the file's dtype, description of the source file(s)).
    """
    folder = Path(folder)
    # Like diffusers, a component without the variant's file falls back to the plain one.
    files = find_weight_files(folder, variant) or (variant and find_weight_files(folder))
    if files:
        tensors: dict[str, np.ndarray] = {}
        for f in files:
            tensors.update(_read_safetensors(f))
        return tensors, ", ".join(str(f) for f in files)

    pickles = [folder / _with_variant(n, variant) for n in PICKLE_NAMES]
    pickles = [p for p in pickles if p.is_file()]
    if pickles and not allow_pickle:
        raise MissingWeightsError(
            f"{folder} has only pickled weights ({pickles[0].name}); unpickling can run "
            "arbitrary code, so it is refused by default. Fix: convert the folder to "
            "safetensors (diffusers: pipe.save_pretrained(out, safe_serialization=True)), "
            "or, if you trust the file, pass --allow-pickle (allow_pickle=True)."
        )
    if pickles:
        return _read_pickled(pickles[0]), str(pickles[0])

    others = sorted(p.name for p in folder.glob("*.safetensors")) if folder.is_dir() else []
    hint = ""
    if others and not variant:
        hint = f" It has {', '.join(others)}: pass the variant (e.g. --variant fp16)."
    elif variant:
        hint = f" No file for variant {variant!r}; drop the variant or check the name."
    raise MissingWeightsError(
        f"no weights found in {folder} (looked for "
        f"{', '.join(_with_variant(s + '.safetensors', variant) for s in WEIGHT_STEMS)})."
        f"{hint or ' Fix: copy the complete pipeline folder, including weight files.'}"
    )


def _read_pickled(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingWeightsError(
            f"{path} is a PyTorch pickle; reading it needs torch (pip install torch), "
            "or convert the folder to safetensors first."
        ) from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {
        k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()
    }


def write_component_weights(
    folder: str | Path, tensors: dict[str, np.ndarray], *, stem: str, variant: str | None = None
) -> Path:
    """Writes tensors as one safetensors file that diffusers/transformers load."""
    path = Path(folder) / _with_variant(f"{stem}.safetensors", variant)
    with atomic_path(path) as tmp:
        save_file(
            {k: np.ascontiguousarray(v) for k, v in tensors.items()},
            str(tmp),
            metadata={"format": "pt"},
        )
    return path
