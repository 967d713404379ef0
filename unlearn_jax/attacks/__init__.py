"""Adversarial recovery attacks: is an unlearned concept gone, or only hidden behind its word?

  objectives  pure jitted attack losses (textual inversion, bounded context perturbation)
  prompts     placeholder prompts: the concept's word replaced by k learned tokens
  run         settings, the sharded attack loop, orbax checkpoints and resume
  evaluation  forget rate under attack from the same noise; attack.json and grid.png
  configured  `eval.attack` of a run config: validation, and the attack of an evaluation
  command     the `unlearn-jax attack` subcommand

Nothing is imported here, so that the CLI can register `attack` without importing JAX.
"""
