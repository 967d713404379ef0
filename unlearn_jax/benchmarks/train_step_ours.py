"""The train-step benchmark's JAX side: the trainer's own step, run in its own subprocess.

`run_ours` is the `--worker ours` of `train_step.py`: it loads the model as the trainer
does (`experiment.load_model`; θ from the perturbed UNet the parent wrote), compiles the
step as `train.step_programs` resolves it (fused, split or staged), and times the compile,
the first call and the steady state. `_step_draws` re-derives the timesteps and noise the
first step draws from its key, which the PyTorch reference (`torch_train_step.py`) replays
for the cross-check; `_our_batch` lays the parent's inputs out as the trainer's batch;
`step_flops` counts a step's FLOPs (for `benchmarks.accelerator`).
"""

from __future__ import annotations

import gc
import time
import warnings
from pathlib import Path

import numpy as np

from unlearn_jax.benchmarks.common import PeakMemory, jax_compile_seconds_by_program, timed_loop

# Both sides' optimizer (Adam, clipping as configs/base.py); torch gets it in the spec.
OPTIM = {"name": "adam", "lr": 1e-5, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "grad_clip": 1.0}


def _step_draws(train_key, step: int, batch: dict, model) -> dict[str, np.ndarray]:
    """The t and eps (NCHW) the terms of `step` draw, re-derived as train_step/step.py do."""
    import jax

    from unlearn_jax.diffusion.forward import (
        TARGET_NOISE_STREAM,
        sample_timesteps_and_noise,
    )
    from unlearn_jax.unlearn.step import FORGET_STREAM, RETAIN_STREAM

    micro = jax.random.fold_in(jax.random.fold_in(train_key, step), 0)  # one micro-step
    draws = {}
    for part, stream in (("forget", FORGET_STREAM), ("retain", RETAIN_STREAM)):
        if "x0" not in batch.get(part, {}):
            continue
        rng = jax.random.fold_in(micro, stream)
        x0 = batch[part]["x0"][0]
        t, eps = sample_timesteps_and_noise(rng, x0, model.num_timesteps)
        noise = jax.random.normal(jax.random.fold_in(rng, TARGET_NOISE_STREAM), x0.shape)
        for key, value in (("t", t), ("eps", eps), ("target_noise", noise)):
            value = np.asarray(value)
            draws[f"{part}_{key}"] = value.transpose(0, 3, 1, 2) if value.ndim == 4 else value
    return draws


