"""Euler's method on the probability-flow ODE, as diffusers' `EulerDiscreteScheduler`.

Karras et al. (arXiv 2206.00364) write sampling in the variable
x = x_t / sqrt(alpha-bar_t) = x_0 + sigma eps, where the ODE is dx/dsigma = eps.
The scheduler keeps its latents in that variable, hence three differences from
DDIM that matter for parity:

  * the initial noise is multiplied by `init_noise_sigma` (sigma_max, or
    sqrt(sigma_max^2 + 1) for 'leading' spacing);
  * the model sees x / sqrt(sigma^2 + 1) (`scale_model_input`), i.e. x_t again;
  * the timesteps are floats: sigma is interpolated linearly in t between table
    entries (and with Karras sigmas, t in log sigma), and the model is called
    at those fractional timesteps.

Timesteps and sigmas are NumPy computed once on the host; the device step is
one Euler update in float32, the same for every step.
"""

from __future__ import annotations

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

# EulerDiscreteScheduler.__init__ defaults of the options read here.
EULER_DEFAULTS: dict[str, Any] = {
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
    "timestep_spacing": "linspace",
    "timestep_type": "discrete",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "final_sigmas_type": "zero",
}
EULER_SUPPORTED: dict[str, tuple[Any, ...]] = {
    "interpolation_type": ("linear",),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "timestep_spacing": ("linspace", "leading", "trailing"),
    "timestep_type": ("discrete",),
    "final_sigmas_type": ("zero", "sigma_min"),
}


def _spaced_timesteps(options: Mapping[str, Any], num_train: int, num_steps: int) -> np.ndarray:
    """float32 timesteps [S], high first, by `timestep_spacing` (N points)."""
    spacing = options["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, num_steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        step_ratio = num_train // num_steps
        points = (np.arange(0, num_steps) * step_ratio).round()[::-1].astype(np.float32)
        return points + np.float32(options["steps_offset"])
    step_ratio = num_train / num_steps  # trailing
    return np.arange(num_train, 0, -step_ratio).round().astype(np.float32) - np.float32(1)


def euler_schedule(
    scheduler_config: Mapping[str, Any],
    num_inference_steps: int,
    *,
    use_karras_sigmas: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.float32, str]:
    """Timesteps, sigmas and init_noise_sigma as `EulerDiscreteScheduler.set_timesteps`.

    Args:
      scheduler_config: a diffusers scheduler config (any class), read as
        `EulerDiscreteScheduler.from_config` reads it.
      num_inference_steps: number of denoising steps N.
      use_karras_sigmas: override the config's `use_karras_sigmas`.

    Returns:
      (timesteps float32 [S], sigmas float32 [S+1] ending with the final sigma,
      init_noise_sigma float32, prediction_type); S == N but for the rare float
      rounding of 'trailing' spacing (not with Karras sigmas).
    """
    schedule = schedule_from_config(scheduler_config)
    options = read_options(scheduler_config, EULER_DEFAULTS, EULER_SUPPORTED, "euler")
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
    # Interpolated in float64 between the float32 table entries.
    sigmas = np.interp(timesteps, np.arange(num_train), table)
    if options["use_karras_sigmas"]:
        # Karras spacing between the first and last *inference* sigmas (unless the
        # config pins sigma_min/sigma_max); fractional timesteps where they fall.
        low = options["sigma_min"] if options["sigma_min"] is not None else float(sigmas[-1])
        high = options["sigma_max"] if options["sigma_max"] is not None else float(sigmas[0])
        sigmas = karras_sigmas(low, high, num_inference_steps)
        timesteps = sigma_to_t(sigmas, np.log(table))
    last = final_sigma(alphas_cumprod, options["final_sigmas_type"])
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    init_noise_sigma = sigmas.max()
    if options["timestep_spacing"] == "leading":
        init_noise_sigma = np.sqrt(init_noise_sigma * init_noise_sigma + np.float32(1.0))
    return (
        timesteps.astype(np.float32),
        sigmas,
        np.float32(init_noise_sigma),
        schedule.prediction_type,
    )


@flax.struct.dataclass
class EulerPlan:
    """An Euler run. The carry is x = x_t / sqrt(alpha-bar_t), in diffusers' latents scale.

    Attributes:
      timesteps: [S] float32 (fractional) timesteps fed to the model.
      sigmas: [S+1] float32, the last one the final sigma (0 by default).
      init_noise_sigma: [] float32 factor of the initial noise.
      prediction_type: 'epsilon', 'v_prediction' or 'sample'.
    """

    supports_eta: ClassVar[bool] = False

    timesteps: Array
    sigmas: Array
    init_noise_sigma: Array
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def init(self, latents: Array) -> Array:
        return jnp.asarray(latents, jnp.float32) * self.init_noise_sigma

    def timestep(self, i: Array) -> Array:
        return self.timesteps[i]

    def model_input(self, carry: Array, i: Array) -> Array:
        """diffusers' `scale_model_input`: x / sqrt(sigma^2 + 1) = x_t."""
        sigma = self.sigmas[i]
        return carry / jnp.sqrt(sigma * sigma + 1)

    def step(
        self,
        carry: Array,
        model_output: Array,
        i: Array,
        *,
        eta: float = 0.0,
        noise: Array | None = None,
    ) -> Array:
        """Step i; `eta` and `noise` are unused: a deterministic solver (the sampler checks)."""
        del eta, noise
        return euler_step(
            model_output, carry, self.sigmas[i], self.sigmas[i + 1], self.prediction_type
        )

    def final(self, carry: Array) -> Array:
        return carry


def euler_plan(
    scheduler_config: Mapping[str, Any],
    num_inference_steps: int,
    *,
    use_karras_sigmas: bool | None = None,
) -> EulerPlan:
    """The EulerPlan of `num_inference_steps` steps (see `euler_schedule`)."""
    timesteps, sigmas, init_noise_sigma, prediction_type = euler_schedule(
        scheduler_config, num_inference_steps, use_karras_sigmas=use_karras_sigmas
    )
    return EulerPlan(
        timesteps=jnp.asarray(timesteps),
        sigmas=jnp.asarray(sigmas),
        init_noise_sigma=jnp.asarray(init_noise_sigma),
        prediction_type=prediction_type,
    )


def euler_step(
    model_output: Array, x: Array, sigma: Array, sigma_next: Array, prediction_type: str
) -> Array:
    """One Euler step from sigma to sigma_next, equal to `EulerDiscreteScheduler.step` (no churn).

    Args:
      model_output: [B, ...] model prediction at x / sqrt(sigma^2 + 1); cast to float32.
      x: [B, ...] float32 latents in the scheduler's scale (x_0 + sigma eps).
      sigma, sigma_next: float32 scalars, sigma > 0.
      prediction_type: 'epsilon', 'v_prediction' or 'sample'.

    Returns:
      [B, ...] float32 latents at sigma_next.
    """
    model_output = jnp.asarray(model_output, jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    if prediction_type == "epsilon":
        x0 = x - sigma * model_output
    elif prediction_type == "v_prediction":
        x0 = model_output * (-sigma / jnp.sqrt(sigma * sigma + 1)) + x / (sigma * sigma + 1)
    elif prediction_type == "sample":
        x0 = model_output
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    derivative = (x - x0) / sigma
    return x + derivative * (sigma_next - sigma)
