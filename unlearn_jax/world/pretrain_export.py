"""The embedded model's component configs and its diffusers folder, written without torch.

`component_configs` turns a pretraining config into the JSON dicts that
diffusers and transformers themselves write (`_class_name`,
`_diffusers_version`, every key of `save_pretrained`), so that
`StableDiffusionPipeline.from_pretrained` reads the folder exactly as one it
saved; our modules are built from the very same dicts. `write_pipeline`
assembles `model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`
and `scheduler/` with fp16 safetensors (the shipped folder is a few MB).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from unlearn_jax.atomic_files import write_json
from unlearn_jax.models import convert, weights
from unlearn_jax.models.abstract import abstract_module

# The versions whose save_pretrained output these dicts reproduce (checked by tests).
DIFFUSERS_VERSION = "0.42.1"
TRANSFORMERS_VERSION = "5.24.0"
STEMS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> `get_config(arg)` of that file."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_pretrain_config", path)
    if module_spec is None or not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} not found")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def unet_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """diffusers `unet/config.json` of the world UNet (SD 1.x layout, small widths)."""
    u = config.unet
    levels = len(u.block_out_channels)
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "addition_embed_type": None,
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": None,
        "attention_head_dim": u.attention_head_dim,
        "attention_type": "default",
        "block_out_channels": list(u.block_out_channels),
        "center_input_sample": False,
        "class_embed_type": None,
        "class_embeddings_concat": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": config.text_encoder.hidden_size,
        "cross_attention_norm": None,
        # As SD: cross-attention at every level but the coarsest, and in the middle.
        "down_block_types": ["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"],
        "downsample_padding": 1,
        "dropout": 0.0,
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": config.vae.latent_channels,
        "layers_per_block": u.layers_per_block,
        "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": u.norm_num_groups,
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": config.vae.latent_channels,
        "projection_class_embeddings_input_dim": None,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "resnet_time_scale_shift": "default",
        "reverse_transformer_layers_per_block": None,
        "sample_size": config.image_size // 2 ** (len(config.vae.block_out_channels) - 1),
        "time_cond_proj_dim": None,
        "time_embedding_act_fn": None,
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
        "transformer_layers_per_block": 1,
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1),
        "upcast_attention": False,
        "use_linear_projection": False,
    }


def vae_config(config: ml_collections.ConfigDict, scaling_factor: float = 1.0) -> dict[str, Any]:
    """diffusers `vae/config.json`; `scaling_factor` is set after training (1/latent std)."""
    v = config.vae
    levels = len(v.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": list(v.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": v.latent_channels,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": v.layers_per_block,
        "mid_block_add_attention": True,
        "norm_num_groups": v.norm_num_groups,
        "out_channels": 3,
        "sample_size": config.image_size,
        "scaling_factor": scaling_factor,
        "shift_factor": None,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "use_post_quant_conv": True,
        "use_quant_conv": True,
    }


def text_encoder_config(config: ml_collections.ConfigDict, tokenizer: Any) -> dict[str, Any]:
    """transformers `text_encoder/config.json` (CLIPTextModel) sized to the tiny tokenizer."""
    t = config.text_encoder
    return {
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": tokenizer.bos_token_id,
        # The loading dtype transformers 5 picks by default: float32, like diffusers does
        # for the other components (the files themselves hold float16).
        "dtype": "float32",
        "eos_token_id": tokenizer.eos_token_id,
        "hidden_act": "quick_gelu",
        "hidden_size": t.hidden_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": t.intermediate_size,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": t.max_length,
        "model_type": "clip_text_model",
        "num_attention_heads": t.num_attention_heads,
        "num_hidden_layers": t.num_hidden_layers,
        "pad_token_id": tokenizer.pad_token_id,
        "projection_dim": t.hidden_size,
        "transformers_version": TRANSFORMERS_VERSION,
        "vocab_size": len(tokenizer),
    }


def scheduler_config() -> dict[str, Any]:
    """SD's DDIM scheduler config: scaled-linear betas, 1000 steps, epsilon prediction."""
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "dynamic_thresholding_ratio": 0.995,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "rescale_betas_zero_snr": False,
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "thresholding": False,
        "timestep_spacing": "leading",
        "trained_betas": None,
    }


def model_index() -> dict[str, Any]:
    """`model_index.json` of a StableDiffusionPipeline without safety checker."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _write_json(path: Path, data: dict) -> None:
    write_json(path, data, sort_keys=True)


def save_component(
    module: nnx.Module, folder: Path, kind: str, config: dict, dtype: np.dtype = np.float32
) -> Path:
    """Writes `config.json` + the weights (PyTorch names) of one component folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", config)
    weights.write_component_weights(
        folder, convert.to_torch_state(module, dtype=dtype), stem=STEMS[kind]
    )
    return folder


def load_component(cls: type, config: dict, folder: Path, kind: str) -> nnx.Module:
    """Builds `cls(config)` abstractly and loads the folder's weights strictly (float32)."""
    module = abstract_module(lambda rngs: cls(config, rngs=rngs))
    tensors, source = weights.read_component_weights(folder)
    convert.load_torch_state(module, tensors, source=source, dtype=np.float32)
    return module


def write_pipeline(
    out: Path,
    configs: dict[str, dict],
    *,
    unet: nnx.Module,
    vae: nnx.Module,
    text_encoder: nnx.Module,
    tokenizer_dir: Path,
) -> Path:
    """Writes the complete diffusers folder with fp16 weights; replaces `out` if present."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _write_json(out / "model_index.json", model_index())
    for kind, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        save_component(module, out / kind, kind, configs[kind], dtype=np.float16)
    (out / "scheduler").mkdir()
    _write_json(out / "scheduler" / "scheduler_config.json", configs["scheduler"])
    shutil.copytree(tokenizer_dir, out / "tokenizer")
    return out
