"""DPM-Solver++(2M) (Lu et al., arXiv 2211.01095), as diffusers' `DPMSolverMultistepScheduler`.

With the settings diffusers uses for Stable Diffusion (algorithm_type
'dpmsolver++', solver_order 2, solver_type 'midpoint', lower_order_final,
final_sigmas_type 'zero'), step i from sigma_i to sigma_{i+1}:

  * turns the model output into a data prediction x0_i (epsilon, v or x_0 models);
  * integrates exactly the linear part of the ODE in lambda = log(alpha / sigma),
    with x0 extrapolated linearly from x0_i and the previous step's x0_{i-1}
    (the multistep buffer, held in the sampler's carry);
  * is first order (a DDIM step) where there is no usable history: the first
    step, and the last one, which lands on sigma = 0.

Timesteps, sigmas and every per-step coefficient depend on the schedule only,
so they are NumPy computed once on the host (float64 from the float32 sigmas).
The device step is the same three multiply-adds for every step, with the
order folded into the coefficients (a zero `prev_coef` is a first-order step),
so one `lax.scan` body serves all of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.struct
import jax.numpy as jnp
import numpy as np

from unlearn_jax.diffusion.schedule import schedule_from_config
from unlearn_jax.diffusion.sigmas import (
    final_sigma,
    karras_sigmas,
    read_options,
    sigma_table,
    sigma_to_t,
    solver_alphas_cumprod,
)

Array = jnp.ndarray

# DPMSolverMultistepScheduler.__init__ defaults of the options read here.
DPM_DEFAULTS: dict[str, Any] = {
    "beta_schedule": "linear",
    "solver_order": 2,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -math.inf,
    "variance_type": None,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
}
DPM_SUPPORTED: dict[str, tuple[Any, ...]] = {
    "solver_order": (2,),
    "algorithm_type": ("dpmsolver++",),
    "solver_type": ("midpoint",),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "final_sigmas_type": ("zero", "sigma_min"),
    "lambda_min_clipped": (-math.inf,),
    "variance_type": (None,),
    "timestep_spacing": ("linspace", "leading", "trailing"),
    "use_dynamic_shifting": (False,),
}


def _spaced_timesteps(options: Mapping[str, Any], num_train: int, num_steps: int) -> np.ndarray:
    """Integer timesteps [S], high first, by `timestep_spacing` (N + 1 points, last dropped)."""
    spacing = options["timestep_spacing"]
    if spacing == "linspace":
        points = np.linspace(0, num_train - 1, num_steps + 1).round()
        return points[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        step_ratio = num_train // (num_steps + 1)
        points = (np.arange(0, num_steps + 1) * step_ratio).round()
        return points[::-1][:-1].astype(np.int64) + options["steps_offset"]
    step_ratio = num_train / num_steps  # trailing
    return np.arange(num_train, 0, -step_ratio).round().astype(np.int64) - 1


def dpm_solver_schedule(
    scheduler_config: Mapping[str, Any],
    num_inference_steps: int,
    *,
    use_karras_sigmas: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Timesteps and sigmas as `DPMSolverMultistepScheduler.set_timesteps` computes them.

    Args:
      scheduler_config: a diffusers scheduler config (any class), read as
        `DPMSolverMultistepScheduler.from_config` reads it.
      num_inference_steps: number of denoising steps N.
      use_karras_sigmas: override the config's `use_karras_sigmas`.

    Returns:
      (timesteps int32 [S], sigmas float32 [S+1] ending with the final sigma,
      options, with the schedule's prediction_type): S == N but for the rare
      float rounding of 'trailing' spacing.
    """
    schedule = schedule_from_config(scheduler_config)
    options = read_options(scheduler_config, DPM_DEFAULTS, DPM_SUPPORTED, "dpmpp_2m")
    if use_karras_sigmas is not None:
        options["use_karras_sigmas"] = use_karras_sigmas
    num_train = schedule.num_train_timesteps
    if not 1 <= num_inference_steps <= num_train:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} must be in [1, {num_train}] "
            "(num_train_timesteps of the schedule)"
        )
    alphas_cumprod = solver_alphas_cumprod(schedule, options["rescale_betas_zero_snr"])
    table = sigma_table(alphas_cumprod)
    timesteps = _spaced_timesteps(options, num_train, num_inference_steps)
    if options["use_karras_sigmas"]:
        # Karras sigmas over the whole table's range; the timesteps fed to the
        # model are where those sigmas fall, rounded (truncated for the cosine
        # schedule, as diffusers' int64 cast does).
        sigmas = karras_sigmas(float(table[0]), float(table[-1]), num_inference_steps)
        timesteps = sigma_to_t(sigmas, np.log(table))
        if options["beta_schedule"] != "squaredcos_cap_v2":
            timesteps = timesteps.round()
        timesteps = timesteps.astype(np.int64)
    else:
        sigmas = np.interp(timesteps, np.arange(num_train), table)
    last = final_sigma(alphas_cumprod, options["final_sigmas_type"])
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    options["prediction_type"] = schedule.prediction_type
    return timesteps.astype(np.int32), sigmas, options


