"""Chips, fake CPU devices, and what a compiled program costs per device.

`memory_of` and `flops_of` read XLA's memory and cost analyses of a compiled
program; `ProgramReport` holds one program's numbers and judges them against the
`CHIPS` (the FLOP floor per step and whether the peak estimate fits the HBM).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

GiB = 2**30
GB = 10**9
# A program "fits" a chip when its peak estimate is at most this share of the HBM; the
# rest is for the runtime (CUDA context, library workspaces) and fragmentation.
USABLE_HBM_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class Chip:
    """An accelerator: dense bf16 peak in TFLOP/s and HBM per chip in bytes."""

    name: str
    peak_tflops: float
    hbm_bytes: int


CHIPS = (
    # https://cloud.google.com/tpu/docs/v4: 275 TFLOP/s peak bf16, 32 GiB HBM2 per chip.
    Chip("TPU v4", 275.0, 32 * GiB),
    # https://cloud.google.com/tpu/docs/v5e: 197 TFLOP/s peak bf16, 16 GiB HBM2 per chip.
    Chip("TPU v5e", 197.0, 16 * GiB),
    # https://www.nvidia.com/en-us/data-center/a100/: BF16 Tensor Core 312 TFLOP/s dense
    # (624 with 2:4 sparsity); A100 80GB: 80 GB HBM2e.
    Chip("A100 80GB", 312.0, 80 * GB),
    # https://www.nvidia.com/en-us/data-center/h100/ (SXM): BF16 Tensor Core 1979 TFLOP/s
    # with sparsity, 989 dense; 80 GB HBM3.
    Chip("H100 SXM", 989.0, 80 * GB),
    # https://www.nvidia.com/en-us/data-center/h200/ (SXM): BF16 Tensor Core 1979 TFLOP/s
    # with sparsity, 989 dense; 141 GB HBM3e.
    Chip("H200 SXM", 989.0, 141 * GB),
)


def use_fake_cpu_devices(count: int) -> None:
    """Starts JAX with `count` CPU devices; must come before any JAX computation.

    Raises:
      ValueError: JAX had already started with other devices (naming the fix).
    """
    flag = f"--xla_force_host_platform_device_count={count}"
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*kept, flag])
    import jax

    jax.config.update("jax_platforms", "cpu")
    if jax.device_count() != count or jax.default_backend() != "cpu":
        raise ValueError(
            f"JAX already started with {jax.device_count()} {jax.default_backend()} "
            f"device(s), so --devices {count} cannot take effect. Fix: plan in a fresh "
            f"process, or start it as XLA_FLAGS={flag} JAX_PLATFORMS=cpu python -m "
            "unlearn_jax.plan ..."
        )


@dataclasses.dataclass
class ProgramReport:
    """One compiled program; every number is per device.

    Attributes:
      kind: 'train' or 'sample'.
      settings: what was planned (mesh, batches, dtype, remat, method, steps, ...).
      memory: bytes: argument, output, alias (donated), temp, generated_code, peak_estimate.
      flops: 'per_step' (one train step; one denoising step), 'per_image' (train: per
        example of each term; sample: one whole generation), and for the sampler 'total'
        (steps x per_step) and 'xla_scan_program' (XLA's count of the scan program, whose
        body it counts once).
      compile_s: lowering + XLA compilation wall time of the memory-analysed program.
      notes: caveats specific to this program.
    """

    kind: str
    settings: dict[str, Any]
    memory: dict[str, int]
    flops: dict[str, float]
    compile_s: float
    notes: list[str] = dataclasses.field(default_factory=list)

    def chips(self, chips: Sequence[Chip] = CHIPS) -> dict[str, dict[str, Any]]:
        """Per chip: the floor (FLOPs per step / peak, a lower bound) and whether it fits."""
        out = {}
        for chip in chips:
            floor_ms = self.flops["per_step"] / (chip.peak_tflops * 1e12) * 1e3
            out[chip.name] = {
                "floor_ms_per_step": floor_ms,
                "fits": self.memory["peak_estimate"] <= USABLE_HBM_FRACTION * chip.hbm_bytes,
            }
            if self.kind == "sample":
                out[chip.name]["floor_s_per_chunk"] = floor_ms * self.settings["steps"] / 1e3
        return out

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "chips": self.chips()}


def memory_of(compiled) -> dict[str, int]:
    """Bytes per device from `compiled.memory_analysis()`, plus the peak estimate."""
    stats = compiled.memory_analysis()
    memory = {
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
        "alias": int(stats.alias_size_in_bytes),
        "temp": int(stats.temp_size_in_bytes),
        "generated_code": int(stats.generated_code_size_in_bytes),
    }
    # A donated input that an output reuses is live once, not twice.
    memory["peak_estimate"] = (
        sum(memory[k] for k in ("argument", "output", "temp", "generated_code")) - memory["alias"]
    )
    return memory


def flops_of(compiled) -> float:
    """FLOPs per device of a compiled program, from XLA's cost analysis."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per executable
        cost = cost[0]
    return float(cost.get("flops", 0.0))


# jax.random in an instruction's op_name metadata: XLA:CPU runs threefry's rounds as a
# loop of integer hashing, negligible next to the UNet however often it is counted.
_RNG_OP_NAMES = ("threefry", "jit(_uniform)", "jit(_randint)", "jit(_normal)")


def loops_other_than_rng(compiled) -> int:
    """While loops of the optimized program other than random-number generation."""
    loops = [line for line in (compiled.as_text() or "").splitlines() if " while(" in line]
    return sum(not any(m in line for m in _RNG_OP_NAMES) for line in loops)


def compile_timed(jitted, *args) -> tuple[Any, float]:
    """(`jitted.lower(*args).compile()`, lowering + compilation seconds)."""
    from unlearn_jax.models.attention import accelerator_attention

    start = time.perf_counter()
    with accelerator_attention():  # the GPU/TPU program, even when planned on CPU
        compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start
