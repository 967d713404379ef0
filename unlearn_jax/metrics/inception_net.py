"""The FID Inception-v3 graph (TF 2015, as ported by pytorch-fid) in Flax NNX.

FID numbers are only comparable when they come from this exact network: the
`inception-2015-12-05` TensorFlow graph, which differs from torchvision's
Inception-v3 in its weights, its 1008-way classifier, the average pools of the
A/C/E_1 blocks that ignore zero padding (`count_include_pad=False`) and a
max-pool (not an average pool) in the pool branch of Mixed_7c. pytorch-fid's
`fid_inception_v3()` patches torchvision's model into that graph; this module
rebuilds the same graph with the same attribute names (`Conv2d_1a_3x3.conv`,
`Mixed_5b.branch1x1.bn`, ...), so that pytorch-fid's state dict maps onto it
key by key (`metrics.inception` loads it).

It holds the network and the PyTorch-semantics operations it needs: the
bilinear resize of `F.interpolate(align_corners=False)` (no antialiasing) and
the pools. Everything runs in float32 with HIGHEST conv/matmul precision, so
the features do not depend on an accelerator's default bf16/TF32 arithmetic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FID_INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TF graph's classifier; unused for FID features

_HIGHEST = jax.lax.Precision.HIGHEST

# ----------------------------------------------------------------------------
# Resize and pooling with PyTorch semantics
# ----------------------------------------------------------------------------


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weight of i1 for PyTorch's align_corners=False.

    src = (dst + 0.5) * in/out - 0.5, clamped below at 0 (PyTorch's
    `area_pixel_compute_source_index`); each output blends only its two
    neighbours, whatever the scale, i.e. no antialiasing on downsampling.
    """
    # Bit-exact with PyTorch's CPU kernel for float32 images: the scale is
    # rounded to float32 and src is one fused multiply-add, i.e. computed
    # exactly (float64 holds the product of a float32 and a small half-integer)
    # and rounded once to float32. Plain float32 or float64 arithmetic moves
    # the weights by up to ~1e-5 at large indices.
    scale = np.float64(np.float32(in_size / out_size))
    src = (scale * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(src.astype(np.int32), in_size - 1)  # truncation = floor for src >= 0
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0))


