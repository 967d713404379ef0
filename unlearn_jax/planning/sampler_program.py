"""The sampler, compiled on abstract shapes and measured.

The integrity sampler (`diffusion.sampler.ddim_sample`: one `lax.scan` over DDIM steps
with classifier-free guidance) for one chunk of prompts. XLA's cost analysis counts the
scan's body once, so `plan_sampler` also compiles one denoising step on its own and
counts its FLOPs times the steps. What it shares with the train step (`ProgramReport`,
`compile_planned`, the abstract UNet) is in `programs`.
"""

from __future__ import annotations

import functools

from unlearn_jax.planning.costs import flops_of, memory_of, xla_flops
from unlearn_jax.planning.models import ModelSpec
from unlearn_jax.planning.programs import (
    OutOfDeviceMemory,
    ProgramReport,
    abstract_unet,
    compile_planned,
    placed,
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
    devices=None,
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
    mesh = sharding.make_mesh(data, fsdp, devices)
    chunk = batch_per_device * mesh.shape["data"]
    latent = model.latent_shape(height, width)
    graphdef, params = abstract_unet(model, dtype, remat=False)
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
    compiled, seconds = compile_planned(
        jax.jit(sample, out_shardings=rows),
        placed(params, sharding.param_shardings(mesh, params)),
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=whole), plan),
        jax.ShapeDtypeStruct((chunk, *latent), jnp.float32, sharding=rows),
        jax.ShapeDtypeStruct((chunk, *context), jnp.dtype(dtype), sharding=rows),
        uncond if uses_guidance(guidance) else None,
        jax.ShapeDtypeStruct((chunk,), jnp.int32, sharding=rows),
        mesh=mesh,
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
    devices=None,
) -> ProgramReport:
    """Compiles the scan sampler (see `compile_sampler`) and measures it.

    XLA counts the scan's body once, so one denoising step is compiled on its own as
    well: its FLOPs times `steps` are the total.
    """
    from unlearn_jax.diffusion.sampler import uses_guidance
    from unlearn_jax.trainer import sharding

    common = dict(
        guidance=guidance,
        batch_per_device=batch_per_device,
        dtype=dtype,
        data=data,
        fsdp=fsdp,
        height=height,
        width=width,
        devices=devices,
    )
    mesh = sharding.make_mesh(data, fsdp, devices)
    settings = {
        "model": model.name,
        "steps": steps,
        "guidance": guidance,
        "mesh": {"data": mesh.shape["data"], "fsdp": mesh.shape["fsdp"]},
        "global_batch": batch_per_device * mesh.shape["data"],
        "batch_per_device": batch_per_device,
        "unet_batch_per_device": batch_per_device * (2 if uses_guidance(guidance) else 1),
        "dtype": dtype,
        "latent_shape": list(model.latent_shape(height, width)),
    }
    try:
        compiled, seconds, mesh = compile_sampler(model, steps=steps, **common)
        one_step, _, _ = compile_sampler(model, steps=1, unrolled=True, **common)
    except OutOfDeviceMemory as e:
        return ProgramReport.refused("sample", settings, e)
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
        settings=settings,
        memory=memory_of(compiled),
        flops={
            "per_step": per_step,
            "per_image": per_step * steps / batch_per_device,
            "total": per_step * steps,
            "xla_scan_program": xla_flops(compiled),
        },
        compile_s=seconds,
        notes=notes,
    )
