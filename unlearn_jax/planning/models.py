"""What the planner plans for: chips (peak FLOP/s, HBM) and models (configs, never weights)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

GiB = 2**30
GB = 10**9
COMPUTE_DTYPES = ("float32", "bfloat16")
# A program "fits" a chip when its peak estimate is at most this share of the HBM; the
# rest is for the runtime (CUDA context, library workspaces) and fragmentation.
USABLE_HBM_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class Chip:
    """An accelerator: dense bf16 peak in TFLOP/s and HBM per chip in bytes."""

    name: str
    peak_tflops: float
    hbm_bytes: int


CHIPS = (
    # https://cloud.google.com/tpu/docs/v4: 275 TFLOP/s peak bf16, 32 GiB HBM2 per chip.
    Chip("TPU v4", 275.0, 32 * GiB),
    # https://cloud.google.com/tpu/docs/v5e: 197 TFLOP/s peak bf16, 16 GiB HBM2 per chip.
    Chip("TPU v5e", 197.0, 16 * GiB),
    # https://cloud.google.com/tpu/docs/v5p: 459 TFLOP/s peak bf16, 95 GiB HBM2e per chip.
    Chip("TPU v5p", 459.0, 95 * GiB),
    # https://cloud.google.com/tpu/docs/v6e: 918 TFLOP/s peak bf16, 32 GiB HBM per chip.
    Chip("TPU v6e", 918.0, 32 * GiB),
    # https://www.nvidia.com/en-us/data-center/a100/: BF16 Tensor Core 312 TFLOP/s dense
    # (624 with 2:4 sparsity); A100 80GB: 80 GB HBM2e.
    Chip("A100 80GB", 312.0, 80 * GB),
    # https://www.nvidia.com/en-us/data-center/h100/ (SXM): BF16 Tensor Core 1979 TFLOP/s
    # with sparsity, 989 dense; 80 GB HBM3.
    Chip("H100 SXM", 989.0, 80 * GB),
    # https://www.nvidia.com/en-us/data-center/h200/ (SXM): BF16 Tensor Core 1979 TFLOP/s
    # with sparsity, 989 dense; 141 GB HBM3e.
    Chip("H200 SXM", 989.0, 141 * GB),
)


# runwayml/stable-diffusion-v1-5, unet/config.json.
SD15_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
# stabilityai/stable-diffusion-2-1 (768 px, v-prediction), unet/config.json.
SD21_UNET_CONFIG = {
    **SD15_UNET_CONFIG,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
    "use_linear_projection": True,
    "upcast_attention": True,
}
# runwayml/stable-diffusion-v1-5, scheduler/scheduler_config.json.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# stabilityai/stable-diffusion-2-1, scheduler/scheduler_config.json.
SD21_SCHEDULER_CONFIG = {
    **SD15_SCHEDULER_CONFIG,
    "_class_name": "DDIMScheduler",
    "prediction_type": "v_prediction",
}
# The micro UNet of the train-loop tests (tests/tiny_unlearn.py): one cross-attention
# level, the cheapest SD-architecture program to compile; 2x VAE, 16 px images.
TINY_UNET_CONFIG = {
    "block_out_channels": [16],
    "down_block_types": ["CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
    "sample_size": 8,
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the planner needs of a model.

    Attributes:
      name: 'sd15', 'sd21', 'tiny' or the folder it was read from.
      unet_config, scheduler_config: diffusers `config.json` dicts.
      context_length, context_dim: the text encoder's output [L, D] (77 x 768 for SD 1.x),
        which the train step and the sampler take precomputed.
      vae_scale_factor: pixels per latent pixel (8 for SD).
    """

    name: str
    unet_config: Mapping[str, Any]
    scheduler_config: Mapping[str, Any]
    context_length: int
    context_dim: int
    vae_scale_factor: int

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple:
        """(h, w, C) of the latents of a height x width image (default: the native size)."""
        native = int(self.unet_config["sample_size"]) * self.vae_scale_factor
        levels = len(self.unet_config.get("block_out_channels", (0,) * 4))
        factor = self.vae_scale_factor * 2 ** (levels - 1)
        height, width = height or native, width or native
        if height % factor or width % factor:
            raise ValueError(
                f"height and width must be multiples of {factor} for {self.name}; got "
                f"{height}x{width}. Fix: e.g. --height {max(factor, height // factor * factor)}."
            )
        channels = int(self.unet_config.get("in_channels", 4))
        return height // self.vae_scale_factor, width // self.vae_scale_factor, channels


MODELS = {
    "sd15": ModelSpec("sd15", SD15_UNET_CONFIG, SD15_SCHEDULER_CONFIG, 77, 768, 8),
    "sd21": ModelSpec("sd21", SD21_UNET_CONFIG, SD21_SCHEDULER_CONFIG, 77, 1024, 8),
    "tiny": ModelSpec("tiny", TINY_UNET_CONFIG, SD15_SCHEDULER_CONFIG, 16, 32, 2),
}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path} does not exist; the planner reads it from a diffusers folder")
    return json.loads(path.read_text(encoding="utf-8"))


def resolve_model(name_or_path: str) -> ModelSpec:
    """A built-in model ('sd15', 'sd21', 'tiny') or a local diffusers folder's configs.

    Only unet/config.json, scheduler/scheduler_config.json, text_encoder/config.json and
    vae/config.json are read.
    """
    if name_or_path in MODELS:
        return MODELS[name_or_path]
    folder = Path(name_or_path).expanduser()
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"unknown model {name_or_path!r}. Fix: --model sd15, sd21 or tiny, or a local "
            "diffusers folder (the one holding model_index.json)."
        )
    unet = _read_json(folder / "unet" / "config.json")
    text = _read_json(folder / "text_encoder" / "config.json")
    vae = _read_json(folder / "vae" / "config.json")
    return ModelSpec(
        str(folder),
        unet,
        _read_json(folder / "scheduler" / "scheduler_config.json"),
        int(text.get("max_position_embeddings", 77)),
        int(text.get("hidden_size", 768)),
        2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1),
    )
