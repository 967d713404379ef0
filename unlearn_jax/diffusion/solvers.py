"""The solver interface of the scan sampler, and the registry of solvers by name.

A solver is its plan: a pytree (flax struct) whose arrays are the host-computed
timestep/sigma tables of one run, and whose methods are the pure, jittable
pieces the sampler's `lax.scan` body calls:

    carry = plan.init(latents)                      # before the loop
    for i in range(plan.num_steps):                 # the scan
        output = model(plan.model_input(carry, i), plan.timestep(i), ...)
        carry = plan.step(carry, output, i, eta=eta, noise=noise)
    latents = plan.final(carry)

The carry holds whatever state the solver needs between steps: DDIM and Euler
carry the latents, DPM-Solver++(2M) also the previous x0 prediction. The step
index i is a traced scalar, so one compiled program serves every step count of
the same length and every schedule; per-step differences (e.g. DPM-Solver's
first-order first and last steps) are data in the plan, not code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import jax

from unlearn_jax.diffusion.ddim import ddim_plan
from unlearn_jax.diffusion.dpm_solver import dpmpp_2m_plan
from unlearn_jax.diffusion.euler import euler_plan
from unlearn_jax.diffusion.schedule import schedule_from_config

Array = jax.Array
Carry = Any

# The names `generate(scheduler=...)` and `--scheduler` accept; ddim is the default.
SCHEDULERS = ("ddim", "dpmpp_2m", "euler")


class SolverPlan(Protocol):
    """What the sampler needs from a solver (see the module docstring)."""

    # Whether `step` uses eta and noise (DDIM); the sampler rejects eta > 0 otherwise.
    supports_eta: ClassVar[bool]

    @property
    def num_steps(self) -> int: ...

    def init(self, latents: Array) -> Carry:
        """[B,h,w,C] initial standard normal noise -> the carry of step 0."""

    def timestep(self, i: Array) -> Array:
        """The model's timestep of step i: int32 scalar, or float32 for fractional ones."""

    def model_input(self, carry: Carry, i: Array) -> Array:
        """[B,h,w,C] float32 latents to evaluate the model on at step i."""

    def step(
        self, carry: Carry, model_output: Array, i: Array, *, eta: float, noise: Array | None
    ) -> Carry:
        """The carry after step i, given the (guided) model output [B,h,w,C] float32."""

    def final(self, carry: Carry) -> Array:
        """[B,h,w,C] float32 final latents from the last carry."""


def check_scheduler(name: str) -> str:
    """Returns `name` if it is a known scheduler; raises ValueError listing the known ones."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    return name


def make_plan(
    scheduler: str,
    scheduler_config: Mapping[str, Any],
    num_inference_steps: int,
    *,
    use_karras_sigmas: bool | None = None,
) -> SolverPlan:
    """The plan of `num_inference_steps` steps of a solver, from a diffusers scheduler config.

    The config is read as `<diffusers class>.from_config(config)` reads it, so the
    same folder gives what diffusers gives after swapping in that scheduler:
    'ddim' -> DDIMScheduler, 'dpmpp_2m' -> DPMSolverMultistepScheduler, 'euler'
    -> EulerDiscreteScheduler (keys the file lacks take *that* class's defaults,
    e.g. timestep_spacing 'linspace' rather than DDIM's 'leading').

    Args:
      scheduler: one of SCHEDULERS.
      scheduler_config: the content of `scheduler_config.json`.
      num_inference_steps: number of denoising steps.
      use_karras_sigmas: dpmpp_2m/euler only: override the config's choice.

    Raises:
      ValueError: unknown scheduler, or options the solver does not implement.
    """
    check_scheduler(scheduler)
    if scheduler == "ddim":
        if use_karras_sigmas:
            raise ValueError("use_karras_sigmas applies to dpmpp_2m and euler, not ddim")
        return ddim_plan(schedule_from_config(scheduler_config), num_inference_steps)
    make = dpmpp_2m_plan if scheduler == "dpmpp_2m" else euler_plan
    return make(scheduler_config, num_inference_steps, use_karras_sigmas=use_karras_sigmas)
