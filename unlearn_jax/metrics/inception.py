"""The FID Inception's metric API: pytorch-fid's weights, loaded strictly, and features.

The network itself (the `inception-2015-12-05` TF graph as pytorch-fid ports
it, and its PyTorch-semantics resize) is `metrics.inception_net`; this module
loads pytorch-fid's weight file `pt_inception-2015-12-05-6726825d.pth` into it
by a strict key table (`Conv2d_1a_3x3.conv.weight`,
`Mixed_5b.branch1x1.bn.running_mean`, ...) and makes the feature extractor.

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

from unlearn_jax.metrics.inception_net import FID_INPUT_SIZE, FIDInceptionV3
from unlearn_jax.models.convert import WeightMismatchError, load_torch_state, param_keys
from unlearn_jax.models.weights import MissingWeightsError

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)

# images [B, H, W, 3] in [0, 1] -> features [B, D]. Any such function can feed
# `fid.fid_between_image_sets` (the embedded toy world plugs in its own).
FeatureExtractor = Callable[[jax.Array], jax.Array]

# NNX BatchStat leaf -> PyTorch buffer name.
_BN_STATS = {"mean": "running_mean", "var": "running_var"}
_BN_BUFFERS = (*_BN_STATS.values(), "num_batches_tracked")
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


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

    from unlearn_jax.atomic_files import atomic_path

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
    with atomic_path(out) as tmp:
        save_file(arrays, str(tmp), metadata={"format": "pt"})
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
