r"""Memory and FLOP planner: the train step and the sampler compiled ahead of time, on shapes only.

    python -m unlearn_jax.plan --model sd15 --devices 8 --mesh 8x1 --mesh 1x8 \
        --remat both --dtype bfloat16 --batch 1 --sample-batch 4 --steps 50 --out plan.json
    unlearn-jax plan --model sd21 --only sample --markdown
    python -m unlearn_jax.plan --render plan.json --markdown     # tables of a saved report

Nothing is loaded and nothing runs: programs are built on abstract arrays
(`jax.ShapeDtypeStruct`, `nnx.eval_shape`) and compiled with `jit(f).lower(...).compile()`.

  * train: the unlearning step as `unlearn.train` jits it (`train_step.make_train_step`
    on the ('data', 'fsdp') mesh of `sharding.make_mesh`, the train state donated, the
    frozen θ0 a separate argument, the batch layout of `unlearn.batches`), for a preset,
    per-device batch, remat and compute dtype, starting from configs/base.py;
  * sample: the integrity sampler (`diffusion.sampler.ddim_sample`: one `lax.scan` over
    DDIM steps with classifier-free guidance) for one chunk of prompts.

Reported per device: XLA's memory analysis (arguments, outputs, donated = aliased,
temporaries, generated code; peak estimate = arguments + outputs - donated +
temporaries + code), FLOPs from the cost analysis, compile time, and per chip in `CHIPS`
the floor (FLOPs / peak) and whether the peak estimate fits.

Devices: `--devices N` plans on N fake CPU devices. It sets
`XLA_FLAGS=--xla_force_host_platform_device_count=N` and the CPU platform before JAX
starts its backend, so it must come before any JAX computation in the process (the
same as `XLA_FLAGS=--xla_force_host_platform_device_count=N python -m unlearn_jax.plan`).
Without it the planner uses the devices JAX sees: on a TPU/GPU host the real ones, and
then the memory analysis is that accelerator's own. This is why JAX and the model code
are imported inside the functions here.

Caveats (repeated in every report): on CPU the memory analysis is XLA:CPU's buffer
assignment, an estimate of what an accelerator needs, not a measurement of one; the cost
analysis counts a loop body once, so the sampler's FLOPs come from one denoising step
compiled on its own, times the steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

GiB = 2**30
GB = 10**9
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
COMPUTE_DTYPES = ("float32", "bfloat16")
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

# ---------------------------------------------------------------------------
# Models: config files only, never weights
# ---------------------------------------------------------------------------

# runwayml/stable-diffusion-v1-5, unet/config.json.
SD15_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
# stabilityai/stable-diffusion-2-1 (768 px, v-prediction), unet/config.json.
SD21_UNET_CONFIG = {
    **SD15_UNET_CONFIG,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
    "use_linear_projection": True,
    "upcast_attention": True,
}
# runwayml/stable-diffusion-v1-5, scheduler/scheduler_config.json.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# stabilityai/stable-diffusion-2-1, scheduler/scheduler_config.json.
SD21_SCHEDULER_CONFIG = {
    **SD15_SCHEDULER_CONFIG,
    "_class_name": "DDIMScheduler",
    "prediction_type": "v_prediction",
}
# The micro UNet of the train-loop tests (tests/tiny_unlearn.py): one cross-attention
# level, the cheapest SD-architecture program to compile; 2x VAE, 16 px images.
TINY_UNET_CONFIG = {
    "block_out_channels": [16],
    "down_block_types": ["CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
    "sample_size": 8,
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the planner needs of a model.

    Attributes:
      name: 'sd15', 'sd21', 'tiny' or the folder it was read from.
      unet_config, scheduler_config: diffusers `config.json` dicts.
      context_length, context_dim: the text encoder's output [L, D] (77 x 768 for SD 1.x),
        which the train step and the sampler take precomputed.
      vae_scale_factor: pixels per latent pixel (8 for SD).
    """

    name: str
    unet_config: Mapping[str, Any]
    scheduler_config: Mapping[str, Any]
    context_length: int
    context_dim: int
    vae_scale_factor: int

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple:
        """(h, w, C) of the latents of a height x width image (default: the native size)."""
        native = int(self.unet_config["sample_size"]) * self.vae_scale_factor
        levels = len(self.unet_config.get("block_out_channels", (0,) * 4))
        factor = self.vae_scale_factor * 2 ** (levels - 1)
        height, width = height or native, width or native
        if height % factor or width % factor:
            raise ValueError(
                f"height and width must be multiples of {factor} for {self.name}; got "
                f"{height}x{width}. Fix: e.g. --height {max(factor, height // factor * factor)}."
            )
        channels = int(self.unet_config.get("in_channels", 4))
        return height // self.vae_scale_factor, width // self.vae_scale_factor, channels


