"""The gradient combiners and SalUn's mask as the train step runs them, against NumPy references.

`trainer.train_step` keeps each term's gradient per parameter ({name: float32
array shaped like the parameter}) and calls
`step.combine_term_grads(g_f, g_r, preset, hparams, saliency)` inside the
jitted step; that runs `registry.COMBINERS[preset.combiner](gram, hp)` and
`combine.linear_combination`. `trainer.train._saliency_mask` builds the mask
with `combine.saliency_mask(split.ordered(total), keep_fraction)`. These tests
call exactly those, on such dicts, for the presets that use each combiner;
the NumPy references work on the concatenation of the leaves.
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

# A gradient as the train step holds it: {name: float32 array shaped like the parameter}.
SHAPES = {"down.kernel": (3, 4), "down.bias": (4,), "up.kernel": (2, 3, 2), "up.norm": (5,)}
SIZE = sum(int(np.prod(s)) for s in SHAPES.values())


def unflat(values: np.ndarray) -> dict[str, jax.Array]:
    """{name: float32 array} from the concatenation of the leaves in SHAPES' order."""
    out, offset = {}, 0
    for name, shape in SHAPES.items():
        n = int(np.prod(shape))
        out[name] = jnp.asarray(np.asarray(values[offset : offset + n]).reshape(shape), jnp.float32)
        offset += n
    return out


def flat_grad(seed: int) -> dict[str, jax.Array]:
    """A per-parameter float32 gradient of SIZE random entries."""
    return unflat(np.random.default_rng(seed).normal(size=SIZE))


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
    """The leaves concatenated (dicts in SHAPES' order), float64."""
    if isinstance(tree, dict) and set(tree) == set(SHAPES):
        tree = [tree[name] for name in SHAPES]
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def with_sign(g_r, sign: int) -> dict[str, jax.Array]:
    """A g_f whose inner product with g_r has the given sign."""
    g_f, fr = np64(flat_grad(1)), np64(g_r)
    dot = g_f @ fr
    shift = (sign * (abs(dot) + 1.0) - dot) / (fr @ fr)
    return unflat(g_f + shift * fr)


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


@pytest.mark.parametrize("concat_max", [24, combine.CONCAT_MAX])
def test_concatenated_reductions_match_numpy(monkeypatch, concat_max):
    """`concatenate=True` (the CPU train step's update): the same Gram matrix, inner
    product and norm as NumPy, over the concatenated leaves (12, 5 and 8 entries, within
    `CONCAT_MAX`) or leaf by leaf beyond the bound (24); bfloat16 leaves accumulate in
    float32."""
    monkeypatch.setattr(combine, "CONCAT_MAX", concat_max)
    for dtype in (jnp.float32, jnp.bfloat16):
        x, y = random_tree(0, dtype), random_tree(1, dtype)
        fx, fy = np64(x), np64(y)
        gram = jax.jit(lambda a, b: combine.tree_gram(a, b, concatenate=True))(x, y)
        assert gram.dtype == jnp.float32
        close(gram, [[fx @ fx, fx @ fy], [fy @ fx, fy @ fy]])
        close(combine.tree_vdot(x, y, concatenate=True), fx @ fy)
        close(combine.tree_norm(x, concatenate=True), np.linalg.norm(fx), rtol=1e-6)


def test_leaves_are_concatenated_only_within_the_bound(monkeypatch):
    """Beyond `CONCAT_MAX` entries in all the reductions go leaf by leaf: XLA:CPU keeps
    every concatenation of a program live at once, so a bound per chunk would not bound
    the memory."""
    x = random_tree(0)  # 25 entries
    (whole,) = combine._pieces(x, concatenate=True)
    np.testing.assert_array_equal(whole, np64(x).astype(np.float32))
    monkeypatch.setattr(combine, "CONCAT_MAX", 24)
    assert [p.shape for p in combine._pieces(x, concatenate=True)] == [(3, 4), (5,), (2, 2, 2)]
    assert [p.shape for p in combine._pieces(x, concatenate=False)] == [(3, 4), (5,), (2, 2, 2)]


# ---------------------------------------------------------------- combiners


def test_sum_combiner_of_graddiff():
    g_f, g_r = flat_grad(0), flat_grad(1)
    ff, fr = np64(g_f), np64(g_r)
    grads, metrics = combine_in_step(g_f, g_r, "graddiff", UnlearnHParams(retain_weight=0.25))
    close(np64(grads), ff + 0.25 * fr)
    assert {n: g.shape for n, g in grads.items()} == SHAPES
    close(metrics["grad/forget_norm"], np.linalg.norm(ff))
    close(metrics["grad/retain_norm"], np.linalg.norm(fr))
    close(metrics["grad/cos"], cosine(ff, fr))
    close(metrics["grad/norm"], np.linalg.norm(ff + 0.25 * fr))


