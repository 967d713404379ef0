"""Gradient combination algebra and SalUn's saliency mask.

The combiners themselves are in `registry.COMBINERS`: each maps the Gram
matrix of (g_f, g_r) to the coefficients of g = a g_f + b g_r. This module
holds what they and `step.combine_term_grads` compute with: the Gram matrix,
norms, the cosine, the projection coefficient, the combination itself, and
the saliency mask and its application.

The train step calls these on {name: float32 array} gradients shaped like the
trainable parameters (`params.ParamSplit`); all work on any pytree of arrays.
Inner products and norms are global across the whole pytree and accumulated
in float32, whatever the leaf dtype; combined gradients keep the dtype of g_f.
By default they reduce leaf by leaf and never ravel a leaf, so an FSDP-sharded
leaf stays a per-device partial sum. With `concatenate=True` (leaves whole on
each device, on CPU: `train_step.make_step_parts`) and at most `CONCAT_MAX` entries in
all, they reduce the leaves raveled and concatenated: XLA:CPU compiles a kernel per
reduction, and the embedded model's 324 leaves made 648 reduction kernels in the train
step's update. Compiled alone on 2 cores, the update took 4.0-5.0 s with them and
2.8-3.3 s without (2026-12-07).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
# The most entries the reductions concatenate (`concatenate=True`; beyond it, leaf by
# leaf): at the bound the update holds 128 MiB of temporaries (g_f's and g_r's
# concatenations; `memory_analysis`), none leaf by leaf. Not in chunks: XLA:CPU kept
# every chunk live at once (24 leaves of 2^23 entries in 64 MiB chunks: 1.5 GiB), which
# for SD-1.5's 860M parameters would be 6.4 GiB. Compile time matters on small models.
CONCAT_MAX = 2**24


def _leaf_dot(x: jax.Array, y: jax.Array) -> jax.Array:
    """⟨x, y⟩ of two same-shaped arrays in float32, as a reduction over all axes.

    Not `vdot` of raveled arrays: raveling an array sharded along a minor axis
    (FSDP) makes XLA gather it whole on every device first.
    """
    return jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32))


def _total(parts: list[jax.Array], shape: tuple[int, ...]) -> jax.Array:
    """The sum of per-leaf partial results (float32 arrays of one shape), computed once.

    Not a Python `sum` (a chain of one add per leaf) nor a bare reduction of
    their stack, which XLA rewrites into that chain: the chain is cheap, so XLA
    fuses (copies) it into every per-leaf consumer of the total, e.g. every
    leaf of `linear_combination` reads the Gram matrix through the combiner's
    coefficients, and the program grows with the square of the number of
    leaves. The optimization barrier keeps the stacked partials whole.
    """
    if not parts:
        return jnp.zeros(shape, jnp.float32)
    return jnp.sum(jax.lax.optimization_barrier(jnp.stack(parts)), axis=0)


def _leaf_gram(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(⟨x,x⟩, ⟨x,y⟩, ⟨y,y⟩) of one leaf pair, float32 scalars.

    One variadic reduction of the three products: XLA's CPU backend emits (and
    compiles) a kernel per reduction, and per stacked operand, and the train step
    has one such triple per trainable leaf. Three sums, or one sum over their
    stack, took two to three kernels each.
    """
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    zero = jnp.zeros((), jnp.float32)
    dims = tuple(range(x.ndim))
    return jax.lax.reduce((x * x, x * y, y * y), (zero, zero, zero), _add_triples, dims)


def _add_triples(a: tuple, b: tuple) -> tuple:
    """The Gram reduction's computation. One function for every leaf: JAX traces a
    reduction's computation once per function object, so a lambda made per leaf was
    traced 324 times in the embedded model's update (0.9 s of its 6 s lowering, profiled)."""
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


def _pieces(tree: PyTree, concatenate: bool) -> list[jax.Array]:
    """What the global reductions reduce: the leaves, or with `concatenate` and at most
    `CONCAT_MAX` entries in all, the leaves raveled and concatenated in float32."""
    leaves = jax.tree.leaves(tree)
    if concatenate and len(leaves) > 1 and sum(x.size for x in leaves) <= CONCAT_MAX:
        return [jnp.concatenate([x.astype(jnp.float32).ravel() for x in leaves])]
    return leaves


