"""The diffusion model as the unlearning losses see it, and the plain denoising loss.

The losses never touch a Flax module: they receive a `DiffusionModel`, i.e. a
pure function

    apply_fn(params, x_t [B,h,w,C] NHWC, t [B] int32, context [B,L,D]) -> [B,h,w,C]

together with the training noise schedule `alphas_cumprod` [T] and the
`prediction_type` of the network ('epsilon' or 'v_prediction'). Forward
process: x_t = sqrt(acp[t]) x0 + sqrt(1 - acp[t]) eps. When the text encoder
trains, the network is text encoder ∘ UNet and `context` holds token ids
[B,L] int32 instead of embeddings (see `text_encoder`); the losses do not
notice.

Random streams: a loss derives its timesteps and noise from its `rng` with
`jax.random.fold_in(rng, STREAM)` for the fixed stream ids below, so every
draw can be reproduced outside the loss (tests do exactly that).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
PREDICTION_TYPES = ("epsilon", "v_prediction")

# fold_in ids of the random streams a loss draws from its rng.
TIMESTEP_STREAM = 0
NOISE_STREAM = 1
TARGET_NOISE_STREAM = 2  # the fresh noise target of `noise_loss`


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["alphas_cumprod"],
    meta_fields=["apply_fn", "prediction_type"],
)
@dataclasses.dataclass(frozen=True)
class DiffusionModel:
    """A noise-prediction network as a pure function plus its training schedule.

    A pytree (the schedule is a leaf, `apply_fn` and `prediction_type` are static),
    so it can be closed over or passed through `jax.jit` as an argument.

    Attributes:
      apply_fn: `(params, x_t [B,h,w,C], t [B] int32, context [B,L,D]) -> [B,h,w,C]`.
      alphas_cumprod: float32 [T], cumulative product of (1 - beta).
      prediction_type: what `apply_fn` predicts: 'epsilon' or 'v_prediction'.
    """

    apply_fn: ApplyFn
    alphas_cumprod: jax.Array
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not supported; "
                f"valid: {', '.join(PREDICTION_TYPES)}"
            )

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]


def _schedule_at(model: DiffusionModel, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """alpha_t, sigma_t as float32 [B,1,1,1], ready to broadcast against NHWC images."""
    # float32 whatever the model dtype: bf16 schedules are visibly wrong.
    acp = jnp.asarray(model.alphas_cumprod, jnp.float32)[t]
    alpha = jnp.sqrt(acp)[:, None, None, None]
    sigma = jnp.sqrt(1.0 - acp)[:, None, None, None]
    return alpha, sigma


def sample_timesteps_and_noise(
    rng: jax.Array, x0: jax.Array, num_timesteps: int
) -> tuple[jax.Array, jax.Array]:
    """Draws t ~ U{0..T-1} [B] int32 and eps ~ N(0, I) float32 shaped like x0 [B,h,w,C]."""
    t = jax.random.randint(
        jax.random.fold_in(rng, TIMESTEP_STREAM), (x0.shape[0],), 0, num_timesteps, jnp.int32
    )
    eps = standard_normal(jax.random.fold_in(rng, NOISE_STREAM), x0.shape)
    return t, eps


def standard_normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """`jax.random.normal(key, shape, float32)`, bit for bit, drawn as one flat vector.

    Threefry (partitionable or not) gives an element bits that depend only on
    its row-major index, so the flat draw reshaped is the same array. XLA's CPU
    backend compiles it ~9x faster: partitionable threefry's counters for a
    4-D shape come from a 4-D iota. Compiled on their own, the draws of a
    two-term train step took 25 s shaped and 3 s flat (one busy core).
    """
    return jax.random.normal(key, (math.prod(shape),), jnp.float32).reshape(shape)


def add_noise(model: DiffusionModel, x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = alpha_t x0 + sigma_t eps, float32 [B,h,w,C]."""
    alpha, sigma = _schedule_at(model, t)
    return alpha * x0.astype(jnp.float32) + sigma * eps.astype(jnp.float32)


def prediction_target(
    model: DiffusionModel, x0: jax.Array, eps: jax.Array, t: jax.Array
) -> jax.Array:
    """What the network should output for (x0, eps, t): eps, or v = alpha_t eps - sigma_t x0."""
    if model.prediction_type == "epsilon":
        return eps.astype(jnp.float32)
    alpha, sigma = _schedule_at(model, t)
    return alpha * eps.astype(jnp.float32) - sigma * x0.astype(jnp.float32)


def mean_squared_error(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over all elements of (prediction - target)^2, accumulated in float32."""
    diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(diff))


def apply_two_contexts(
    model: DiffusionModel,
    params: Any,
    x_t: jax.Array,
    t: jax.Array,
    context_a: jax.Array,
    context_b: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The model at the same (x_t, t) under two contexts, as one call of batch 2B.

    One call rather than two: the accelerator sees a bigger batch, and a student
    and teacher evaluated this way with equal parameters agree bit for bit.
    context_a is [B,L,D] (token ids: [B,L]); context_b is the same shape (e.g. each
    example's own anchor) or [1,L,D] (e.g. the empty prompt), broadcast to [B,L,D].
    """
    context_b = jnp.broadcast_to(context_b, context_a.shape).astype(context_a.dtype)
    out = model.apply_fn(
        params,
        jnp.concatenate([x_t, x_t]),
        jnp.concatenate([t, t]),
        jnp.concatenate([context_a, context_b]),
    )
    return out[: x_t.shape[0]], out[x_t.shape[0] :]


def denoising_loss(
    model: DiffusionModel, params: Any, batch: dict[str, jax.Array], rng: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The standard diffusion loss E_t,eps ||f_θ(x_t, t, c) - target||^2 (mean over elements).

    Args:
      batch: 'x0' [B,h,w,C] clean latents, 'context' [B,L,D] text embeddings.
      rng: source of t and eps (streams TIMESTEP_STREAM, NOISE_STREAM).
    Returns:
      (mse scalar, {'mse': mse}).
    """
    x0 = batch["x0"]
    t, eps = sample_timesteps_and_noise(rng, x0, model.num_timesteps)
    x_t = add_noise(model, x0, eps, t)
    prediction = model.apply_fn(params, x_t, t, batch["context"])
    mse = mean_squared_error(prediction, prediction_target(model, x0, eps, t))
    return mse, {"mse": mse}
