"""The FID Inception-v3 (TF 2015 graph, as ported by pytorch-fid) in Flax NNX.

FID numbers are only comparable when they come from this exact network: the
`inception-2015-12-05` TensorFlow graph, which differs from torchvision's
Inception-v3 in its weights, its 1008-way classifier, the average pools of the
A/C/E_1 blocks that ignore zero padding (`count_include_pad=False`) and a
max-pool (not an average pool) in the pool branch of Mixed_7c. pytorch-fid's
`fid_inception_v3()` patches torchvision's model into that graph; this module
rebuilds the same graph with the same attribute names, so that pytorch-fid's
weight file `pt_inception-2015-12-05-6726825d.pth` loads by a strict key table
(`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, ...).

Public API (images NHWC, RGB, float in [0, 1]):

  model = load_fid_inception("pt_inception-2015-12-05-6726825d.pth", allow_pickle=True)
  convert_fid_inception("pt_inception-....pth", "fid_inception.safetensors")  # once
  model = load_fid_inception("fid_inception.safetensors")      # no pickle needed
  features = make_inception_features(model)   # jitted: [B, H, W, 3] -> [B, 2048]

Preprocessing is pytorch-fid's: bilinear resize to 299x299 with PyTorch's
`F.interpolate(mode="bilinear", align_corners=False)` semantics (no
antialiasing, also when downsampling), then `2x - 1`. Everything runs in
float32 with HIGHEST conv/matmul precision, so the features do not depend on
an accelerator's default bf16/TF32 arithmetic.

BatchNorm: an `nnx.BatchNorm` in inference mode (eps 1e-3) per conv; the
parameters (`weight`, `bias`) go through the generic converter, the running
statistics (`running_mean`, `running_var`, NNX `BatchStat`s `mean`/`var`) are
loaded here with the same strictness; `num_batches_tracked` is ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.models.convert import WeightMismatchError, load_torch_state, param_keys
from unlearn_jax.models.weights import MissingWeightsError

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
FID_INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TF graph's classifier; unused for FID features

# images [B, H, W, 3] in [0, 1] -> features [B, D]. Any such function can feed
# `fid.fid_between_image_sets` (the embedded toy world plugs in its own).
FeatureExtractor = Callable[[jax.Array], jax.Array]

_HIGHEST = jax.lax.Precision.HIGHEST
# NNX BatchStat leaf -> PyTorch buffer name.
_BN_STATS = {"mean": "running_mean", "var": "running_var"}
_BN_BUFFERS = (*_BN_STATS.values(), "num_batches_tracked")
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

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

    A freshly built module has random weights (tests); use `load_fid_inception`
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


# ----------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------


def _bn_stat_vars(model: nnx.Module) -> dict[str, nnx.Variable]:
    """PyTorch key (`...bn.running_mean|running_var`) -> the NNX BatchStat variable."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
        *head, leaf = (str(p) for p in path)
        out[".".join([*head, _BN_STATS[leaf]])] = var
    return out


def _read_tensors(path: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise MissingWeightsError(
            f"FID Inception weights not found: {path}. No package ships them; download "
            f"pytorch-fid's release file {FID_WEIGHTS_URL} and pass its path "
            "(then convert_fid_inception(pth, 'fid_inception.safetensors') for a "
            "pickle-free copy)."
        )
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    if path.suffix not in _PICKLE_SUFFIXES:
        raise ValueError(f"{path}: expected a .safetensors or a PyTorch .pth file")
    if not allow_pickle:
        raise MissingWeightsError(
            f"{path} is a PyTorch pickle; unpickling can run arbitrary code, so it is "
            "refused by default. Fix: if you trust the file, pass allow_pickle=True, or "
            "convert it once with convert_fid_inception(pth, out_safetensors) and load that."
        )
    import torch  # only needed for .pth files

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in state.items()}


