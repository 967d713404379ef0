"""A small random Stable-Diffusion-architecture diffusers folder for benchmarks.

The benchmarks need a model that both diffusers (PyTorch) and `load_pipeline`
read, without downloads. This one is written by diffusers' own
`save_pretrained`, so it has the exact layout and configs of an SD 1.x folder;
its sizes are close to the embedded-world model's: 32x32 RGB images, a
2-level VAE (16x16x4 latents), a 3-level UNet with channels (32, 64, 64) and
cross-attention width 64, and a 2-layer CLIP text encoder of width 64 with
SD's 77-token context. Weights are random (seeded) and every parameter is
perturbed off its initial value, so zero-initialised output layers cannot make
the outputs trivially equal. Needs torch, diffusers and transformers (the
`test` extra).

    from unlearn_jax.benchmarks.tiny_model import save_tiny_model
    save_tiny_model("/tmp/tiny_sd")  # then: --model /tmp/tiny_sd
"""

from __future__ import annotations

import shutil
from pathlib import Path

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


def _perturb_(module, seed: int, scale: float = 0.05) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def build_tiny_model(seed: int = 0):
    """A random SD-1.x-architecture `StableDiffusionPipeline` (float32, PyTorch)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,  # SD 1.x semantics: the number of heads
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        layers_per_block=1,
    )
    tok_dir = Path(f"/tmp/unlearn_jax_bench_tokenizer_{MAX_LENGTH}_{seed}")
    tokenizer = CLIPTokenizer.from_pretrained(
        str(write_clip_tokenizer(tok_dir, WORDS, model_max_length=MAX_LENGTH))
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    for i, module in enumerate((unet, vae, text_encoder)):
        _perturb_(module, seed * 10 + i)
    # A random UNet under guidance 7.5 makes sampling chaotic: moving the initial
    # latents by 1e-5 changes diffusers' own 20-step images by 0.35, so float32
    # round-off would decide any comparison between two frameworks. Smaller
    # outputs (eps std ~0.06 instead of ~0.6) keep that sensitivity at ~5e-4
    # and leave the compute unchanged. A trained model is stable by itself.
    with torch.no_grad():
        unet.conv_out.weight.mul_(UNET_OUTPUT_SCALE)
        unet.conv_out.bias.mul_(UNET_OUTPUT_SCALE)
    scheduler = PNDMScheduler(  # what SD 1.x folders ship; samplers read it as DDIM
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
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
    return pipe  # float32, as built


def quiet_hf_logging() -> None:
    """Silences diffusers'/transformers' progress bars and notices (they go to stderr)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def save_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """Writes the tiny model as a diffusers folder (safetensors); returns the folder."""
    path = Path(path)
    quiet_hf_logging()
    build_tiny_model(seed).save_pretrained(str(path), safe_serialization=True)
    # Real SD folders carry vocab.json + merges.txt, not transformers 5's tokenizer.json.
    shutil.rmtree(path / "tokenizer")
    write_clip_tokenizer(path / "tokenizer", WORDS, model_max_length=MAX_LENGTH)
    return path
