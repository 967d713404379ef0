"""Tiny random Stable Diffusion pipelines saved by diffusers itself, for hermetic tests.

The folders are written with diffusers' own `save_pretrained`
(`unlearn_jax.testing.tiny_model` builds and saves them), so they have
exactly the layout, file names and configs of a real SD 1.x / 2.x folder; only
the sizes are tiny and the weights random. Every parameter is perturbed away
from its initial value so that zero-initialised layers cannot hide a bug.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from unlearn_jax.testing.tiny_model import build_sd_pipeline, save_sd_folder, two_level_vae

WORDS = [
    "a",
    "an",
    "photo",
    "of",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "cat",
    "dog",
    "large",
    "small",
    "on",
    "grey",
    "background",
    "painting",
    "in",
    "the",
    "style",
]
MAX_LENGTH = 16


def text_encoder_config(sd2: bool) -> dict:
    """`CLIPTextConfig` sizes of the tests' 2-layer text encoders (SD 2.x: wider, gelu)."""
    return dict(
        hidden_size=48 if sd2 else 32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="gelu" if sd2 else "quick_gelu",
    )


def build_tiny_pipeline(variant: str = "sd1", seed: int = 0) -> StableDiffusionPipeline:
    """A random SD-architecture pipeline; `variant` is "sd1" or "sd2" style."""
    sd2 = variant == "sd2"
    unet = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48 if sd2 else 32,
        attention_head_dim=[2, 4] if sd2 else 4,
        use_linear_projection=sd2,
        upcast_attention=sd2,
        norm_num_groups=8,
    )
    pipe = build_sd_pipeline(
        seed=seed,
        unet=unet,
        vae=two_level_vae((16, 32), 16),
        text_encoder=text_encoder_config(sd2),
        words=WORDS,
        max_length=MAX_LENGTH,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


def save_tiny_pipeline(
    path: Path, variant: str = "sd1", seed: int = 0, torch_dtype: torch.dtype = torch.float32
) -> Path:
    """Builds and saves a tiny pipeline as safetensors in `torch_dtype`; returns the folder."""
    pipe = build_tiny_pipeline(variant, seed)
    return save_sd_folder(pipe.to(torch_dtype), path, WORDS, MAX_LENGTH)
