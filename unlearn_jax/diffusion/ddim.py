"""DDIM (Song et al., arXiv 2010.02502) timesteps and update, as diffusers does them.

Two diffusers details matter for parity and are kept on purpose:
  * the previous timestep is always `t - num_train_timesteps // num_steps`, even
    for 'trailing'/'linspace' spacing where that is not the next timestep of
    the schedule (diffusers' `DDIMScheduler.step` does exactly this);
  * a negative previous timestep (the last step) uses `final_alpha_cumprod`.

The update is computed in float32 whatever the model's dtype: bf16 schedule
arithmetic gives black images.
"""

from __future__ import annotations

from typing import ClassVar

import flax.struct
import jax.numpy as jnp
import numpy as np

from unlearn_jax.diffusion.schedule import NoiseSchedule

Array = jnp.ndarray

# diffusers' DDIMScheduler.init_noise_sigma: initial latents are used as given.
INIT_NOISE_SIGMA = 1.0


def ddim_timesteps(
    schedule: NoiseSchedule, num_inference_steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """The timesteps of a DDIM run, exactly as `DDIMScheduler.set_timesteps`.

    Args:
      schedule: the noise schedule (its spacing and steps_offset are used).
      num_inference_steps: number of denoising steps N.

    Returns:
      (timesteps, prev_timesteps): int32 [S] each, in denoising order (high t
      first); prev_timesteps[i] < 0 marks a step to `final_alpha_cumprod`.
      S == N except for the rare 'trailing' float rounding that diffusers also has.
    """
    num_train = schedule.num_train_timesteps
    if not 1 <= num_inference_steps <= num_train:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} must be in [1, {num_train}] "
            "(num_train_timesteps of the schedule)"
        )
    # The same NumPy expressions as diffusers, so that rounding ties agree.
    if schedule.timestep_spacing == "linspace":
        timesteps = (
            np.linspace(0, num_train - 1, num_inference_steps).round()[::-1].astype(np.int64)
        )
    elif schedule.timestep_spacing == "leading":
        step_ratio = num_train // num_inference_steps
        timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].astype(np.int64)
        timesteps = timesteps + schedule.steps_offset
    elif schedule.timestep_spacing == "trailing":
        step_ratio = num_train / num_inference_steps
        timesteps = np.round(np.arange(num_train, 0, -step_ratio)).astype(np.int64) - 1
    else:
        raise ValueError(f"unknown timestep_spacing {schedule.timestep_spacing!r}")
    if timesteps.max() >= num_train or timesteps.min() < 0:
        # diffusers would index out of range here; jnp indexing would clamp silently.
        raise ValueError(
            f"timesteps {timesteps.min()}..{timesteps.max()} outside [0, {num_train}) "
            f"(steps_offset={schedule.steps_offset})"
        )
    prev_timesteps = timesteps - num_train // num_inference_steps
    return timesteps.astype(np.int32), prev_timesteps.astype(np.int32)


@flax.struct.dataclass
class DDIMPlan:
    """Everything the jitted sampler needs to know about the schedule.

    Arrays are pytree leaves (inputs of the compiled function, so a new step
    count of the same length, or a new schedule, needs no new trace); the
    strings and flags are static. As a solver (`solvers.SolverPlan`) the carry
    is just the latents.

    Attributes:
      timesteps: [S] int32, denoising order.
      prev_timesteps: [S] int32 (negative: use final_alpha_cumprod).
      alphas_cumprod: [T] float32.
      final_alpha_cumprod: [] float32.
      prediction_type: 'epsilon', 'v_prediction' or 'sample'.
      clip_sample: clip predicted x_0 to +-clip_sample_range.
      clip_sample_range: the clipping bound.
    """

    timesteps: Array
    prev_timesteps: Array
    alphas_cumprod: Array
    final_alpha_cumprod: Array
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")
    clip_sample: bool = flax.struct.field(pytree_node=False, default=False)
    clip_sample_range: float = flax.struct.field(pytree_node=False, default=1.0)

    supports_eta: ClassVar[bool] = True

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def init(self, latents: Array) -> Array:
        return jnp.asarray(latents, jnp.float32) * INIT_NOISE_SIGMA

    def timestep(self, i: Array) -> Array:
        return self.timesteps[i]

    def model_input(self, carry: Array, i: Array) -> Array:
        return carry

    def step(
        self,
        carry: Array,
        model_output: Array,
        i: Array,
        *,
        eta: float = 0.0,
        noise: Array | None = None,
    ) -> Array:
        """Step i: latents at timesteps[i] -> at prev_timesteps[i] (see `ddim_step`)."""
        return ddim_step(
            model_output,
            self.timesteps[i],
            self.prev_timesteps[i],
            carry,
            self.alphas_cumprod,
            self.final_alpha_cumprod,
            eta=eta,
            noise=noise,
            prediction_type=self.prediction_type,
            clip_sample=self.clip_sample,
            clip_sample_range=self.clip_sample_range,
        )

    def final(self, carry: Array) -> Array:
        return carry