def _second_order_steps(num_steps: int, options: Mapping[str, Any]) -> np.ndarray:
    """[S] bool: which steps use the previous x0 (diffusers' `lower_order_nums` logic)."""
    second = np.arange(num_steps) >= 1
    final_is_first_order = (
        options["euler_at_final"]
        or (options["lower_order_final"] and num_steps < 15)
        or options["final_sigmas_type"] == "zero"
    )
    if final_is_first_order:
        second[-1] = False
    return second


@flax.struct.dataclass
class DPMSolverPlan:
    """A DPM-Solver++(2M) run: the timesteps and per-step coefficients, all [S] arrays.

    The update of step i, with x0 the data prediction and x0_prev the previous one:
      x_next = sample_coef x - x0_coef x0 - prev_coef (x0 - x0_prev).

    Attributes:
      timesteps: [S] int32 timesteps fed to the model.
      sigmas: [S+1] float32 sigmas (diffusers' `scheduler.sigmas`), for reference.
      alpha, sigma: [S] float32 alpha_i = 1 / sqrt(1 + sigma_i^2) and sigma_i alpha_i,
        the VP coefficients x_t = alpha x0 + sigma eps used to read the model output.
      sample_coef: [S] float32 sigma_{i+1} / sigma_i (VP sigmas).
      x0_coef: [S] float32 alpha_{i+1} (exp(-h_i) - 1), h_i = lambda_{i+1} - lambda_i.
      prev_coef: [S] float32 x0_coef_i / (2 r_i), r_i = h_{i-1} / h_i; 0 on first-order steps.
      prediction_type: 'epsilon', 'v_prediction' or 'sample'.
    """

    supports_eta: ClassVar[bool] = False

    timesteps: Array
    sigmas: Array
    alpha: Array
    sigma: Array
    sample_coef: Array
    x0_coef: Array
    prev_coef: Array
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def init(self, latents: Array) -> tuple[Array, Array]:
        """Carry (x, x0_prev); init_noise_sigma is 1 and there is no previous x0 yet."""
        latents = jnp.asarray(latents, jnp.float32)
        return latents, jnp.zeros_like(latents)

    def timestep(self, i: Array) -> Array:
        return self.timesteps[i]

    def model_input(self, carry: tuple[Array, Array], i: Array) -> Array:
        return carry[0]

    def step(
        self,
        carry: tuple[Array, Array],
        model_output: Array,
        i: Array,
        *,
        eta: float = 0.0,
        noise: Array | None = None,
    ) -> tuple[Array, Array]:
        """Step i; `eta` and `noise` are unused: a deterministic solver (the sampler checks)."""
        del eta, noise
        x, x0_prev = carry
        x0 = dpm_data_prediction(
            model_output, x, self.alpha[i], self.sigma[i], self.prediction_type
        )
        x_next = dpm_solver_update(
            x, x0, x0_prev, self.sample_coef[i], self.x0_coef[i], self.prev_coef[i]
        )
        return x_next, x0

    def final(self, carry: tuple[Array, Array]) -> Array:
        return carry[0]


def dpmpp_2m_plan(
    scheduler_config: Mapping[str, Any],
    num_inference_steps: int,
    *,
    use_karras_sigmas: bool | None = None,
) -> DPMSolverPlan:
    """The DPMSolverPlan of `num_inference_steps` steps (see `dpm_solver_schedule`)."""
    timesteps, sigmas, options = dpm_solver_schedule(
        scheduler_config, num_inference_steps, use_karras_sigmas=use_karras_sigmas
    )
    # float64 from the float32 sigmas; sigma = 0 gives lambda = inf, exp(-h) = 0:
    # the last step then returns x0 exactly, as in diffusers.
    s = sigmas.astype(np.float64)
    alpha = 1 / np.sqrt(s**2 + 1)
    sigma = s * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    h = lam[1:] - lam[:-1]
    x0_coef = alpha[1:] * np.expm1(-h)
    second = _second_order_steps(len(timesteps), options)
    h_prev = np.concatenate([[np.nan], h[:-1]])
    prev_coef = np.where(second, 0.5 * x0_coef * h / np.where(second, h_prev, 1.0), 0.0)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return DPMSolverPlan(
        timesteps=jnp.asarray(timesteps, jnp.int32),
        sigmas=f32(sigmas),
        alpha=f32(alpha[:-1]),
        sigma=f32(sigma[:-1]),
        sample_coef=f32(sigma[1:] / sigma[:-1]),
        x0_coef=f32(x0_coef),
        prev_coef=f32(prev_coef),
        prediction_type=options["prediction_type"],
    )


def dpm_data_prediction(
    model_output: Array, x: Array, alpha: Array, sigma: Array, prediction_type: str
) -> Array:
    """x0 from the model output at x = alpha x0 + sigma eps (float32, any input dtype)."""
    model_output = jnp.asarray(model_output, jnp.float32)
    if prediction_type == "epsilon":
        return (x - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def dpm_solver_update(
    x: Array,
    x0: Array,
    x0_prev: Array,
    sample_coef: Array,
    x0_coef: Array,
    prev_coef: Array,
) -> Array:
    """One DPM-Solver++ step [B,...] -> [B,...] float32; prev_coef 0 makes it first order."""
    return sample_coef * x - x0_coef * x0 - prev_coef * (x0 - x0_prev)
