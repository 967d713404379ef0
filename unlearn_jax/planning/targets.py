"""Compile-only TPU devices: plan for a TPU slice on a machine without one.

libtpu (the TPU compiler and runtime, `pip install "jax[tpu]"`) can describe a slice by
its topology name and hand out compile-only devices for it; programs jitted on a mesh of
those devices compile with the TPU compiler, and their memory analysis is the TPU's own
buffer assignment (tiling, fusion, scheduling), not XLA:CPU's estimate. Nothing can run
on them.

    python -m unlearn_jax.planning --tpu v5e:2x4 --mesh 1x8 --dtype bfloat16 --only train
"""

from __future__ import annotations

import math
import os
import re

# Topology name prefix -> (the chip in planning.models.CHIPS, chip config). v4 and v5p
# run one device per chip ("megacore": the chip's two TensorCores as one device), as
# JAX uses them by default; v5e and v6e have one TensorCore per chip.
TPU_GENERATIONS = {
    "v4": ("TPU v4", "megacore"),
    "v5p": ("TPU v5p", "megacore"),
    "v5e": ("TPU v5e", None),
    "v6e": ("TPU v6e", None),
}
_DEFAULT_HOST_BOUNDS = (2, 2, 1)
_TOPOLOGY = re.compile(r"^(v4|v5p|v5e|v6e):(\d+(x\d+){1,2})$")
# libtpu looks for a TPU VM's metadata when it loads; these name a local, single-host
# machine so that it does not (and does not print warnings about it). It also takes a
# lock file that lets one process use the chips; compile-only devices use none, so
# several plans may run at once.
_QUIET_LIBTPU = {
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_ACCELERATOR_TYPE": "v5litepod-8",
    "TF_CPP_MIN_LOG_LEVEL": "3",
}


def tpu_chip(topology: str) -> str:
    """The `planning.models.CHIPS` name of a topology's chip ('v5e:2x4' -> 'TPU v5e')."""
    return TPU_GENERATIONS[_parse(topology)[0]][0]


def tpu_chip_count(topology: str) -> int:
    """Chips in a topology ('v5e:2x4' -> 8): one device each (megacore on v4 and v5p)."""
    return math.prod(_dims(_parse(topology)[1]))


def _dims(shape: str) -> list[int]:
    """'2x4' -> [2, 4, 1]: chips per axis, three axes."""
    dims = [int(n) for n in shape.split("x")]
    return dims + [1] * (3 - len(dims))


def _parse(topology: str) -> tuple[str, str]:
    match = _TOPOLOGY.match(topology.strip().lower())
    if match is None:
        raise ValueError(
            f"--tpu {topology!r}: expected GENERATION:SHAPE with GENERATION one of "
            f"{', '.join(TPU_GENERATIONS)} and SHAPE the slice's chips per axis, e.g. "
            "v5e:2x4 (8 chips), v6e:2x2, v4:2x2x1 (4 chips), v5p:2x2x2"
        )
    return match.group(1), match.group(2)


def tpu_devices(topology: str) -> list:
    """Compile-only devices of a TPU slice, one per chip (megacore on v4 and v5p).

    Raises:
      ValueError: a malformed topology, libtpu missing, or one it does not know, each
        naming the fix.
    """
    generation, shape = _parse(topology)
    try:
        import libtpu  # noqa: F401  (only to give the fix when it is missing)
    except ImportError:
        raise ValueError(
            "--tpu needs libtpu, the TPU compiler, in this environment. Fix: pip install "
            "\"jax[tpu]==$(python -c 'import jax; print(jax.__version__)')\" (the libtpu "
            "that matches this JAX; it runs on machines without a TPU for planning)"
        ) from None
    for name, value in _QUIET_LIBTPU.items():
        os.environ.setdefault(name, value)
    from jax.experimental import topologies

    chip_config = TPU_GENERATIONS[generation][1]
    options = {"chip_config_name": chip_config} if chip_config else {}
    # libtpu's default host holds 2x2x1 chips; a smaller slice is one smaller host.
    host = [min(d, h) for d, h in zip(_dims(shape), _DEFAULT_HOST_BOUNDS)]
    if host != list(_DEFAULT_HOST_BOUNDS):
        options["chips_per_host_bounds"] = host
    try:
        topo = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{generation}:{shape}", **options
        )
    except Exception as e:  # libtpu's error types are not public
        if "lockfile" in str(e):
            raise ValueError(
                f"libtpu refused to load: {e}. Fix: another process holds libtpu's lock; "
                "set ALLOW_MULTIPLE_LIBTPU_LOAD=1 (compile-only planning uses no chips)."
            ) from e
        raise ValueError(
            f"libtpu cannot describe the TPU topology {topology!r}: {e}. Fix: a slice shape "
            f"that {generation} comes in (e.g. v5e:1x1, v5e:2x4, v6e:4x4, v4:2x2x2)."
        ) from e
    return list(topo.devices)


def libtpu_version() -> str:
    """The installed libtpu's version ('unknown' when its metadata is missing)."""
    from importlib import metadata

    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return "unknown"
