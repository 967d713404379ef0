"""The UNet's resolution stages in Flax NNX: `DownBlock2D`, `UNetMidBlock2DCrossAttn`, `UpBlock2D`.

Each stage is a list of `resnets` (`unet_blocks.ResnetBlock2D`), optional
`attentions` (`unet_transformer.Transformer2DModel`, for the `CrossAttn*`
block types) and an optional down/upsampler, with diffusers' attribute names
(`down_blocks.0.attentions.0...`, `up_blocks.1.upsamplers.0.conv`).

The stages are built from the resolved config of `unet.resolve_config` with two
entries the top-level model adds: `time_embed_dim` and `remat` (recompute each
resnet/transformer's activations in the backward pass). Layout is NHWC.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unlearn_jax.models.unet_blocks import Downsample2D, ResnetBlock2D, Upsample2D
from unlearn_jax.models.unet_transformer import Transformer2DModel


def _call(module: nnx.Module, *args: jax.Array) -> jax.Array:
    return module(*args)


# Rematerialised variant: activations of each resnet/transformer are recomputed
# in the backward pass instead of stored (training memory at SD scale).
_remat_call = nnx.remat(_call)


class _Block(nnx.Module):
    """Shared pieces of the down/mid/up blocks: `resnets`, optional `attentions`."""

    remat: bool

    def _apply(self, module: nnx.Module, *args: jax.Array) -> jax.Array:
        return (_remat_call if self.remat else _call)(module, *args)


def _transformer(cfg: dict, index: int, channels: int, kw: dict) -> Transformer2DModel:
    heads = cfg["heads"][index]
    return Transformer2DModel(
        heads,
        channels // heads,
        channels,
        num_layers=cfg["transformer_layers_per_block"][index],
        cross_attention_dim=cfg["cross_attention_dim"][index],
        norm_num_groups=cfg["norm_num_groups"],
        use_linear_projection=cfg["use_linear_projection"],
        upcast_attention=cfg["upcast_attention"],
        **kw,
    )


class DownBlock2D(_Block):
    """diffusers `DownBlock2D`, or `CrossAttnDownBlock2D` when `with_attention`.

    Returns the block output and the per-layer skips the up path consumes.
    """

    def __init__(self, cfg: dict, index: int, in_channels: int, with_attention: bool, kw: dict):
        out_channels = cfg["block_out_channels"][index]
        temb = cfg["time_embed_dim"]
        self.remat = cfg["remat"]
        resnet_kw = dict(groups=cfg["norm_num_groups"], eps=cfg["norm_eps"], **kw)
        num_layers = cfg["layers_per_block"][index]
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels, out_channels, temb, **resnet_kw
                )
                for i in range(num_layers)
            ]
        )
        if with_attention:
            self.attentions = nnx.List(
                [_transformer(cfg, index, out_channels, kw) for _ in range(num_layers)]
            )
        else:
            self.attentions = None
        if index < len(cfg["block_out_channels"]) - 1:
            self.downsamplers = nnx.List(
                [Downsample2D(out_channels, cfg["downsample_padding"], **kw)]
            )
        else:
            self.downsamplers = None

    def __call__(
        self, x: jax.Array, temb: jax.Array, context: jax.Array
    ) -> tuple[jax.Array, list[jax.Array]]:
        """x [B, H, W, C_in] -> ([B, H', W', C_out], skips: one per layer (+1 if downsampling))."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = self._apply(resnet, x, temb)
            if self.attentions is not None:
                x = self._apply(self.attentions[i], x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(_Block):
    """resnet, then (transformer, resnet) pairs; resnets scaled by `mid_block_scale_factor`."""

    def __init__(self, cfg: dict, kw: dict):
        channels = cfg["block_out_channels"][-1]
        self.remat = cfg["remat"]
        resnet = lambda: ResnetBlock2D(
            channels,
            channels,
            cfg["time_embed_dim"],
            groups=cfg["norm_num_groups"],
            eps=cfg["norm_eps"],
            output_scale_factor=cfg["mid_block_scale_factor"],
            **kw,
        )
        last = len(cfg["block_out_channels"]) - 1
        self.attentions = nnx.List([_transformer(cfg, last, channels, kw)])
        self.resnets = nnx.List([resnet(), resnet()])

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, H, W, C]."""
        x = self._apply(self.resnets[0], x, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            x = self._apply(attention, x, context)
            x = self._apply(resnet, x, temb)
        return x


class UpBlock2D(_Block):
    """diffusers `UpBlock2D`, or `CrossAttnUpBlock2D` when `with_attention`.

    `index` counts up blocks from the bottom of the UNet (0 = deepest).
    """

    def __init__(
        self, cfg: dict, index: int, prev_output_channel: int, with_attention: bool, kw: dict
    ):
        channels = list(reversed(cfg["block_out_channels"]))
        n = len(channels)
        out_channels = channels[index]
        skip_in = channels[min(index + 1, n - 1)]
        # Per-block options of the up path are the down path's, reversed.
        block = n - 1 - index
        num_layers = cfg["layers_per_block"][block] + 1
        self.remat = cfg["remat"]
        resnet_kw = dict(groups=cfg["norm_num_groups"], eps=cfg["norm_eps"], **kw)
        resnets = []
        for i in range(num_layers):
            skip_channels = skip_in if i == num_layers - 1 else out_channels
            in_channels = prev_output_channel if i == 0 else out_channels
            resnets.append(
                ResnetBlock2D(
                    in_channels + skip_channels, out_channels, cfg["time_embed_dim"], **resnet_kw
                )
            )
        self.resnets = nnx.List(resnets)
        if with_attention:
            self.attentions = nnx.List(
                [_transformer(cfg, block, out_channels, kw) for _ in range(num_layers)]
            )
        else:
            self.attentions = None
        self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)]) if index < n - 1 else None

    def __call__(
        self,
        x: jax.Array,
        skips: Sequence[jax.Array],
        temb: jax.Array,
        context: jax.Array,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        """x [B, H, W, C], skips (consumed last first) -> [B, 2H, 2W, C_out] (or upsample_size)."""
        skips = list(skips)
        for i, resnet in enumerate(self.resnets):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = self._apply(resnet, x, temb)
            if self.attentions is not None:
                x = self._apply(self.attentions[i], x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x
