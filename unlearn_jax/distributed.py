"""Multi-process start-up: `jax.distributed.initialize` when the launcher asks for it.

Launch scripts in `launch/` describe the job through environment variables,
read here once, before any JAX computation:

  UNLEARN_JAX_DISTRIBUTED=auto        let JAX detect the cluster (TPU pods, SLURM)
  UNLEARN_JAX_COORDINATOR=host:port   explicit coordinator (generic multi-node)
  UNLEARN_JAX_NUM_PROCESSES=N         with the coordinator: number of processes
  UNLEARN_JAX_PROCESS_ID=i            with the coordinator: this process' rank

Unset, nothing happens and the program runs single-process. After start-up
every process sees all devices (`jax.devices()`), so meshes span the whole
job; each process feeds only its own batch rows and only process 0 writes
logs and reports.

On a CPU-only host, `split_cpu_into_devices` makes JAX expose several CPU
devices (one per core, within limits) so that the samplers' batch sharding
runs the shards in parallel: XLA's intra-op threading alone keeps ~1.4 of 2
cores busy on a small UNet, one device per core ~1.9. UNLEARN_JAX_CPU_DEVICES=N
sets the count (1 turns it off).

`python -m unlearn_jax.distributed` is a self-check a launcher can run: each
process contributes its rank to one sharded sum and process 0 prints it.
"""

from __future__ import annotations

import os

import jax
import numpy as np

CPU_DEVICES_ENV = "UNLEARN_JAX_CPU_DEVICES"
_ENV = ("UNLEARN_JAX_COORDINATOR", "UNLEARN_JAX_NUM_PROCESSES", "UNLEARN_JAX_PROCESS_ID")
_initialized = False


def initialize_from_env(environ: dict | None = None) -> bool:
    """Calls `jax.distributed.initialize` as the environment says; returns whether it did."""
    global _initialized
    env = os.environ if environ is None else environ
    if _initialized:
        return True
    mode = env.get("UNLEARN_JAX_DISTRIBUTED", "").lower()
    coordinator = env.get("UNLEARN_JAX_COORDINATOR")
    if coordinator:
        missing = [k for k in _ENV[1:] if k not in env]
        if missing:
            raise ValueError(
                f"UNLEARN_JAX_COORDINATOR is set but {', '.join(missing)} is not; a generic "
                "multi-node job needs all three (see launch/multinode.sh)."
            )
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(env["UNLEARN_JAX_NUM_PROCESSES"]),
            process_id=int(env["UNLEARN_JAX_PROCESS_ID"]),
        )
    elif mode in ("auto", "1", "true"):
        jax.distributed.initialize()  # TPU pods and SLURM: JAX reads the cluster itself
    elif mode not in ("", "0", "false"):
        raise ValueError(f"UNLEARN_JAX_DISTRIBUTED={mode!r}: use 'auto' or leave it unset")
    else:
        return False
    _initialized = True
    return True


def split_cpu_into_devices(max_devices: int, replica_bytes: int) -> int:
    """Exposes this host's CPU cores as up to `max_devices` JAX CPU devices.

    Must run before the first JAX computation. Each device holds a replica of
    the parameters, so the count is also limited to what fits in half of the
    host's memory. Nothing changes when the user already chose a CPU device
    count (XLA_FLAGS or jax.config), when this is a multi-process job, or when
    JAX's backends are already up (e.g. a library caller that computed first).

    Args:
      max_devices: upper bound, e.g. the batch size (more devices than rows
        would only add padding).
      replica_bytes: memory one parameter replica needs.

    Returns:
      The CPU device count asked for, or 0 where nothing was changed.
    """
    setting = os.environ.get(CPU_DEVICES_ENV, "").strip()
    if setting:
        if not setting.isdigit() or int(setting) < 1:
            raise ValueError(f"{CPU_DEVICES_ENV}={setting!r}: use a positive device count")
        count = int(setting)
    else:
        if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
            return 0
        if jax.config.jax_num_cpu_devices != -1 or _initialized:
            return 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        fit = max(1, int(memory // 2 // max(replica_bytes, 1)))
        count = max(1, min(cores or 1, max_devices, fit))
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # backends already initialised: keep what they have
        return 0
    return count


def is_main_process() -> bool:
    """True on the process that writes logs, checkpoint metadata and reports."""
    return jax.process_index() == 0


def self_check() -> float:
    """A sharded sum over all processes' devices: each device holds its process rank + 1.

    Returns the global sum, identical on every process; with P processes of D
    devices each it is D * P * (P + 1) / 2.
    """
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("data")), local)
    total = jax.jit(lambda v: v.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))(x)
    return float(total)


def main() -> None:
    initialize_from_env()
    total = self_check()
    print(
        f"process {jax.process_index()}/{jax.process_count()}: "
        f"{jax.local_device_count()} local of {jax.device_count()} devices, sum={total:g}",
        flush=True,
    )


if __name__ == "__main__":
    main()
