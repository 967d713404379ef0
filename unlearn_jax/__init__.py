"""unlearn_jax: concept unlearning for diffusers-format text-to-image models in JAX/Flax."""

__version__ = "0.1.0"
