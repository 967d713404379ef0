"""Small random Stable-Diffusion-architecture diffusers folders, for benchmarks and tests.

Benchmarks and tests need models that both diffusers (PyTorch) and
`load_pipeline` read, without downloads. `build_sd_pipeline` makes one from
the constructor arguments of its UNet, VAE and CLIP text encoder: weights are
random (seeded) and every parameter is perturbed off its initial value, so
zero-initialised output layers cannot make outputs trivially equal.
`save_sd_folder` writes it with diffusers' own `save_pretrained`, so the folder
has the exact layout and configs of an SD 1.x / 2.x folder, with the classic
`vocab.json` + `merges.txt` tokenizer. The tests' sizes live in
`tests/tiny_sd.py` and `tests/tiny_unlearn.py`.

The benchmarks' model (`build_tiny_model`, `save_tiny_model`) has sizes close
to the embedded-world model's: 32x32 RGB images, a 2-level VAE (16x16x4
latents), a 3-level UNet with channels (32, 64, 64) and cross-attention width
64, and a 2-layer CLIP text encoder of width 64 with SD's 77-token context.
Needs torch, diffusers and transformers (the `test` extra).

    from unlearn_jax.testing.tiny_model import save_tiny_model
    save_tiny_model("/tmp/tiny_sd")  # then: --model /tmp/tiny_sd

`save_sd15_model` writes a random model of SD-1.5's size instead (860M-parameter
UNet from the planner's config, SD's 4-level VAE and 12-layer CLIP text
encoder; only the tokenizer's vocabulary is the small one above), for
benchmarks on accelerators without downloading weights.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unlearn_jax.data.tokenizer import write_clip_tokenizer

# The embedded world's caption vocabulary: "a large red circle on a grey background".
WORDS = (
    "a an the of on in with photo painting style background "
    "small large tiny big red green blue yellow purple orange white black grey "
    "circle square triangle star cross ring heart"
).split()
MAX_LENGTH = 77  # SD's text context; cross-attention cost scales with it
IMAGE_SIZE = 32
UNET_OUTPUT_SCALE = 0.1  # see build_tiny_model


def caption_prompts(n: int) -> list[str]:
    """n distinct-as-possible captions from the embedded world's vocabulary, deterministic."""
    sizes, colours = ("small", "large"), ("red", "green", "blue", "yellow", "purple", "orange")
    shapes = ("circle", "square", "triangle", "star", "cross", "ring", "heart")
    backgrounds = ("grey", "white", "black")
    prompts = []
    for i in range(n):
        size, colour = sizes[i % 2], colours[(i // 2) % 6]
        shape, bg = shapes[(i // 12) % 7], backgrounds[(i // 84) % 3]
        prompts.append(f"a {size} {colour} {shape} on a {bg} background")
    return prompts


# ----------------------------------------------------------------------------- builders


def perturb_(module, seed: int, scale: float = 0.05) -> None:
    """Adds seeded noise to every parameter of a torch module (norm scales stay near 1)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def two_level_vae(block_out_channels: tuple[int, int], sample_size: int) -> dict[str, Any]:
    """diffusers `AutoencoderKL` arguments: 2 levels (latents at 1/2 size), 4 channels."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=block_out_channels,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
        layers_per_block=1,
    )


def build_sd_pipeline(
    *,
    seed: int,
    unet: dict[str, Any],
    vae: dict[str, Any],
    text_encoder: dict[str, Any],
    words: Sequence[str],
    max_length: int,
    prediction_type: str = "epsilon",
    perturbation: float = 0.05,
):
    """A random SD-architecture `StableDiffusionPipeline` (float32, PyTorch).

    Args:
      seed: seeds torch's global RNG, which initialises the UNet, the VAE and
        the text encoder in that order; then module i of (unet, vae,
        text_encoder) is perturbed with seed `seed * 10 + i` by `perturbation`
        x N(0, 1) (0: left at diffusers' initialisation).
      unet, vae: diffusers `UNet2DConditionModel` / `AutoencoderKL` arguments.
      text_encoder: transformers `CLIPTextConfig` arguments, without the
        vocabulary size, context length and special tokens (from the tokenizer).
      words, max_length: the CLIP tokenizer's vocabulary and context length.
      prediction_type: of the scheduler (PNDM, SD's scaled-linear betas, as SD
        folders ship it; our samplers read it as DDIM).
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet_model = UNet2DConditionModel(**unet)
    vae_model = AutoencoderKL(**vae)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(
            str(write_clip_tokenizer(Path(tmp), words, model_max_length=max_length))
        )
    text_model = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **text_encoder,
        )
    )
    for i, module in enumerate((unet_model, vae_model, text_model)):
        if perturbation:
            perturb_(module, seed * 10 + i, perturbation)
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        unet=unet_model,
        vae=vae_model,
        text_encoder=text_model,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_sd_folder(pipe, path: str | Path, words: Sequence[str], max_length: int) -> Path:
    """Writes `pipe` as a diffusers folder (safetensors, its dtype); returns the folder.

    transformers 5 saves tokenizer.json; real SD folders carry vocab.json +
    merges.txt, so the tokenizer is rewritten in that classic layout and
    loaders are tested on what users have.
    """
    path = Path(path)
    pipe.save_pretrained(str(path), safe_serialization=True)
    shutil.rmtree(path / "tokenizer")
    write_clip_tokenizer(path / "tokenizer", words, model_max_length=max_length)
    return path


# ----------------------------------------------------------------------------- the benchmark model


# UNet levels of the benchmarks' tiny models: (block_out_channels, down, up block types).
TINY_UNET_LEVELS = {
    3: (
        (32, 64, 64),
        ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    2: ((32, 64), ("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D")),
}


def build_tiny_model(seed: int = 0, levels: int = 3):
    """The benchmarks' random SD-1.x-architecture `StableDiffusionPipeline` (float32).

    levels: 3 (UNet 32/64/64, the default model) or 2 (UNet 32/64: a smaller held-out
    workload, to check a speed claim on more than the model it was tuned on).
    """
    if levels not in TINY_UNET_LEVELS:
        raise ValueError(f"levels={levels}: expected one of {sorted(TINY_UNET_LEVELS)}")
    channels, down, up = TINY_UNET_LEVELS[levels]
    pipe = build_sd_pipeline(
        seed=seed,
        unet=dict(
            sample_size=IMAGE_SIZE // 2,
            in_channels=4,
            out_channels=4,
            block_out_channels=channels,
            layers_per_block=2,
            down_block_types=down,
            up_block_types=up,
            cross_attention_dim=64,
            attention_head_dim=4,  # SD 1.x semantics: the number of heads
            norm_num_groups=8,
        ),
        vae=two_level_vae((32, 64), IMAGE_SIZE),
        text_encoder=dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_act="quick_gelu",
        ),
        words=WORDS,
        max_length=MAX_LENGTH,
    )
    return scale_unet_output_(pipe)  # float32, as built


def scale_unet_output_(pipe):
    """Scales the UNet's output layer by `UNET_OUTPUT_SCALE`, in place; returns `pipe`.

    A random UNet under guidance 7.5 makes sampling chaotic: moving the initial
    latents by 1e-5 changes diffusers' own 20-step images by 0.35, so float32
    round-off would decide any comparison between two frameworks. Smaller
    outputs (eps std ~0.06 instead of ~0.6) keep that sensitivity at ~5e-4
    and leave the compute unchanged. A trained model is stable by itself.
    """
    import torch

    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(UNET_OUTPUT_SCALE)
        pipe.unet.conv_out.bias.mul_(UNET_OUTPUT_SCALE)
    return pipe


def build_sd15_model(seed: int = 0):
    """A random `StableDiffusionPipeline` of SD-1.5's architecture and size (float32).

    The UNet is the planner's `SD15_UNET_CONFIG`; VAE and text encoder are SD-1.5's
    (`vae/config.json`, `text_encoder/config.json`). Left at diffusers'/transformers'
    initialisation (an absolute perturbation would swamp weights of fan-in ~3000
    and overflow fp16), with the UNet's output scaled by `UNET_OUTPUT_SCALE` as in
    `build_tiny_model`, so that 50 guided steps stay far from fp16's range.
    """

    from unlearn_jax.planning.models import SD15_UNET_CONFIG

    pipe = build_sd_pipeline(
        seed=seed,
        unet={k: v for k, v in SD15_UNET_CONFIG.items() if not k.startswith("_")},
        vae=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
            layers_per_block=2,
        ),
        text_encoder=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
            hidden_act="quick_gelu",
        ),
        words=WORDS,
        max_length=MAX_LENGTH,
        perturbation=0.0,
    )
    return scale_unet_output_(pipe)


def quiet_hf_logging() -> None:
    """Silences diffusers'/transformers' progress bars and notices (they go to stderr)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def save_tiny_model(path: str | Path, seed: int = 0, levels: int = 3) -> Path:
    """Writes the benchmarks' tiny model as a diffusers folder (safetensors); returns it."""
    quiet_hf_logging()
    return save_sd_folder(build_tiny_model(seed, levels), path, WORDS, MAX_LENGTH)


def save_sd15_model(path: str | Path, seed: int = 0) -> Path:
    """Writes `build_sd15_model(seed)` as a diffusers folder (safetensors float32, ~4.3 GB)."""
    quiet_hf_logging()
    return save_sd_folder(build_sd15_model(seed), path, WORDS, MAX_LENGTH)