def _check_bn_stats(model: nnx.Module, tensors: Mapping[str, np.ndarray], source: str) -> None:
    expected = _bn_stat_vars(model)
    given = {k for k in tensors if k.endswith(tuple(_BN_STATS.values()))}
    missing, unexpected = sorted(set(expected) - given), sorted(given - set(expected))
    bad = [
        f"{k}: file has {np.shape(tensors[k])}, model expects {expected[k].get_value().shape}"
        for k in sorted(set(expected) & given)
        if np.shape(tensors[k]) != expected[k].get_value().shape
    ]
    if missing or unexpected or bad:
        raise WeightMismatchError(
            f"{source} is not the FID Inception's state dict: "
            f"missing BN statistics {missing[:10]} ({len(missing)}), "
            f"unexpected {unexpected[:10]} ({len(unexpected)}), wrong shapes {bad[:10]}."
        )


def load_fid_inception_state(
    model: FIDInceptionV3, tensors: Mapping[str, np.ndarray], *, source: str = "weights"
) -> None:
    """Loads a pytorch-fid state dict (key -> array) into `model`, in place and strictly."""
    _check_bn_stats(model, tensors, source)
    is_buffer = lambda k: k.endswith(_BN_BUFFERS)
    load_torch_state(model, tensors, source=source, ignore=is_buffer, dtype=jnp.float32)
    for key, var in _bn_stat_vars(model).items():
        var.set_value(jnp.asarray(tensors[key], jnp.float32))


def load_fid_inception(path: str | Path, *, allow_pickle: bool = False) -> FIDInceptionV3:
    """Builds the FID Inception and loads `pt_inception-2015-12-05-6726825d.pth` into it.

    Args:
      path: pytorch-fid's `.pth` (needs `allow_pickle=True` and torch) or its
        safetensors conversion (see `convert_fid_inception`).
      allow_pickle: permit reading a pickled `.pth` (torch.load(weights_only=True)).
    Raises:
      MissingWeightsError: no such file (the message says where to get it), or
        a pickle without opt-in.
      WeightMismatchError: the file is not this network's state dict.
    """
    path = Path(path)
    tensors = _read_tensors(path, allow_pickle)
    model = FIDInceptionV3(rngs=nnx.Rngs(0))
    load_fid_inception_state(model, tensors, source=str(path))
    return model


def convert_fid_inception(pth: str | Path, out_safetensors: str | Path) -> Path:
    """Writes pytorch-fid's pickled `.pth` as a safetensors file (same keys, OIHW layout).

    The key set is checked against the model first, so the wrong file (e.g.
    torchvision's Inception) is refused before anything is written.
    """
    from safetensors.numpy import save_file

    pth, out = Path(pth), Path(out_safetensors)
    tensors = _read_tensors(pth, allow_pickle=True)
    abstract = nnx.eval_shape(lambda: FIDInceptionV3(rngs=nnx.Rngs(0)))
    _check_bn_stats(abstract, tensors, str(pth))
    expected = set(param_keys(abstract))
    given = {k for k in tensors if not k.endswith(_BN_BUFFERS)}
    if expected != given:
        raise WeightMismatchError(
            f"{pth} is not the FID Inception's state dict: missing "
            f"{sorted(expected - given)[:10]}, unexpected {sorted(given - expected)[:10]}."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(arrays, str(out), metadata={"format": "pt"})
    return out


def make_inception_features(
    model: FIDInceptionV3, *, resize_to: int | None = FID_INPUT_SIZE
) -> FeatureExtractor:
    """A jitted FeatureExtractor: images [B, H, W, 3] in [0, 1] -> [B, 2048] float32.

    The weights are a jit argument, not a closure constant, so they are not
    baked into (and copied by) every compiled executable. Each new input shape
    compiles once; feed fixed-size batches (`fid_between_image_sets` does).
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def features(state: nnx.State, images: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(images, resize_to=resize_to)

    return lambda images: features(state, jnp.asarray(images, jnp.float32))