def run_ours(spec: dict, workdir: Path) -> dict:
    """Loads, compiles and times our step; returns timings, memory and the step-0 metrics."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    from flax import nnx

    from unlearn_jax.models import convert, weights
    from unlearn_jax.models.unet import UNet2DConditionModel
    from unlearn_jax.program_cache import compile_program
    from unlearn_jax.trainer import experiment
    from unlearn_jax.trainer.staged_step import compile_staged_step
    from unlearn_jax.trainer.state import init_state, make_optimizer
    from unlearn_jax.trainer.train_step import (
        compile_all,
        jit_step_parts,
        lower_step_parts,
        make_step_parts,
        resolve_step_programs,
        split_step,
    )
    from unlearn_jax.unlearn import registry

    memory = PeakMemory()
    memory.mark()
    if spec["compilation_cache"]:
        jax.config.update("jax_compilation_cache_dir", spec["compilation_cache"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    t0 = time.perf_counter()
    preset = registry.get_preset(spec["method"])
    config = ml_collections.ConfigDict(
        {
            "model": {"path": spec["model"], "variant": None, "allow_pickle": False},
            "train": {"dtype": spec["dtype"], "remat": spec["remat"]},
        }
    )
    run = experiment.RunSpec(preset, preset.params, preset.hparams, [], [], [], [], [], {})
    model = experiment.load_model(config, run)
    # θ: the perturbed UNet the parent wrote, in θ0's structure (float32 parameters).
    tensors, _ = weights.read_component_weights(workdir / "start_unet")
    unet = nnx.eval_shape(
        lambda: UNet2DConditionModel(dict(model.pipe.unet.config), rngs=nnx.Rngs(0))
    )
    convert.load_torch_state(unet, tensors, source="start_unet", dtype=jnp.float32)
    start_params = nnx.split(unet)[1].to_pure_dict()
    optimizer = make_optimizer(ml_collections.ConfigDict(OPTIM))
    state = init_state(model.split.select(start_params), optimizer)
    frozen = jax.device_put(model.theta0)
    # On the device once, like torch's tensors: the step, not the host transfer, is timed.
    batch = jax.device_put(_our_batch(preset, np.load(workdir / "inputs.npz")))
    train_key = jax.random.fold_in(jax.random.key(spec["seed"]), experiment.TRAIN_STREAM)
    loaded = time.perf_counter()

    parts = make_step_parts(model.diffusion, preset, preset.hparams, optimizer, model.split)
    step_fn = parts.step()
    # 'auto' as the trainer resolves it for a run of the timed steps' length.
    programs = resolve_step_programs(
        spec.get("step_programs", "auto"), jax.default_backend(), steps=spec["steps"], preset=preset
    )

    def build():  # as the trainer compiles it (`step_programs.compile_step`)
        if programs == "fused":
            jitted = jax.jit(step_fn, donate_argnums=(0,))
            return compile_program(jitted.lower(state, frozen, batch, train_key))
        if programs == "staged":
            return compile_staged_step(
                model.diffusion, preset, preset.hparams, model.split, jit_step_parts(parts),
                None, state, frozen, batch, train_key,
            )  # fmt: skip
        lowered = lower_step_parts(jit_step_parts(parts), state, frozen, batch, train_key)
        return split_step(compile_all(lowered))

    c0 = time.perf_counter()
    compiled, compile_by_program = jax_compile_seconds_by_program(build)
    compile_s = time.perf_counter() - c0
    jax_compile_s = sum(compile_by_program.values())
    compile_peak = PeakMemory.peak_mb()  # XLA's own memory while compiling shows up here
    flops = None
    if spec.get("count_flops"):
        flops = step_flops(step_fn, state, frozen, batch, train_key)
    draws = _step_draws(train_key, 0, batch, model.diffusion)
    np.savez(workdir / "draws.npz", **draws)
    holder = {"state": state}

    def step():
        holder["state"], holder["metrics"] = compiled(holder["state"], frozen, batch, train_key)

    sync = lambda: jax.block_until_ready(holder["state"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        f0 = time.perf_counter()
        step()
        sync()
        first_s = time.perf_counter() - f0
        metrics = {k: float(v) for k, v in jax.device_get(holder["metrics"]).items()}
        timing = timed_loop(step, spec["warmup"], spec["steps"], sync)
    stats = jax.devices()[0].memory_stats() or {}
    return {
        **timing,
        "load_s": loaded - t0,
        "compile_s": compile_s,
        "jax_compile_s": jax_compile_s,
        "compile_by_program_s": compile_by_program,
        "step_programs": programs,
        "first_step_s": first_s,
        "trainable_parameters": model.split.size,
        "flops_per_step": flops,
        **memory.report(),
        "peak_rss_through_compile_mb": compile_peak,
        "device_peak_mb": stats.get("peak_bytes_in_use", 0) / 2**20 or None,
        "backend": jax.default_backend(),
        "python_gc_threshold": gc.get_threshold()[0],  # the CLI's (`cli.collect_less`)
        "step0": metrics,
    }


def step_flops(step_fn, *args) -> float:
    """FLOPs of one train step: XLA's cost analysis of the lowered program, traced with
    XLA's attention (`accelerator_attention`), as the planner counts: a cuDNN custom call
    counts 0 FLOPs, and the iterations of 'blockwise''s loop are added from the jaxpr.
    Lowering only (the unoptimised program; no second compile of the step)."""
    import jax

    from unlearn_jax.models.attention import accelerator_attention
    from unlearn_jax.planning.costs import flops_of, loop_flops

    with accelerator_attention():  # a fresh function: no trace cached without the context
        traced = jax.jit(lambda *a: step_fn(*a)).trace(*args)
        lowered = traced.lower()
    # Where the logits are large the attention is 'blockwise', a loop XLA counts once.
    return flops_of(lowered) + loop_flops(traced.jaxpr)


def _our_batch(preset, inputs) -> dict:
    """The trainer's batch: per-example arrays [1 micro-step, B, ...] (NHWC), shared [1,L,D].

    As in training, 'anchor_context' is per example and only ∅ is shared.
    """
    from unlearn_jax.trainer.batches import SHARED_KEYS
    from unlearn_jax.unlearn.registry import BATCH_KEYS

    nhwc = lambda x: x.transpose(0, 2, 3, 1)
    values = {
        "forget": {
            "x0": nhwc(inputs["forget_x0"]),
            "x_t": nhwc(inputs["esd_x_t"]),
            "t": inputs["esd_t"],
            "context": inputs["forget_context"],
            "anchor_context": inputs["anchor_context"],
        },
        "retain": {"x0": nhwc(inputs["retain_x0"]), "context": inputs["retain_context"]},
    }
    for part in values.values():
        part.update(uncond_context=inputs["empty_context"])
    terms = {"forget": preset.forget, "retain": preset.retain}
    return {
        part: {
            k: values[part][k] if k in SHARED_KEYS else values[part][k][None]
            for k in BATCH_KEYS[term]
        }
        for part, term in terms.items()
        if term is not None and BATCH_KEYS[term]
    }
