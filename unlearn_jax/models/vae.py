"""The Stable Diffusion VAE (diffusers `AutoencoderKL`) as a Flax NNX module.

Attribute names follow diffusers exactly (`encoder.down_blocks.0.resnets.0.conv1`,
`encoder.mid_block.attentions.0.to_out.0`, `quant_conv`, ...), so that
`convert.load_torch_state` maps a diffusers `vae/diffusion_pytorch_model.safetensors`
onto this module by a strict table. Layout is NHWC throughout: images are
`[B, H, W, 3]` in [-1, 1] and latents `[B, H/f, W/f, latent_channels]` with
`f = 2 ** (len(block_out_channels) - 1)`; diffusers' NCHW arrays need a transpose.

Latents are unscaled: the diffusion model works on `z * scaling_factor`, so callers
multiply after `encode` and divide before `decode`, as diffusers' pipelines do.

Only the SD-family configuration is implemented (DownEncoderBlock2D /
UpDecoderBlock2D, group norm). Anything else raises a ValueError that names it
rather than silently building a different network.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from unlearn_jax.models.attention import dot_product_attention
from unlearn_jax.models.config import FrozenConfig

_EPS = 1e-6  # diffusers hard-codes this for every VAE norm.

_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU() is the erf form
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}


@struct.dataclass
class DiagonalGaussian:
    """The encoder posterior N(mean, exp(logvar)), a pytree that can leave `jit`.

    Attributes:
      mean: [B, h, w, C] latent means (unscaled).
      logvar: [B, h, w, C] log-variances, already clipped to [-30, 20] like diffusers.
    """

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """A reparameterized draw, [B, h, w, C]."""
        noise = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> jax.Array:
        """The most likely latent (the mean), [B, h, w, C]."""
        return self.mean

    def kl(self) -> jax.Array:
        """KL(self || N(0, I)) summed over latent dims, [B]."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


def _parse_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Fills diffusers' defaults and rejects options this port does not implement."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _DEFAULTS)
    if unknown:
        raise ValueError(
            f"AutoencoderKL config has options this port does not implement: {unknown}. "
            f"Supported: {sorted(_DEFAULTS)}."
        )
    cfg = {**_DEFAULTS, **dict(config)}
    channels = tuple(cfg["block_out_channels"])
    for key, allowed in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        bad = [t for t in cfg[key] if t != allowed]
        if bad:
            raise ValueError(f"AutoencoderKL {key} {bad} are not supported (only {allowed}).")
        if len(cfg[key]) != len(channels):
            raise ValueError(
                f"AutoencoderKL {key} has {len(cfg[key])} entries but block_out_channels "
                f"has {len(channels)}; they must match."
            )
    if cfg["act_fn"] not in _ACTIVATIONS:
        raise ValueError(
            f"AutoencoderKL act_fn {cfg['act_fn']!r} is not supported ({sorted(_ACTIVATIONS)})."
        )
    groups = cfg["norm_num_groups"]
    bad_groups = [c for c in channels if c % groups]
    if bad_groups:
        raise ValueError(
            f"AutoencoderKL norm_num_groups={groups} does not divide block_out_channels "
            f"{bad_groups}."
        )
    return cfg


class _Builder:
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

    def norm(self, channels: int) -> nnx.GroupNorm:
        # Two-pass variance, like torch: E[x^2]-E[x]^2 loses digits on activations
        # with a large mean. Statistics are computed in float32 whatever `dtype`.
        return nnx.GroupNorm(
            channels,
            num_groups=self.groups,
            epsilon=_EPS,
            use_fast_variance=False,
            rngs=self.rngs,
            **self.dtypes,
        )


class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D without time embedding: x + conv(act(norm(conv(act(norm(x))))))."""

    def __init__(self, cin: int, cout: int, b: _Builder):
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

    def __init__(self, channels: int, b: _Builder):
        self.conv = b.conv(channels, channels, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]."""
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int, b: _Builder):
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

    def __init__(self, channels: int, b: _Builder):
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

    def __init__(self, channels: int, add_attention: bool, b: _Builder):
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

    def __init__(self, cin: int, cout: int, layers: int, add_downsample: bool, b: _Builder):
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

    def __init__(self, cin: int, cout: int, layers: int, add_upsample: bool, b: _Builder):
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

    def __init__(self, cfg: Mapping[str, Any], b: _Builder):
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

    def __init__(self, cfg: Mapping[str, Any], b: _Builder):
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


class AutoencoderKL(nnx.Module):
    """diffusers `AutoencoderKL`, NHWC, built from the dict of `vae/config.json`.

    Attributes:
      config: the config dict with diffusers' defaults filled in.
      scaling_factor: multiply latents by it before diffusion, divide before decode.
      force_upcast: the checkpoint asks to be run in float32 (build with dtype=float32).
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        cfg = _parse_config(config)
        self.config = FrozenConfig(cfg)
        self.scaling_factor = float(cfg["scaling_factor"])
        self.force_upcast = bool(cfg["force_upcast"])
        self.dtype = dtype
        b = _Builder(
            groups=cfg["norm_num_groups"],
            act=_ACTIVATIONS[cfg["act_fn"]],
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        latent2 = 2 * cfg["latent_channels"]
        self.encoder = Encoder(cfg, b)
        self.decoder = Decoder(cfg, b)
        self.quant_conv = b.conv(latent2, latent2, 1, padding=0) if cfg["use_quant_conv"] else None
        latent = cfg["latent_channels"]
        self.post_quant_conv = (
            b.conv(latent, latent, 1, padding=0) if cfg["use_post_quant_conv"] else None
        )

    def _check_input(self, x: jax.Array, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(
                f"AutoencoderKL.{what} expects NHWC input [B, H, W, {channels}], got shape "
                f"{tuple(x.shape)}. (diffusers arrays are NCHW: transpose with (0, 2, 3, 1).)"
            )

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Images [B, H, W, in_channels] in [-1, 1] -> posterior over [B, H/f, W/f, C] latents."""
        self._check_input(x, self.config["in_channels"], "encode")
        moments = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        # Same channel order as torch.chunk(moments, 2, dim=1): means first.
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return DiagonalGaussian(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels]."""
        self._check_input(z, self.config["latent_channels"], "decode")
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruction [B, H, W, out] of a posterior draw (with `key`) or of its mode."""
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z)


_OLD_ATTENTION = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_NAME = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def normalize_vae_keys(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames the pre-0.14 diffusers VAE attention keys to the current ones.

    `...attentions.0.{query,key,value,proj_attn}.*` become `...{to_q,to_k,to_v,to_out.0}.*`;
    every other key passes unchanged. Old files sometimes store these projections as
    1x1 convs ([C, C, 1, 1]); `convert.load_torch_state` accepts that shape as is.

    Raises:
      ValueError: if a file holds both the old and the new name of one tensor.
    """
    out: dict[str, np.ndarray] = {}
    renamed: dict[str, str] = {}
    for key, value in tensors.items():
        match = _OLD_ATTENTION.match(key)
        if match:
            prefix, old, leaf = match.groups()
            new = f"{prefix}{_NEW_NAME[old]}.{leaf}"
            renamed[new] = key
            key = new
        if key in out:
            raise ValueError(
                f"VAE weights hold both {renamed.get(key, key)!r} (old name) and {key!r}; "
                "keep only one of them."
            )
        out[key] = value
    return out