MODELS = {
    "sd15": ModelSpec("sd15", SD15_UNET_CONFIG, SD15_SCHEDULER_CONFIG, 77, 768, 8),
    "sd21": ModelSpec("sd21", SD21_UNET_CONFIG, SD21_SCHEDULER_CONFIG, 77, 1024, 8),
    "tiny": ModelSpec("tiny", TINY_UNET_CONFIG, SD15_SCHEDULER_CONFIG, 16, 32, 2),
}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path} does not exist; the planner reads it from a diffusers folder")
    return json.loads(path.read_text(encoding="utf-8"))


def resolve_model(name_or_path: str) -> ModelSpec:
    """A built-in model ('sd15', 'sd21', 'tiny') or a local diffusers folder's configs.

    Only unet/config.json, scheduler/scheduler_config.json, text_encoder/config.json and
    vae/config.json are read.
    """
    if name_or_path in MODELS:
        return MODELS[name_or_path]
    folder = Path(name_or_path).expanduser()
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"unknown model {name_or_path!r}. Fix: --model sd15, sd21 or tiny, or a local "
            "diffusers folder (the one holding model_index.json)."
        )
    unet = _read_json(folder / "unet" / "config.json")
    text = _read_json(folder / "text_encoder" / "config.json")
    vae = _read_json(folder / "vae" / "config.json")
    return ModelSpec(
        str(folder),
        unet,
        _read_json(folder / "scheduler" / "scheduler_config.json"),
        int(text.get("max_position_embeddings", 77)),
        int(text.get("hidden_size", 768)),
        2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1),
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


# ---------------------------------------------------------------------------
# Measuring a compiled program
# ---------------------------------------------------------------------------


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


def _compile(jitted, *args) -> tuple[Any, float]:
    from unlearn_jax.models.attention import accelerator_attention

    start = time.perf_counter()
    with accelerator_attention():  # the GPU/TPU program, even when planned on CPU
        compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


# ---------------------------------------------------------------------------
# The programs
# ---------------------------------------------------------------------------


def _abstract_unet(model: ModelSpec, dtype: str, remat: bool):
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


