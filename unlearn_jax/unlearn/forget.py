"""Forget terms: losses whose minimisation removes a concept c_f from the model.

Signature of every term (see `unlearn_jax.unlearn`):

    loss(model, params, frozen, batch, rng, cfg) -> (loss scalar, aux dict of scalars)

Forget batches (all arrays share the batch size B):
  neggrad, noise:  'x0' [B,h,w,C] latents of forget images, 'context' [B,L,D] c_f.
  remap:           'x0', 'context' (c_f), 'anchor_context' [B,L,D] c_a, each example's
                   own anchor (one per forget prompt), or [1,L,D] one for all.
  esd:             'x_t' [B,h,w,C] from a partial θ0 trajectory for c_f, 't' [B] int32
                   its timesteps, 'context' (c_f), 'uncond_context' [B|1,L,D] (∅).

Targets from the frozen θ0 (or the current model, detached) are wrapped in
`jax.lax.stop_gradient`, so only the student branch carries gradient even when
`frozen` is the same array as `params`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from unlearn_jax.diffusion.forward import (
    TARGET_NOISE_STREAM,
    DiffusionModel,
    add_noise,
    apply_two_contexts,
    denoising_loss,
    mean_squared_error,
    prediction_target,
    sample_timesteps_and_noise,
    standard_normal,
)
from unlearn_jax.unlearn.hparams import UnlearnHParams

Batch = dict[str, jax.Array]
LossOut = tuple[jax.Array, dict[str, jax.Array]]


def neggrad_loss(
    model: DiffusionModel,
    params: Any,
    frozen: Any,
    batch: Batch,
    rng: jax.Array,
    cfg: UnlearnHParams,
) -> LossOut:
    """−E‖ε_θ(x_t^f, t, c_f) − ε‖²: gradient ascent on the forget denoising loss.

    Exactly the negative of `retain_dm_loss` on the same batch and rng.
    Returns (−mse, {'mse': mse}).
    """
    del frozen, cfg  # the target is the true noise
    mse, aux = denoising_loss(model, params, batch, rng)
    return -mse, aux


def remap_loss(
    model: DiffusionModel,
    params: Any,
    frozen: Any,
    batch: Batch,
    rng: jax.Array,
    cfg: UnlearnHParams,
) -> LossOut:
    """E‖ε_θ(x_t^f, t, c_f) − sg[ε_θ'(x_t^f, t, c_a)]‖²: predict for c_f what θ' predicts for c_a.

    θ' is the frozen θ0 when `cfg.target_model == 'frozen'` (Concept Ablation,
    model-based) and the current θ when it is 'current' (SalUn / EraseDiff
    pseudo prompt). The target is in the network's own output space (eps or
    v), so no conversion is needed for v-prediction models.

    Args:
      batch: 'x0' [B,h,w,C]; 'context' [B,L,D] c_f; 'anchor_context' [B,L,D], row b
        the anchor paired with example b's forget prompt, or [1,L,D] broadcast to all
        (token ids [B,L] / [1,L] when the text encoder trains).
    Returns (mse, {'mse': mse}).
    """
    x0 = batch["x0"]
    t, eps = sample_timesteps_and_noise(rng, x0, model.num_timesteps)
    x_t = add_noise(model, x0, eps, t)
    if cfg.target_model == "current":
        prediction, anchored = apply_two_contexts(
            model, params, x_t, t, batch["context"], batch["anchor_context"]
        )
    else:
        prediction = model.apply_fn(params, x_t, t, batch["context"])
        anchor = jnp.broadcast_to(batch["anchor_context"], batch["context"].shape)
        anchored = model.apply_fn(frozen, x_t, t, anchor)
    mse = mean_squared_error(prediction, jax.lax.stop_gradient(anchored))
    return mse, {"mse": mse}


def esd_target(eps_cond: jax.Array, eps_uncond: jax.Array, eta: float) -> jax.Array:
    """ESD's negatively guided target ε* = ε(∅) − η (ε(c_f) − ε(∅)), same shape as inputs."""
    eps_cond = eps_cond.astype(jnp.float32)
    eps_uncond = eps_uncond.astype(jnp.float32)
    return eps_uncond - eta * (eps_cond - eps_uncond)


def esd_loss(
    model: DiffusionModel,
    params: Any,
    frozen: Any,
    batch: Batch,
    rng: jax.Array,
    cfg: UnlearnHParams,
) -> LossOut:
    """‖ε_θ(x_t, t, c_f) − sg[ε*]‖², ε* = `esd_target` of the frozen θ0 with η = cfg.eta.

    x_t and t come in the batch (ESD draws them from partial θ0 trajectories
    for c_f, outside this function); rng is unused. Linear in the network's
    outputs, so the same formula holds for v-prediction.
    Returns (mse, {'mse': mse}).
    """
    del rng
    x_t, t = batch["x_t"], batch["t"]
    teacher_cond, teacher_uncond = apply_two_contexts(
        model, frozen, x_t, t, batch["context"], batch["uncond_context"]
    )
    target = jax.lax.stop_gradient(esd_target(teacher_cond, teacher_uncond, cfg.eta))
    prediction = model.apply_fn(params, x_t, t, batch["context"])
    mse = mean_squared_error(prediction, target)
    return mse, {"mse": mse}


def noise_loss(
    model: DiffusionModel,
    params: Any,
    frozen: Any,
    batch: Batch,
    rng: jax.Array,
    cfg: UnlearnHParams,
) -> LossOut:
    """E‖ε_θ(x_t^f, t, c_f) − target(n)‖² for fresh noise n ~ N(0, I) (EraseDiff v1).

    n is drawn independently of the eps that made x_t (stream
    TARGET_NOISE_STREAM), so the model learns to output noise unrelated to its
    input. For v-prediction the target is the v that n would imply,
    alpha_t n − sigma_t x0. Returns (mse, {'mse': mse}).
    """
    del frozen, cfg
    x0 = batch["x0"]
    t, eps = sample_timesteps_and_noise(rng, x0, model.num_timesteps)
    x_t = add_noise(model, x0, eps, t)
    random_noise = standard_normal(jax.random.fold_in(rng, TARGET_NOISE_STREAM), x0.shape)
    prediction = model.apply_fn(params, x_t, t, batch["context"])
    mse = mean_squared_error(prediction, prediction_target(model, x0, random_noise, t))
    return mse, {"mse": mse}
