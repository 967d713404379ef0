"""Experiment configs, one per file: `get_config(arg)` (installed as unlearn_jax.configs)."""