def _placed(tree, shardings):
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
    mesh = sharding.make_mesh(data, fsdp)
    devices = sharding.batch_devices(mesh)
    batch = batch_per_device * devices if global_batch is None else global_batch
    _check_global_batch(batch, mesh.shape["data"], mesh.shape["fsdp"])
    group = params or config.unlearn.get("params") or preset.params
    hparams = experiment.resolve_hparams(preset, config.unlearn.get("hparams"))
    optimizer = make_optimizer(config.optim)

    # As experiment.load_model builds them: θ0 as a pure dict, a pure apply function.
    graphdef, state = _abstract_unet(model, dtype, remat)
    theta0 = state.to_pure_dict()
    split = ParamSplit.from_params(theta0, group)
    schedule = schedule_from_config(model.scheduler_config)
    diffusion = DiffusionModel(
        lambda p, x_t, t, context: nnx.merge(graphdef, p)(x_t, t, context),
        jnp.asarray(schedule.alphas_cumprod, jnp.float32),
        schedule.prediction_type,
    )

    # As unlearn.train jits it: state donated, θ0 separate, batch [micro_steps, B, ...].
    theta0_shardings = sharding.param_shardings(mesh, theta0)
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
        make_train_step(diffusion, preset, hparams, optimizer, split),
        in_shardings=(
            state_shardings,
            theta0_shardings,
            jax.tree.map(lambda a: a.sharding, example_batch),
            sharding.replicated(mesh),
        ),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    compiled, seconds = _compile(
        jitted,
        _placed(abstract, state_shardings),
        _placed(theta0, theta0_shardings),
        example_batch,
        key,
    )
    per_step = flops_of(compiled)
    trainable, total = split.sizes(theta0)
    notes = []
    if loops := loops_other_than_rng(compiled):
        notes.append(f"{loops} while loop(s) in the train step: FLOPs count each body once")
    return ProgramReport(
        kind="train",
        settings={
            "model": model.name,
            "method": preset.name,
            "params": group,
            "trainable_parameters": trainable,
            "unet_parameters": total,
            "optimizer": config.optim.name,
            "mesh": {"data": mesh.shape["data"], "fsdp": mesh.shape["fsdp"]},
            "global_batch": batch,
            "batch_per_device": batch // devices,
            "remat": remat,
            "dtype": dtype,
            "latent_shape": list(latent),
        },
        memory=memory_of(compiled),
        flops={"per_step": per_step, "per_image": per_step / (batch // devices)},
        compile_s=seconds,
        notes=notes,
    )


def compile_sampler(
    model: ModelSpec,
    *,
    steps: int,
    guidance: float = 7.5,
    batch_per_device: int = 1,
    dtype: str = "float32",
    data: int = -1,
    fsdp: int = 1,
    height: int | None = None,
    width: int | None = None,
    unrolled: bool = False,
):
    """The sampler for one chunk of prompts, compiled on abstract shapes.

    The chunk (`batch_per_device` x mesh data) is split over the mesh's 'data' axis as
    `sample_in_chunks` splits it; the UNet parameters are replicated, or sharded over
    'fsdp' as the trainer's evaluator holds them (the batch is not split over 'fsdp').

    Args:
      unrolled: `ddim_sample`'s Python loop over the steps (debug mode, traced under
        jit) instead of its `lax.scan`; with steps=1: one denoising step on its own.
    Returns:
      (compiled, lower + compile seconds, mesh).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from unlearn_jax.diffusion.ddim import ddim_plan
    from unlearn_jax.diffusion.sampler import ddim_sample, uses_guidance
    from unlearn_jax.diffusion.schedule import schedule_from_config
    from unlearn_jax.diffusion.text_to_image import unet_model_fn
    from unlearn_jax.trainer import sharding

    if steps < 1 or batch_per_device < 1:
        raise ValueError(
            f"--steps and --sample-batch must be >= 1; got {steps}, {batch_per_device}"
        )
    mesh = sharding.make_mesh(data, fsdp)
    chunk = batch_per_device * mesh.shape["data"]
    latent = model.latent_shape(height, width)
    graphdef, params = _abstract_unet(model, dtype, remat=False)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    whole = sharding.replicated(mesh)
    context = (model.context_length, model.context_dim)
    plan = ddim_plan(schedule_from_config(model.scheduler_config), steps)
    run = functools.partial(
        ddim_sample, unet_model_fn(graphdef), guidance_scale=guidance, debug=unrolled
    )

    def sample(params, plan, latents, cond, uncond, example_ids):
        return run(params, plan, latents, cond, uncond, example_ids=example_ids)

    uncond = jax.ShapeDtypeStruct(context, jnp.dtype(dtype), sharding=whole)
    compiled, seconds = _compile(
        jax.jit(sample, out_shardings=rows),
        _placed(params, sharding.param_shardings(mesh, params)),
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=whole), plan),
        jax.ShapeDtypeStruct((chunk, *latent), jnp.float32, sharding=rows),
        jax.ShapeDtypeStruct((chunk, *context), jnp.dtype(dtype), sharding=rows),
        uncond if uses_guidance(guidance) else None,
        jax.ShapeDtypeStruct((chunk,), jnp.int32, sharding=rows),
    )
    return compiled, seconds, mesh


def plan_sampler(
    model: ModelSpec,
    *,
    steps: int = 50,
    guidance: float = 7.5,
    batch_per_device: int = 1,
    dtype: str = "float32",
    data: int = -1,
    fsdp: int = 1,
    height: int | None = None,
    width: int | None = None,
) -> ProgramReport:
    """Compiles the scan sampler (see `compile_sampler`) and measures it.

    XLA counts the scan's body once, so one denoising step is compiled on its own as
    well: its FLOPs times `steps` are the total.
    """
    from unlearn_jax.diffusion.sampler import uses_guidance

    common = dict(
        guidance=guidance,
        batch_per_device=batch_per_device,
        dtype=dtype,
        data=data,
        fsdp=fsdp,
        height=height,
        width=width,
    )
    compiled, seconds, mesh = compile_sampler(model, steps=steps, **common)
    one_step, _, _ = compile_sampler(model, steps=1, unrolled=True, **common)
    per_step = flops_of(one_step)
    notes = [
        "sampler FLOPs: one denoising step compiled on its own, times the steps (XLA's "
        "cost analysis counts the scan body once)",
        "sampler: the denoising loop only; the text encoder and the VAE decoder are "
        "separate programs, not included",
    ]
    if mesh.shape["fsdp"] > 1:
        notes.append("sampler with fsdp > 1: the devices of an fsdp group sample the same rows")
    return ProgramReport(
        kind="sample",
        settings={
            "model": model.name,
            "steps": steps,
            "guidance": guidance,
            "mesh": {"data": mesh.shape["data"], "fsdp": mesh.shape["fsdp"]},
            "global_batch": batch_per_device * mesh.shape["data"],
            "batch_per_device": batch_per_device,
            "unet_batch_per_device": batch_per_device * (2 if uses_guidance(guidance) else 1),
            "dtype": dtype,
            "latent_shape": list(model.latent_shape(height, width)),
        },
        memory=memory_of(compiled),
        flops={
            "per_step": per_step,
            "per_image": per_step * steps / batch_per_device,
            "total": per_step * steps,
            "xla_scan_program": flops_of(compiled),
        },
        compile_s=seconds,
        notes=notes,
    )


# ---------------------------------------------------------------------------
# The report: JSON, text and Markdown tables
# ---------------------------------------------------------------------------

CPU_NOTE = (
    "Planned on CPU: the memory is XLA:CPU's buffer assignment, an estimate of what an "
    "accelerator needs, not a measurement. Arguments (parameters, optimizer state, batch) "
    "are exact; temporaries depend on the backend: TPUs pad minor dimensions to (8, 128) "
    "tiles, GPUs add convolution workspaces, fusion and scheduling differ, and XLA:CPU may "
    "keep bf16 intermediates in f32. Attention: on CPU (and TPU) jax.nn.dot_product_attention "
    "materialises float32 [rows, heads, N, N] logits (4 GiB for 8 rows of 64x64 SD latents), "
    "which cuDNN's fused attention on GPUs may avoid. Plan on the accelerator itself for its "
    "own numbers."
)
GENERAL_NOTES = (
    "Per device. Peak estimate = arguments + outputs - donated (aliased) + temporaries + "
    "generated code, from XLA's buffer assignment of the compiled program.",
    f"'fits': peak estimate <= {USABLE_HBM_FRACTION:.0%} of the chip's HBM (the rest for the "
    "runtime and fragmentation; JAX on GPU preallocates 75% of the memory unless "
    "XLA_PYTHON_CLIENT_MEM_FRACTION is raised).",
    "Floor: FLOPs per device / the chip's dense bf16 peak, a lower bound on the time per "
    "step; real steps are slower (memory-bound norms and attention, communication, and "
    "float32 compute runs below the bf16 peak).",
    "FLOPs: XLA's count for one device's share of the program; a loop body counts once.",
)


def build_report(programs: Sequence[ProgramReport], model: ModelSpec) -> dict[str, Any]:
    """The JSON-able report of a planning run."""
    import jax

    cpu_note = [CPU_NOTE] if jax.default_backend() == "cpu" else []
    return {
        "model": model.name,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "usable_hbm_fraction": USABLE_HBM_FRACTION,
        "chips": [dataclasses.asdict(c) for c in CHIPS],
        "programs": [p.to_json() for p in programs],
        "notes": [GENERAL_NOTES[0], *cpu_note, *GENERAL_NOTES[1:]],
    }


def program_label(program: Mapping[str, Any]) -> str:
    """A row name: 'train distill_project 8x1 bf16 remat', 'sample 50 steps cfg 7.5 8x1 bf16'."""
    s = program["settings"]
    mesh = f"{s['mesh']['data']}x{s['mesh']['fsdp']}"
    dtype = {"float32": "f32", "bfloat16": "bf16"}[s["dtype"]]
    if program["kind"] == "train":
        return f"train {s['method']} {mesh} {dtype}" + (" remat" if s["remat"] else "")
    return f"sample {s['steps']} steps cfg {s['guidance']:g} {mesh} {dtype}"


def _scaled(value: float, units: Sequence[tuple[str, float]], digits: int = 2) -> str:
    for unit, size in units:
        if value >= size:
            return f"{value / size:.{digits}f} {unit}"
    unit, size = units[-1]
    return f"{value / size:.{digits}f} {unit}"


_BYTES = (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))
_FLOPS = (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("FLOP", 1))
_SECONDS = (("s", 1.0), ("ms", 1e-3), ("us", 1e-6))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_tables(report: Mapping[str, Any], markdown: bool = False) -> str:
    """Memory and FLOPs per program; floor and fit per chip; the notes. Text or Markdown."""
    programs = report["programs"]
    header = [
        "program",
        "batch/device",
        "arguments",
        "outputs",
        "donated",
        "temporaries",
        "peak estimate",
        "FLOP/step",
        "FLOP/image",
        "compile",
    ]
    rows = [
        [
            program_label(p),
            str(p["settings"]["batch_per_device"]),
            *(_scaled(p["memory"][k], _BYTES) for k in ("argument", "output", "alias", "temp")),
            _scaled(p["memory"]["peak_estimate"], _BYTES),
            _scaled(p["flops"]["per_step"], _FLOPS),
            _scaled(p["flops"]["per_image"], _FLOPS),
            f"{p['compile_s']:.0f} s",
        ]
        for p in programs
    ]
    chip_header = ["floor per step, fit"]
    for c in report["chips"]:
        hbm = f"{c['hbm_bytes'] // GiB} GiB" if c["hbm_bytes"] % GiB == 0 else None
        hbm = hbm or f"{c['hbm_bytes'] / GB:g} GB"
        chip_header.append(f"{c['name']} ({hbm}, {c['peak_tflops']:g} TFLOP/s)")
    chip_rows = []
    for p in programs:
        cells = [program_label(p)]
        for c in report["chips"]:
            chip = p["chips"][c["name"]]
            floor = _scaled(chip["floor_ms_per_step"] / 1e3, _SECONDS)
            cells.append(f"{floor}, {'fits' if chip['fits'] else 'DOES NOT FIT'}")
        chip_rows.append(cells)
    notes = dict.fromkeys([n for p in programs for n in p["notes"]] + list(report["notes"]))
    title = (
        f"Plan for {report['model']} on {report['devices']} {report['backend']} device(s) "
        f"({report['device_kind']}). Train: one update step, FLOP/image per example of "
        "each term. Sample: one denoising step, FLOP/image for the whole generation."
    )
    bullet = "- " if markdown else "* "
    return "\n\n".join(
        [
            title,
            _table(header, rows, markdown),
            _table(chip_header, chip_rows, markdown),
            "\n".join(bullet + n for n in notes),
        ]
    )


def markdown_tables(report: Mapping[str, Any]) -> str:
    """The report as Markdown tables, to paste into the README."""
    return format_tables(report, markdown=True)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

_DESCRIPTION = (
    "Compile the unlearning train step and the integrity sampler ahead of time on abstract "
    "shapes (no weights) and report per-device memory, FLOPs and compile time, with the "
    "FLOP floor and fit on TPU v4/v5e, A100, H100 and H200."
)
_REMAT = {"off": [False], "on": [True], "both": [False, True]}
_DTYPE = {"float32": ["float32"], "bfloat16": ["bfloat16"], "both": list(COMPUTE_DTYPES)}


def _mesh(text: str) -> tuple[int, int]:
    try:
        data, fsdp = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected DATAxFSDP, e.g. 8x1 (data parallel) or 1x8 (FSDP)"
        ) from None
    return data, fsdp


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """The planner's options (shared by `unlearn-jax plan` and `python -m unlearn_jax.plan`)."""
    p.add_argument("--model", default="sd15", help="sd15 | sd21 | tiny | a diffusers folder")
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="plan on N fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, "
        "set before JAX starts); default: the devices JAX sees",
    )
    p.add_argument("--only", choices=["train", "sample"], default=None)
    p.add_argument("--dtype", choices=list(_DTYPE), default="float32", help="compute dtype")
    p.add_argument(
        "--mesh",
        type=_mesh,
        action="append",
        default=None,
        help="train mesh DATAxFSDP, repeatable (default -1x1: data parallel on all devices)",
    )
    p.add_argument("--remat", choices=list(_REMAT), default="off")
    p.add_argument("--method", default=None, help="unlearning preset (default distill_project)")
    p.add_argument("--params", default=None, help="unlearn.params (default: the preset's)")
    p.add_argument("--batch", type=int, default=1, help="train examples per term per device")
    p.add_argument("--global-batch", type=int, default=None, help="train.batch_size instead")
    p.add_argument(
        "--config",
        default=None,
        help="trainer config FILE.py[:ARGS] (default configs/base.py); --config.a.b=value "
        "sets its fields (optimizer, hyperparameters, ...)",
    )
    p.add_argument("--steps", type=int, default=50, help="sampler DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="sampler CFG scale (<= 1: none)")
    p.add_argument("--sample-batch", type=int, default=1, help="sampler prompts per device")
    p.add_argument("--sample-mesh", type=_mesh, default=(-1, 1), help="sampler DATAxFSDP")
    p.add_argument("--height", type=int, default=None, help="default: the native image size")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables")
    p.add_argument("--render", type=Path, default=None, help="print a saved report's tables")


def run_plan(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    """Compiles what `args` asks for, prints the tables and writes --out; returns 0."""
    from unlearn_jax.trainer.config_file import split_overrides

    overrides, rest = split_overrides(extra)
    if rest:
        raise ValueError(f"unrecognized arguments: {' '.join(rest)}")
    if args.render is not None:
        print(format_tables(json.loads(args.render.read_text("utf-8")), args.markdown))
        return 0
    if args.devices is not None:
        use_fake_cpu_devices(args.devices)
    model = resolve_model(args.model)
    config = train_config(args.method, config_file=args.config, overrides=overrides)
    size = dict(height=args.height, width=args.width)
    jobs = []
    if args.only in (None, "train"):
        train = functools.partial(
            plan_train_step,
            model,
            method=args.method,
            batch_per_device=args.batch,
            global_batch=args.global_batch,
            params=args.params,
            config=config,
            **size,
        )
        for data, fsdp in args.mesh or [(-1, 1)]:
            for dtype in _DTYPE[args.dtype]:
                for remat in _REMAT[args.remat]:
                    jobs.append(
                        functools.partial(train, data=data, fsdp=fsdp, dtype=dtype, remat=remat)
                    )
    if args.only in (None, "sample"):
        data, fsdp = args.sample_mesh
        for dtype in _DTYPE[args.dtype]:
            jobs.append(
                functools.partial(
                    plan_sampler,
                    model,
                    steps=args.steps,
                    guidance=args.guidance,
                    batch_per_device=args.sample_batch,
                    dtype=dtype,
                    data=data,
                    fsdp=fsdp,
                    **size,
                )
            )
    programs = []
    for i, job in enumerate(jobs):
        print(f"[plan] compiling {i + 1}/{len(jobs)} ...", file=sys.stderr, flush=True)
        programs.append(job())
        report = build_report(programs, model)
        p = report["programs"][-1]
        print(
            f"[plan] {program_label(p)}: peak {_scaled(p['memory']['peak_estimate'], _BYTES)}"
            f" per device, {_scaled(p['flops']['per_step'], _FLOPS)} per step, compiled in "
            f"{p['compile_s']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        if args.out is not None:  # after every program: a long run keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(format_tables(build_report(programs, model), markdown=args.markdown))
    return 0


def add_plan_command(subparsers: argparse._SubParsersAction) -> None:
    """Registers `unlearn-jax plan`; its `func(args, extra=()) -> int` runs the planner."""
    p = subparsers.add_parser(
        "plan",
        help="per-device memory and FLOPs of the train step and sampler (AOT, no weights)",
        description=_DESCRIPTION,
    )
    add_plan_arguments(p)
    p.set_defaults(func=run_plan)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m unlearn_jax.plan ...`; bad input raises ValueError."""
    parser = argparse.ArgumentParser(prog="python -m unlearn_jax.plan", description=_DESCRIPTION)
    add_plan_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    return run_plan(args, extra)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
