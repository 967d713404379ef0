"""Schedules and DDIM steps against diffusers' DDIMScheduler (the PyTorch reference)."""

from __future__ import annotations

import json

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from unlearn_jax.diffusion import ddim_step, ddim_timesteps, load_schedule, schedule_from_config

diffusers.utils.logging.set_verbosity_error()  # from_config warns about PNDM-only keys

# Stable Diffusion 1.x ships this PNDM config; diffusers users sample with
# DDIMScheduler.from_config(it).
SD_PNDM_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.7.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

CONFIGS = {
    "sd_pndm": SD_PNDM_CONFIG,
    "sd2_v": {**SD_PNDM_CONFIG, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"},
    "trailing": {**SD_PNDM_CONFIG, "timestep_spacing": "trailing", "set_alpha_to_one": True},
    "linspace": {**SD_PNDM_CONFIG, "timestep_spacing": "linspace"},
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "linear_odd_t": {"beta_schedule": "linear", "num_train_timesteps": 777, "steps_offset": 2},
    "squaredcos": {"beta_schedule": "squaredcos_cap_v2", "set_alpha_to_one": False},
    "clipped": {"beta_schedule": "linear", "clip_sample": True, "clip_sample_range": 0.8},
    # Keys listed in _use_default_values take DDIM's default (set_alpha_to_one=True).
    "use_defaults": {**SD_PNDM_CONFIG, "_use_default_values": ["set_alpha_to_one"]},
}
STEP_COUNTS = (1, 3, 7, 20, 50, 333)


def _reference(config: dict) -> diffusers.DDIMScheduler:
    return diffusers.DDIMScheduler.from_config(config)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_alphas_cumprod_bit_exact(name):
    config = CONFIGS[name]
    ours, ref = schedule_from_config(config), _reference(config)
    np.testing.assert_array_equal(ours.betas, ref.betas.numpy())
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
    assert ours.alphas_cumprod.dtype == np.float32
    assert ours.final_alpha_cumprod == np.float32(ref.final_alpha_cumprod.item())
    assert ours.prediction_type == ref.config.prediction_type
    assert ours.clip_sample == ref.config.clip_sample


def test_zero_terminal_snr_close():
    config = {**CONFIGS["trailing"], "rescale_betas_zero_snr": True}
    ours, ref = schedule_from_config(config), _reference(config)
    # Not bit-exact: torch's float32 sqrt is not correctly rounded (see schedule.py).
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
    assert ours.alphas_cumprod[-1] == 0.0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ddim_timesteps_match(name):
    config = CONFIGS[name]
    schedule, ref = schedule_from_config(config), _reference(config)
    for steps in STEP_COUNTS:
        ref.set_timesteps(steps)
        timesteps, prev = ddim_timesteps(schedule, steps)
        np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
        # diffusers' step() always goes back by T // N, whatever the spacing.
        np.testing.assert_array_equal(prev, timesteps - ref.config.num_train_timesteps // steps)
        assert timesteps.dtype == np.int32


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("name", ["sd_pndm", "trailing", "clipped"])
def test_ddim_step_matches_diffusers(name, eta, prediction_type):
    config = {**CONFIGS[name], "prediction_type": prediction_type}
    schedule, ref = schedule_from_config(config), _reference(config)
    ref.set_timesteps(10)
    timesteps, prev = ddim_timesteps(schedule, 10)
    rng = np.random.default_rng(0)
    worst = 0.0
    for i in (0, 4, 9):  # first, middle, and last (prev < 0) steps
        sample, output, noise = rng.standard_normal((3, 2, 4, 6, 5), dtype=np.float32)
        expected = ref.step(
            torch.from_numpy(output),
            int(timesteps[i]),
            torch.from_numpy(sample),
            eta=eta,
            variance_noise=torch.from_numpy(noise) if eta > 0 else None,
        ).prev_sample.numpy()
        nhwc = lambda x: jnp.asarray(x.transpose(0, 2, 3, 1))
        got = ddim_step(
            nhwc(output),
            timesteps[i],
            prev[i],
            nhwc(sample),
            schedule.alphas_cumprod,
            schedule.final_alpha_cumprod,
            eta=eta,
            noise=nhwc(noise) if eta > 0 else None,
            prediction_type=prediction_type,
            clip_sample=schedule.clip_sample,
            clip_sample_range=schedule.clip_sample_range,
        )
        got = np.asarray(got).transpose(0, 3, 1, 2)
        scale = max(1.0, float(np.abs(expected).max()))
        worst = max(worst, float(np.abs(got - expected).max()) / scale)
    assert worst < 1e-6, worst


def test_ddim_step_upcasts_bf16_model_output():
    schedule = schedule_from_config(SD_PNDM_CONFIG)
    rng = np.random.default_rng(1)
    sample, output = rng.standard_normal((2, 1, 4, 4, 3), dtype=np.float32)
    output_bf16 = jnp.asarray(output, jnp.bfloat16)
    args = (981, 961, jnp.asarray(sample), schedule.alphas_cumprod, schedule.final_alpha_cumprod)
    got = ddim_step(output_bf16, *args)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, ddim_step(output_bf16.astype(jnp.float32), *args))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"beta_shedule": "linear"}, "beta_shedule"),
        ({"thresholding": True}, "thresholding"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"prediction_type": "flow"}, "prediction_type"),
        ({"timestep_spacing": "middle"}, "timestep_spacing"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ],
)
def test_bad_config_raises(bad, message):
    with pytest.raises(ValueError, match=message):
        schedule_from_config({**SD_PNDM_CONFIG, **bad})


def test_bad_step_counts_raise():
    schedule = schedule_from_config(SD_PNDM_CONFIG)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ddim_timesteps(schedule, 1001)
    with pytest.raises(ValueError, match="outside"):
        ddim_timesteps(schedule_from_config({**SD_PNDM_CONFIG, "steps_offset": 50}), 20)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(jnp.zeros((1, 2, 2, 1)), 1, -1, jnp.zeros((1, 2, 2, 1)), np.ones(2), 1.0, eta=0.5)


def test_load_schedule_from_pipeline_folder(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_PNDM_CONFIG))
    for path in (
        tmp_path,
        tmp_path / "scheduler",
        tmp_path / "scheduler" / "scheduler_config.json",
    ):
        np.testing.assert_array_equal(
            load_schedule(path).alphas_cumprod, schedule_from_config(SD_PNDM_CONFIG).alphas_cumprod
        )
    with pytest.raises(FileNotFoundError):
        load_schedule(tmp_path / "missing")
