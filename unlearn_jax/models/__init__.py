"""Flax NNX Stable Diffusion components named like diffusers/transformers."""
