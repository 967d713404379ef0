"""Flax NNX `UNet2DConditionModel` for Stable Diffusion 1.x / 2.x, equal to diffusers'.

Built from the dict of a diffusers `unet/config.json`; attribute names follow
diffusers exactly (`conv_in`, `time_embedding.linear_1`,
`down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`, `mid_block`,
`up_blocks.*.upsamplers.0.conv`, `conv_norm_out`, `conv_out`), so
`unlearn_jax.models.convert.load_torch_state` loads a diffusers checkpoint
strictly and `to_torch_state` writes one back.

Layout is NHWC. Config options outside SD 1.x / 2.x (class or addition
embeddings, Fourier time embedding, gated attention, other block types, ...)
raise a ValueError that names the option instead of being silently ignored;
`resolve_config` does that check and expands the per-block options.

This module holds the config handling and the top-level model; the down/mid/up
stages are in `unet_stages`, their layers in `unet_blocks` (resnets,
resamplers, timestep embedding) and `unet_transformer` (attention).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from unlearn_jax.models.config import FrozenConfig
from unlearn_jax.models.normalization import group_norm
from unlearn_jax.models.unet_blocks import Dtype, TimestepEmbedding, Timesteps, conv2d
from unlearn_jax.models.unet_stages import DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D

_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # type -> has attention
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers defaults of the options we read (a config.json may omit any of them).
_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1.0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "use_linear_projection": False,
    "upcast_attention": False,
    "time_embedding_dim": None,
}

# Options whose only supported value is the SD 1.x/2.x one (diffusers' default).
_FIXED: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu", "swish"),
    "dropout": (0.0, 0),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0, 1),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}


def _unsupported(option: str, value: Any) -> ValueError:
    return ValueError(
        f"UNet config option {option}={value!r} is not supported: this UNet2DConditionModel "
        "implements Stable Diffusion 1.x/2.x configs only."
    )


def _per_block(config: Mapping[str, Any], key: str, num_blocks: int) -> list:
    value = config[key]
    if isinstance(value, (list, tuple)):
        if len(value) != num_blocks:
            raise ValueError(
                f"UNet config {key}={value!r} needs one entry per block ({num_blocks})."
            )
        return list(value)
    return [value] * num_blocks


def resolve_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Validates a diffusers UNet config and expands per-block options to lists.

    Raises:
      ValueError: naming the first option that is outside SD 1.x/2.x.
    """
    cfg = {**_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for option, allowed in _FIXED.items():
        value = cfg.get(option, allowed[0])
        if isinstance(value, (list, tuple)) and option == "only_cross_attention":
            value = any(value)
        if value not in allowed:
            raise _unsupported(option, value)
    for key, known in (("down_block_types", _DOWN_TYPES), ("up_block_types", _UP_TYPES)):
        for block_type in cfg[key]:
            if block_type not in known:
                raise _unsupported(key, block_type)
    if cfg["mid_block_type"] not in _MID_TYPES:
        raise _unsupported("mid_block_type", cfg["mid_block_type"])
    if cfg["norm_num_groups"] is None:
        raise _unsupported("norm_num_groups", None)
    n = len(cfg["block_out_channels"])
    if len(cfg["down_block_types"]) != n or len(cfg["up_block_types"]) != n:
        raise ValueError("UNet config needs as many down/up block types as block_out_channels.")
    # diffusers' SD naming quirk: `attention_head_dim` holds the number of heads
    # unless `num_attention_heads` is set; either way the head width is
    # channels // heads in the cross-attention blocks.
    heads_key = (
        "attention_head_dim" if cfg["num_attention_heads"] is None else "num_attention_heads"
    )
    for key in ("layers_per_block", "transformer_layers_per_block", "cross_attention_dim"):
        cfg[key] = _per_block(cfg, key, n)
    cfg["heads"] = _per_block(cfg, heads_key, n)
    for key in ("transformer_layers_per_block", "cross_attention_dim"):
        if any(not isinstance(v, int) for v in cfg[key]):
            raise _unsupported(key, config.get(key))
    if any(not isinstance(heads, int) or heads < 1 for heads in cfg["heads"]):
        raise ValueError(f"UNet config {heads_key}={config.get(heads_key)!r}: heads must be ints.")
    return cfg


class UNet2DConditionModel(nnx.Module):
    """The Stable Diffusion noise-prediction UNet (SD 1.x / 2.x configs).

    Attributes:
      config: the diffusers config dict the model was built from (unchanged).
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        remat: bool = False,
    ):
        """Builds the module tree of a diffusers `unet/config.json`.

        Args:
          config: the config dict (diffusers defaults fill omitted keys).
          rngs: initialisation randomness (weights are usually loaded after).
          dtype: compute dtype (e.g. jnp.bfloat16); norms/softmax stay float32.
          param_dtype: parameter storage dtype.
          remat: recompute resnet/transformer activations in the backward pass.

        Raises:
          ValueError: for options outside SD 1.x/2.x, naming the option.
        """
        self.config = FrozenConfig(config)
        cfg = resolve_config(config)
        channels = list(cfg["block_out_channels"])
        cfg["time_embed_dim"] = cfg["time_embedding_dim"] or 4 * channels[0]
        cfg["remat"] = remat
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype
        self.center_input_sample = bool(cfg["center_input_sample"])

        self.conv_in = conv2d(cfg["in_channels"], channels[0], 3, padding=1, **kw)
        self.time_proj = Timesteps(channels[0], cfg["flip_sin_to_cos"], cfg["freq_shift"])
        self.time_embedding = TimestepEmbedding(channels[0], cfg["time_embed_dim"], **kw)

        down_blocks = []
        in_channels = channels[0]
        for i, block_type in enumerate(cfg["down_block_types"]):
            down_blocks.append(DownBlock2D(cfg, i, in_channels, _DOWN_TYPES[block_type], kw))
            in_channels = channels[i]
        self.down_blocks = nnx.List(down_blocks)

        if cfg["mid_block_type"] is None:
            self.mid_block = None
        else:
            self.mid_block = UNetMidBlock2DCrossAttn(cfg, kw)

        up_blocks = []
        prev_output_channel = channels[-1]
        for i, block_type in enumerate(cfg["up_block_types"]):
            up_blocks.append(UpBlock2D(cfg, i, prev_output_channel, _UP_TYPES[block_type], kw))
            prev_output_channel = channels[len(channels) - 1 - i]
        self.up_blocks = nnx.List(up_blocks)

        groups, eps = cfg["norm_num_groups"], cfg["norm_eps"]
        self.conv_norm_out = group_norm(channels[0], groups, eps, **kw)
        self.conv_out = conv2d(channels[0], cfg["out_channels"], 3, padding=1, **kw)

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | int | float,
        encoder_hidden_states: jax.Array,
    ) -> jax.Array:
        """Predicts the noise (or v) for a batch of noisy latents.

        Args:
          sample: [B, H, W, C_in] noisy latents (NHWC).
          timesteps: scalar or [B], int or float.
          encoder_hidden_states: [B, L, cross_attention_dim] text embeddings.

        Returns:
          [B, H, W, C_out] in the compute dtype.
        """
        batch = sample.shape[0]
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (batch,))
        temb = self.time_embedding(self.time_proj(timesteps).astype(self.dtype))

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, encoder_hidden_states)
            skips.extend(block_skips)
        if self.mid_block is not None:
            x = self.mid_block(x, temb, encoder_hidden_states)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # Upsample to the next skip's size: equals 2x for sizes divisible by
            # the total stride, and matches diffusers' `upsample_size` otherwise.
            size = tuple(skips[-1].shape[1:3]) if skips else None
            x = block(x, block_skips, temb, encoder_hidden_states, size)
        x = jax.nn.silu(self.conv_norm_out(x))
        return self.conv_out(x)
