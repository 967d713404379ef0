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

Gradients, the combination, the optimizer update and the saliency mask stay
per parameter ({name: float32 array}): each has its parameter's shape and
sharding, so under FSDP every device holds 1/fsdp of them, and nothing the
size of all parameters is ever concatenated (see `unlearn.params`).

Under FSDP (a mesh with fsdp > 1) every parameter is all-gathered where the
network reads it (`gather_at_use`), in the student's passes and the
teacher's alike. Left to itself, XLA's sharding propagation partitions the
student's matmuls (whose gradients are reduce-scattered) differently from
the teacher's: their sums then run in different orders, and
retain_distill's student and teacher, equal at θ = θ0, no longer agree bit
for bit (6e-14 instead of 0 on the micro model at fsdp=8).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unlearn_jax.diffusion.forward import DiffusionModel
from unlearn_jax.trainer.batches import SHARED_KEYS
from unlearn_jax.trainer.state import TrainState, float32_tree
from unlearn_jax.unlearn import combine
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


def gather_at_use(model: DiffusionModel, mesh: Mesh | None) -> DiffusionModel:
    """`model` whose apply_fn all-gathers the parameters first when `mesh` has fsdp > 1.

    Each parameter is constrained to be replicated where the network reads it,
    so every device runs the whole network on its own examples, in the same
    order of operations for the student and the teacher (module docstring).
    The gradient of the gather is the reduce-scatter of FSDP. Other meshes
    (and None) return `model` unchanged.
    """
    if mesh is None or mesh.shape.get("fsdp", 1) <= 1:
        return model
    whole = NamedSharding(mesh, PartitionSpec())
    apply_fn = model.apply_fn

    def gathered(params, *args):
        params = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, whole), params)
        return apply_fn(params, *args)

    return dataclasses.replace(model, apply_fn=gathered)


def make_train_step(
    model: DiffusionModel,
    preset: Preset,
    hparams: UnlearnHParams,
    optimizer: optax.GradientTransformation,
    split: ParamSplit,
    mesh: Mesh | None = None,
) -> TrainStep:
    """The (unjitted) train step for a method; see the module docstring for its contract.

    `mesh`: the mesh the step is jitted for; under FSDP the parameters are
    gathered at use (`gather_at_use`). None: no constraint (one device, or
    data parallelism).

    Returns:
      train_step(state, frozen_original, batch, train_key) -> (new state, metrics) where
      metrics holds the terms' losses, gradient norms and cosine, 'param/norm'
      and 'finite' (bool: every metric and the new parameters are finite).
    """

    model = gather_at_use(model, mesh)

    def train_step(state: TrainState, frozen_original: PyTree, batch, train_key: jax.Array):
        rng = jax.random.fold_in(train_key, state.step)
        merge = lambda trainable: split.merge(trainable, frozen_original)
        per_example, shared = _split_shared(batch)
        micro_steps = jax.tree.leaves(per_example)[0].shape[0]

        def micro_grads(index, micro_batch):
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
            return (float32_tree(g_f), None if g_r is None else float32_tree(g_r)), metrics

        if micro_steps == 1:
            (g_f, g_r), metrics = micro_grads(
                jnp.int32(0), jax.tree.map(lambda x: x[0], per_example)
            )
        else:
            zeros = {n: jnp.zeros(p.shape, jnp.float32) for n, p in state.params.items()}

            def micro_step(accumulated, inputs):
                grads, metrics = micro_grads(*inputs)
                return jax.tree.map(jnp.add, accumulated, grads), metrics

            init = (zeros, zeros if preset.retain is not None else None)
            (g_f, g_r), metrics = jax.lax.scan(
                micro_step, init, (jnp.arange(micro_steps), per_example)
            )
            metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
            g_f, g_r = jax.tree.map(lambda g: g / micro_steps, (g_f, g_r))
        grads, combine_metrics = combine_term_grads(g_f, g_r, preset, hparams, state.saliency)
        params32 = float32_tree(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, params32)
        if state.saliency is not None:
            # Weight decay or momentum must not move parameters outside the mask either.
            updates = combine.apply_mask(updates, state.saliency)
        moved = jax.tree.map(jnp.add, params32, updates)
        params = {n: moved[n].astype(p.dtype) for n, p in state.params.items()}
        metrics.update(combine_metrics)
        metrics["param/norm"] = combine.tree_norm(moved)
        metrics["finite"] = _all_finite(metrics)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_saliency_grad_fn(
    model: DiffusionModel, split: ParamSplit
) -> Callable[[PyTree, dict, jax.Array], dict[str, jax.Array]]:
    """Jitted (frozen_original, forget chunk {'x0','context'}, rng) -> gradient at θ0.

    The gradient of the forget denoising loss with respect to the trainable
    parameters, evaluated at θ = θ0 (SalUn's saliency is taken there), as
    {name: float32 array} of `split`'s trainable leaves.
    """

    def grad_fn(frozen_original, chunk, rng):
        merge = lambda trainable: split.merge(trainable, frozen_original)
        grads = forget_saliency_grads(split.select(frozen_original), merge, chunk, rng, model)
        return float32_tree(grads)

    return jax.jit(grad_fn)


@functools.partial(jax.jit, static_argnums=0)
def merged_params(split: ParamSplit, trainable: dict, full: PyTree) -> PyTree:
    """`split.merge(trainable, full)` as one compiled call."""
    return split.merge(trainable, full)
