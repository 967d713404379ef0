"""Building blocks of the Stable Diffusion UNet, in Flax NNX, named like diffusers.

Every module here mirrors one diffusers PyTorch module attribute for attribute
(`norm1`, `conv1`, `time_emb_proj`, `to_q`, `to_out.0`, `ff.net.0.proj`, ...),
so the NNX state path of a parameter is its PyTorch key with `weight` renamed
and `unlearn_jax.models.convert` can map checkpoints strictly in both
directions. Parameter-free PyTorch entries inside module lists (dropout at
`to_out.1` and `ff.net.1`) are kept as `Identity` placeholders so that list
indices line up.

Layout is NHWC for images and [B, L, D] for token sequences. `dtype` is the
compute dtype (float32 or bfloat16); normalisation statistics, attention
logits and the attention softmax are always computed in float32, which covers
diffusers' `upcast_attention`/`upcast_softmax` and keeps bfloat16 safe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.models.attention import dot_product_attention

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


class Identity(nnx.Module):
    """Parameter-free placeholder for a PyTorch list entry (dropout with p=0)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


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


def group_norm(
    num_channels: int,
    num_groups: int,
    eps: float,
    *,
    rngs: nnx.Rngs,
    dtype: Dtype,
    param_dtype: Dtype,
) -> nnx.GroupNorm:
    """A torch-equivalent GroupNorm: two-pass variance (torch's), stats in float32."""
    return nnx.GroupNorm(
        num_channels,
        num_groups=num_groups,
        epsilon=eps,
        use_fast_variance=False,
        rngs=rngs,
        dtype=dtype,
        param_dtype=param_dtype,
    )


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


class Attention(nnx.Module):
    """Multi-head (cross-)attention as diffusers `Attention` with its default processor.

    `to_q/to_k/to_v` have no bias (SD's `attention_bias=False`), `to_out.0` has
    one and `to_out.1` is the parameter-free dropout slot.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        upcast_attention: bool = False,
        rngs: nnx.Rngs,
        dtype: Dtype,
        param_dtype: Dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner_dim = heads * dim_head
        kv_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.heads = heads
        self.dim_head = dim_head
        # Kept for the record: logits and softmax are float32 regardless (see module doc).
        self.upcast_attention = upcast_attention
        self.to_q = nnx.Linear(query_dim, inner_dim, use_bias=False, **kw)
        self.to_k = nnx.Linear(kv_dim, inner_dim, use_bias=False, **kw)
        self.to_v = nnx.Linear(kv_dim, inner_dim, use_bias=False, **kw)
        self.to_out = nnx.List([nnx.Linear(inner_dim, query_dim, **kw), Identity()])

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """x [B, N, query_dim], context [B, L, kv_dim] or None (self) -> [B, N, query_dim]."""
        context = x if context is None else context
        batch = x.shape[0]
        split = lambda t: t.reshape(batch, t.shape[1], self.heads, self.dim_head)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        # q.k accumulated in float32, softmax in float32, probs cast to v's dtype.
        out = dot_product_attention(q, k, v, scale=self.dim_head**-0.5)
        out = out.reshape(batch, x.shape[1], self.heads * self.dim_head)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nnx.Module):
    """Gated GELU projection: `proj` to 2x width, value * gelu(gate) (exact erf GELU)."""

    def __init__(
        self, dim_in: int, dim_out: int, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype
    ):
        self.proj = nnx.Linear(dim_in, 2 * dim_out, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., dim_in] -> [..., dim_out]."""
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """diffusers `FeedForward` with GEGLU: `net.0.proj`, `net.1` (dropout), `net.2`."""

    def __init__(
        self, dim: int, mult: int = 4, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner_dim = dim * mult
        self.net = nnx.List(
            [GEGLU(dim, inner_dim, **kw), Identity(), nnx.Linear(inner_dim, dim, **kw)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., dim] -> [..., dim]."""
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nnx.Module):
    """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual."""

    def __init__(
        self,
        dim: int,
        *,
        num_attention_heads: int,
        attention_head_dim: int,
        cross_attention_dim: int,
        upcast_attention: bool = False,
        norm_eps: float = 1e-5,
        rngs: nnx.Rngs,
        dtype: Dtype,
        param_dtype: Dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        attn_kw = dict(
            heads=num_attention_heads,
            dim_head=attention_head_dim,
            upcast_attention=upcast_attention,
            **kw,
        )
        norm = lambda: nnx.LayerNorm(dim, epsilon=norm_eps, use_fast_variance=False, **kw)
        self.norm1 = norm()
        self.attn1 = Attention(dim, **attn_kw)
        self.norm2 = norm()
        self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **attn_kw)
        self.norm3 = norm()
        self.ff = FeedForward(dim, **kw)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x [B, N, dim], context [B, L, cross_attention_dim] -> [B, N, dim]."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """diffusers `Transformer2DModel` for continuous (image) inputs.

    GroupNorm (eps 1e-6), `proj_in` (1x1 conv for SD1, Linear for SD2's
    `use_linear_projection`), a stack of `transformer_blocks`, `proj_out`, and a
    residual connection around the whole.
    """

    def __init__(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        in_channels: int,
        *,
        num_layers: int = 1,
        cross_attention_dim: int,
        norm_num_groups: int,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        rngs: nnx.Rngs,
        dtype: Dtype,
        param_dtype: Dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner_dim = num_attention_heads * attention_head_dim
        self.norm = group_norm(in_channels, norm_num_groups, 1e-6, **kw)
        # A 1x1 conv and a Linear are the same map in NHWC; only the stored
        # weight layout differs, and that is what the checkpoint dictates.
        if use_linear_projection:
            self.proj_in = nnx.Linear(in_channels, inner_dim, **kw)
            self.proj_out = nnx.Linear(inner_dim, in_channels, **kw)
        else:
            self.proj_in = conv2d(in_channels, inner_dim, 1, **kw)
            self.proj_out = conv2d(inner_dim, in_channels, 1, **kw)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    inner_dim,
                    num_attention_heads=num_attention_heads,
                    attention_head_dim=attention_head_dim,
                    cross_attention_dim=cross_attention_dim,
                    upcast_attention=upcast_attention,
                    **kw,
                )
                for _ in range(num_layers)
            ]
        )

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x [B, H, W, C], context [B, L, cross_attention_dim] -> [B, H, W, C]."""
        batch, height, width, _ = x.shape
        h = self.proj_in(self.norm(x))
        h = h.reshape(batch, height * width, h.shape[-1])
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h.reshape(batch, height, width, h.shape[-1]))
        return h + x
