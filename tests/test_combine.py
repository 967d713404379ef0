"""The gradient combiners and SalUn's mask as the train step runs them, against NumPy references.

`trainer.train_step` flattens each term's gradient into one float32 vector
[padded_size] (`ParamSplit.flatten`: the real entries, then zero padding) and
calls `step.combine_term_grads(g_f, g_r, preset, hparams, saliency)` inside
the jitted step; that runs `registry.COMBINERS[preset.combiner](gram, hp)` and
`combine.linear_combination`. `trainer.train._saliency_mask` builds the mask
with `combine.saliency_mask(total, keep_fraction, split.size)`. These tests
call exactly those, on such vectors, for the presets that use each combiner.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unlearn_jax.unlearn import combine, step
from unlearn_jax.unlearn.hparams import UnlearnHParams
from unlearn_jax.unlearn.registry import get_preset

SIZE, PADDED = 37, 64  # real entries of the flat vector, and its padded length


def flat_grad(seed: int) -> jax.Array:
    """A flat float32 gradient as `ParamSplit.flatten` lays it out: SIZE values, zero padding."""
    values = np.random.default_rng(seed).normal(size=SIZE)
    return jnp.asarray(np.concatenate([values, np.zeros(PADDED - SIZE)]), jnp.float32)


def random_tree(seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {
        "a": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), dtype)},
        "b": [
            jnp.asarray(rng.normal(size=(5,)), dtype),
            jnp.asarray(rng.normal(size=(2, 2, 2)), dtype),
        ],
    }


def np64(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def with_sign(g_r: jax.Array, sign: int) -> jax.Array:
    """A flat g_f (zero padding kept) whose inner product with g_r has the given sign."""
    g_f, fr = np64(flat_grad(1)), np64(g_r)
    dot = g_f @ fr
    shift = (sign * (abs(dot) + 1.0) - dot) / (fr @ fr)
    return jnp.asarray(g_f + shift * fr, jnp.float32)


def cosine(x: np.ndarray, y: np.ndarray) -> float:
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


@functools.partial(jax.jit, static_argnums=(2, 3))
def combine_in_step(g_f, g_r, method: str, hparams: UnlearnHParams, saliency=None):
    """`step.combine_term_grads` for the preset `method`, jitted as in the train step."""
    return step.combine_term_grads(g_f, g_r, get_preset(method), hparams, saliency)


def close(got, want, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- Gram matrix, norms


def test_gram_norms_and_cosine_match_numpy():
    for x, y in ((flat_grad(0), flat_grad(1)), (random_tree(0), random_tree(1))):
        fx, fy = np64(x), np64(y)
        gram = combine.tree_gram(x, y)
        close(gram, [[fx @ fx, fx @ fy], [fy @ fx, fy @ fy]])
        close(combine.tree_vdot(x, y), fx @ fy)
        close(combine.tree_norm(x), np.linalg.norm(fx), rtol=1e-6)
        close(combine.gram_cosine(gram), cosine(fx, fy))
        close(combine.combination_norm(0.7, -1.3, gram), np.linalg.norm(0.7 * fx - 1.3 * fy))
        zero = jax.tree.map(jnp.zeros_like, x)
        assert float(combine.gram_cosine(combine.tree_gram(x, zero))) == 0.0
    # bf16 leaves: accumulated in float32, the result is float32.
    assert combine.tree_gram(random_tree(0, jnp.bfloat16), random_tree(1)).dtype == jnp.float32
    assert combine.tree_vdot(random_tree(0, jnp.bfloat16), random_tree(1)).dtype == jnp.float32


# ---------------------------------------------------------------- combiners


def test_sum_combiner_of_graddiff():
    g_f, g_r = flat_grad(0), flat_grad(1)
    ff, fr = np64(g_f), np64(g_r)
    grads, metrics = combine_in_step(g_f, g_r, "graddiff", UnlearnHParams(retain_weight=0.25))
    close(grads, ff + 0.25 * fr)
    assert not np.any(np.asarray(grads)[SIZE:])  # the padding stays zero
    close(metrics["grad/forget_norm"], np.linalg.norm(ff))
    close(metrics["grad/retain_norm"], np.linalg.norm(fr))
    close(metrics["grad/cos"], cosine(ff, fr))
    close(metrics["grad/norm"], np.linalg.norm(ff + 0.25 * fr))


def test_forget_only_preset_passes_the_forget_gradient_through():
    g_f = flat_grad(0)
    grads, metrics = combine_in_step(g_f, None, "neggrad", UnlearnHParams())
    np.testing.assert_array_equal(grads, g_f)
    close(metrics["grad/forget_norm"], np.linalg.norm(np64(g_f)))
    close(metrics["grad/norm"], np.linalg.norm(np64(g_f)))
    assert "grad/cos" not in metrics


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_project_removes_exactly_the_conflicting_component(lam):
    g_r = flat_grad(0)
    g_f = with_sign(g_r, -1)
    fr, ff = np64(g_r), np64(g_f)
    assert ff @ fr < 0
    grads, metrics = combine_in_step(g_f, g_r, "distill_project", UnlearnHParams(retain_weight=lam))
    projected = ff - (ff @ fr) / (fr @ fr) * fr
    close(grads, projected + lam * fr)
    close(metrics["grad/norm"], np.linalg.norm(projected + lam * fr), rtol=1e-4)
    if lam == 0.0:
        # Orthogonal to g_r up to float32 rounding of the inputs' scale.
        assert abs(np64(grads) @ fr) < 1e-5 * np.linalg.norm(ff) * np.linalg.norm(fr)


def test_project_keeps_agreeing_gradient_unless_strict():
    g_r = flat_grad(0)
    g_f = with_sign(g_r, +1)
    fr, ff = np64(g_r), np64(g_f)
    grads, _ = combine_in_step(g_f, g_r, "distill_project", UnlearnHParams(retain_weight=0.0))
    np.testing.assert_array_equal(grads, g_f)
    hp = UnlearnHParams(retain_weight=0.0, strict=True)
    strict, _ = combine_in_step(g_f, g_r, "distill_project", hp)
    assert abs(np64(strict) @ fr) < 1e-5 * np.linalg.norm(ff) * np.linalg.norm(fr)
    close(strict, ff - (ff @ fr) / (fr @ fr) * fr)


def test_project_with_zero_retain_gradient_is_identity():
    g_f = flat_grad(1)
    hp = UnlearnHParams(retain_weight=1.0, strict=True)
    grads, metrics = combine_in_step(g_f, jnp.zeros_like(g_f), "distill_project", hp)
    np.testing.assert_array_equal(grads, g_f)
    assert float(metrics["grad/cos"]) == 0.0


def test_combination_keeps_the_dtype_of_the_forget_gradient():
    g_f, g_r = random_tree(1, jnp.bfloat16), random_tree(0, jnp.bfloat16)
    hp = UnlearnHParams(retain_weight=0.0, strict=True)
    grads, _ = step.combine_term_grads(g_f, g_r, get_preset("distill_project"), hp)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(grads))


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_erasediff_lambda_is_max_of_eta_minus_cosine_and_zero(eta):
    g_f, g_r = flat_grad(0), flat_grad(1)
    ff, fr = np64(g_f), np64(g_r)
    lam = max(eta - cosine(ff, fr), 0.0)
    grads, metrics = combine_in_step(g_f, g_r, "erasediff", UnlearnHParams(erasediff_eta=eta))
    close(metrics["combine/lambda"], lam, atol=1e-6)
    close(grads, lam * ff + fr)  # EraseDiff's outer step: retain + λ forget
    close(metrics["grad/norm"], np.linalg.norm(lam * ff + fr))
    # Aligned gradients: λ = max(η − 1, 0).
    _, aligned = combine_in_step(2.0 * g_r, g_r, "erasediff", UnlearnHParams(erasediff_eta=eta))
    close(aligned["combine/lambda"], max(eta - 1.0, 0.0), atol=1e-6)


def test_erasediff_fixed_lambda_overrides_the_adaptive_one():
    g_f, g_r = flat_grad(0), flat_grad(1)
    grads, metrics = combine_in_step(g_f, g_r, "erasediff", UnlearnHParams(erasediff_lambda=0.3))
    close(metrics["combine/lambda"], 0.3)
    close(grads, 0.3 * np64(g_f) + np64(g_r))


# ---------------------------------------------------------------- SalUn's saliency mask


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.77, 1.0])
def test_saliency_mask_keeps_exact_count_of_largest_and_never_the_padding(fraction):
    g = flat_grad(3)
    magnitudes = np.abs(np64(g)[:SIZE])
    mask = np.asarray(combine.saliency_mask(g, fraction, SIZE))
    assert mask.shape == (PADDED,) and mask.dtype == bool
    assert not mask[SIZE:].any()
    want_count = int(np.floor(fraction * SIZE + 0.5))
    assert mask.sum() == want_count == combine.saliency_keep_count(fraction, SIZE)
    # Same set as a NumPy top-k over the real entries (the random values have no ties).
    want = np.zeros(PADDED, bool)
    want[np.argsort(-magnitudes, kind="stable")[:want_count]] = True
    np.testing.assert_array_equal(mask, want)


def test_saliency_mask_padding_never_competes():
    # All-zero gradient: every real entry ties with the zero padding; the real ones win.
    zeros = jnp.zeros((PADDED,), jnp.float32)
    np.testing.assert_array_equal(combine.saliency_mask(zeros, 0.5, SIZE), np.arange(PADDED) < 19)
    # Whatever sits after `size` is not a parameter and is never selected.
    loud_padding = flat_grad(3).at[SIZE:].set(1e6)
    for fraction in (0.3, 1.0):
        assert not np.asarray(combine.saliency_mask(loud_padding, fraction, SIZE))[SIZE:].any()
    # Without `size` every entry competes.
    assert combine.saliency_mask(flat_grad(3), 1.0).all()


def test_saliency_mask_ties_are_deterministic():
    # All |g| equal: the first k entries are kept.
    g = jnp.where(flat_grad(4) > 0, 1.0, -1.0).at[SIZE:].set(0.0)
    k = combine.saliency_keep_count(0.4, SIZE)
    np.testing.assert_array_equal(combine.saliency_mask(g, 0.4, SIZE), np.arange(PADDED) < k)
    # A partial tie at the threshold: the larger values first, then the earliest tied ones.
    leaf = jnp.asarray([0.1, 3.0, 2.0, 2.0, 2.0, 0.2, -2.0, 5.0, 0.0, 0.0])
    np.testing.assert_array_equal(
        combine.saliency_mask(leaf, 0.5, 8),
        [False, True, True, True, False, False, False, True, False, False],
    )


def test_salun_update_is_exactly_zero_outside_the_mask():
    g_f, g_r = flat_grad(5), flat_grad(6)
    hp = get_preset("salun").hparams
    mask = combine.saliency_mask(flat_grad(7), hp.keep_fraction, SIZE)
    grads, metrics = combine_in_step(g_f, g_r, "salun", hp, mask)
    want = np.where(np.asarray(mask), np64(g_f) + hp.retain_weight * np64(g_r), 0.0)
    close(grads, want)
    assert not np.any(np.asarray(grads)[~np.asarray(mask)])  # exact zeros, padding included
    close(metrics["grad/norm"], np.linalg.norm(want))
