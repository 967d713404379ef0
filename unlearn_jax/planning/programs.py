"""The programs, compiled on abstract shapes and measured: what they share, and the train step.

Shared by the train step and the sampler (`sampler_program`): `ProgramReport` (one
compiled program's memory, FLOPs and compile time per device), `OutOfDeviceMemory` (the
compiler's refusal), `compile_planned` (trace, lower and compile with the accelerator's
attention), the abstract UNet and placed arguments. The train step is the unlearning
step as the trainer jits it (`plan_train_step`), from the trainer's config
(`train_config`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unlearn_jax.planning.costs import (
    flops_of,
    loops_other_than_rng,
    memory_of,
    record_loop_flops,
    uncounted_loop_flops,
)
from unlearn_jax.planning.models import CHIPS, COMPUTE_DTYPES, USABLE_HBM_FRACTION, Chip, ModelSpec

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


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
      out_of_memory: the compiler's refusal when it could not fit the program in the
        device's memory (TPU compiles fail so); `memory` and `flops` are then empty.
    """

    kind: str
    settings: dict[str, Any]
    memory: dict[str, int]
    flops: dict[str, float]
    compile_s: float
    notes: list[str] = dataclasses.field(default_factory=list)
    out_of_memory: str | None = None

    def chips(self, chips: Sequence[Chip] = CHIPS) -> dict[str, dict[str, Any]]:
        """Per chip: the floor (FLOPs per step / peak, a lower bound) and whether it fits."""
        out = {}
        for chip in chips:
            per_step = self.flops.get("per_step")
            floor_ms = None if per_step is None else per_step / (chip.peak_tflops * 1e12) * 1e3
            peak = self.memory.get("peak_estimate")
            out[chip.name] = {
                "floor_ms_per_step": floor_ms,
                "fits": peak is not None and peak <= USABLE_HBM_FRACTION * chip.hbm_bytes,
            }
            if self.kind == "sample" and floor_ms is not None:
                out[chip.name]["floor_s_per_chunk"] = floor_ms * self.settings["steps"] / 1e3
        return out

    @classmethod
    def refused(cls, kind: str, settings: dict[str, Any], error: OutOfDeviceMemory):
        """The report of a program the compiler could not fit: no memory or FLOPs."""
        first_lines = " ".join(line.strip() for line in str(error).strip().splitlines()[:3])
        program = "the train step" if kind == "train" else "the sampler"
        return cls(
            kind=kind,
            settings=settings,
            memory={},
            flops={},
            compile_s=error.seconds,
            notes=[f"the compiler could not fit {program}: {first_lines}"],
            out_of_memory=str(error),
        )

    def to_json(self, chips: Sequence[Chip] = CHIPS) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "chips": self.chips(chips)}


class OutOfDeviceMemory(Exception):
    """The compiler refused the program: it does not fit the device's memory.

    The TPU compiler fails a program it cannot fit in HBM (after trying to rematerialize),
    so for a TPU target "does not fit" is the compiler's verdict, not an estimate.
    """

    def __init__(self, message: str, seconds: float):
        super().__init__(message)
        self.seconds = seconds


PALLAS_FLOPS_NOTE = (
    "TPU attention runs as Pallas flash kernels, which XLA's cost analysis counts by "
    "their own estimates: the forward's, while the backward kernels carry none, so a TPU "
    "train step's FLOPs are undercounted; plan on CPU (--devices) for the FLOP count"
)
# Compiler errors that mean the program does not fit the device's memory.
_OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "Ran out of memory")


def compile_planned(jitted, *args, mesh=None) -> tuple[Any, float]:
    """(compiled, seconds); raises OutOfDeviceMemory when the compiler cannot fit it.

    The attention traced is an accelerator's, even when planned on CPU: on compile-only
    TPU devices the TPU's own (Pallas flash kernels per device over `mesh`), else XLA's.
    """
    from unlearn_jax.models.attention import accelerator_attention, batch_mesh

    tpu = mesh is not None and mesh.devices.flat[0].platform == "tpu"
    start = time.perf_counter()
    try:
        with accelerator_attention("tpu" if tpu else None), batch_mesh(mesh):
            traced = jitted.trace(*args)
            compiled = traced.lower().compile()
    except Exception as e:  # the backends' error types differ
        if not any(marker in str(e) for marker in _OUT_OF_MEMORY):
            raise
        raise OutOfDeviceMemory(str(e), time.perf_counter() - start) from e
    record_loop_flops(compiled, traced.jaxpr)
    return compiled, time.perf_counter() - start