def resize_bilinear_torch(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """`F.interpolate(x, size, mode="bilinear", align_corners=False)` on NHWC arrays.

    jax.image.resize('bilinear') antialiases when downsampling, so it differs
    from PyTorch (and from pytorch-fid's FID) for inputs larger than 299.

    Args:
      images: [B, H, W, C] float.
      size: (out_h, out_w).
    Returns:
      [B, out_h, out_w, C], same dtype.
    """
    _, h, w, _ = images.shape
    out_h, out_w = size
    if (h, w) == (out_h, out_w):
        return images  # PyTorch's weights are then exactly (1, 0): the identity
    y0, y1, wy = _linear_taps(h, out_h)
    x0, x1, wx = _linear_taps(w, out_w)
    wy = jnp.asarray(wy, images.dtype)[None, :, None, None]
    wx = jnp.asarray(wx, images.dtype)[None, None, :, None]
    # Separable: blend along the width, then along the height.
    rows = images[:, :, x0] * (1 - wx) + images[:, :, x1] * wx
    return rows[:, y0] * (1 - wy) + rows[:, y1] * wy


def _avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3/1 average pool, padding 1, dividing by the number of real pixels.

    This is TF's 'SAME' average pool = PyTorch `count_include_pad=False`.
    """
    window, strides, pad = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pad)
    return total / count


def _max_pool(x: jax.Array, size: int, stride: int, pad: int = 0) -> jax.Array:
    # -inf padding: PyTorch's max_pool2d never picks a padded position.
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, size, size, 1), (1, stride, stride, 1), padding
    )


# ----------------------------------------------------------------------------
# Blocks (attribute names = pytorch-fid / torchvision state-dict keys)
# ----------------------------------------------------------------------------


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else v


class BasicConv2d(nnx.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, running stats) -> ReLU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        *,
        rngs: nnx.Rngs,
    ):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(
            cin,
            cout,
            _pair(kernel),
            strides=stride,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=_HIGHEST,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=1e-3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class InceptionA(nnx.Module):
    """Mixed_5b/c/d: 1x1 | 5x5 | double 3x3 | avg-pool(excl. pad) + 1x1."""

    def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([self.branch1x1(x), b5, b3, pool], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a (grid reduction): 3x3/2 | double 3x3 (/2) | max-pool 3x3/2."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, _max_pool(x, 3, 2)], axis=-1)


class InceptionC(nnx.Module):
    """Mixed_6b..e: 1x1 | 1x7,7x1 | double 7x1,1x7 | avg-pool(excl. pad) + 1x1."""

    def __init__(self, cin: int, channels_7x7: int, *, rngs: nnx.Rngs):
        c7 = channels_7x7
        row, col = dict(padding=(0, 3)), dict(padding=(3, 0))  # 1x7 and 7x1 convs
        self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), **row, rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), **col, rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), **col, rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), **row, rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), **col, rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), **row, rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            d = layer(d)
        d = self.branch7x7dbl_5(d)
        pool = self.branch_pool(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([self.branch1x1(x), b7, d, pool], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a (grid reduction): 1x1,3x3/2 | 1x1,1x7,7x1,3x3/2 | max-pool 3x3/2."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return jnp.concatenate([b3, b7, _max_pool(x, 3, 2)], axis=-1)


class InceptionE(nnx.Module):
    """Mixed_7b/c: 1x1 | 1x1,(1x3|3x1) | 1x1,3x3,(1x3|3x1) | pool + 1x1.

    `pool="avg"` (Mixed_7b, FIDInceptionE_1): average pool excluding padding;
    `pool="max"` (Mixed_7c, FIDInceptionE_2): the TF graph's 3x3/1 max-pool.
    """

    def __init__(self, cin: int, pool: str, *, rngs: nnx.Rngs):
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool_3x3_exclude_pad(x) if self.pool == "avg" else _max_pool(x, 3, 1, 1)
        branches = [
            self.branch1x1(x),
            self.branch3x3_2a(b3),
            self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d),
            self.branch3x3dbl_3b(d),
            self.branch_pool(pooled),
        ]
        return jnp.concatenate(branches, axis=-1)


class FIDInceptionV3(nnx.Module):
    """pytorch-fid's `fid_inception_v3()` graph; `__call__` returns pool3 features.

    A freshly built module has random weights (tests); use `inception.load_fid_inception`
    for the real ones.
    """

    def __init__(self, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, pool_features=32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, pool_features=64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, pool_features=64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, channels_7x7=128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, channels_7x7=160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, channels_7x7=160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, channels_7x7=192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, pool="avg", rngs=rngs)
        self.Mixed_7c = InceptionE(2048, pool="max", rngs=rngs)
        # Only here so that the weight file loads strictly; FID ignores it.
        self.fc = nnx.Linear(FEATURE_DIM, NUM_CLASSES, precision=_HIGHEST, rngs=rngs)

    def __call__(self, images: jax.Array, resize_to: int | None = FID_INPUT_SIZE) -> jax.Array:
        """images [B, H, W, 3] in [0, 1] -> pool3 features [B, 2048] float32.

        Args:
          images: RGB, NHWC, values in [0, 1].
          resize_to: side length of the bilinear resize (299 for FID; smaller
            values only for tests; None feeds the images as they are, which
            must be at least 75x75).
        """
        x = jnp.asarray(images, jnp.float32)
        if resize_to is not None:
            x = resize_bilinear_torch(x, (resize_to, resize_to))
        x = 2.0 * x - 1.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool(x, 3, 2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = _max_pool(x, 3, 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a):
            x = block(x)
        for block in (self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = block(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return jnp.mean(x, axis=(1, 2))

    def logits(self, features: jax.Array) -> jax.Array:
        """pool3 features [B, 2048] -> the TF graph's 1008 class logits [B, 1008]."""
        return self.fc(features)
