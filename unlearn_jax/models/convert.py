"""Strict, torch-free conversion between PyTorch state dicts and Flax NNX state.

Our NNX modules name their attributes exactly like diffusers/transformers and
hold sub-module lists in `nnx.List`, so the NNX state path
`down_blocks.0.resnets.0.conv1.kernel` *is* the PyTorch key
`down_blocks.0.resnets.0.conv1.weight` with the leaf renamed. The conversion is
therefore a bijective table derived from the module itself:

  Linear  weight (out, in)       <-> kernel (in, out)
  Conv2d  weight (O, I, H, W)    <-> kernel (H, W, I, O)
  Norm    weight                 <-> scale
  Embed   weight                 <-> embedding
  bias and every other leaf      <-> unchanged

Any missing, unexpected or wrong-shaped tensor is an error that lists names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


class WeightMismatchError(ValueError):
    """The weights on disk do not match the module built from its config."""


def path_to_key(path: tuple) -> str:
    """The PyTorch key of an NNX parameter path (`...conv1.kernel` -> `...conv1.weight`)."""
    *head, leaf = (str(p) for p in path)
    return ".".join([*head, _LEAF_TO_TORCH.get(leaf, leaf)])


def _torch_to_flax_layout(leaf: str, array: np.ndarray, flax_ndim: int) -> np.ndarray:
    if leaf != "kernel":
        return array
    if array.ndim == 4 and flax_ndim == 2 and array.shape[2:] == (1, 1):
        # Very old VAE checkpoints store attention projections as 1x1 convs.
        array = array[:, :, 0, 0]
    if array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if array.ndim == 2:
        return array.T
    return array


def _flax_to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf != "kernel":
        return array
    if array.ndim == 4:
        return np.transpose(array, (3, 2, 0, 1))
    if array.ndim == 2:
        return array.T
    return array


def param_keys(module: nnx.Module) -> dict[str, tuple]:
    """Maps each PyTorch key the module expects to its NNX state path."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {path_to_key(path): path for path, _ in flat}


def format_names(names: Iterable[str], limit: int = 20) -> str:
    """The first `limit` sorted names, comma-separated, and how many more there are."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return shown + more


def load_torch_state(
    module: nnx.Module,
    tensors: Mapping[str, np.ndarray],
    *,
    source: str = "weights",
    ignore: Callable[[str], bool] | None = None,
    dtype: jnp.dtype | None = None,
) -> None:
    """Loads a PyTorch-layout state dict into `module`, in place and strictly.

    Args:
      module: an NNX module whose attribute paths follow the PyTorch names.
      tensors: PyTorch key -> array (any float dtype, e.g. fp16/bf16 files).
      source: what to call the tensors in error messages (usually a file path).
      ignore: keys in `tensors` to skip (buffers such as CLIP `position_ids`).
      dtype: parameter dtype to load into; default: the module's own dtypes.

    Raises:
      WeightMismatchError: listing missing, unexpected and wrong-shaped tensors.
    """
    expected = param_keys(module)
    given = {k for k in tensors if not (ignore and ignore(k))}
    missing = set(expected) - given
    unexpected = given - set(expected)
    flat = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    bad_shapes = []
    new_values = {}
    for key in sorted(set(expected) & given):
        path = expected[key]
        var = flat[path]
        current = var.get_value()
        array = _torch_to_flax_layout(str(path[-1]), np.asarray(tensors[key]), current.ndim)
        if tuple(array.shape) != tuple(current.shape):
            torch_shape = tuple(np.asarray(tensors[key]).shape)
            want = tuple(
                _flax_to_torch_layout(str(path[-1]), np.zeros(current.shape, np.int8)).shape
            )
            bad_shapes.append(f"{key}: file has {torch_shape}, config expects {want}")
            continue
        new_values[path] = array
    if missing or unexpected or bad_shapes:
        lines = [f"{source} do not match the model built from its config.json:"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): {format_names(missing)}")
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): {format_names(unexpected)}")
        if bad_shapes:
            lines.append(f"  wrong shapes ({len(bad_shapes)}):")
            lines.extend(f"    {s}" for s in bad_shapes[:20])
        lines.append(
            "  Fix: point to the weights that belong to this config.json (same "
            "model variant), or fix the config so it describes these weights."
        )
        raise WeightMismatchError("\n".join(lines))
    for path, array in new_values.items():
        var = flat[path]
        target = dtype if dtype is not None else var.get_value().dtype
        var.set_value(jnp.asarray(array, dtype=target))


def to_torch_state(module: nnx.Module, dtype: np.dtype | None = None) -> dict[str, np.ndarray]:
    """Returns the module's parameters as a PyTorch-layout state dict of numpy arrays."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        array = np.asarray(var.get_value())
        if dtype is not None:
            array = array.astype(dtype)
        torch_layout = _flax_to_torch_layout(str(path[-1]), array)
        # ascontiguousarray promotes 0-d arrays to 1-d; keep scalars (CLIP logit_scale) scalar.
        out[path_to_key(path)] = np.ascontiguousarray(torch_layout).reshape(torch_layout.shape)
    return out
