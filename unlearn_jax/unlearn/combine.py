"""Gradient combiners over pytrees, and the SalUn saliency mask.

Every function is pure and works on any pytree of arrays (nested dicts of
leaves, with `None` for absent subtrees). Inner products and norms are global
across the whole pytree (one vector of all parameters) and accumulated in
float32, whatever the leaf dtype; combined gradients keep the dtype of g_f.
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


def tree_cosine(a: PyTree, b: PyTree) -> jax.Array:
    """cos(a, b) = ⟨a,b⟩ / (‖a‖ ‖b‖), float32 scalar; 0 when either is all zeros."""
    gram = tree_gram(a, b)
    return gram_cosine(gram)


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


def sum_grads(g_f: PyTree, g_r: PyTree, lam: float | jax.Array) -> PyTree:
    """g = g_f + λ g_r."""
    return linear_combination(1.0, g_f, lam, g_r)


def project_coefficient(gram: jax.Array, lam: float | jax.Array, strict: bool = False) -> jax.Array:
    """c with `project_grads(g_f, g_r, λ) = g_f + c g_r`, from the Gram matrix of (g_f, g_r)."""
    dot, norm_sq = gram[0, 1], gram[1, 1]
    remove = (norm_sq > 0) & ((dot < 0) | strict)
    return lam - jnp.where(remove, dot / jnp.where(norm_sq > 0, norm_sq, 1.0), 0.0)


def project_grads(g_f: PyTree, g_r: PyTree, lam: float | jax.Array, strict: bool = False) -> PyTree:
    """g = g_f − [⟨g_f,g_r⟩/‖g_r‖²] g_r + λ g_r, the bracket applied only on conflict.

    On conflict (⟨g_f, g_r⟩ < 0), or always when `strict`, the component of
    g_f along g_r is removed, so a forget step cannot undo the retain
    objective to first order (PCGrad-style); otherwise g_f is kept as is.
    A zero g_r leaves g_f unchanged.
    """
    return linear_combination(1.0, g_f, project_coefficient(tree_gram(g_f, g_r), lam, strict), g_r)


def erasediff_lambda(g_r: PyTree, g_delta: PyTree, eta: float | jax.Array) -> jax.Array:
    """EraseDiff's adaptive weight λ = max(η − cos(g_r, g_delta), 0), float32 scalar.

    g_delta is the gradient of the forget gap f − f*; the forget step is
    weighted up when it disagrees with the retain gradient and switched off
    once they align beyond η.
    """
    return jnp.maximum(eta - tree_cosine(g_r, g_delta), 0.0)


def saliency_keep_count(keep_fraction: float, total: int) -> int:
    """Number of parameters a saliency mask keeps: round half up of keep_fraction * total."""
    return min(total, max(0, math.floor(keep_fraction * total + 0.5)))


def saliency_mask(accumulated_forget_grad: PyTree, keep_fraction: float) -> PyTree:
    """Boolean mask pytree keeping the largest |g| parameters globally (SalUn).

    Exactly `saliency_keep_count(keep_fraction, N)` entries are True over the
    whole pytree of N parameters. Ties at the threshold go to the earlier
    entries in `jax.tree.leaves` order, row-major within a leaf, so the mask
    is deterministic. One sort of all |g| values (float32).

    Args:
      accumulated_forget_grad: pytree of gradients (any shapes).
      keep_fraction: in [0, 1].
    Returns:
      pytree of bool arrays shaped like the leaves.
    """
    leaves, treedef = jax.tree.flatten(accumulated_forget_grad)
    magnitudes = jnp.concatenate([jnp.abs(x.astype(jnp.float32)).ravel() for x in leaves])
    total = magnitudes.shape[0]
    keep = saliency_keep_count(keep_fraction, total)
    if keep == 0:
        flat = jnp.zeros((total,), bool)
    elif keep == total:
        flat = jnp.ones((total,), bool)
    else:
        threshold = jnp.sort(magnitudes)[total - keep]  # the keep-th largest value
        above = magnitudes > threshold
        at_threshold = magnitudes == threshold
        # Of the entries equal to the threshold, take the first ones until `keep` are in.
        room = keep - jnp.sum(above)
        flat = above | (at_threshold & (jnp.cumsum(at_threshold) <= room))
    masks, offset = [], 0
    for x in leaves:
        masks.append(flat[offset : offset + x.size].reshape(x.shape))
        offset += x.size
    return jax.tree.unflatten(treedef, masks)


def apply_mask(grads: PyTree, mask: PyTree) -> PyTree:
    """grads where mask is true (or 1), exact zeros elsewhere; mask shaped like grads."""
    return jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)), grads, mask)
