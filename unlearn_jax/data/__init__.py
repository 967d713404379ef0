"""Prompt sets, tokenizers, TFDS builders and latent/embedding caches."""