def test_forget_only_preset_passes_the_forget_gradient_through():
    g_f = flat_grad(0)
    grads, metrics = combine_in_step(g_f, None, "neggrad", UnlearnHParams())
    np.testing.assert_array_equal(np64(grads), np64(g_f))
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
    close(np64(grads), projected + lam * fr)
    assert float(metrics["combine/projected"]) == 1.0
    close(metrics["grad/norm"], np.linalg.norm(projected + lam * fr), rtol=1e-4)
    if lam == 0.0:
        # Orthogonal to g_r up to float32 rounding of the inputs' scale.
        assert abs(np64(grads) @ fr) < 1e-5 * np.linalg.norm(ff) * np.linalg.norm(fr)


def test_project_keeps_agreeing_gradient_unless_strict():
    g_r = flat_grad(0)
    g_f = with_sign(g_r, +1)
    fr, ff = np64(g_r), np64(g_f)
    grads, _ = combine_in_step(g_f, g_r, "distill_project", UnlearnHParams(retain_weight=0.0))
    np.testing.assert_array_equal(np64(grads), np64(g_f))
    hp = UnlearnHParams(retain_weight=0.0, strict=True)
    strict, _ = combine_in_step(g_f, g_r, "distill_project", hp)
    assert abs(np64(strict) @ fr) < 1e-5 * np.linalg.norm(ff) * np.linalg.norm(fr)
    close(np64(strict), ff - (ff @ fr) / (fr @ fr) * fr)


def test_project_with_zero_retain_gradient_is_identity():
    g_f = flat_grad(1)
    hp = UnlearnHParams(retain_weight=1.0, strict=True)
    zeros = jax.tree.map(jnp.zeros_like, g_f)
    grads, metrics = combine_in_step(g_f, zeros, "distill_project", hp)
    np.testing.assert_array_equal(np64(grads), np64(g_f))
    assert float(metrics["grad/cos"]) == 0.0
    assert float(metrics["combine/projected"]) == 0.0


def project_reference(ff, fr, lam, strict, rounding):
    """NumPy: the projected update, g_r ignored when ‖g_r‖ <= rounding ‖g_f‖."""
    ignored = np.linalg.norm(fr) <= rounding * np.linalg.norm(ff)
    if ignored or not (strict or ff @ fr < 0):
        return ff + lam * fr, False
    return ff - (ff @ fr) / (fr @ fr) * fr + lam * fr, True


@pytest.mark.parametrize("ratio", [1e-7, 9e-6, 1.2e-5, 1e-3])
@pytest.mark.parametrize("strict", [False, True])
def test_project_ignores_a_retain_gradient_at_rounding_level(ratio, strict):
    """‖g_r‖/‖g_f‖ <= project_rounding (1e-5): rounding, not signal; g_f is kept whole."""
    g_f = flat_grad(1)
    ff = np64(g_f)
    direction = np64(with_sign(flat_grad(0), -1))  # conflicts with g_f: projection would apply
    direction = -direction if ff @ direction > 0 else direction
    fr = direction / np.linalg.norm(direction) * ratio * np.linalg.norm(ff)
    g_r = unflat(fr)
    fr = np64(g_r)  # as float32 holds it
    hp = UnlearnHParams(retain_weight=0.5, strict=strict)
    assert hp.project_rounding == 1e-5
    grads, metrics = combine_in_step(g_f, g_r, "distill_project", hp)
    want, projected = project_reference(ff, fr, 0.5, strict, hp.project_rounding)
    assert projected == (ratio > 1e-5)
    assert float(metrics["combine/projected"]) == float(projected)
    close(np64(grads), want, rtol=1e-5, atol=1e-6 * np.linalg.norm(ff))
    # project_rounding=0 restores projecting on any nonzero g_r.
    exact = UnlearnHParams(retain_weight=0.5, strict=strict, project_rounding=0.0)
    _, metrics = combine_in_step(g_f, g_r, "distill_project", exact)
    assert float(metrics["combine/projected"]) == 1.0


def test_project_rounding_out_of_range_is_refused():
    with pytest.raises(ValueError, match="project_rounding must lie in"):
        UnlearnHParams(project_rounding=1.5)


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
    close(np64(grads), lam * ff + fr)  # EraseDiff's outer step: retain + λ forget
    close(metrics["grad/norm"], np.linalg.norm(lam * ff + fr))
    # Aligned gradients: λ = max(η − 1, 0).
    twice = jax.tree.map(lambda g: 2.0 * g, g_r)
    _, aligned = combine_in_step(twice, g_r, "erasediff", UnlearnHParams(erasediff_eta=eta))
    close(aligned["combine/lambda"], max(eta - 1.0, 0.0), atol=1e-6)


def test_erasediff_fixed_lambda_overrides_the_adaptive_one():
    g_f, g_r = flat_grad(0), flat_grad(1)
    grads, metrics = combine_in_step(g_f, g_r, "erasediff", UnlearnHParams(erasediff_lambda=0.3))
    close(metrics["combine/lambda"], 0.3)
    close(np64(grads), 0.3 * np64(g_f) + np64(g_r))


# ---------------------------------------------------------------- SalUn's saliency mask