def abstract_unet(model: ModelSpec, dtype: str, remat: bool):
    """(graphdef, abstract state) of the UNet: float32 parameters, `dtype` compute."""
    import jax.numpy as jnp
    from flax import nnx

    from unlearn_jax.models.unet import UNet2DConditionModel

    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype {dtype!r} is unknown; valid: {', '.join(COMPUTE_DTYPES)}")
    unet = nnx.eval_shape(
        lambda: UNet2DConditionModel(
            dict(model.unet_config),
            rngs=nnx.Rngs(0),
            dtype=jnp.dtype(dtype),
            param_dtype=jnp.float32,
            remat=remat,
        )
    )
    return nnx.split(unet)


def placed(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings`."""
    import jax

    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


def _check_global_batch(batch: int, data: int, fsdp: int) -> None:
    devices = data * fsdp if data > 0 and fsdp > 0 else 1
    if batch < 1 or batch % devices:
        fixed = max(devices, batch // devices * devices)
        raise ValueError(
            f"the global train batch {batch} must be a positive multiple of the {devices} "
            f"devices it is split over (mesh data={data} x fsdp={fsdp}). Fix: "
            f"--global-batch {fixed}, or --batch B for B examples per device."
        )


def train_config(
    method: str | None = None,
    *,
    config_file: str | None = None,
    overrides: Sequence[tuple[str, str]] = (),
):
    """The trainer's config (configs/base.py unless `config_file`), `overrides` applied."""
    from unlearn_jax.trainer.config_file import load_config

    config = load_config(config_file or str(CONFIGS_DIR / "base.py"), overrides)
    if method is not None:
        config.unlearn.method = method
    return config


def plan_train_step(
    model: ModelSpec,
    *,
    method: str | None = None,
    batch_per_device: int = 1,
    global_batch: int | None = None,
    remat: bool = False,
    dtype: str = "float32",
    data: int = -1,
    fsdp: int = 1,
    params: str | None = None,
    height: int | None = None,
    width: int | None = None,
    config=None,
    devices=None,
) -> ProgramReport:
    """Compiles the unlearning train step on abstract shapes and measures it.

    Args:
      model: the model's configs.
      method: preset name (default: the config's; 'distill_project' in base.py).
      batch_per_device: examples per term (forget, retain) per device; the global batch
        (train.batch_size) is this times data x fsdp.
      global_batch: train.batch_size instead; must divide by data x fsdp.
      remat, dtype: train.remat and train.dtype.
      data, fsdp: mesh.data and mesh.fsdp (-1: all remaining devices).
      params: unlearn.params (trainable group or regex; default: the config's, else the
        preset's).
      height, width: image size of the training latents (default: the native size).
      config: the trainer config to start from (default `train_config()`), for the
        optimizer and hyperparameters. Planned with grad_accum = 1: with gradient
        accumulation, plan the micro-batch.
      devices: the devices of the mesh (default `jax.devices()`); compile-only TPU
        devices (`targets.tpu_devices`) compile for a TPU slice without one.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from unlearn_jax.diffusion.forward import DiffusionModel
    from unlearn_jax.diffusion.schedule import schedule_from_config
    from unlearn_jax.trainer import experiment, sharding
    from unlearn_jax.trainer.batches import SHARED_KEYS
    from unlearn_jax.trainer.state import abstract_state, make_optimizer
    from unlearn_jax.trainer.train_step import make_train_step
    from unlearn_jax.unlearn.params import ParamSplit
    from unlearn_jax.unlearn.registry import BATCH_KEYS, get_preset

    config = train_config(method) if config is None else config
    preset = get_preset(method or config.unlearn.method)
    if global_batch is not None:
        _check_global_batch(global_batch, data, fsdp)  # before the mesh: the clearer error
    elif batch_per_device < 1:
        raise ValueError(f"--batch must be >= 1 (examples per device), got {batch_per_device}")
    mesh = sharding.make_mesh(data, fsdp, devices)
    splits = sharding.batch_devices(mesh)
    batch = batch_per_device * splits if global_batch is None else global_batch
    _check_global_batch(batch, mesh.shape["data"], mesh.shape["fsdp"])
    group = params or config.unlearn.get("params") or preset.params
    hparams = experiment.resolve_hparams(preset, config.unlearn.get("hparams"))
    optimizer = make_optimizer(config.optim)

    # As experiment.load_model builds them: θ0 as a pure dict, a pure apply function.
    graphdef, state = abstract_unet(model, dtype, remat)
    theta0 = state.to_pure_dict()
    split = ParamSplit.from_params(theta0, group)
    # As train.frozen_theta0 holds it: float32, or (train.frozen_dtype="compute") `dtype`.
    frozen_dtype = config.train.get("frozen_dtype", "float32")
    frozen = theta0
    if frozen_dtype == "compute":
        frozen = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype)), theta0)
    schedule = schedule_from_config(model.scheduler_config)
    diffusion = DiffusionModel(
        lambda p, x_t, t, context: nnx.merge(graphdef, p)(x_t, t, context),
        jnp.asarray(schedule.alphas_cumprod, jnp.float32),
        schedule.prediction_type,
    )

    # As the trainer jits it (trainer.step_programs): state donated, θ0 separate,
    # batch [micro_steps, B, ...].
    theta0_shardings = sharding.param_shardings(mesh, frozen)
    abstract = abstract_state(split, theta0, optimizer, preset.saliency)
    state_shardings = sharding.param_shardings(mesh, abstract)
    latent = model.latent_shape(height, width)
    context = (model.context_length, model.context_dim)
    shapes = {
        "x0": ((1, batch, *latent), jnp.float32),
        "x_t": ((1, batch, *latent), jnp.float32),
        "t": ((1, batch), jnp.int32),
        "context": ((1, batch, *context), jnp.float32),
        "anchor_context": ((1, batch, *context), jnp.float32),  # c_a per example
        "uncond_context": ((1, *context), jnp.float32),
    }
    parts = {"forget": BATCH_KEYS[preset.forget]}
    if preset.retain is not None:
        parts["retain"] = BATCH_KEYS[preset.retain]
    per_example = sharding.batch_sharding(mesh, leading_dims=2)
    example_batch = {
        part: {
            k: jax.ShapeDtypeStruct(
                *shapes[k],
                sharding=sharding.replicated(mesh) if k in SHARED_KEYS else per_example,
            )
            for k in keys
        }
        for part, keys in parts.items()
    }
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
    jitted = jax.jit(
        make_train_step(diffusion, preset, hparams, optimizer, split, mesh),
        in_shardings=(
            state_shardings,
            theta0_shardings,
            jax.tree.map(lambda a: a.sharding, example_batch),
            sharding.replicated(mesh),
        ),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    trainable, total = split.sizes(theta0)
    settings = {
        "model": model.name,
        "method": preset.name,
        "params": group,
        "trainable_parameters": trainable,
        "unet_parameters": total,
        "optimizer": config.optim.name,
        "mesh": {"data": mesh.shape["data"], "fsdp": mesh.shape["fsdp"]},
        "global_batch": batch,
        "batch_per_device": batch // splits,
        "remat": remat,
        "dtype": dtype,
        "frozen_dtype": frozen_dtype,
        "mu_dtype": config.optim.get("mu_dtype", "float32"),
        "latent_shape": list(latent),
    }
    try:
        compiled, seconds = compile_planned(
            jitted,
            placed(abstract, state_shardings),
            placed(frozen, theta0_shardings),
            example_batch,
            key,
            mesh=mesh,
        )
    except OutOfDeviceMemory as e:
        return ProgramReport.refused("train", settings, e)
    per_step = flops_of(compiled)
    notes = []
    if uncounted_loop_flops(compiled):
        notes.append(
            "FLOPs of the step's loop iterations after the first (attention in query "
            "blocks, 'blockwise') are counted from the jaxpr: XLA's cost analysis counts a "
            "loop body once"
        )
    elif loops := loops_other_than_rng(compiled):
        notes.append(f"{loops} while loop(s) in the train step: FLOPs count each body once")
    if "tpu_custom_call" in (compiled.as_text() or ""):
        notes.append(PALLAS_FLOPS_NOTE)
    return ProgramReport(
        kind="train",
        settings=settings,
        memory=memory_of(compiled),
        flops={"per_step": per_step, "per_image": per_step / (batch // splits)},
        compile_s=seconds,
        notes=notes,
    )
