"""Convolutional building blocks of the Stable Diffusion UNet, in Flax NNX, named like diffusers.

The timestep embedding (`Timesteps`, `TimestepEmbedding`), the torch-equivalent
`conv2d` constructor (`group_norm` is in `normalization`), `ResnetBlock2D` and the
`Downsample2D` / `Upsample2D` resamplers. The attention path (`Attention` ... `Transformer2DModel`)
is in `unet_transformer`, the down/mid/up blocks that assemble these in
`unet_stages`.

Every module here mirrors one diffusers PyTorch module attribute for attribute
(`norm1`, `conv1`, `time_emb_proj`, `linear_1`, `conv`, ...), so the NNX state
path of a parameter is its PyTorch key with `weight` renamed and
`unlearn_jax.models.convert` can map checkpoints strictly in both directions.

Layout is NHWC. `dtype` is the compute dtype (float32 or bfloat16);
normalisation statistics are always computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.models.normalization import group_norm

Dtype = jnp.dtype | type


def get_timestep_embedding(
    timesteps: jax.Array,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: int = 10000,
) -> jax.Array:
    """Sinusoidal timestep embedding, as diffusers' `get_timestep_embedding`.

    Args:
      timesteps: [N] int or float timesteps (fractional values allowed).
      embedding_dim: output width D.
      flip_sin_to_cos: order the halves (cos, sin) instead of (sin, cos).
      downscale_freq_shift: the frequency exponent is divided by
        `D // 2 - downscale_freq_shift`.
      scale: multiplies the arguments of sin/cos.
      max_period: the lowest frequency is 1 / max_period.

    Returns:
      [N, D] float32 (always float32: timesteps up to 1000 lose their low bits
      in bfloat16 and neighbouring steps would get the same embedding).
    """
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * jnp.arange(half_dim, dtype=jnp.float32)
    exponent = exponent / (half_dim - downscale_freq_shift)
    args = scale * (timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :])
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half_dim:], emb[:, :half_dim]], axis=-1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Timesteps(nnx.Module):
    """Parameter-free sinusoidal projection of timesteps (diffusers `Timesteps`)."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float):
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def __call__(self, timesteps: jax.Array) -> jax.Array:
        """[N] timesteps -> [N, num_channels] float32."""
        return get_timestep_embedding(
            timesteps,
            self.num_channels,
            flip_sin_to_cos=self.flip_sin_to_cos,
            downscale_freq_shift=self.downscale_freq_shift,
        )


class TimestepEmbedding(nnx.Module):
    """Two-layer SiLU MLP on the sinusoidal embedding (`linear_1`, `linear_2`)."""

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype,
        param_dtype: Dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = nnx.Linear(in_channels, time_embed_dim, **kw)
        self.linear_2 = nnx.Linear(time_embed_dim, time_embed_dim, **kw)

    def __call__(self, sample: jax.Array) -> jax.Array:
        """[B, in_channels] -> [B, time_embed_dim]."""
        return self.linear_2(jax.nn.silu(self.linear_1(sample)))


def conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int | Sequence[tuple[int, int]] = 0,
    rngs: nnx.Rngs,
    dtype: Dtype,
    param_dtype: Dtype,
) -> nnx.Conv:
    """An NHWC conv with PyTorch's explicit (symmetric int or per-side) padding."""
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nnx.Conv(
        in_channels,
        out_channels,
        (kernel_size, kernel_size),
        strides=stride,
        padding=tuple(padding),
        rngs=rngs,
        dtype=dtype,
        param_dtype=param_dtype,
    )


class ResnetBlock2D(nnx.Module):
    """diffusers `ResnetBlock2D` with `time_embedding_norm="default"` and SiLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        *,
        groups: int,
        eps: float,
        output_scale_factor: float = 1.0,
        rngs: nnx.Rngs,
        dtype: Dtype,
        param_dtype: Dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.output_scale_factor = output_scale_factor
        self.norm1 = group_norm(in_channels, groups, eps, **kw)
        self.conv1 = conv2d(in_channels, out_channels, 3, padding=1, **kw)
        self.time_emb_proj = nnx.Linear(temb_channels, out_channels, **kw)
        self.norm2 = group_norm(out_channels, groups, eps, **kw)
        self.conv2 = conv2d(out_channels, out_channels, 3, padding=1, **kw)
        if in_channels != out_channels:
            self.conv_shortcut = conv2d(in_channels, out_channels, 1, **kw)
        else:
            self.conv_shortcut = None

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        """x [B, H, W, C_in], temb [B, T] -> [B, H, W, C_out]."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv (`conv`); padding 0 means PyTorch's right/bottom pad by 1."""

    def __init__(
        self, channels: int, padding: int, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype
    ):
        # diffusers pads (0, 1, 0, 1) by hand before an unpadded conv when padding == 0.
        pads = ((padding, padding),) * 2 if padding else ((0, 1), (0, 1))
        self.conv = conv2d(
            channels,
            channels,
            3,
            stride=2,
            padding=pads,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, H', W', C] with H' = floor((H + 2p - 3) / 2) + 1."""
        return self.conv(x)


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    # torch's "nearest" with an explicit output size: src = floor(dst * in / out)
    # in float32, clamped; the exact-2x case is dst // 2.
    if out_size == 2 * in_size:
        return np.arange(out_size) // 2
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    """[B, H, W, C] -> [B, *size, C] (default 2H, 2W), like torch `interpolate(mode="nearest")`."""
    _, height, width, _ = x.shape
    out_h, out_w = size if size is not None else (2 * height, 2 * width)
    if (out_h, out_w) == (2 * height, 2 * width):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    x = jnp.take(x, _nearest_indices(height, out_h), axis=1)
    return jnp.take(x, _nearest_indices(width, out_w), axis=2)


class Upsample2D(nnx.Module):
    """Nearest 2x (or to a given size) upsampling followed by a 3x3 conv (`conv`)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
        self.conv = conv2d(
            channels, channels, 3, padding=1, rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )

    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        """[B, H, W, C] -> [B, 2H, 2W, C], or [B, *output_size, C] when given."""
        return self.conv(upsample_nearest(x, output_size))
