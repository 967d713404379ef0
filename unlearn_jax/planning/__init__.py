"""The memory and FLOP planner (`unlearn-jax plan`, `python -m unlearn_jax.plan`).

Modules:
  models    -- `ModelSpec`, the SD-1.5 / SD-2.1 / tiny configs, `resolve_model`.
  programs  -- `plan_train_step` and `plan_sampler`: the trainer's step and the
               integrity sampler compiled ahead of time on abstract shapes.
  measure   -- `CHIPS`, fake CPU devices, `memory_of` / `flops_of` of a compiled
               program, `ProgramReport`.
  report    -- the JSON report and its text / Markdown tables.

The command line lives in `unlearn_jax.plan`.
"""
