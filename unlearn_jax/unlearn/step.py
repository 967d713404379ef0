"""One unlearning step's gradient, model-agnostic: forget and retain gradients, combined.

Only the trainable parameters are differentiated (optimizer and gradient
memory scale with them): the caller passes them (e.g. `ParamSplit.select`'s
{name: array}) with a function `merge(trainable) -> full parameters` (e.g.
`lambda tr: split.merge(tr, frozen_original)`) for `apply_fn`.

    g_f, g_r, metrics = term_grads(trainable, merge, frozen_original, batch, rng, preset, model)
    grads, more_metrics = combine_term_grads(g_f, g_r, preset, hparams, saliency)

The two are separate so that gradient accumulation can average each term's
gradient over micro-batches and combine once. The optimizer update,
jit/sharding and accumulation live in `trainer.train_step`; this module only
maps (parameters, batch, rng) to (gradient, metrics).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from unlearn_jax.diffusion.forward import DiffusionModel, denoising_loss
from unlearn_jax.unlearn import combine
from unlearn_jax.unlearn.hparams import UnlearnHParams
from unlearn_jax.unlearn.registry import COMBINERS, FORGET_TERMS, RETAIN_TERMS, Preset

PyTree = Any
# trainable parameters -> the full parameter pytree `apply_fn` takes.
Merge = Callable[[PyTree], PyTree]

# fold_in ids splitting the step's rng by purpose: forget and retain terms
# draw their own timesteps and noise.
FORGET_STREAM = 0
RETAIN_STREAM = 1


def _term_value_and_grad(term, model, merge: Merge, frozen_original, hp):
    def objective(trainable, batch, rng):
        return term(model, merge(trainable), frozen_original, batch, rng, hp)

    return jax.value_and_grad(objective, has_aux=True)


TERM_PARTS = {"forget": (FORGET_TERMS, FORGET_STREAM), "retain": (RETAIN_TERMS, RETAIN_STREAM)}


def term_grad(
    part: str,
    params_trainable: PyTree,
    merge: Merge,
    frozen_original: PyTree,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    preset: Preset,
    model: DiffusionModel,
    hparams: UnlearnHParams | None = None,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """One term's gradient: `part` 'forget' (the preset's forget term) or 'retain'.

    The term gets fold_in(rng, FORGET_STREAM / RETAIN_STREAM); `batch` is that
    part's batch ({} for a retain term that reads none, such as 'anchor').
    Returns (gradient shaped like params_trainable, metrics '<part>/loss' and
    '<part>/<aux>'). Each term is differentiated on its own, so a train step can
    compile each as its own program (`trainer.train_step.make_step_parts`).
    """
    hp = preset.hparams if hparams is None else hparams
    table, stream = TERM_PARTS[part]
    name = preset.forget if part == "forget" else preset.retain
    value_and_grad = _term_value_and_grad(table[name], model, merge, frozen_original, hp)
    (loss, aux), grads = value_and_grad(params_trainable, batch, jax.random.fold_in(rng, stream))
    return grads, {f"{part}/loss": loss, **{f"{part}/{k}": v for k, v in aux.items()}}


def term_grads(
    params_trainable: PyTree,
    merge: Merge,
    frozen_original: PyTree,
    batch: dict[str, dict[str, jax.Array]],
    rng: jax.Array,
    preset: Preset,
    model: DiffusionModel,
    hparams: UnlearnHParams | None = None,
) -> tuple[PyTree, PyTree | None, dict[str, jax.Array]]:
    """The forget and retain gradients of one batch, not yet combined (`term_grad` of each).

    Split from the combination so that gradient accumulation can average each
    term's gradient over micro-batches first and combine once (combiners such
    as `project` are not linear, so combining per micro-batch would differ).

    Args:
      params_trainable: the trainable part of θ (any pytree, e.g. {name: array}).
      merge: maps `params_trainable` to the full parameter pytree θ.
      frozen_original: the full original θ0 (never differentiated, never donated).
      batch: {'forget': forget batch, 'retain': retain batch} with the keys
        `registry.BATCH_KEYS` lists for the preset's terms ('retain' may be
        omitted when the preset has no retain term or uses 'anchor').
      rng: this micro-step's key; the forget and retain terms get
        fold_in(rng, FORGET_STREAM / RETAIN_STREAM).
      preset: the method (terms, combiner, saliency).
      model: the pure model function and schedule.
      hparams: overrides `preset.hparams`.
    Returns:
      (g_f, g_r or None when the preset has no retain term, both shaped like
      params_trainable; metrics: 'forget/loss', 'forget/<aux>', 'retain/loss',
      'retain/<aux>').
    """
    args = (params_trainable, merge, frozen_original)
    rest = (rng, preset, model, hparams)
    g_f, metrics = term_grad("forget", *args, batch["forget"], *rest)
    if preset.retain is None:
        return g_f, None, metrics
    g_r, retain_metrics = term_grad("retain", *args, batch.get("retain", {}), *rest)
    return g_f, g_r, {**metrics, **retain_metrics}


def combine_term_grads(
    g_f: PyTree,
    g_r: PyTree | None,
    preset: Preset,
    hparams: UnlearnHParams | None = None,
    saliency: PyTree | None = None,
    concatenate: bool = False,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """The preset's combiner applied to (g_f, g_r), then the saliency mask if given.

    The train step calls it on {name: float32 array} gradients shaped like the
    trainable parameters (`ParamSplit.select`); any pytrees of one structure work.

    Args:
      g_f, g_r: the forget and retain gradients (g_r None: forget-only preset).
      preset: names the combiner in `registry.COMBINERS`.
      hparams: overrides `preset.hparams`.
      saliency: bool mask shaped like g_f (SalUn: `combine.saliency_mask`), or
        None; outside it the gradient is exactly zero.
      concatenate: the global reductions (Gram matrix, norms) over the leaves
        concatenated (`combine.tree_gram`); only for leaves whole on each device.
    Returns:
      (gradient shaped like g_f, metrics: 'grad/forget_norm', 'grad/retain_norm',
      'grad/cos', 'combine/<aux>', 'grad/norm').
    """
    hp = preset.hparams if hparams is None else hparams
    if g_r is None:
        grads = g_f
        metrics = {"grad/forget_norm": combine.tree_norm(g_f, concatenate=concatenate)}
        norm = metrics["grad/forget_norm"]
    else:
        gram = combine.tree_gram(g_f, g_r, concatenate=concatenate)
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
        norm = combine.tree_norm(grads, concatenate=concatenate)
    metrics["grad/norm"] = norm
    return grads, metrics


def forget_saliency_grads(
    params_trainable: PyTree,
    merge: Merge,
    forget_batch: dict[str, jax.Array],
    rng: jax.Array,
    model: DiffusionModel,
) -> PyTree:
    """Gradient of the denoising loss on a forget batch ('x0', 'context'), trainable part.

    SalUn's saliency: sum this over the forget set (at θ = θ0), flatten, then
    `combine.saliency_mask(total, keep_fraction, split.size)`.
    """

    def objective(trainable):
        return denoising_loss(model, merge(trainable), forget_batch, rng)[0]

    return jax.grad(objective)(params_trainable)
