"""The encoder and decoder of the Stable Diffusion VAE (diffusers `AutoencoderKL`), in Flax NNX.

`Encoder` (`conv_in`, `down_blocks` of `DownEncoderBlock2D`, `mid_block`,
`conv_norm_out`, `conv_out`) and `Decoder` (the mirror image with
`UpDecoderBlock2D`), built from the resnets, resamplers and single-head
`VAEAttention` below. Attribute names follow diffusers exactly, so the NNX state
path of a parameter is its PyTorch key under `encoder.`/`decoder.` with `weight`
renamed. `LayerBuilder` carries what every layer of one model shares (norm
groups, activation, dtypes, rngs). Layout is NHWC; `vae.AutoencoderKL` wraps
these with the quant convs and the posterior.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from unlearn_jax.models.attention import dot_product_attention
from unlearn_jax.models.normalization import GroupNorm, group_norm

_EPS = 1e-6  # diffusers hard-codes this for every VAE norm.


class LayerBuilder:
    """Constructor arguments shared by every layer of one model."""

    def __init__(self, *, groups: int, act: Callable, dtype, param_dtype, rngs: nnx.Rngs):
        self.groups, self.act, self.rngs = groups, act, rngs
        self.dtypes = {"dtype": dtype, "param_dtype": param_dtype}

    def conv(
        self, cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: Any = 1
    ) -> nnx.Conv:
        pad = ((padding, padding),) * 2 if isinstance(padding, int) else padding
        return nnx.Conv(
            cin,
            cout,
            (kernel, kernel),
            (stride, stride),
            padding=pad,
            rngs=self.rngs,
            **self.dtypes,
        )

    def norm(self, channels: int) -> GroupNorm:
        return group_norm(channels, self.groups, _EPS, rngs=self.rngs, **self.dtypes)


class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D without time embedding: x + conv(act(norm(conv(act(norm(x))))))."""

    def __init__(self, cin: int, cout: int, b: LayerBuilder):
        self.act = b.act
        self.norm1 = b.norm(cin)
        self.conv1 = b.conv(cin, cout)
        self.norm2 = b.norm(cout)
        self.conv2 = b.conv(cout, cout)
        self.conv_shortcut = b.conv(cin, cout, kernel=1, padding=0) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, cin] -> [B, H, W, cout]."""
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))  # dropout is 0 in every SD VAE
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv after padding one row/column at the bottom/right only (diffusers)."""

    def __init__(self, channels: int, b: LayerBuilder):
        self.conv = b.conv(channels, channels, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]."""
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int, b: LayerBuilder):
        self.conv = b.conv(channels, channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, 2H, 2W, C]."""
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class VAEAttention(nnx.Module):
    """Single-head spatial self-attention with a residual (diffusers `Attention` in the VAE).

    diffusers sets `attention_head_dim = channels` for the VAE mid block, so there
    is exactly one head of width `channels`.
    """

    def __init__(self, channels: int, b: LayerBuilder):
        self.group_norm = b.norm(channels)
        lin = lambda: nnx.Linear(channels, channels, rngs=b.rngs, **b.dtypes)
        self.to_q, self.to_k, self.to_v = lin(), lin(), lin()
        self.to_out = nnx.List([lin()])  # index 0 as in diffusers (index 1 was dropout)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, H, W, C]."""
        bsz, height, width, channels = x.shape
        h = self.group_norm(x).reshape(bsz, height * width, channels)
        one_head = lambda t: t[:, :, None, :]
        q, k, v = one_head(self.to_q(h)), one_head(self.to_k(h)), one_head(self.to_v(h))
        # diffusers marks this attention `upcast_softmax`: logits and softmax in float32.
        h = dot_product_attention(q, k, v, scale=channels**-0.5)[:, :, 0, :]
        h = self.to_out[0](h).reshape(bsz, height, width, channels)
        return x + h


class UNetMidBlock2D(nnx.Module):
    """resnet -> (attention -> resnet), the VAE bottleneck at the lowest resolution."""

    def __init__(self, channels: int, add_attention: bool, b: LayerBuilder):
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, b) for _ in range(2)])
        self.attentions = nnx.List([VAEAttention(channels, b)] if add_attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, H, W, C]."""
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    """`layers` resnets, then (except in the last block) a stride-2 downsampler."""

    def __init__(self, cin: int, cout: int, layers: int, add_downsample: bool, b: LayerBuilder):
        self.resnets = nnx.List(
            [ResnetBlock2D(cin if i == 0 else cout, cout, b) for i in range(layers)]
        )
        self.downsamplers = nnx.List([Downsample2D(cout, b)]) if add_downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nnx.Module):
    """`layers` resnets, then (except in the last block) a 2x upsampler."""

    def __init__(self, cin: int, cout: int, layers: int, add_upsample: bool, b: LayerBuilder):
        self.resnets = nnx.List(
            [ResnetBlock2D(cin if i == 0 else cout, cout, b) for i in range(layers)]
        )
        self.upsamplers = nnx.List([Upsample2D(cout, b)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nnx.Module):
    """Image [B, H, W, in] -> posterior moments [B, H/f, W/f, 2 * latent_channels]."""

    def __init__(self, cfg: Mapping[str, Any], b: LayerBuilder):
        channels = list(cfg["block_out_channels"])
        self.act = b.act
        self.conv_in = b.conv(cfg["in_channels"], channels[0])
        blocks, prev = [], channels[0]
        for i, cout in enumerate(channels):
            last = i == len(channels) - 1
            blocks.append(DownEncoderBlock2D(prev, cout, cfg["layers_per_block"], not last, b))
            prev = cout
        self.down_blocks = nnx.List(blocks)
        self.mid_block = UNetMidBlock2D(channels[-1], cfg["mid_block_add_attention"], b)
        self.conv_norm_out = b.norm(channels[-1])
        self.conv_out = b.conv(channels[-1], 2 * cfg["latent_channels"])  # double_z

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latent [B, h, w, latent_channels] -> image [B, h*f, w*f, out_channels]."""

    def __init__(self, cfg: Mapping[str, Any], b: LayerBuilder):
        channels = list(reversed(cfg["block_out_channels"]))
        self.act = b.act
        self.conv_in = b.conv(cfg["latent_channels"], channels[0])
        self.mid_block = UNetMidBlock2D(channels[0], cfg["mid_block_add_attention"], b)
        blocks, prev = [], channels[0]
        for i, cout in enumerate(channels):
            last = i == len(channels) - 1
            # The decoder has one resnet more per block than the encoder (diffusers).
            blocks.append(UpDecoderBlock2D(prev, cout, cfg["layers_per_block"] + 1, not last, b))
            prev = cout
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = b.norm(channels[-1])
        self.conv_out = b.conv(channels[-1], cfg["out_channels"])

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))
