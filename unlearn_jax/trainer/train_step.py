"""The jitted train step and SalUn's saliency pass, as pure functions of explicit arguments.

    train_step(state, frozen_original, batch, train_key) -> (state, metrics)

`frozen_original` is θ0, the full UNet parameter pytree: an argument, never
donated and never closed over. Closing over it would bake θ0 into the
compiled program as constants that XLA may fold differently from the same
values arriving as arguments, and retain_distill's "exactly zero at θ = θ0"
would no longer hold. The state is donated: its buffers are reused for the
new state.

Gradient accumulation scans over the leading [micro_steps] axis of the batch;
each term's gradient is averaged over micro-batches and the combiner runs
once on the averages (combiners are not linear). Micro-batch i uses
`fold_in(fold_in(train_key, step), i)`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from unlearn_jax.diffusion.forward import DiffusionModel
from unlearn_jax.trainer.batches import SHARED_KEYS
from unlearn_jax.trainer.state import TrainState
from unlearn_jax.unlearn.hparams import UnlearnHParams
from unlearn_jax.unlearn.params import ParamSplit
from unlearn_jax.unlearn.registry import Preset
from unlearn_jax.unlearn.step import combine_term_grads, forget_saliency_grads, term_grads

PyTree = Any
TrainStep = Callable[[TrainState, PyTree, dict, jax.Array], tuple[TrainState, dict]]


def _split_shared(batch: dict[str, dict[str, jax.Array]]):
    per_example = {
        part: {k: v for k, v in d.items() if k not in SHARED_KEYS} for part, d in batch.items()
    }
    shared = {part: {k: v for k, v in d.items() if k in SHARED_KEYS} for part, d in batch.items()}
    return per_example, shared


def _all_finite(metrics: dict[str, jax.Array]) -> jax.Array:
    values = [jnp.all(jnp.isfinite(v)) for v in metrics.values()]
    return jnp.all(jnp.stack(values))


def make_train_step(
    model: DiffusionModel,
    preset: Preset,
    hparams: UnlearnHParams,
    optimizer: optax.GradientTransformation,
    split: ParamSplit,
) -> TrainStep:
    """The (unjitted) train step for a method; see the module docstring for its contract.

    Returns:
      train_step(state, frozen_original, batch, train_key) -> (new state, metrics) where
      metrics holds the terms' losses, gradient norms and cosine, 'param/norm'
      and 'finite' (bool: every metric and the new parameters are finite).
    """

    def train_step(state: TrainState, frozen_original: PyTree, batch, train_key: jax.Array):
        rng = jax.random.fold_in(train_key, state.step)
        merge = lambda trainable: split.merge(trainable, frozen_original)
        per_example, shared = _split_shared(batch)
        micro_steps = jax.tree.leaves(per_example)[0].shape[0]
        zeros = jnp.zeros((split.padded_size,), jnp.float32)
        init = (zeros, zeros if preset.retain is not None else None)

        def micro_step(accumulated, inputs):
            index, micro_batch = inputs
            full = {part: {**micro_batch[part], **shared[part]} for part in batch}
            g_f, g_r, metrics = term_grads(
                state.params,
                merge,
                frozen_original,
                full,
                jax.random.fold_in(rng, index),
                preset,
                model,
                hparams,
            )
            flat = (split.flatten(g_f), None if g_r is None else split.flatten(g_r))
            return jax.tree.map(jnp.add, accumulated, flat), metrics

        if micro_steps == 1:
            (g_f, g_r), metrics = micro_step(
                init, (jnp.int32(0), jax.tree.map(lambda x: x[0], per_example))
            )
        else:
            (g_f, g_r), metrics = jax.lax.scan(
                micro_step, init, (jnp.arange(micro_steps), per_example)
            )
            metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
            g_f = g_f / micro_steps
            g_r = None if g_r is None else g_r / micro_steps
        grads, combine_metrics = combine_term_grads(g_f, g_r, preset, hparams, state.saliency)
        flat_params = split.flatten(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, flat_params)
        if state.saliency is not None:
            # Weight decay or momentum must not move parameters outside the mask either.
            updates = jnp.where(state.saliency, updates, 0.0)
        delta = split.unflatten(updates)
        params = {n: (p + delta[n]).astype(p.dtype) for n, p in state.params.items()}
        metrics.update(combine_metrics)
        metrics["param/norm"] = jnp.linalg.norm(flat_params + updates)
        metrics["finite"] = _all_finite(metrics)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_saliency_grad_fn(
    model: DiffusionModel, split: ParamSplit
) -> Callable[[PyTree, dict, jax.Array], jax.Array]:
    """Jitted (frozen_original, forget chunk {'x0','context'}, rng) -> flat gradient at θ0.

    The gradient of the forget denoising loss with respect to the trainable
    parameters, evaluated at θ = θ0 (SalUn's saliency is taken there), as the
    flat vector of `split`.
    """

    def grad_fn(frozen_original, chunk, rng):
        merge = lambda trainable: split.merge(trainable, frozen_original)
        grads = forget_saliency_grads(split.select(frozen_original), merge, chunk, rng, model)
        return split.flatten(grads)

    return jax.jit(grad_fn)


@functools.partial(jax.jit, static_argnums=0)
def merged_params(split: ParamSplit, trainable: dict, full: PyTree) -> PyTree:
    """`split.merge(trainable, full)` as one compiled call."""
    return split.merge(trainable, full)
