"""Noise schedules, DDIM steps, guidance and the scan sampler."""

from unlearn_jax.diffusion.ddim import (
    DDIMPlan,
    ddim_plan,
    ddim_step,
    ddim_timesteps,
    predict_x0_and_eps,
)
from unlearn_jax.diffusion.sampler import (
    ModelFn,
    data_mesh,
    ddim_sample,
    guided_model_output,
    sample_in_chunks,
    step_noise,
    uses_guidance,
)
from unlearn_jax.diffusion.schedule import NoiseSchedule, load_schedule, schedule_from_config

__all__ = [
    "DDIMPlan",
    "ModelFn",
    "NoiseSchedule",
    "data_mesh",
    "ddim_plan",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "guided_model_output",
    "load_schedule",
    "predict_x0_and_eps",
    "sample_in_chunks",
    "schedule_from_config",
    "step_noise",
    "uses_guidance",
]