def tree_gram(a: PyTree, b: PyTree, *, concatenate: bool = False) -> jax.Array:
    """Global Gram matrix of two pytrees of the same structure, float32 [2, 2].

    Everything a combiner needs (norms, inner product, cosine, the norm of
    any combination a g_f + b g_r) in one pass: one reduction per leaf (or of the
    concatenated leaves, `concatenate`) instead of one per leaf and quantity.
    """
    xs, ys = _pieces(a, concatenate), _pieces(b, concatenate)
    if concatenate and len(xs) == 1:
        # The concatenation's three sums stay three: XLA:CPU sums a variadic reduction in
        # sequence, which over millions of entries loses digits (4.7e-4 of ‖g_f‖ on the
        # embedded model); `jnp.sum` keeps vector partial sums.
        grams = [(_leaf_dot(xs[0], xs[0]), _leaf_dot(xs[0], ys[0]), _leaf_dot(ys[0], ys[0]))]
    else:
        grams = [_leaf_gram(x, y) for x, y in zip(xs, ys, strict=True)]
    xx, xy, yy = (_total([g[i] for g in grams], ()) for i in range(3))
    return jnp.stack([jnp.stack([xx, xy]), jnp.stack([xy, yy])])


def tree_vdot(a: PyTree, b: PyTree, *, concatenate: bool = False) -> jax.Array:
    """Global inner product ⟨a, b⟩ of two pytrees of the same structure, float32 scalar."""
    pairs = zip(_pieces(a, concatenate), _pieces(b, concatenate), strict=True)
    return _total([_leaf_dot(x, y) for x, y in pairs], ())


def tree_norm(a: PyTree, *, concatenate: bool = False) -> jax.Array:
    """Global L2 norm ‖a‖ of a pytree, float32 scalar."""
    return jnp.sqrt(tree_vdot(a, a, concatenate=concatenate))


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


def project_coefficient(
    gram: jax.Array, lam: float | jax.Array, strict: bool = False, rounding: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """(c, projected) of the projected update g = g_f + c g_r, from the Gram of (g_f, g_r).

    g = g_f − [⟨g_f,g_r⟩/‖g_r‖²] g_r + λ g_r, the bracket applied only on
    conflict (⟨g_f, g_r⟩ < 0), or always when `strict`: the component of g_f
    along g_r is removed, so a forget step cannot undo the retain objective
    to first order (PCGrad-style); otherwise g_f is kept as is. A g_r with
    ‖g_r‖ ≤ rounding · ‖g_f‖ (zero included) is not projected on: c = λ.
    Such a g_r is rounding (see `UnlearnHParams.project_rounding`), and its
    direction says nothing about the retain objective.

    Args:
      gram: [2, 2] float32, `tree_gram(g_f, g_r)`.
      lam: λ, the retain weight.
      strict: project whatever the sign of ⟨g_f, g_r⟩.
      rounding: the ratio ‖g_r‖/‖g_f‖ at or below which g_r is ignored.
    Returns:
      c (float32), and whether the g_r component was removed (bool scalar).
    """
    dot, norm_sq = gram[0, 1], gram[1, 1]
    significant = norm_sq > jnp.float32(rounding) ** 2 * gram[0, 0]
    remove = (norm_sq > 0) & significant & ((dot < 0) | strict)
    c = lam - jnp.where(remove, dot / jnp.where(norm_sq > 0, norm_sq, 1.0), 0.0)
    return jnp.asarray(c, jnp.float32), remove


def saliency_keep_count(keep_fraction: float, total: int) -> int:
    """Number of parameters a saliency mask keeps: round half up of keep_fraction * total."""
    return min(total, max(0, math.floor(keep_fraction * total + 0.5)))


def saliency_mask(
    accumulated_forget_grad: list[jax.Array], keep_fraction: float
) -> list[jax.Array]:
    """SalUn's mask: the parameter entries with the largest |g| over all leaves together.

    Exactly `saliency_keep_count(keep_fraction, total entries)` entries are
    True. Ties at the threshold go to the earlier entries in the order of the
    leaves, then row-major within a leaf, so the mask is deterministic. One
    sort of all |g| values (float32); it runs once, before step 0.

    Args:
      accumulated_forget_grad: the forget gradient summed over the forget set,
        one array per trainable leaf in the split's order (`ParamSplit.ordered`).
      keep_fraction: in [0, 1].
    Returns:
      bool arrays shaped like the leaves, in the same order.
    """
    shapes = [g.shape for g in accumulated_forget_grad]
    magnitudes = jnp.concatenate(
        [jnp.abs(g.astype(jnp.float32)).ravel() for g in accumulated_forget_grad]
    )
    size = magnitudes.shape[0]
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
    out, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(mask[offset : offset + n].reshape(shape))
        offset += n
    return out


def apply_mask(grads: PyTree, mask: PyTree) -> PyTree:
    """grads where mask is true (or 1), exact zeros elsewhere; mask shaped like grads."""
    return jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)), grads, mask)
