"""The unlearning train loop: config -> jitted, sharded, checkpointed steps -> export.

It runs the pure objectives of `unlearn_jax.unlearn` (terms, combiners,
`ParamSplit`) on a real pipeline; it pulls in the models, the data and orbax,
so import its modules on demand.

Modules:
  config_file   -- `get_config(arg)` files and `--config.a.b=value` overrides.
  config_checks -- range checks of a config's numbers, before anything is loaded.
  experiment    -- config -> RunSpec (method, trainable group, hyperparameters,
                   prompts, fingerprint), the model (θ0, apply_fn, `ParamSplit`), the data.
  text_encoder  -- `unlearn.text_encoder`: text encoder ∘ UNet as the trained network
                   (joint parameters, trainable mask, apply_fn on token ids).
  batches       -- training batches as a pure function of (seed, step), split
                   into micro-batches for gradient accumulation.
  state         -- `TrainState` (step, trainable parameters, optimizer state over
                   the flat vector, SalUn's mask) and the optax optimizer/schedule.
  sharding      -- the ('data', 'fsdp') mesh and the shardings of batch and state.
  train_step    -- the jitted step (θ0 an argument, state donated, accumulation,
                   combine once, masked update) and SalUn's saliency gradient.
  checkpoints   -- orbax checkpoints, incomplete-save handling, the run record.
  restore       -- the latest checkpoint of a workdir, for evaluate and export.
  evaluation    -- evaluators (integrity, pluggable forget rate) for periodic/final eval.
  writers       -- metrics.jsonl (+ TensorBoard through clu when available).
  train         -- `train_and_evaluate(config, workdir)`, `evaluate`, `export`.
  commands      -- the `unlearn`, `evaluate` and `export` CLI subcommands.
"""
