"""The device mesh of the train loop and the shardings of its arrays.

One 2-D mesh with axes ('data', 'fsdp') (`mesh.data` x `mesh.fsdp` devices):

  * the batch is split over both axes (every device sees different examples);
  * parameters, optimizer state and the frozen θ0 are either replicated
    (`mesh.fsdp == 1`, plain data parallelism) or sharded over 'fsdp' along
    the largest dimension that divides evenly (ZeRO-3/FSDP style: XLA gathers
    each weight where it is used and reduce-scatters its gradient).

The rule depends only on an array's shape, so a parameter, its Adam moments
and its saliency mask always get the same sharding.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any
MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# Arrays smaller than this stay replicated under FSDP: sharding biases and
# norms saves nothing and costs a collective each.
MIN_FSDP_SIZE = 2**14


def make_mesh(data: int = -1, fsdp: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh of data x fsdp devices; -1 means all remaining devices.

    Explicit sizes whose product is smaller than the device count use the first
    data x fsdp devices (e.g. data=1, fsdp=1 for a single-device reference run).

    Raises:
      ValueError: when both are -1, or the sizes do not fit the devices.
    """
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh.data and mesh.fsdp cannot both be -1; set one of them")
    if data == -1:
        data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
    if fsdp == -1:
        fsdp = n // data if data > 0 and n % data == 0 else 0
    if data < 1 or fsdp < 1 or data * fsdp > n:
        raise ValueError(
            f"mesh.data x mesh.fsdp must fit the {n} devices; got data={data}, fsdp={fsdp}. "
            f"Fix: e.g. --config.mesh.data=-1 --config.mesh.fsdp=1 (data parallel on all) or "
            f"--config.mesh.data=1 --config.mesh.fsdp=-1 (FSDP over all)."
        )
    grid = mesh_utils.create_device_mesh((data, fsdp), devices=devices[: data * fsdp])
    return Mesh(grid, MESH_AXES)


def batch_devices(mesh: Mesh) -> int:
    """How many ways the batch is split (data x fsdp)."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def param_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
    """Replicated, or sharded over 'fsdp' along the largest dimension divisible by `fsdp`.

    Ties go to the later dimension (the output channels of a kernel).
    """
    if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < MIN_FSDP_SIZE:
        return PartitionSpec()
    candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return PartitionSpec()
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return PartitionSpec(*spec)


def param_shardings(mesh: Mesh, tree: PyTree) -> PyTree:
    """NamedSharding per array leaf of `tree` (arrays or ShapeDtypeStructs) by `param_spec`."""
    fsdp = mesh.shape["fsdp"]

    def one(leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, param_spec(shape, fsdp))

    return jax.tree.map(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, leading_dims: int = 1) -> NamedSharding:
    """Examples split over ('data', 'fsdp') on axis `leading_dims - 1`; earlier axes whole.

    `leading_dims=2` is for [micro_steps, micro_batch, ...] arrays of gradient accumulation.
    """
    return NamedSharding(mesh, PartitionSpec(*([None] * (leading_dims - 1)), BATCH_AXES))


def put_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array from a host array every process holds in full.

    Works on one host and on many (each process fills its addressable shards).
    """
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
