"""The diffusers pipeline folder on disk: finding it, checking it, writing one.

`resolve_model_path` turns a local path or a hub id (downloaded: safetensors and
configs, never pickles) into a local folder or single file; `read_model_index`
checks that a folder is a Stable Diffusion pipeline (`model_index.json` and
the `REQUIRED_COMPONENTS` sub-folders). `save_pipeline` writes the (possibly
unlearned) modules of a `pipeline.StableDiffusion` back as a diffusers folder,
copying every other file of the source unchanged, in the source's weight
dtypes; a pipeline read from a single-file checkpoint gets its configs,
scheduler and tokenizer written instead (`single_file_export.write_folder_files`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from unlearn_jax.atomic_files import atomic_folder
from unlearn_jax.models import convert, weights
from unlearn_jax.models.single_file_export import write_folder_files

if TYPE_CHECKING:  # only for annotations: pipeline imports this module
    from unlearn_jax.models.pipeline import StableDiffusion

REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Weight-file stem per trainable component, as diffusers/transformers name them.
_STEMS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
# Files a hub download needs; pickles are never fetched.
HUB_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.model"]


class PipelineError(ValueError):
    """The folder or hub id is not a usable Stable Diffusion pipeline."""


def resolve_model_path(path_or_id: str | Path) -> Path:
    """A local pipeline folder or single file, or a hub id downloaded (safetensors, configs)."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    text = str(path_or_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise PipelineError(
            f"{text}: no such folder or file. Fix: pass a local diffusers folder (the one "
            "holding model_index.json), a single-file checkpoint (.safetensors) or a hub id "
            "such as 'org/name'."
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        raise PipelineError(
            f"{text!r} is not a local folder, and fetching it from the Hugging Face hub "
            f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Fix: on an offline machine pass a local diffusers folder (copy one saved with "
            "StableDiffusionPipeline.save_pretrained); online, check the id and your access "
            "token (huggingface-cli login)."
        ) from e


def read_json(path: Path, what: str) -> dict:
    """A pipeline folder's JSON file; `what` names it in the error if it is missing or invalid."""
    if not path.is_file():
        raise PipelineError(f"{path} is missing: {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path} is not valid JSON ({e}). Fix: restore the file.") from e


def read_model_index(folder: Path) -> dict:
    """Validates that `folder` is a diffusers SD pipeline and returns model_index.json."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        hint = ""
        if (folder / "config.json").is_file() and (folder.parent / "model_index.json").is_file():
            hint = f" {folder} looks like one component; pass its parent {folder.parent}."
        raise PipelineError(
            f"{folder} is not a diffusers pipeline folder: it has no model_index.json."
            f"{hint} Fix: pass the folder written by StableDiffusionPipeline.save_pretrained "
            "(it holds model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."
        )
    index = read_json(index_path, "the pipeline index")
    missing = [c for c in REQUIRED_COMPONENTS if c not in index or not (folder / c).is_dir()]
    if missing:
        raise PipelineError(
            f"{folder} lacks the component(s) {', '.join(missing)} (in model_index.json "
            "and as sub-folders). Fix: copy the complete pipeline folder; unlearn_jax needs "
            f"{', '.join(REQUIRED_COMPONENTS)}."
        )
    return index


def save_pipeline(
    pipe: StableDiffusion,
    out: str | Path,
    components: tuple[str, ...] = ("unet", "vae", "text_encoder"),
) -> Path:
    """Writes a diffusers folder: `components` from the NNX modules, the rest copied.

    Weights are written in the dtype the source files had, so a pipeline that
    was loaded and not changed is written back bit for bit. Refuses to write
    into an existing non-empty folder (nothing the user had is overwritten).
    A pipeline read from a single file has no folder to copy from: its configs,
    scheduler and tokenizer are written and all three networks with them.
    """
    out = Path(out)
    check_new_folder(out)
    # Written under a private temporary name next to `out`, renamed when complete:
    # the folder appears whole or not at all, and a failure removes only what we wrote.
    with atomic_folder(out) as tmp:
        if pipe.single_file is not None:
            # No folder to copy the rest from: its files are written, all weights with them.
            write_folder_files(pipe.single_file, pipe.tokenizer, tmp)
            components = ("unet", "vae", "text_encoder")
        else:
            shutil.copytree(
                pipe.source, tmp, ignore=_weight_files_of(components), dirs_exist_ok=True
            )
        for name in components:
            module = getattr(pipe, name)
            tensors = convert.to_torch_state(module, dtype=pipe.file_dtypes[name])
            tensors.update(pipe.buffers[name])
            prefix = pipe.strip_prefix.get(name, "")
            if prefix:
                tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
            weights.write_component_weights(tmp / name, tensors, stem=_STEMS[name])
    return out


def check_new_folder(out: Path) -> None:
    """Refuses an `out` that is a file or a non-empty folder (nothing the user had is touched)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(
            f"{out} is a file, not a folder; refusing to overwrite it. "
            "Fix: choose a new --out folder."
        )
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists and is not empty; refusing to overwrite it. "
            "Fix: choose a new --out folder or remove this one yourself."
        )


def _weight_files_of(components: tuple[str, ...]):
    def ignore(directory: str, names: list[str]) -> list[str]:
        if Path(directory).name not in components:
            return []
        return [n for n in names if n.endswith((".safetensors", ".bin", ".index.json"))]

    return ignore
