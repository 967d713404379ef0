"""Writing a pipeline as a single-file SD checkpoint (LDM layout), or a folder from one.

`save_single_file(pipe, "model.safetensors")` writes the UNet, VAE and text
encoder under `model.diffusion_model.`, `first_stage_model.` and
`cond_stage_model.`. When the pipeline came from a single file, every tensor
of that file we did not load (schedule buffers, OpenCLIP's `text_projection`,
...) is copied back byte for byte and each network tensor keeps the file's
dtype and shape, so an unchanged model round-trips bit for bit; with
`components=("unet",)` (`--unet-only`) the VAE and text encoder are copied
from the original file too. The original's EMA copy (`model_ema.*`) is dropped
unless `keep_ema`: it holds the UNet from before unlearning, and a tool that
prefers EMA weights would silently load that.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from unlearn_jax.atomic_files import atomic_path
from unlearn_jax.models import convert, ldm_keys
from unlearn_jax.models.ldm_detect import SD1, SD2
from unlearn_jax.models.single_file import (
    COMPONENTS,
    SAFETENSORS_DTYPES,
    SingleFilePlan,
    ldm_tables,
    read_tensors,
)

log = logging.getLogger(__name__)

_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def layout_of(pipe: Any) -> str:
    """ "sd2" when the text encoder is OpenCLIP's (GELU), else "sd1" (OpenAI CLIP, quick GELU)."""
    if pipe.single_file is not None:
        return pipe.single_file.layout
    return SD2 if pipe.text_encoder.config["hidden_act"] == "gelu" else SD1


def check_new_file(out: Path) -> None:
    """Refuses an `out` that exists or is not a `.safetensors` name (nothing is overwritten)."""
    if out.suffix != ".safetensors":
        raise ValueError(
            f"{out}: a single-file checkpoint is written as safetensors. Fix: name it "
            f"{out.with_suffix('.safetensors').name}."
        )
    if out.exists():
        raise FileExistsError(
            f"{out} exists; refusing to overwrite it. Fix: choose a new --out file name or "
            "remove that file yourself."
        )


def save_single_file(
    pipe: Any,
    out: str | Path,
    *,
    components: tuple[str, ...] = COMPONENTS,
    keep_ema: bool = False,
) -> Path:
    """Writes `pipe` (a `pipeline.StableDiffusion`) as one LDM-layout `.safetensors` file.

    Args:
      pipe: the pipeline; its `single_file` plan, when loaded from one, supplies
        the original's other tensors, dtypes, shapes and metadata.
      out: new `.safetensors` path (never overwritten).
      components: the networks written from `pipe`; the others are copied from the
        original file (`("unet",)`: `--unet-only`, needs a single-file original).
      keep_ema: also copy the original's `model_ema.*` tensors.

    Returns:
      `out`.
    """
    out = Path(out)
    check_new_file(out)
    plan: SingleFilePlan | None = pipe.single_file
    if set(components) != set(COMPONENTS) and plan is None:
        raise ValueError(
            f"--unet-only puts the UNet on top of the original single file, but this model "
            f"was loaded from the diffusers folder {pipe.source}. Fix: drop --unet-only (the "
            "whole model is written), or start from the single-file checkpoint."
        )
    layout = layout_of(pipe)
    tables = ldm_tables(layout, {n: getattr(pipe, n) for n in components})
    tensors: dict[str, np.ndarray] = {}
    if plan is not None:
        ours = {k for table in tables.values() for k in table}
        others = [k for k in plan.header.shapes if k not in ours]
        ema = [k for k in others if k.startswith(ldm_keys.EMA_PREFIX)]
        if ema and not keep_ema:
            log.info(
                "not writing the original's %d EMA tensors (model_ema.*): they hold the UNet "
                "from before unlearning",
                len(ema),
            )
            others = [k for k in others if not k.startswith(ldm_keys.EMA_PREFIX)]
        tensors.update(read_tensors(plan, others))
    for name, table in tables.items():
        ldm = ldm_keys.to_ldm(table, convert.to_torch_state(getattr(pipe, name)))
        for key, array in ldm.items():
            dtype, shape = np.dtype(pipe.file_dtypes[name]), array.shape
            if plan is not None and key in plan.header.shapes:
                dtype = SAFETENSORS_DTYPES.get(plan.header.dtypes[key], dtype)
                shape = plan.header.shapes[key]  # e.g. VAE attention stored as [C, C]
            tensors[key] = np.ascontiguousarray(array.astype(dtype).reshape(shape))
    if "text_encoder" in components and layout == SD1:
        for key, value in pipe.buffers.get("text_encoder", {}).items():
            tensors.setdefault(ldm_keys.SD1_TEXT_PREFIX + key, value)
    metadata = dict(plan.header.metadata) if plan is not None and plan.header.metadata else {}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"})
    return out


def write_folder_files(plan: SingleFilePlan, tokenizer: Any, folder: Path) -> None:
    """A diffusers folder's non-weight files for a model read from a single file.

    model_index.json names only the five SD components; the configs are those the
    model was built from (copied from `--model-config` when given); the tokenizer
    is copied from there, or saved from `tokenizer`.
    """
    index = {
        **_MODEL_INDEX,
        "scheduler": ["diffusers", plan.configs["scheduler"].get("_class_name", "DDIMScheduler")],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    for name in (*COMPONENTS, "scheduler"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        file = "scheduler_config.json" if name == "scheduler" else "config.json"
        (folder / name / file).write_text(json.dumps(plan.configs[name], indent=2) + "\n")
    source = plan.config_folder / "tokenizer" if plan.config_folder else None
    if source is not None and source.is_dir():
        shutil.copytree(source, folder / "tokenizer")
    else:
        tokenizer.save_pretrained(str(folder / "tokenizer"))
