"""One unlearning step's gradient, model-agnostic: forget and retain gradients, combined.

Only the trainable subtree is differentiated (optimizer and gradient memory
scale with it). Parameters are split with `partition_params` into two pytrees
of the structure of the full tree, each holding `None` where the other holds
the leaf; `merge_params` puts them back together for `apply_fn`. Parameter
pytrees are nested dicts/lists of arrays (e.g. `nnx.State.to_pure_dict()`).

The optimizer update, jit/sharding and the loop live with the train loop; this
module only maps (parameters, batch, rng) to (gradient, metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from unlearn_jax.diffusion.forward import DiffusionModel, denoising_loss
from unlearn_jax.unlearn import combine
from unlearn_jax.unlearn.hparams import UnlearnHParams
from unlearn_jax.unlearn.params import param_paths
from unlearn_jax.unlearn.registry import (
    COMBINERS,
    FORGET_TERMS,
    RETAIN_TERMS,
    Preset,
    trainable_mask,
)

PyTree = Any

# fold_in ids splitting the step's rng by purpose: forget and retain terms
# draw their own timesteps and noise.
FORGET_STREAM = 0
RETAIN_STREAM = 1


def partition_params(params: PyTree, group: str | Sequence[bool]) -> tuple[PyTree, PyTree]:
    """Splits params into (trainable, rest) by a group name/regex or a per-leaf bool list.

    Both outputs have the structure of `params` with `None` in place of the
    leaves that belong to the other part.
    """
    leaves, treedef = jax.tree.flatten(params)
    mask = trainable_mask(param_paths(params), group) if isinstance(group, str) else list(group)
    if len(mask) != len(leaves):
        raise ValueError(f"mask has {len(mask)} entries for {len(leaves)} parameters")
    trainable = [x if m else None for x, m in zip(leaves, mask)]
    rest = [None if m else x for x, m in zip(leaves, mask)]
    return jax.tree.unflatten(treedef, trainable), jax.tree.unflatten(treedef, rest)


def merge_params(trainable: PyTree, rest: PyTree) -> PyTree:
    """Inverse of `partition_params`: the full parameter pytree."""
    is_none = lambda x: x is None
    trainable_leaves, treedef = jax.tree.flatten(trainable, is_leaf=is_none)
    rest_leaves = jax.tree.leaves(rest, is_leaf=is_none)
    merged = [r if t is None else t for t, r in zip(trainable_leaves, rest_leaves)]
    return jax.tree.unflatten(treedef, merged)


Merge = Callable[[PyTree], PyTree]


def _as_merge(rest_or_merge: PyTree | Merge) -> Merge:
    """A function trainable -> full params, from the frozen rest or such a function itself."""
    if callable(rest_or_merge):
        return rest_or_merge
    return lambda trainable: merge_params(trainable, rest_or_merge)


def _term_value_and_grad(term, model, merge: Merge, frozen_original, hp):
    def objective(trainable, batch, rng):
        return term(model, merge(trainable), frozen_original, batch, rng, hp)

    return jax.value_and_grad(objective, has_aux=True)


def term_grads(
    params_trainable: PyTree,
    params_frozen_rest: PyTree | Merge,
    frozen_original: PyTree,
    batch: dict[str, dict[str, jax.Array]],
    rng: jax.Array,
    preset: Preset,
    model: DiffusionModel,
    hparams: UnlearnHParams | None = None,
) -> tuple[PyTree, PyTree | None, dict[str, jax.Array]]:
    """The forget and retain gradients of one batch, not yet combined.

    Split from the combination so that gradient accumulation can average each
    term's gradient over micro-batches first and combine once (combiners such
    as `project` are not linear, so combining per micro-batch would differ).

    Args:
      params_trainable: the trainable part of θ (any pytree).
      params_frozen_rest: the rest of θ as from `partition_params`, or a function
        mapping `params_trainable` to the full parameter pytree.
      frozen_original, batch, rng, preset, model, hparams: as in `unlearn_step_grads`.
    Returns:
      (g_f, g_r or None when the preset has no retain term, metrics:
      'forget/loss', 'forget/<aux>', 'retain/loss', 'retain/<aux>').
    """
    hp = preset.hparams if hparams is None else hparams
    merge = _as_merge(params_frozen_rest)
    value_and_grad_f = _term_value_and_grad(
        FORGET_TERMS[preset.forget], model, merge, frozen_original, hp
    )
    (loss_f, aux_f), g_f = value_and_grad_f(
        params_trainable, batch["forget"], jax.random.fold_in(rng, FORGET_STREAM)
    )
    metrics = {"forget/loss": loss_f, **{f"forget/{k}": v for k, v in aux_f.items()}}
    if preset.retain is None:
        return g_f, None, metrics
    value_and_grad_r = _term_value_and_grad(
        RETAIN_TERMS[preset.retain], model, merge, frozen_original, hp
    )
    (loss_r, aux_r), g_r = value_and_grad_r(
        params_trainable, batch.get("retain", {}), jax.random.fold_in(rng, RETAIN_STREAM)
    )
    metrics.update({"retain/loss": loss_r, **{f"retain/{k}": v for k, v in aux_r.items()}})
    return g_f, g_r, metrics


def combine_term_grads(
    g_f: PyTree,
    g_r: PyTree | None,
    preset: Preset,
    hparams: UnlearnHParams | None = None,
    saliency: PyTree | None = None,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """The preset's combiner applied to (g_f, g_r), then the saliency mask if given.

    Returns:
      (gradient shaped like g_f, metrics: 'grad/forget_norm', 'grad/retain_norm',
      'grad/cos', 'combine/<aux>', 'grad/norm').
    """
    hp = preset.hparams if hparams is None else hparams
    if g_r is None:
        grads = g_f
        metrics = {"grad/forget_norm": combine.tree_norm(g_f)}
        norm = metrics["grad/forget_norm"]
    else:
        gram = combine.tree_gram(g_f, g_r)
        a, b, aux_c = COMBINERS[preset.combiner](gram, hp)
        grads = combine.linear_combination(a, g_f, b, g_r)
        norm = combine.combination_norm(a, b, gram)
        metrics = {
            "grad/forget_norm": jnp.sqrt(gram[0, 0]),
            "grad/retain_norm": jnp.sqrt(gram[1, 1]),
            "grad/cos": combine.gram_cosine(gram),
            **{f"combine/{k}": v for k, v in aux_c.items()},
        }
    if saliency is not None:
        grads = combine.apply_mask(grads, saliency)
        norm = combine.tree_norm(grads)
    metrics["grad/norm"] = norm
    return grads, metrics


def _check_saliency(preset: Preset, saliency: PyTree | None) -> None:
    if preset.saliency and saliency is None:
        raise ValueError(
            f"method {preset.name!r} needs a saliency mask: accumulate forget_saliency_grads "
            "over the forget set and pass combine.saliency_mask(grads, keep_fraction)"
        )


def unlearn_step_grads(
    params_trainable: PyTree,
    params_frozen_rest: PyTree | Merge,
    frozen_original: PyTree,
    batch: dict[str, dict[str, jax.Array]],
    rng: jax.Array,
    preset: Preset,
    model: DiffusionModel,
    hparams: UnlearnHParams | None = None,
    saliency: PyTree | None = None,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """The combined unlearning gradient with respect to the trainable subtree.

    Args:
      params_trainable, params_frozen_rest: the current θ split by `partition_params`
        (or params_frozen_rest a function trainable -> full params).
      frozen_original: the full original θ0 (never differentiated, never donated).
      batch: {'forget': forget batch, 'retain': retain batch} with the keys
        `registry.BATCH_KEYS` lists for the preset's terms ('retain' may be
        omitted when the preset has no retain term or uses 'anchor').
      rng: this step's key (e.g. fold_in(root, step)); the forget and retain
        terms get fold_in(rng, FORGET_STREAM / RETAIN_STREAM).
      preset: the method (terms, combiner, saliency).
      model: the pure model function and schedule.
      hparams: overrides `preset.hparams`.
      saliency: bool mask pytree shaped like params_trainable (from
        `combine.saliency_mask`); required when `preset.saliency`.
    Returns:
      (gradient pytree shaped like params_trainable, metrics dict of scalars:
      'forget/loss', 'forget/<aux>', 'retain/loss', 'retain/<aux>',
      'grad/forget_norm', 'grad/retain_norm', 'grad/cos', 'combine/<aux>', 'grad/norm').
    """
    _check_saliency(preset, saliency)
    g_f, g_r, metrics = term_grads(
        params_trainable, params_frozen_rest, frozen_original, batch, rng, preset, model, hparams
    )
    grads, combine_metrics = combine_term_grads(g_f, g_r, preset, hparams, saliency)
    return grads, {**metrics, **combine_metrics}


def forget_saliency_grads(
    params_trainable: PyTree,
    params_frozen_rest: PyTree | Merge,
    forget_batch: dict[str, jax.Array],
    rng: jax.Array,
    model: DiffusionModel,
) -> PyTree:
    """Gradient of the denoising loss on a forget batch ('x0', 'context'), trainable subtree.

    SalUn's saliency: sum this over the forget set, then
    `combine.saliency_mask(total, keep_fraction)`.
    """
    merge = _as_merge(params_frozen_rest)

    def objective(trainable):
        return denoising_loss(model, merge(trainable), forget_batch, rng)[0]

    return jax.grad(objective)(params_trainable)
