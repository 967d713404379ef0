"""Unlearning objectives as pure functions: forget terms, retain terms, gradient combiners.

Every loss has the signature

    loss(model, params, frozen, batch, rng, cfg) -> (loss scalar, aux dict of scalars)

where `model` is a `DiffusionModel` (the pure `apply_fn`, the noise schedule and
the prediction type), `params` the full current parameters θ, `frozen` the full
original parameters θ0 (never differentiated), `batch` a dict of arrays,
`rng` a PRNG key and `cfg` an `UnlearnHParams`. Binding the model first,
`functools.partial(loss, model)`, gives the `loss(params, frozen, batch, rng,
cfg)` form of DESIGN.md.

Modules:
  denoising  -- `DiffusionModel`, noising, prediction targets, the denoising loss.
  hparams    -- `UnlearnHParams`, the hyperparameters every term reads from.
  forget     -- forget terms: `neggrad`, `remap`, `esd`, `noise`.
  retain     -- retain terms: `retain_dm`, `retain_distill`, `anchor`.
  combine    -- gradient combiners over pytrees and the SalUn saliency mask.
  registry   -- names -> terms/combiners, the named presets, `trainable_mask`.
  step       -- `unlearn_step_grads`: forget/retain gradients on the trainable
                subtree, combined.

The trainer (imported on demand; it pulls in the model, data and orbax):
  experiment  -- config -> RunSpec (method, params, prompts, fingerprint), model, data.
  batches     -- training batches as a pure function of (seed, step).
  state       -- `ParamSplit` (trainable subset), `TrainState`, the optax optimizer.
  text_encoder -- `unlearn.text_encoder`: text encoder ∘ UNet as the trained network
                (joint parameters, trainable mask, apply_fn on token ids).
  sharding    -- the ('data', 'fsdp') mesh and the shardings of batch and state.
  train_step  -- the jitted step (θ0 an argument, state donated) and SalUn's saliency.
  checkpoints -- orbax checkpoints, incomplete-save handling, the run fingerprint.
  evaluation  -- evaluators (integrity, pluggable forget rate) for periodic/final eval.
  writers     -- metrics.jsonl (+ TensorBoard through clu when available).
  train       -- `train_and_evaluate(config, workdir)`, `evaluate`, `export`.
  config_file -- `get_config(arg)` files and `--config.a.b=value` overrides.
  commands    -- the `unlearn`, `evaluate` and `export` CLI subcommands.
"""

from unlearn_jax.diffusion.forward import DiffusionModel
from unlearn_jax.unlearn.hparams import UnlearnHParams
from unlearn_jax.unlearn.registry import Preset, get_preset, trainable_mask
from unlearn_jax.unlearn.step import unlearn_step_grads

__all__ = [
    "DiffusionModel",
    "Preset",
    "UnlearnHParams",
    "get_preset",
    "trainable_mask",
    "unlearn_step_grads",
]
