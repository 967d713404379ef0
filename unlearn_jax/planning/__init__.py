r"""Memory and FLOP planner: the train step and the sampler compiled ahead of time, on shapes only.

    python -m unlearn_jax.planning --model sd15 --devices 8 --mesh 8x1 --mesh 1x8 \
        --remat both --dtype bfloat16 --batch 1 --sample-batch 4 --steps 50 --out plan.json
    unlearn-jax plan --model sd21 --only sample --markdown
    python -m unlearn_jax.planning --render plan.json --markdown     # tables of a saved report

Nothing is loaded and nothing runs: programs are built on abstract arrays
(`jax.ShapeDtypeStruct`, `nnx.eval_shape`) and compiled with `jit(f).lower(...).compile()`.

  * train: the unlearning step as the trainer jits it on GPUs and TPUs
    (`trainer.step_programs`), as one program (`train.step_programs='fused'`:
    `train_step.make_train_step` on the ('data', 'fsdp') mesh of `sharding.make_mesh`,
    the train state donated, the frozen θ0 a separate argument, the batch layout of
    `trainer.batches`), for a preset, per-device batch, remat and compute dtype,
    starting from configs/base.py;
  * sample: the integrity sampler (`diffusion.sampler.ddim_sample`: one `lax.scan` over
    DDIM steps with classifier-free guidance) for one chunk of prompts.

Reported per device: XLA's memory analysis (arguments, outputs, donated = aliased,
temporaries, generated code; peak estimate = arguments + outputs - donated +
temporaries + code), FLOPs from the cost analysis, compile time, and per chip in `CHIPS`
the floor (FLOPs / peak) and whether the peak estimate fits.

TPU without a TPU: `--tpu v5e:2x4` (any GENERATION:SHAPE of v4, v5e, v5p, v6e) compiles
for that slice with the TPU compiler itself (libtpu, the `tpu-plan` extra) on compile-only
devices (`targets.tpu_devices`). The memory is then the TPU compiler's buffer assignment
for the chip, and a program that cannot fit HBM is refused by the compiler, which the
report gives as its verdict ('out_of_memory').

Devices: `--devices N` plans on N fake CPU devices. It sets
`XLA_FLAGS=--xla_force_host_platform_device_count=N` and the CPU platform before JAX
starts its backend, so it must come before any JAX computation in the process (the
same as `XLA_FLAGS=--xla_force_host_platform_device_count=N python -m unlearn_jax.planning`).
Without it the planner uses the devices JAX sees: on a TPU/GPU host the real ones, and
then the memory analysis is that accelerator's own. This is why JAX and the model code
are imported inside the functions here.

Caveats (repeated in every report): on CPU the memory analysis is XLA:CPU's buffer
assignment, an estimate of what an accelerator needs, not a measurement of one; the cost
analysis counts a loop body once, so the sampler's FLOPs come from one denoising step
compiled on its own, times the steps.

Modules: `models` (chips and model configs), `targets` (compile-only TPU devices),
`programs` (what the programs share; compile and measure the train step),
`sampler_program` (compile and measure the sampler), `costs` (a compiled program's
memory and FLOPs), `report` (JSON and tables), `command` (the command line).
"""

from unlearn_jax.planning.command import add_plan_command, main, run_plan, use_fake_cpu_devices
from unlearn_jax.planning.costs import flops_of, loops_other_than_rng, memory_of
from unlearn_jax.planning.models import CHIPS, MODELS, Chip, ModelSpec, resolve_model
from unlearn_jax.planning.programs import (
    OutOfDeviceMemory,
    ProgramReport,
    plan_train_step,
    train_config,
)
from unlearn_jax.planning.report import build_report, format_tables, markdown_tables, program_label
from unlearn_jax.planning.sampler_program import compile_sampler, plan_sampler
from unlearn_jax.planning.targets import tpu_chip, tpu_devices

__all__ = [
    "CHIPS",
    "MODELS",
    "Chip",
    "ModelSpec",
    "OutOfDeviceMemory",
    "ProgramReport",
    "add_plan_command",
    "build_report",
    "compile_sampler",
    "flops_of",
    "format_tables",
    "loops_other_than_rng",
    "main",
    "markdown_tables",
    "memory_of",
    "plan_sampler",
    "plan_train_step",
    "program_label",
    "resolve_model",
    "run_plan",
    "tpu_chip",
    "tpu_devices",
    "train_config",
    "use_fake_cpu_devices",
]
