"""Host-side sigma tables shared by the sigma-parameterised solvers (DPM-Solver++, Euler).

diffusers' `DPMSolverMultistepScheduler` and `EulerDiscreteScheduler` index the
schedule by sigma = sqrt((1 - alpha-bar) / alpha-bar), the noise-to-signal
ratio of x_t / sqrt(alpha-bar) = x_0 + sigma eps. This module reproduces how they
read their options from a `scheduler_config.json` and build sigmas: the float32
table, Karras et al.'s rho = 7 spacing (arXiv 2206.00364) in float64, and the
log-linear inversion sigma -> fractional timestep. All NumPy, computed once per
plan; nothing here runs on the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from unlearn_jax.diffusion.schedule import NoiseSchedule

# alpha-bar of the last training step under zero-terminal-SNR rescaling; both
# schedulers set it (instead of 0) so that sigma stays finite.
ZERO_SNR_ALPHA_CUMPROD = np.float32(2.0**-24)
KARRAS_RHO = 7.0


def read_options(
    config: Mapping[str, Any],
    defaults: Mapping[str, Any],
    supported: Mapping[str, tuple[Any, ...]],
    solver: str,
) -> dict[str, Any]:
    """The options `SchedulerClass.from_config(config)` would use, for the keys in `defaults`.

    As in diffusers, a key absent from `config` (or listed in its
    `_use_default_values`, i.e. only the *saving* class's default) takes the
    loading class's default, so a PNDM config read for Euler gets Euler's
    `timestep_spacing='linspace'` unless the file names a spacing.

    Args:
      config: a diffusers scheduler config dict.
      defaults: the loading class's `__init__` defaults of the options used.
      supported: allowed values of the options that are implemented only in part.
      solver: the solver's name, for error messages.

    Raises:
      ValueError: naming every option whose value is not implemented.
    """
    use_defaults = set(config.get("_use_default_values", ()))
    options = {
        key: config[key] if key in config and key not in use_defaults else default
        for key, default in defaults.items()
    }
    bad = [
        f"{key}={options[key]!r} (supported: {', '.join(map(repr, allowed))})"
        for key, allowed in supported.items()
        if options[key] not in allowed
    ]
    if bad:
        raise ValueError(f"scheduler config for {solver}: unsupported {'; '.join(bad)}")
    return options


def solver_alphas_cumprod(schedule: NoiseSchedule, rescale_betas_zero_snr: bool) -> np.ndarray:
    """alpha-bar [T] float32 as the sigma-based schedulers hold it (zero-SNR end made finite)."""
    alphas_cumprod = np.array(schedule.alphas_cumprod, np.float32)
    if rescale_betas_zero_snr:
        alphas_cumprod[-1] = ZERO_SNR_ALPHA_CUMPROD
    return alphas_cumprod


def sigma_table(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t), [T] float32, increasing in t.

    Computed in float32 like diffusers; torch's CPU float32 square root is not
    correctly rounded, so ~20% of entries differ from it by one ulp (~6e-8 relative).
    """
    alphas_cumprod = np.asarray(alphas_cumprod, np.float32)
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod)


def final_sigma(alphas_cumprod: np.ndarray, final_sigmas_type: str) -> float:
    """The sigma after the last step: 0 ('zero') or the table's smallest ('sigma_min')."""
    if final_sigmas_type == "zero":
        return 0.0
    first = np.float32(alphas_cumprod[0])
    return float(np.sqrt((np.float32(1.0) - first) / first))


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Karras et al.'s sigmas [num_steps] float64, from sigma_max down to sigma_min.

    Uniform steps in sigma^(1/rho) with rho = 7, which concentrates steps at low noise.
    """
    ramp = np.linspace(0.0, 1.0, num_steps)
    max_root, min_root = sigma_max ** (1 / KARRAS_RHO), sigma_min ** (1 / KARRAS_RHO)
    return (max_root + ramp * (min_root - max_root)) ** KARRAS_RHO


def sigma_to_t(sigmas: np.ndarray, log_sigma_table: np.ndarray) -> np.ndarray:
    """Fractional timesteps of `sigmas`: linear interpolation of log sigma between table entries.

    Args:
      sigmas: [N] float64 sigmas to place.
      log_sigma_table: [T] float32 log of `sigma_table`, increasing.

    Returns:
      [N] float64 timesteps in [0, T-1]; sigmas outside the table clamp to its ends.
    """
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    # The last table entry not above log_sigma, kept one below the end so that
    # [low, low + 1] is always an interval of the table.
    low = np.searchsorted(log_sigma_table, log_sigma, side="right") - 1
    low = np.clip(low, 0, log_sigma_table.shape[0] - 2)
    low_log, high_log = log_sigma_table[low], log_sigma_table[low + 1]
    # (low_log - high_log) stays float32, as in diffusers.
    weight = np.clip((low_log - log_sigma) / (low_log - high_log), 0.0, 1.0)
    return (1 - weight) * low + weight * (low + 1)
