"""The LPIPS v0.1 network (Zhang et al. 2018) in Flax NNX: backbones, normalisation, heads.

distance(x, y) = sum over taps l of mean_hw( w_l . (u(f_l(x)) - u(f_l(y)))^2 )

where f_l are the backbone activations after the ReLUs (VGG16: relu1_2, relu2_2,
relu3_3, relu4_3, relu5_3; AlexNet: the five conv ReLUs), u() scales each
spatial position's channel vector to unit length (eps 1e-10) and w_l >= 0 are
the learned 1x1 "linear heads". Inputs first go through LPIPS' ScalingLayer,
which for inputs in [-1, 1] is ImageNet mean/std normalisation.

This module holds the network only (random weights when built directly);
`metrics.lpips` loads real weights into it and is the metric's public API.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from unlearn_jax.models import convolution

NetName = Literal["vgg", "alex"]
InputRange = Literal["[0,1]", "[-1,1]"]

# ScalingLayer of LPIPS: for inputs in [-1, 1] this is (x' - mean) / std with
# x' = (x + 1) / 2 and ImageNet mean/std, written in the [-1, 1] frame.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10

_VGG_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_VGG_TAPS = (1, 3, 6, 9, 12)  # conv index whose ReLU is tapped
_VGG_POOL_AFTER = (1, 3, 6, 9)  # 2x2/2 max-pool after these convs (before the next one)

# AlexNet features of torchvision: (out, kernel, stride, pad) per conv.
_ALEX_CONVS = ((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))

_TAP_CHANNELS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}
_NET_ALIASES = {"vgg": "vgg", "vgg16": "vgg", "alex": "alex", "alexnet": "alex"}


def canonical_net(net: str) -> NetName:
    """'vgg'/'vgg16' -> 'vgg', 'alex'/'alexnet' -> 'alex' (case-insensitive); else ValueError."""
    try:
        return _NET_ALIASES[net.lower()]  # type: ignore[return-value]
    except KeyError:
        raise ValueError(f"unknown LPIPS backbone {net!r}; use 'vgg' or 'alex'") from None


def _conv(cin, cout, kernel, stride, pad, *, rngs, precision) -> nnx.Conv:
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=stride,
        # Explicit symmetric padding = PyTorch's Conv2d(padding=pad).
        padding=((pad, pad), (pad, pad)),
        precision=precision,
        # Small images leave maps smaller than the kernel (VGG's last block is 2x2 for
        # 32x32 images), which XLA:CPU runs as slow loop nests: 8x LPIPS-VGG's time.
        conv_general_dilated=convolution.conv_general_dilated,
        rngs=rngs,
    )


class VGG16Features(nnx.Module):
    """torchvision VGG16 `features` up to relu5_3; returns the five LPIPS taps."""

    def __init__(self, *, rngs: nnx.Rngs, precision: jax.lax.PrecisionLike = None):
        cins = (3, *_VGG_CHANNELS[:-1])
        self.convs = nnx.List(
            [
                _conv(cin, cout, 3, 1, 1, rngs=rngs, precision=precision)
                for cin, cout in zip(cins, _VGG_CHANNELS)
            ]
        )

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """x: [B, H, W, 3] scaled input -> 5 maps [B, h_l, w_l, C_l]."""
        taps = []
        for i, conv in enumerate(self.convs):
            x = jax.nn.relu(conv(x))
            if i in _VGG_TAPS:
                taps.append(x)
            if i in _VGG_POOL_AFTER:
                # VALID = PyTorch max_pool2d's default floor mode for odd sizes.
                x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        return taps


class AlexNetFeatures(nnx.Module):
    """torchvision AlexNet `features` (pools after conv 1 and 2); taps after each ReLU."""

    def __init__(self, *, rngs: nnx.Rngs, precision: jax.lax.PrecisionLike = None):
        cins = (3, *(c[0] for c in _ALEX_CONVS[:-1]))
        self.convs = nnx.List(
            [
                _conv(cin, cout, k, s, p, rngs=rngs, precision=precision)
                for cin, (cout, k, s, p) in zip(cins, _ALEX_CONVS)
            ]
        )

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """x: [B, H, W, 3] scaled input -> 5 maps [B, h_l, w_l, C_l]."""
        taps = []
        for i, conv in enumerate(self.convs):
            x = jax.nn.relu(conv(x))
            taps.append(x)
            if i < 2:
                x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
        return taps


def _unit_normalize(feat: jax.Array) -> jax.Array:
    norm = jnp.sqrt(jnp.sum(feat**2, axis=-1, keepdims=True))
    return feat / (norm + _EPS)


class LPIPS(nnx.Module):
    """LPIPS v0.1 distance; state paths `net.convs.{i}.{kernel,bias}`, `lins.{l}.kernel`.

    A freshly built module has random weights (tests); use `metrics.lpips.load_lpips`
    for real ones. Heads are initialised non-negative, as trained LPIPS heads are.
    """

    def __init__(
        self,
        net: str = "vgg",
        *,
        rngs: nnx.Rngs | None = None,
        precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
    ):
        # HIGHEST: a metric must not change with the accelerator's default
        # (bf16/TF32) matmul precision; on CPU it costs nothing.
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.net_name: NetName = canonical_net(net)
        features = VGG16Features if self.net_name == "vgg" else AlexNetFeatures
        self.net = features(rngs=rngs, precision=precision)
        self.lins = nnx.List(
            [
                nnx.Conv(
                    c,
                    1,
                    (1, 1),
                    use_bias=False,
                    precision=precision,
                    kernel_init=nnx.initializers.uniform(2.0 / c),
                    rngs=rngs,
                )
                for c in _TAP_CHANNELS[self.net_name]
            ]
        )

    def __call__(
        self, x: jax.Array, y: jax.Array, *, input_range: InputRange = "[0,1]"
    ) -> jax.Array:
        """LPIPS distance per image pair.

        Args:
          x, y: [B, H, W, 3] RGB images, in [0, 1] (default) or in [-1, 1]
            with `input_range="[-1,1]"` (the range the PyTorch `lpips` package
            takes). H, W >= 32 for VGG; AlexNet needs its first layers to fit.
        Returns:
          [B] float32 distances, >= 0; exactly 0 where x == y.
        """
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"expected two [B,H,W,3] images of equal shape, got {x.shape}, {y.shape}"
            )
        if input_range == "[0,1]":
            x, y = 2.0 * x - 1.0, 2.0 * y - 1.0
        elif input_range != "[-1,1]":
            raise ValueError(f"input_range must be '[0,1]' or '[-1,1]', got {input_range!r}")
        shift = jnp.asarray(_SHIFT, jnp.float32)
        scale = jnp.asarray(_SCALE, jnp.float32)
        pair = (jnp.stack([x, y]).astype(jnp.float32) - shift) / scale
        # One compiled body (backbone + normalisation) run twice by lax.map, not
        # two inlined copies or one concatenated batch: XLA fuses and tiles
        # those differently, and identical images then give ~1e-16 instead of
        # the exact 0 that the integrity metric promises for identical models.
        feats = jax.lax.map(lambda img: [_unit_normalize(f) for f in self.net(img)], pair)
        total = jnp.zeros(x.shape[0], jnp.float32)
        for (fx, fy), lin in zip(feats, self.lins):
            diff = (fx - fy) ** 2
            total = total + jnp.mean(lin(diff), axis=(1, 2, 3))
        return total
