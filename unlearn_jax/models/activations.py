"""Activations shared by the UNet, VAE and text encoder."""

from __future__ import annotations

import math

import jax


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU written as torch computes it: x/2 * (1 + erf(x/sqrt(2))).

    `jax.nn.gelu(approximate=False)` computes x/2 * erfc(-x/sqrt(2)) instead, which
    is more accurate in the far negative tail (where both are within 2e-6 of 0) and
    1.8x slower on XLA:CPU, whose erfc costs nearly twice its erf (2.6 vs 1.4 ms for
    the GEGLU of one tiny-UNet transformer block at batch 16).
    """
    return 0.5 * x * (1 + jax.lax.erf(x * (1 / math.sqrt(2))))
