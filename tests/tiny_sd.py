"""Tiny random Stable Diffusion pipelines saved by diffusers itself, for hermetic tests.

The folders are written with diffusers' own `save_pretrained`, so they have
exactly the layout, file names and configs of a real SD 1.x / 2.x folder; only
the sizes are tiny and the weights random. Every parameter is perturbed away
from its initial value so that zero-initialised layers cannot hide a bug.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from unlearn_jax.data.tokenizer import write_clip_tokenizer

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


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Adds seeded noise to every parameter (norm scales stay near 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def build_tiny_pipeline(variant: str = "sd1", seed: int = 0) -> StableDiffusionPipeline:
    """A random SD-architecture pipeline; `variant` is "sd1" or "sd2" style."""
    sd2 = variant == "sd2"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        layers_per_block=1,
    )
    return _assemble(unet, vae, sd2=sd2, seed=seed)


def _assemble(unet, vae, *, sd2: bool, seed: int) -> StableDiffusionPipeline:
    tok_dir = Path(f"/tmp/unlearn_jax_test_tokenizer_{MAX_LENGTH}")
    tokenizer = CLIPTokenizer.from_pretrained(
        str(write_clip_tokenizer(tok_dir, WORDS, model_max_length=MAX_LENGTH))
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=48 if sd2 else 32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="gelu" if sd2 else "quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config)
    for i, m in enumerate((unet, vae, text_encoder)):
        perturb_(m, seed * 10 + i)
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


def save_tiny_pipeline(
    path: Path, variant: str = "sd1", seed: int = 0, torch_dtype: torch.dtype = torch.float32
) -> Path:
    """Builds and saves a tiny pipeline as safetensors in `torch_dtype`; returns the folder."""
    pipe = build_tiny_pipeline(variant, seed)
    pipe.to(torch_dtype).save_pretrained(str(path), safe_serialization=True)
    # transformers 5 saves tokenizer.json; real SD folders carry vocab.json + merges.txt.
    # Write that classic layout so the loader is tested on what users have.
    shutil.rmtree(path / "tokenizer")
    write_clip_tokenizer(path / "tokenizer", WORDS, model_max_length=MAX_LENGTH)
    return path
