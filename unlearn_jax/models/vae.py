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

This module holds the config handling, the posterior (`DiagonalGaussian`), the
`AutoencoderKL` wrapper and `normalize_vae_keys` for old checkpoints; the
`Encoder`/`Decoder` and their blocks are in `vae_blocks`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from unlearn_jax.models.activations import gelu
from unlearn_jax.models.config import FrozenConfig
from unlearn_jax.models.vae_blocks import Decoder, Encoder, LayerBuilder

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
    "gelu": gelu,  # torch nn.GELU() is the erf form
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
        b = LayerBuilder(
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
