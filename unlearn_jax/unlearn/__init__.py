"""Unlearning objectives as pure functions: forget terms, retain terms, gradient combiners.

Every loss has the signature

    loss(model, params, frozen, batch, rng, cfg) -> (loss scalar, aux dict of scalars)

where `model` is a `DiffusionModel` (the pure `apply_fn`, the noise schedule and
the prediction type, from `unlearn_jax.diffusion.forward`, which also holds
noising and the denoising loss), `params` the full current parameters θ,
`frozen` the full original parameters θ0 (never differentiated), `batch` a
dict of arrays, `rng` a PRNG key and `cfg` an `UnlearnHParams`. Binding the
model first, `functools.partial(loss, model)`, gives the `loss(params, frozen,
batch, rng, cfg)` form of DESIGN.md.

Modules:
  hparams   -- `UnlearnHParams`, the hyperparameters every term reads from.
  forget    -- forget terms: `neggrad`, `remap`, `esd`, `noise`.
  retain    -- retain terms: `retain_dm`, `retain_distill`, `anchor`.
  combine   -- the algebra of the combiners (Gram matrix, norms, cosine, the
               projection coefficient, a g_f + b g_r) and SalUn's saliency mask,
               on {name: array} dicts shaped like the parameters.
  registry  -- names -> terms and combiners (a combiner maps the Gram matrix of
               (g_f, g_r) to the coefficients of g = a g_f + b g_r), the named
               presets, `trainable_mask`.
  params    -- `ParamSplit`: which parameters train, by name; `param_paths`.
  step      -- `term_grads` (forget/retain gradients with respect to the
               trainable parameters) and `combine_term_grads` (the preset's
               combiner, then the saliency mask), as `trainer.train_step` calls them.

The train loop that jits, shards, accumulates and checkpoints these is
`unlearn_jax.trainer`.
"""

from unlearn_jax.diffusion.forward import DiffusionModel
from unlearn_jax.unlearn.hparams import UnlearnHParams
from unlearn_jax.unlearn.params import ParamSplit
from unlearn_jax.unlearn.registry import Preset, get_preset, trainable_mask
from unlearn_jax.unlearn.step import combine_term_grads, term_grads

__all__ = [
    "DiffusionModel",
    "ParamSplit",
    "Preset",
    "UnlearnHParams",
    "combine_term_grads",
    "get_preset",
    "term_grads",
    "trainable_mask",
]
