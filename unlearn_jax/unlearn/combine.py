"""Gradient combination algebra and SalUn's saliency mask.

The combiners themselves are in `registry.COMBINERS`: each maps the Gram
matrix of (g_f, g_r) to the coefficients of g = a g_f + b g_r. This module
holds what they and `step.combine_term_grads` compute with: the Gram matrix,
norms, the cosine, the projection coefficient, the combination itself, and
the saliency mask and its application.

The train step calls these on the flat float32 gradient vectors of
`params.ParamSplit` (a pytree of one leaf); all but `saliency_mask` work on
any pytree of arrays. Inner products and norms are global across the whole
pytree and accumulated in float32, whatever the leaf dtype; combined
gradients keep the dtype of g_f.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def _leaf_gram(x: jax.Array, y: jax.Array) -> jax.Array:
    """[[⟨x,x⟩, ⟨x,y⟩], [⟨y,x⟩, ⟨y,y⟩]] of one leaf pair, float32 [2, 2]."""
    x, y = x.astype(jnp.float32).ravel(), y.astype(jnp.float32).ravel()
    dot = jnp.vdot(x, y)
    return jnp.stack([jnp.stack([jnp.vdot(x, x), dot]), jnp.stack([dot, jnp.vdot(y, y)])])


def tree_gram(a: PyTree, b: PyTree) -> jax.Array:
    """Global Gram matrix of two pytrees of the same structure, float32 [2, 2].

    Everything a combiner needs (norms, inner product, cosine, the norm of
    any combination a g_f + b g_r) in one pass: three reductions per leaf
    instead of one per leaf and quantity (XLA's compile time grows with the
    number of separate reductions).
    """
    parts = jax.tree.leaves(jax.tree.map(_leaf_gram, a, b))
    return sum(parts, jnp.zeros((2, 2), jnp.float32))


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Global inner product ⟨a, b⟩ of two pytrees of the same structure, float32 scalar."""
    parts = jax.tree.map(
        lambda x, y: jnp.vdot(x.astype(jnp.float32).ravel(), y.astype(jnp.float32).ravel()), a, b
    )
    return sum(jax.tree.leaves(parts), jnp.zeros((), jnp.float32))


def tree_norm(a: PyTree) -> jax.Array:
    """Global L2 norm ‖a‖ of a pytree, float32 scalar."""
    return jnp.sqrt(tree_vdot(a, a))


def _safe_cosine(dot: jax.Array, norm_a: jax.Array, norm_b: jax.Array) -> jax.Array:
    denominator = norm_a * norm_b
    return jnp.where(denominator > 0, dot / jnp.where(denominator > 0, denominator, 1), 0.0)


def gram_cosine(gram: jax.Array) -> jax.Array:
    """cos of the two vectors of a [2, 2] Gram matrix; 0 when either is zero."""
    return _safe_cosine(gram[0, 1], jnp.sqrt(gram[0, 0]), jnp.sqrt(gram[1, 1]))


def linear_combination(a: float | jax.Array, x: PyTree, b: float | jax.Array, y: PyTree) -> PyTree:
    """a x + b y leafwise, in float32, cast back to x's dtypes."""
    return jax.tree.map(
        lambda xi, yi: (a * xi.astype(jnp.float32) + b * yi.astype(jnp.float32)).astype(xi.dtype),
        x,
        y,
    )


def combination_norm(a: jax.Array, b: jax.Array, gram: jax.Array) -> jax.Array:
    """‖a x + b y‖ from the Gram matrix of (x, y), without another pass over the pytrees."""
    sq = a * a * gram[0, 0] + 2 * a * b * gram[0, 1] + b * b * gram[1, 1]
    return jnp.sqrt(jnp.maximum(sq, 0.0))


def project_coefficient(gram: jax.Array, lam: float | jax.Array, strict: bool = False) -> jax.Array:
    """c of the projected update g = g_f + c g_r, from the Gram matrix of (g_f, g_r), float32.

    g = g_f − [⟨g_f,g_r⟩/‖g_r‖²] g_r + λ g_r, the bracket applied only on
    conflict (⟨g_f, g_r⟩ < 0), or always when `strict`: the component of g_f
    along g_r is removed, so a forget step cannot undo the retain objective
    to first order (PCGrad-style); otherwise g_f is kept as is. A zero g_r
    leaves c = λ (and g_f unchanged).

    Args:
      gram: [2, 2] float32, `tree_gram(g_f, g_r)`.
      lam: λ, the retain weight.
      strict: project whatever the sign of ⟨g_f, g_r⟩.
    """
    dot, norm_sq = gram[0, 1], gram[1, 1]
    remove = (norm_sq > 0) & ((dot < 0) | strict)
    return lam - jnp.where(remove, dot / jnp.where(norm_sq > 0, norm_sq, 1.0), 0.0)


def saliency_keep_count(keep_fraction: float, total: int) -> int:
    """Number of parameters a saliency mask keeps: round half up of keep_fraction * total."""
    return min(total, max(0, math.floor(keep_fraction * total + 0.5)))


def saliency_mask(
    accumulated_forget_grad: jax.Array, keep_fraction: float, size: int | None = None
) -> jax.Array:
    """SalUn's mask: the entries of the flat gradient with the largest |g|.

    Only the first `size` entries compete (default: all); the entries after
    them (`ParamSplit`'s zero padding) are never selected. Exactly
    `saliency_keep_count(keep_fraction, size)` entries are True. Ties at the
    threshold go to the earlier entries, so the mask is deterministic. One
    sort of all |g| values (float32).

    Args:
      accumulated_forget_grad: [n], the forget gradient summed over the forget
        set, flat (`ParamSplit.flatten`, n = padded_size).
      keep_fraction: in [0, 1].
      size: number of real entries (`ParamSplit.size`), at most n.
    Returns:
      bool [n].
    """
    n = accumulated_forget_grad.shape[0]
    size = n if size is None else size
    magnitudes = jnp.abs(accumulated_forget_grad[:size].astype(jnp.float32))
    keep = saliency_keep_count(keep_fraction, size)
    if keep == 0:
        mask = jnp.zeros((size,), bool)
    elif keep == size:
        mask = jnp.ones((size,), bool)
    else:
        threshold = jnp.sort(magnitudes)[size - keep]  # the keep-th largest value
        above = magnitudes > threshold
        at_threshold = magnitudes == threshold
        # Of the entries equal to the threshold, take the first ones until `keep` are in.
        room = keep - jnp.sum(above)
        mask = above | (at_threshold & (jnp.cumsum(at_threshold) <= room))
    return jnp.concatenate([mask, jnp.zeros((n - size,), bool)])


def apply_mask(grads: PyTree, mask: PyTree) -> PyTree:
    """grads where mask is true (or 1), exact zeros elsewhere; mask shaped like grads."""
    return jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)), grads, mask)
