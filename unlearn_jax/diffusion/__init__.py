"""Noise schedules, solvers (DDIM, DPM-Solver++(2M), Euler), guidance and the scan sampler."""

from unlearn_jax.diffusion.chunks import data_mesh, precompile_chunks, sample_in_chunks
from unlearn_jax.diffusion.ddim import (
    DDIMPlan,
    ddim_plan,
    ddim_step,
    ddim_timesteps,
    predict_x0_and_eps,
)
from unlearn_jax.diffusion.dpm_solver import DPMSolverPlan, dpm_solver_schedule, dpmpp_2m_plan
from unlearn_jax.diffusion.euler import EulerPlan, euler_plan, euler_schedule, euler_step
from unlearn_jax.diffusion.sampler import (
    ModelFn,
    ddim_sample,
    guided_model_output,
    sample,
    step_noise,
    uses_guidance,
)
from unlearn_jax.diffusion.schedule import NoiseSchedule, load_schedule, schedule_from_config
from unlearn_jax.diffusion.solvers import SCHEDULERS, SolverPlan, check_scheduler, make_plan

__all__ = [
    "DDIMPlan",
    "DPMSolverPlan",
    "EulerPlan",
    "ModelFn",
    "NoiseSchedule",
    "SCHEDULERS",
    "SolverPlan",
    "check_scheduler",
    "data_mesh",
    "ddim_plan",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "dpm_solver_schedule",
    "dpmpp_2m_plan",
    "euler_plan",
    "euler_schedule",
    "euler_step",
    "guided_model_output",
    "load_schedule",
    "make_plan",
    "precompile_chunks",
    "predict_x0_and_eps",
    "sample",
    "sample_in_chunks",
    "schedule_from_config",
    "step_noise",
    "uses_guidance",
]
