"""Gradient combiners and the saliency mask against NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unlearn_jax.unlearn import combine


def random_tree(seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {
        "a": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), dtype)},
        "b": [
            jnp.asarray(rng.normal(size=(5,)), dtype),
            jnp.asarray(rng.normal(size=(2, 2, 2)), dtype),
        ],
        "frozen": None,  # an absent subtree, as partition_params leaves it
    }


def flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def with_sign(g_r, sign):
    """A g_f whose inner product with g_r has the given sign."""
    g_f = random_tree(1)
    dot = float(np.dot(flat(g_f), flat(g_r)))
    shift = (sign * (abs(dot) + 1.0) - dot) / float(np.dot(flat(g_r), flat(g_r)))
    return jax.tree.map(lambda f, r: f + shift * r, g_f, g_r)


def test_vdot_norm_cosine():
    x, y = random_tree(0), random_tree(1)
    fx, fy = flat(x), flat(y)
    np.testing.assert_allclose(combine.tree_vdot(x, y), fx @ fy, rtol=1e-5)
    np.testing.assert_allclose(combine.tree_norm(x), np.linalg.norm(fx), rtol=1e-6)
    cos = fx @ fy / np.linalg.norm(fx) / np.linalg.norm(fy)
    np.testing.assert_allclose(combine.tree_cosine(x, y), cos, rtol=1e-5)
    zero = jax.tree.map(jnp.zeros_like, x)
    assert float(combine.tree_cosine(x, zero)) == 0.0
    # bf16 leaves: accumulated in float32, the result is float32.
    assert combine.tree_vdot(random_tree(0, jnp.bfloat16), x).dtype == jnp.float32


def test_sum_grads():
    g_f, g_r = random_tree(0), random_tree(1)
    np.testing.assert_allclose(
        flat(combine.sum_grads(g_f, g_r, 0.25)), flat(g_f) + 0.25 * flat(g_r), rtol=1e-6
    )


def test_project_removes_exactly_the_conflicting_component():
    g_r = random_tree(0)
    g_f = with_sign(g_r, -1)
    fr, ff = flat(g_r), flat(g_f)
    assert ff @ fr < 0
    out = combine.project_grads(g_f, g_r, 0.0)
    np.testing.assert_allclose(flat(out), ff - (ff @ fr) / (fr @ fr) * fr, rtol=1e-5, atol=1e-6)
    # Orthogonal to g_r up to float32 rounding of the inputs' scale.
    assert abs(flat(out) @ fr) < 1e-5 * np.linalg.norm(ff) * np.linalg.norm(fr)
    # + λ g_r on top.
    out_lam = combine.project_grads(g_f, g_r, 0.5)
    np.testing.assert_allclose(flat(out_lam), flat(out) + 0.5 * fr, rtol=1e-5, atol=1e-6)
    assert jax.tree.structure(out) == jax.tree.structure(g_f)


def test_project_keeps_agreeing_gradient_unless_strict():
    g_r = random_tree(0)
    g_f = with_sign(g_r, +1)
    out = combine.project_grads(g_f, g_r, 0.0)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(g_f)):
        np.testing.assert_array_equal(a, b)
    strict = combine.project_grads(g_f, g_r, 0.0, strict=True)
    fr, ff = flat(g_r), flat(g_f)
    assert abs(flat(strict) @ fr) < 1e-5 * np.linalg.norm(ff) * np.linalg.norm(fr)
    np.testing.assert_allclose(flat(strict), ff - (ff @ fr) / (fr @ fr) * fr, rtol=1e-5, atol=1e-6)


def test_project_with_zero_retain_gradient_is_identity():
    g_f = random_tree(1)
    out = combine.project_grads(g_f, jax.tree.map(jnp.zeros_like, g_f), 1.0, strict=True)
    np.testing.assert_array_equal(flat(out), flat(g_f))


def test_project_keeps_dtype():
    g_f, g_r = random_tree(1, jnp.bfloat16), random_tree(0, jnp.bfloat16)
    out = combine.project_grads(g_f, g_r, 0.0, strict=True)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_erasediff_lambda(eta):
    g_r, g_d = random_tree(0), random_tree(1)
    fr, fd = flat(g_r), flat(g_d)
    cos = fr @ fd / np.linalg.norm(fr) / np.linalg.norm(fd)
    np.testing.assert_allclose(
        combine.erasediff_lambda(g_r, g_d, eta), max(eta - cos, 0.0), rtol=1e-5, atol=1e-7
    )
    # Aligned gradients: λ = max(η − 1, 0).
    np.testing.assert_allclose(combine.erasediff_lambda(g_r, g_r, eta), max(eta - 1, 0), atol=1e-6)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.77, 1.0])
def test_saliency_mask_keeps_exact_count_of_largest_globally(fraction):
    g = random_tree(3)
    magnitudes = np.abs(flat(g))
    total = magnitudes.size
    mask = combine.saliency_mask(g, fraction)
    assert jax.tree.structure(mask) == jax.tree.structure(g)
    kept = flat(mask).astype(bool)
    want_count = int(np.floor(fraction * total + 0.5))
    assert kept.sum() == want_count == combine.saliency_keep_count(fraction, total)
    # Same set as a global NumPy top-k (the random values have no ties).
    want = np.zeros(total, bool)
    want[np.argsort(-magnitudes, kind="stable")[:want_count]] = True
    np.testing.assert_array_equal(kept, want)


def test_saliency_mask_ties_are_deterministic():
    # All |g| equal: the first k entries in leaf order, row-major, are kept.
    g = jax.tree.map(lambda x: jnp.where(x > 0, 1.0, -1.0), random_tree(4))
    total = flat(g).size
    kept = flat(jax.jit(combine.saliency_mask, static_argnums=1)(g, 0.4)).astype(bool)
    k = combine.saliency_keep_count(0.4, total)
    np.testing.assert_array_equal(kept, np.arange(total) < k)
    # A partial tie at the threshold: the larger values first, then the earliest tied ones.
    leaf = jnp.asarray([0.1, 3.0, 2.0, 2.0, 2.0, 0.2, -2.0, 5.0])
    np.testing.assert_array_equal(
        combine.saliency_mask({"w": leaf}, 0.5)["w"],
        [False, True, True, True, False, False, False, True],
    )


def test_apply_mask():
    g = random_tree(5)
    mask = combine.saliency_mask(g, 0.5)
    out = combine.apply_mask(g, mask)
    np.testing.assert_array_equal(flat(out), np.where(flat(mask) > 0, flat(g), 0.0))
