"""Noise schedules read from a diffusers `scheduler_config.json`.

Stable Diffusion folders ship a `PNDMScheduler` (or other) config; diffusers users
sample with DDIM through `DDIMScheduler.from_config(pipe.scheduler.config)`. This
module reproduces exactly what that call builds: which config keys are used,
which take DDIM's defaults, and the float32 arithmetic of the betas and
`alphas_cumprod` (bit-for-bit against torch on x86 CPUs, see `_torch_linspace_float32` and
`_torch_cumprod_float32`).

Everything here is host-side NumPy: a schedule is built once and its arrays
are handed to the jitted sampler as inputs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

# DDIMScheduler.__init__ defaults: `from_config` fills every key missing from the
# config with these, whatever scheduler class the config was written for.
DDIM_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}

# Options of other diffusers schedulers (PNDM, Euler, DPM-Solver, UniPC, ...).
# DDIMScheduler.from_config drops them, so they cannot change DDIM sampling; any
# key outside DDIM_DEFAULTS and this set is treated as a typo and rejected.
OTHER_SCHEDULER_KEYS = frozenset(
    {
        "algorithm_type",
        "disable_corrector",
        "euler_at_final",
        "final_sigmas_type",
        "flow_shift",
        "interpolation_type",
        "lambda_min_clipped",
        "lower_order_final",
        "original_inference_steps",
        "predict_x0",
        "rho",
        "shift_terminal",
        "sigma_data",
        "sigma_max",
        "sigma_min",
        "sigma_schedule",
        "skip_prk_steps",
        "solver_order",
        "solver_p",
        "solver_type",
        "time_shift_type",
        "timestep_scaling",
        "timestep_type",
        "use_beta_sigmas",
        "use_dynamic_shifting",
        "use_exponential_sigmas",
        "use_flow_sigmas",
        "use_karras_sigmas",
        "use_lu_lambdas",
        "variance_type",
    }
)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete-time variance-preserving schedule, as DDIMScheduler holds it.

    Attributes:
      betas: [T] float32.
      alphas_cumprod: [T] float32, alpha-bar_t = prod_{s<=t} (1 - beta_s).
      final_alpha_cumprod: float32 scalar used as alpha-bar of the step after the
        last one (1.0 if `set_alpha_to_one`, else `alphas_cumprod[0]`).
      prediction_type: what the model predicts: 'epsilon', 'v_prediction' or 'sample'.
      timestep_spacing: 'leading', 'trailing' or 'linspace' (how inference
        timesteps are picked, see `ddim.ddim_timesteps`).
      steps_offset: added to 'leading' timesteps (1 for Stable Diffusion).
      clip_sample: whether the predicted x_0 is clipped to +-clip_sample_range.
      clip_sample_range: the clipping bound.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    final_alpha_cumprod: np.float32
    prediction_type: str
    timestep_spacing: str
    steps_offset: int
    clip_sample: bool
    clip_sample_range: float

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])


def _torch_linspace_float32(start: float, end: float, num: int) -> np.ndarray:
    """`torch.linspace(start, end, num, dtype=torch.float32)` in NumPy.

    torch rounds the endpoints and the step to float32 and fills the first half
    forward from `start` and the second half backward from `end`, each value with
    one fused multiply-add. NumPy's linspace (float64, one direction) differs by an
    ulp in ~15% of the entries, which is enough to break bit-exact parity.
    The float64 product of two float32 numbers is exact, so `s + step * i` in
    float64 followed by one rounding to float32 is the FMA result.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if num == 1:
        return np.array([start32], np.float32)
    step = np.float32((end32 - start32) / np.float32(num - 1))
    index = np.arange(num, dtype=np.float64)
    forward = np.float64(start32) + np.float64(step) * index
    backward = np.float64(end32) - np.float64(step) * (num - 1 - index)
    return np.where(index < num // 2, forward, backward).astype(np.float32)


def _torch_cumprod_float32(x: np.ndarray) -> np.ndarray:
    """`torch.cumprod` of a float32 CPU tensor: accumulated in float64, rounded once.

    A float32 running product drifts from it by up to ~3e-7 over 1000 steps.
    """
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _squaredcos_cap_v2_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The Glide cosine schedule: betas from alpha_bar(t) = cos^2((t+0.008)/1.008 pi/2).

    diffusers evaluates this in Python floats (float64) and rounds once to float32.
    """

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(
            1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps),
            max_beta,
        )
        for i in range(num_train_timesteps)
    ]
    return np.asarray(betas, dtype=np.float64).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale float32 betas to zero terminal SNR (arXiv 2305.08891, Algorithm 1).

    Agrees with diffusers to ~4e-7 in `alphas_cumprod`, not bit-for-bit: torch's
    float32 `sqrt` on CPU is not correctly rounded (1 ulp off in ~20% of entries).
    """
    alphas_bar_sqrt = np.sqrt(_torch_cumprod_float32(np.float32(1.0) - betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * np.float32(first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def _checked_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(
            f"scheduler config: {name}={value!r} is not supported; use one of {allowed}"
        )
    return value


def schedule_from_config(config: Mapping[str, Any]) -> NoiseSchedule:
    """Build the schedule `DDIMScheduler.from_config(config)` would build.

    Args:
      config: a diffusers scheduler config dict (the content of
        `scheduler_config.json`), for any scheduler class.

    Returns:
      The NoiseSchedule; keys absent from `config` (or listed in its
      `_use_default_values`) take DDIMScheduler's defaults, exactly as in
      diffusers. Note that DDIM's default `clip_sample` is True.

    Raises:
      ValueError: for keys that no diffusers scheduler knows (named in the
        message), unsupported values, or `thresholding=True` (dynamic
        thresholding is not implemented).
    """
    # diffusers drops keys whose saved value was the saving class's default, so
    # that they take the *loading* class's default instead.
    use_defaults = set(config.get("_use_default_values", ()))
    given = {k: v for k, v in config.items() if k not in use_defaults and not k.startswith("_")}
    unknown = sorted(set(given) - set(DDIM_DEFAULTS) - OTHER_SCHEDULER_KEYS)
    if unknown:
        raise ValueError(f"scheduler config: unknown option(s) {unknown}")
    cfg = {**DDIM_DEFAULTS, **{k: v for k, v in given.items() if k in DDIM_DEFAULTS}}

    if cfg["thresholding"]:
        raise ValueError(
            "scheduler config: thresholding=True (dynamic thresholding) is not supported"
        )
    beta_schedule = _checked_choice("beta_schedule", cfg["beta_schedule"], BETA_SCHEDULES)
    prediction_type = _checked_choice("prediction_type", cfg["prediction_type"], PREDICTION_TYPES)
    spacing = _checked_choice("timestep_spacing", cfg["timestep_spacing"], TIMESTEP_SPACINGS)
    num_train_timesteps = int(cfg["num_train_timesteps"])
    if num_train_timesteps < 1:
        raise ValueError(
            f"scheduler config: num_train_timesteps={num_train_timesteps} must be >= 1"
        )

    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float32)
        if betas.shape != (num_train_timesteps,):
            raise ValueError(
                f"scheduler config: trained_betas has shape {betas.shape}, "
                f"expected ({num_train_timesteps},)"
            )
    elif beta_schedule == "linear":
        betas = _torch_linspace_float32(cfg["beta_start"], cfg["beta_end"], num_train_timesteps)
    elif beta_schedule == "scaled_linear":
        # Linear in sqrt(beta): the latent-diffusion schedule of Stable Diffusion.
        sqrt_betas = _torch_linspace_float32(
            cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, num_train_timesteps
        )
        betas = sqrt_betas * sqrt_betas
    else:
        betas = _squaredcos_cap_v2_betas(num_train_timesteps)
    if cfg["rescale_betas_zero_snr"]:
        betas = _rescale_zero_terminal_snr(betas)

    alphas_cumprod = _torch_cumprod_float32(np.float32(1.0) - betas)
    final = np.float32(1.0) if cfg["set_alpha_to_one"] else alphas_cumprod[0]
    return NoiseSchedule(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        final_alpha_cumprod=np.float32(final),
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        steps_offset=int(cfg["steps_offset"]),
        clip_sample=bool(cfg["clip_sample"]),
        clip_sample_range=float(cfg["clip_sample_range"]),
    )


def load_schedule(path: str | os.PathLike) -> NoiseSchedule:
    """Read a schedule from a `scheduler_config.json` file, or from a folder holding one.

    A diffusers pipeline folder (with a `scheduler/` subfolder) is accepted too.
    """
    path = os.fspath(path)
    for candidate in (path, os.path.join(path, "scheduler_config.json")):
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as f:
                return schedule_from_config(json.load(f))
    nested = os.path.join(path, "scheduler", "scheduler_config.json")
    if os.path.isfile(nested):
        return load_schedule(nested)
    raise FileNotFoundError(f"no scheduler_config.json at {path}")
