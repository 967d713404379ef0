"""The scan sampler: debug-loop agreement, diffusers parity, guidance, chunking, sharding."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unlearn_jax.diffusion import (
    data_mesh,
    ddim_plan,
    ddim_sample,
    sample_in_chunks,
    schedule_from_config,
    step_noise,
)
from unlearn_jax.diffusion.sampler import placeholder_key

SD_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}
BATCH, HEIGHT, WIDTH, CHANNELS, TOKENS, DIM = 3, 6, 6, 4, 5, 8


def make_model(prediction_type: str = "epsilon", calls: list | None = None):
    """A tiny analytic model: the exact denoiser of a point mass at mu(context), perturbed.

    x_0 = tanh(mean_L(context) @ P) is what the model "believes"; a random linear
    map of the latents keeps the prediction from being trivially exact. `calls`,
    if given, records the batch size of every (traced) call.
    """
    alphas_cumprod = jnp.asarray(schedule_from_config(SD_CONFIG).alphas_cumprod)

    def model_fn(params, latents, timesteps, context):
        if calls is not None:
            calls.append(latents.shape[0])
        alpha = alphas_cumprod[timesteps][:, None, None, None]
        mu = jnp.tanh(context.mean(axis=1) @ params["proj"])[:, None, None, :]
        eps = (latents - jnp.sqrt(alpha) * mu) / jnp.sqrt(1 - alpha)
        eps = eps + 0.1 * jnp.tanh(latents @ params["mix"])
        if prediction_type == "v_prediction":
            return jnp.sqrt(alpha) * eps - jnp.sqrt(1 - alpha) * mu
        return eps

    return model_fn


def make_inputs(batch: int = BATCH, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 5)
    params = {
        "proj": jax.random.normal(keys[0], (DIM, CHANNELS)),
        "mix": 0.5 * jax.random.normal(keys[1], (CHANNELS, CHANNELS)),
    }
    latents = jax.random.normal(keys[2], (batch, HEIGHT, WIDTH, CHANNELS))
    cond = jax.random.normal(keys[3], (batch, TOKENS, DIM))
    uncond = jax.random.normal(keys[4], (TOKENS, DIM))
    return params, latents, cond, uncond


def make_plan(steps: int, prediction_type: str = "epsilon"):
    return ddim_plan(schedule_from_config({**SD_CONFIG, "prediction_type": prediction_type}), steps)


@pytest.mark.parametrize("prediction_type, eta", [("epsilon", 0.0), ("v_prediction", 0.7)])
def test_scan_equals_debug_loop(prediction_type, eta):
    model_fn = make_model(prediction_type)
    params, latents, cond, uncond = make_inputs()
    plan = make_plan(6, prediction_type)
    kwargs = dict(guidance_scale=5.0, eta=eta, key=jax.random.key(7))
    compiled = ddim_sample(model_fn, params, plan, latents, cond, uncond, **kwargs)
    eager = ddim_sample(model_fn, params, plan, latents, cond, uncond, debug=True, **kwargs)
    assert compiled.shape == latents.shape and compiled.dtype == jnp.float32
    # Guidance 5 extrapolates to |x| ~ 9: compare relative to that scale.
    np.testing.assert_allclose(compiled, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "prediction_type, eta, steps, guidance",
    [("epsilon", 0.0, 20, 7.5), ("v_prediction", 0.7, 10, 4.0), ("epsilon", 0.0, 8, 1.0)],
)
def test_matches_diffusers_ddim_loop(prediction_type, eta, steps, guidance):
    import diffusers
    import torch

    diffusers.utils.logging.set_verbosity_error()
    model_fn = make_model(prediction_type)
    params, latents, cond, uncond = make_inputs()
    plan = make_plan(steps, prediction_type)
    key = jax.random.key(3)
    ours = ddim_sample(
        model_fn, params, plan, latents, cond, uncond, guidance_scale=guidance, eta=eta, key=key
    )

    # The reference: diffusers' pipeline loop, with the same model evaluated
    # through NumPy, latents in diffusers' NCHW layout.
    scheduler = diffusers.DDIMScheduler.from_config(
        {**SD_CONFIG, "prediction_type": prediction_type}
    )
    scheduler.set_timesteps(steps)
    to_nhwc = lambda x: jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    to_nchw = lambda x: torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    sample = to_nchw(latents) * scheduler.init_noise_sigma
    do_cfg = guidance > 1
    context = jnp.concatenate([jnp.broadcast_to(uncond, cond.shape), cond]) if do_cfg else cond
    for i, t in enumerate(scheduler.timesteps):
        model_input = torch.cat([sample] * 2) if do_cfg else sample
        t_batch = jnp.full((model_input.shape[0],), int(t), jnp.int32)
        output = to_nchw(model_fn(params, to_nhwc(model_input), t_batch, context))
        if do_cfg:
            output_uncond, output_cond = output.chunk(2)
            output = output_uncond + guidance * (output_cond - output_uncond)
        noise = to_nchw(step_noise(key, jnp.arange(BATCH), i, latents.shape[1:])) if eta else None
        sample = scheduler.step(output, t, sample, eta=eta, variance_noise=noise).prev_sample
    reference = sample.numpy().transpose(0, 2, 3, 1)
    assert np.abs(reference).max() > 0.1  # a non-degenerate result
    # Guidance extrapolates to |x| ~ 14; float32 over 20 steps agrees to ~1e-6 relative.
    np.testing.assert_allclose(ours, reference, rtol=2e-6, atol=2e-6)


def test_trajectory_is_every_steps_model_input_as_in_diffusers_loop():
    """trajectory=True (ESD's x_t source) records what diffusers' loop feeds the UNet."""
    import diffusers
    import torch

    model_fn = make_model()
    params, latents, cond, uncond = make_inputs()
    plan, guidance, steps = make_plan(5), 4.0, 5
    ours = ddim_sample(
        model_fn, params, plan, latents, cond, uncond, guidance_scale=guidance, trajectory=True
    )
    chunked = sample_in_chunks(
        model_fn,
        params,
        plan,
        latents,
        cond,
        uncond,
        batch_size=2,
        guidance_scale=guidance,
        progress=False,
        trajectory=True,
    )
    scheduler = diffusers.DDIMScheduler.from_config(SD_CONFIG)
    scheduler.set_timesteps(steps)
    to_nchw = lambda x: torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    sample = to_nchw(latents) * scheduler.init_noise_sigma
    context = jnp.concatenate([jnp.broadcast_to(uncond, cond.shape), cond])
    inputs = []
    for t in scheduler.timesteps:
        inputs.append(sample.numpy().transpose(0, 2, 3, 1))
        model_input = jnp.asarray(torch.cat([sample] * 2).numpy().transpose(0, 2, 3, 1))
        t_batch = jnp.full((model_input.shape[0],), int(t), jnp.int32)
        uncond_out, cond_out = to_nchw(model_fn(params, model_input, t_batch, context)).chunk(2)
        output = uncond_out + guidance * (cond_out - uncond_out)
        sample = scheduler.step(output, t, sample).prev_sample
    reference = np.stack(inputs, axis=1)
    assert ours.shape == (BATCH, steps, HEIGHT, WIDTH, CHANNELS)
    np.testing.assert_allclose(ours, reference, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(chunked, ours, rtol=2e-6, atol=2e-6)


def test_guidance_one_skips_unconditional_half():
    calls: list[int] = []
    model_fn = make_model(calls=calls)
    params, latents, cond, uncond = make_inputs()
    plan = make_plan(4)
    ddim_sample(model_fn, params, plan, latents, cond, uncond, guidance_scale=3.0)
    assert calls == [2 * BATCH]
    calls.clear()
    for guidance in (1.0, 0.5):
        without = ddim_sample(model_fn, params, plan, latents, cond, None, guidance_scale=guidance)
    assert calls == [BATCH]  # one trace for both scales, conditional batch only
    # Guidance 1 is mathematically the conditional model: up to rounding of u + 1 (c - u).
    with_uncond = ddim_sample(
        model_fn, params, plan, latents, cond, uncond, guidance_scale=1.0 + 1e-7
    )
    np.testing.assert_allclose(without, with_uncond, atol=1e-5)
    with pytest.raises(ValueError, match="uncond"):
        ddim_sample(model_fn, params, plan, latents, cond, None, guidance_scale=2.0)


def test_new_params_and_guidance_reuse_the_compiled_sampler():
    calls: list[int] = []
    model_fn = make_model(calls=calls)
    params, latents, cond, uncond = make_inputs()
    other_params = jax.tree.map(lambda p: p * 1.5, params)
    plan = make_plan(5)
    a = ddim_sample(model_fn, params, plan, latents, cond, uncond, guidance_scale=3.0)
    b = ddim_sample(model_fn, other_params, plan, latents, cond, uncond, guidance_scale=6.0)
    c = ddim_sample(
        model_fn, params, make_plan(5, "epsilon"), latents, cond, uncond, guidance_scale=3.0
    )
    assert len(calls) == 1
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, c)


def test_chunked_equals_one_batch_and_compiles_once():
    total = 7
    params, latents, cond, uncond = make_inputs(batch=total, seed=1)
    plan = make_plan(6)
    key = jax.random.key(11)
    # eta > 0: the per-example noise streams must not depend on the chunking.
    kwargs = dict(guidance_scale=4.0, eta=0.5, key=key)
    one_batch = ddim_sample(make_model(), params, plan, latents, cond, uncond, **kwargs)
    calls: list[int] = []
    chunked = sample_in_chunks(
        make_model(calls=calls),
        params,
        plan,
        np.asarray(latents),
        np.asarray(cond),
        uncond,
        batch_size=3,  # chunks of 3, 3, 1 (+2 padding)
        progress=False,
        **kwargs,
    )
    assert calls == [2 * 3]  # one trace, CFG-doubled chunk batch
    assert isinstance(chunked, np.ndarray) and chunked.shape == latents.shape
    # Equal up to float32 rounding: XLA may vectorise a batch of 3 unlike one of 7 (with
    # jaxlib 0.10.2 on these CPUs the two differ by up to 7.5e-7 relative, on values ~5).
    np.testing.assert_allclose(chunked, one_batch, rtol=2e-6, atol=1e-6)


def check_sharded_matches_single_device() -> None:
    """Run in a process with 8 (fake CPU) devices: sharded sampling == one device."""
    assert jax.device_count() >= 8, jax.device_count()
    total = 11
    model_fn = make_model()
    params, latents, cond, uncond = make_inputs(batch=total, seed=2)
    plan = make_plan(5)
    kwargs = dict(guidance_scale=3.0, eta=0.3, key=jax.random.key(5))
    single = ddim_sample(model_fn, params, plan, latents, cond, uncond, **kwargs)
    mesh = data_mesh()
    # batch_size 6 is rounded up to 8 (the device count): chunks of 8 and 3 (+5 padding).
    sharded = sample_in_chunks(
        model_fn,
        params,
        plan,
        latents,
        cond,
        uncond,
        batch_size=6,
        mesh=mesh,
        progress=False,
        **kwargs,
    )
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-6)

    # The batch really is split over the devices, and stays split in the output.
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    placed = jax.device_put((latents[:8], cond[:8]), batch_sharding)
    out = ddim_sample(model_fn, params, plan, *placed, uncond, **kwargs)
    assert len(out.sharding.device_set) == jax.device_count()
    assert out.addressable_shards[0].data.shape[0] == 8 // jax.device_count()
    np.testing.assert_allclose(out, single[:8], rtol=0, atol=1e-6)


def test_sharded_sampling_equals_single_device():
    if jax.device_count() >= 8:
        check_sharded_matches_single_device()
        return
    # XLA_FLAGS must be set before JAX starts, so run the check in a fresh process.
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    code = (
        f"import sys; sys.path.insert(0, {tests_dir!r}); "
        "import test_sampler; test_sampler.check_sharded_matches_single_device()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_placeholder_key_is_key_zero_without_its_hash():
    key = placeholder_key()
    reference = jax.random.key(0)
    assert key.dtype == reference.dtype and key.shape == reference.shape
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(reference))
    # Same draws, so a program compiled for one runs identically on the other.
    np.testing.assert_array_equal(jax.random.normal(key, (4,)), jax.random.normal(reference, (4,)))
