"""Retain terms: losses that hold the model to its behaviour outside the forget concept.

Signature of every term (see `unlearn_jax.unlearn`):

    loss(model, params, frozen, batch, rng, cfg) -> (loss scalar, aux dict of scalars)

Retain batches: 'x0' [B,h,w,C] latents of retain images (real ones, or θ0's own
generations for the retain prompts), 'context' [B,L,D] c_r, and for
retain_distill 'uncond_context' [B|1,L,D] (the empty prompt ∅).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from unlearn_jax.diffusion.forward import (
    DiffusionModel,
    add_noise,
    apply_two_contexts,
    denoising_loss,
    mean_squared_error,
    sample_timesteps_and_noise,
)
from unlearn_jax.unlearn.hparams import UnlearnHParams

Batch = dict[str, jax.Array]
LossOut = tuple[jax.Array, dict[str, jax.Array]]


def retain_dm_loss(
    model: DiffusionModel,
    params: Any,
    frozen: Any,
    batch: Batch,
    rng: jax.Array,
    cfg: UnlearnHParams,
) -> LossOut:
    """E‖ε_θ(x_t^r, t, c_r) − ε‖² (v-target for v-prediction): keep denoising retain images.

    Returns (mse, {'mse': mse}).
    """
    del frozen, cfg
    return denoising_loss(model, params, batch, rng)


def retain_distill_loss(
    model: DiffusionModel,
    params: Any,
    frozen: Any,
    batch: Batch,
    rng: jax.Array,
    cfg: UnlearnHParams,
) -> LossOut:
    """E‖ε_θ(x_t^r,t,c_r) − sg ε_θ0(x_t^r,t,c_r)‖² + w E‖ε_θ(x_t^r,t,∅) − sg ε_θ0(x_t^r,t,∅)‖².

    Holds the model to the original's own predictions on the retain
    distribution, including the unconditional branch that classifier-free
    guidance uses; w = cfg.uncond_weight. Student and teacher are evaluated
    the same way (one call over both contexts), so at θ = θ0 the loss and its
    gradient are exactly zero.
    Returns (loss, {'mse_cond': ..., 'mse_uncond': ...}).
    """
    x0 = batch["x0"]
    t, eps = sample_timesteps_and_noise(rng, x0, model.num_timesteps)
    x_t = add_noise(model, x0, eps, t)
    student_cond, student_uncond = apply_two_contexts(
        model, params, x_t, t, batch["context"], batch["uncond_context"]
    )
    teacher_cond, teacher_uncond = apply_two_contexts(
        model, frozen, x_t, t, batch["context"], batch["uncond_context"]
    )
    mse_cond = mean_squared_error(student_cond, jax.lax.stop_gradient(teacher_cond))
    mse_uncond = mean_squared_error(student_uncond, jax.lax.stop_gradient(teacher_uncond))
    loss = mse_cond + cfg.uncond_weight * mse_uncond
    return loss, {"mse_cond": mse_cond, "mse_uncond": mse_uncond}


def anchor_loss(
    model: DiffusionModel,
    params: Any,
    frozen: Any,
    batch: Batch,
    rng: jax.Array,
    cfg: UnlearnHParams,
) -> LossOut:
    """‖θ − θ0‖² summed over all leaves (L2-SP), accumulated in float32.

    `params` and `frozen` must have the same structure. Leaves outside the
    trainable subtree are equal in both and add exactly 0; the gradient is
    2(θ − θ0). Returns (loss, {'sq_dist': loss}).
    """
    del model, batch, rng, cfg
    sq = jax.tree.map(
        lambda p, p0: jnp.sum(jnp.square(p.astype(jnp.float32) - p0.astype(jnp.float32))),
        params,
        frozen,
    )
    loss = sum(jax.tree.leaves(sq), jnp.zeros((), jnp.float32))
    return loss, {"sq_dist": loss}
