"""Benchmarks, run as python -m unlearn_jax.benchmarks.NAME; never timed tests."""