def saliency(g, fraction):
    """`combine.saliency_mask` as `train._saliency_mask` calls it: leaves in the split's order."""
    masks = combine.saliency_mask([g[name] for name in SHAPES], fraction)
    assert [m.shape for m in masks] == list(SHAPES.values())
    assert all(m.dtype == bool for m in masks)
    return np64(masks).astype(bool)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.77, 1.0])
def test_saliency_mask_keeps_exact_count_of_largest(fraction):
    g = flat_grad(3)
    mask = saliency(g, fraction)
    want_count = int(np.floor(fraction * SIZE + 0.5))
    assert mask.sum() == want_count == combine.saliency_keep_count(fraction, SIZE)
    # Same set as a NumPy top-k over all entries of all leaves (random values: no ties).
    want = np.zeros(SIZE, bool)
    want[np.argsort(-np.abs(np64(g)), kind="stable")[:want_count]] = True
    np.testing.assert_array_equal(mask, want)


def test_saliency_mask_ties_are_deterministic():
    # All |g| equal: the first k entries (leaf order, then row-major) are kept.
    g = unflat(np.where(np64(flat_grad(4)) > 0, 1.0, -1.0))
    k = combine.saliency_keep_count(0.4, SIZE)
    np.testing.assert_array_equal(saliency(g, 0.4), np.arange(SIZE) < k)
    # A partial tie at the threshold: the larger values first, then the earliest tied ones.
    values = np.zeros(SIZE)
    values[:10] = [0.1, 3.0, 2.0, 2.0, 2.0, 0.2, -2.0, 5.0, 0.0, 0.0]
    want = np.zeros(SIZE, bool)
    want[[1, 2, 3, 7]] = True  # 5 and 3, then the first two of the four tied at |2|
    np.testing.assert_array_equal(saliency(unflat(values), 4 / SIZE), want)


def test_salun_update_is_exactly_zero_outside_the_mask():
    g_f, g_r = flat_grad(5), flat_grad(6)
    hp = get_preset("salun").hparams
    names = list(SHAPES)
    mask = dict(zip(names, combine.saliency_mask([flat_grad(7)[n] for n in names], 0.5)))
    grads, metrics = combine_in_step(g_f, g_r, "salun", hp, mask)
    keep = np64(mask).astype(bool)
    want = np.where(keep, np64(g_f) + hp.retain_weight * np64(g_r), 0.0)
    close(np64(grads), want)
    assert not np.any(np64(grads)[~keep])  # exact zeros
    close(metrics["grad/norm"], np.linalg.norm(want))


def test_global_sums_compile_once_not_once_per_leaf():
    """Every leaf of the combination reads the Gram matrix: XLA must not copy its sum into each.

    A Python `sum` over the leaves (or a reduction of their stack, which XLA rewrites
    into the same chain of adds) is fused into every leaf's update, so the compiled
    program grows with the square of the number of leaves (`combine._total`).
    """

    def compiled_lines(leaves: int) -> int:
        tree = {f"w{i}": jax.ShapeDtypeStruct((4, 3), jnp.float32) for i in range(leaves)}
        preset, hp = get_preset("distill_project"), UnlearnHParams()
        project = jax.jit(lambda g_f, g_r: step.combine_term_grads(g_f, g_r, preset, hp))
        return project.lower(tree, tree).compile().as_text().count("\n")

    small, large = compiled_lines(40), compiled_lines(160)
    # 4x the leaves: about 4x the program when linear (~10x with a chain of adds).
    assert large < 6 * small, (small, large)


def test_concatenated_reductions_do_not_grow_with_the_leaves(monkeypatch):
    """`concatenate=True`: the Gram matrix and the norms are the same few reductions
    for 40 leaves as for 160 (leaf by leaf, one per leaf: XLA:CPU compiles a kernel
    for each); beyond `CONCAT_MAX` entries, the same reductions as leaf by leaf."""

    def reductions(leaves: int, concatenate: bool) -> int:
        tree = {f"w{i}": jax.ShapeDtypeStruct((4, 3), jnp.float32) for i in range(leaves)}
        preset, hp = get_preset("distill_project"), UnlearnHParams()

        def f(g_f, g_r):
            grads, _ = step.combine_term_grads(g_f, g_r, preset, hp, concatenate=concatenate)
            return combine.tree_norm(grads, concatenate=concatenate)

        eqns = jax.make_jaxpr(f)(tree, tree).jaxpr.eqns
        return sum(e.primitive.name.startswith("reduce") for e in eqns)

    # ⟨x,x⟩, ⟨x,y⟩, ⟨y,y⟩ and ‖g‖², each over the concatenation, then (trivially) totalled.
    assert reductions(40, True) == reductions(160, True) == 8
    # Leaf by leaf: each leaf's Gram triple and its term of ‖g‖².
    assert reductions(160, False) - reductions(40, False) == 2 * 120
    monkeypatch.setattr(combine, "CONCAT_MAX", 40 * 12 - 1)
    assert reductions(40, True) == reductions(40, False)