def ddim_plan(schedule: NoiseSchedule, num_inference_steps: int) -> DDIMPlan:
    """The DDIMPlan for `num_inference_steps` steps of `schedule`."""
    timesteps, prev_timesteps = ddim_timesteps(schedule, num_inference_steps)
    return DDIMPlan(
        timesteps=jnp.asarray(timesteps),
        prev_timesteps=jnp.asarray(prev_timesteps),
        alphas_cumprod=jnp.asarray(schedule.alphas_cumprod, jnp.float32),
        final_alpha_cumprod=jnp.asarray(schedule.final_alpha_cumprod, jnp.float32),
        prediction_type=schedule.prediction_type,
        clip_sample=schedule.clip_sample,
        clip_sample_range=schedule.clip_sample_range,
    )


def _expand_to(values: Array, x: Array) -> Array:
    """[] or [B] per-example values -> broadcastable against x [B, ...]."""
    return jnp.reshape(values, values.shape + (1,) * (x.ndim - values.ndim))


def predict_x0_and_eps(
    model_output: Array, x_t: Array, alpha_prod_t: Array, prediction_type: str
) -> tuple[Array, Array]:
    """Turn a model output into (predicted x_0, predicted noise).

    Args:
      model_output: [B, ...] float32 epsilon, v or x_0 prediction.
      x_t: [B, ...] float32 noisy latents.
      alpha_prod_t: alpha-bar_t, broadcastable against x_t.
      prediction_type: 'epsilon', 'v_prediction' or 'sample'.

    Returns:
      (x_0, eps), both shaped like x_t.
    """
    sqrt_alpha = jnp.sqrt(alpha_prod_t)
    sqrt_beta = jnp.sqrt(1 - alpha_prod_t)
    if prediction_type == "epsilon":
        return (x_t - sqrt_beta * model_output) / sqrt_alpha, model_output
    if prediction_type == "v_prediction":
        # v = sqrt(a) eps - sqrt(1-a) x_0 (Salimans & Ho 2022).
        return (
            sqrt_alpha * x_t - sqrt_beta * model_output,
            sqrt_alpha * model_output + sqrt_beta * x_t,
        )
    if prediction_type == "sample":
        return model_output, (x_t - sqrt_alpha * model_output) / sqrt_beta
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def ddim_step(
    model_output: Array,
    t: Array | int,
    prev_t: Array | int,
    x_t: Array,
    alphas_cumprod: Array,
    final_alpha_cumprod: Array | float,
    *,
    eta: Array | float = 0.0,
    noise: Array | None = None,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
) -> Array:
    """One DDIM update x_t -> x_prev, equal to `DDIMScheduler.step(...).prev_sample`.

    Args:
      model_output: [B, ...] model prediction at (x_t, t), any float dtype; cast
        to float32.
      t: current timestep, int scalar or [B].
      prev_t: previous timestep (t - T // N), int scalar or [B]; negative means
        the last step, which goes to `final_alpha_cumprod`.
      x_t: [B, ...] current latents (cast to float32).
      alphas_cumprod: [T] float32.
      final_alpha_cumprod: float32 scalar.
      eta: 0 for deterministic DDIM, 1 for DDPM-like ancestral noise.
      noise: [B, ...] standard normal noise (diffusers' `variance_noise`);
        required when eta may be non-zero, ignored when it is None and eta == 0.
      prediction_type: 'epsilon', 'v_prediction' or 'sample'.
      clip_sample: clip the predicted x_0 to [-clip_sample_range, clip_sample_range].
      clip_sample_range: the clipping bound.

    Returns:
      x_prev: [B, ...] float32.
    """
    if noise is None and not (isinstance(eta, (int, float)) and eta == 0):
        raise ValueError("ddim_step: eta may be non-zero, so `noise` must be given")
    model_output = jnp.asarray(model_output, jnp.float32)
    x_t = jnp.asarray(x_t, jnp.float32)
    alphas_cumprod = jnp.asarray(alphas_cumprod, jnp.float32)
    t = jnp.asarray(t, jnp.int32)
    prev_t = jnp.asarray(prev_t, jnp.int32)

    alpha_prod_t = _expand_to(alphas_cumprod[t], x_t)
    alpha_prod_prev = jnp.where(
        prev_t >= 0,
        alphas_cumprod[jnp.maximum(prev_t, 0)],
        jnp.asarray(final_alpha_cumprod, jnp.float32),
    )
    alpha_prod_prev = _expand_to(alpha_prod_prev, x_t)

    x0, eps = predict_x0_and_eps(model_output, x_t, alpha_prod_t, prediction_type)
    if clip_sample:
        x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)

    # sigma_t(eta) of DDIM eq. (16); eta = 1 gives the DDPM posterior variance.
    variance = ((1 - alpha_prod_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_prev)
    std_dev = eta * jnp.sqrt(variance)
    direction_to_x_t = jnp.sqrt(1 - alpha_prod_prev - std_dev**2) * eps
    x_prev = jnp.sqrt(alpha_prod_prev) * x0 + direction_to_x_t
    if noise is not None:
        x_prev = x_prev + std_dev * jnp.asarray(noise, jnp.float32)
    return x_prev
