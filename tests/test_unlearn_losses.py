"""Forget/retain terms, presets, trainable groups and the step, against NumPy references.

The model is a tiny linear noise predictor,
    f(x_t, t, c) = x_t W + E[t] + mean_L(c) W_c,
so every loss can be recomputed in NumPy from the t and eps the loss draws
(reproduced with the same keys through the public stream helpers).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unlearn_jax.diffusion.forward import (
    TARGET_NOISE_STREAM,
    DiffusionModel,
    sample_timesteps_and_noise,
)
from unlearn_jax.unlearn import combine, forget, retain, step
from unlearn_jax.unlearn.hparams import UnlearnHParams
from unlearn_jax.unlearn.registry import (
    BATCH_KEYS,
    COMBINERS,
    FORGET_TERMS,
    PRESETS,
    RETAIN_TERMS,
    get_preset,
    trainable_mask,
)

B, H, W, C, L, D, T = 3, 4, 4, 2, 5, 6, 10
ACP = np.cumprod(1.0 - np.linspace(1e-3, 0.2, T)).astype(np.float32)
HP = UnlearnHParams()


def apply_fn(params, x_t, t, context):
    W_ = params["block"]["proj"]["kernel"]
    Wc = params["block"]["attn2"]["to_k"]["kernel"]
    E = params["time"]["embedding"]
    return x_t @ W_ + E[t][:, None, None, :] + (context.mean(1) @ Wc)[:, None, None, :]


def np_apply(params, x_t, t, context):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    return apply_fn(p, np.asarray(x_t, np.float64), np.asarray(t), np.asarray(context, np.float64))


def make_params(seed):
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "block": {
            "proj": {"kernel": jax.random.normal(k[0], (C, C))},
            "attn2": {"to_k": {"kernel": jax.random.normal(k[1], (D, C))}},
        },
        "time": {"embedding": jax.random.normal(k[2], (T, C))},
    }


def make_batch(seed):
    k = jax.random.split(jax.random.key(100 + seed), 6)
    return {
        "x0": jax.random.normal(k[0], (B, H, W, C)),
        "context": jax.random.normal(k[1], (B, L, D)),
        "anchor_context": jax.random.normal(k[2], (B, L, D)),
        "uncond_context": jax.random.normal(k[3], (1, L, D)),
        "x_t": jax.random.normal(k[4], (B, H, W, C)),
        "t": jax.random.randint(k[5], (B,), 0, T),
    }


MODEL = DiffusionModel(apply_fn, jnp.asarray(ACP))
MODEL_V = DiffusionModel(apply_fn, jnp.asarray(ACP), "v_prediction")
THETA, THETA0 = make_params(0), make_params(1)
BATCH = make_batch(0)
RNG = jax.random.key(7)


def np_noised(batch, rng):
    """(x0, t, eps, x_t, alpha, sigma) in float64, drawn as the losses draw them."""
    t, eps = sample_timesteps_and_noise(rng, batch["x0"], T)
    t, eps, x0 = np.asarray(t), np.asarray(eps, np.float64), np.asarray(batch["x0"], np.float64)
    alpha = np.sqrt(ACP[t].astype(np.float64))[:, None, None, None]
    sigma = np.sqrt(1.0 - ACP[t].astype(np.float64))[:, None, None, None]
    return x0, t, eps, alpha * x0 + sigma * eps, alpha, sigma


def np_mse(a, b):
    return float(np.mean((a - b) ** 2))


def close(a, b):
    np.testing.assert_allclose(float(a), b, rtol=2e-5, atol=1e-6)


# ---------------------------------------------------------------- forget terms


def test_retain_dm_matches_numpy_and_neggrad_is_its_negative():
    x0, t, eps, x_t, _, _ = np_noised(BATCH, RNG)
    ref = np_mse(np_apply(THETA, x_t, t, BATCH["context"]), eps)
    dm, aux = retain.retain_dm_loss(MODEL, THETA, THETA0, BATCH, RNG, HP)
    ng, aux_ng = forget.neggrad_loss(MODEL, THETA, THETA0, BATCH, RNG, HP)
    close(dm, ref)
    assert float(ng) == -float(dm)
    assert float(aux_ng["mse"]) == float(aux["mse"]) == float(dm)


def test_v_prediction_target():
    x0, t, eps, x_t, alpha, sigma = np_noised(BATCH, RNG)
    v = alpha * eps - sigma * x0
    ref = np_mse(np_apply(THETA, x_t, t, BATCH["context"]), v)
    close(retain.retain_dm_loss(MODEL_V, THETA, THETA0, BATCH, RNG, HP)[0], ref)
    # noise_loss: the v that the fresh noise n would imply.
    n = np.asarray(jax.random.normal(jax.random.fold_in(RNG, TARGET_NOISE_STREAM), x0.shape))
    ref_noise = np_mse(np_apply(THETA, x_t, t, BATCH["context"]), alpha * n - sigma * x0)
    close(forget.noise_loss(MODEL_V, THETA, THETA0, BATCH, RNG, HP)[0], ref_noise)
    with pytest.raises(ValueError, match="epsilon, v_prediction"):
        DiffusionModel(apply_fn, jnp.asarray(ACP), "sample")


def test_remap_frozen_and_current_targets():
    _, t, _, x_t, _, _ = np_noised(BATCH, RNG)
    pred = np_apply(THETA, x_t, t, BATCH["context"])
    frozen_target = np_apply(THETA0, x_t, t, BATCH["anchor_context"])
    current_target = np_apply(THETA, x_t, t, BATCH["anchor_context"])
    close(forget.remap_loss(MODEL, THETA, THETA0, BATCH, RNG, HP)[0], np_mse(pred, frozen_target))
    hp_cur = UnlearnHParams(target_model="current")
    close(
        forget.remap_loss(MODEL, THETA, THETA0, BATCH, RNG, hp_cur)[0],
        np_mse(pred, current_target),
    )
    # 'current': the target is detached, so the gradient is that of a constant target.
    const = jnp.asarray(current_target, jnp.float32)
    x_t32, t32 = jnp.asarray(x_t, jnp.float32), jnp.asarray(t)
    want = jax.grad(lambda p: jnp.mean((apply_fn(p, x_t32, t32, BATCH["context"]) - const) ** 2))(
        THETA
    )
    got = jax.grad(lambda p: forget.remap_loss(MODEL, p, THETA0, BATCH, RNG, hp_cur)[0])(THETA)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)


def test_remap_per_example_anchors_match_a_numpy_loop_over_examples():
    """Each example is remapped to its own anchor, gathered by prompt as the batches do."""
    distinct = np.random.default_rng(3).normal(size=(2, L, D)).astype(np.float32)  # A = 2
    rows = np.array([1, 0, 1])  # anchor of each example's forget prompt
    batch = {**BATCH, "anchor_context": jnp.asarray(distinct[rows])}
    _, t, _, x_t, _, _ = np_noised(batch, RNG)
    prediction = np_apply(THETA, x_t, t, BATCH["context"])
    for hp, teacher in ((HP, THETA0), (UnlearnHParams(target_model="current"), THETA)):
        remap = jax.jit(lambda b, hp=hp: forget.remap_loss(MODEL, THETA, THETA0, b, RNG, hp)[0])
        target = np.concatenate(
            [
                np_apply(teacher, x_t[i : i + 1], t[i : i + 1], distinct[rows[i]][None])
                for i in range(B)
            ]
        )
        close(remap(batch), np_mse(prediction, target))
        # One anchor for all as [1, L, D] equals it repeated per example, and differs from
        # the per-example anchors (so each example's row is what the loss used).
        shared = {**batch, "anchor_context": jnp.asarray(distinct[:1])}
        repeated = {**batch, "anchor_context": jnp.asarray(np.repeat(distinct[:1], B, 0))}
        close(remap(shared), float(remap(repeated)))
        assert abs(float(remap(shared)) - float(remap(batch))) > 1e-3


def test_esd_target_formula_and_loss():
    e_c, e_u = np.random.default_rng(0).normal(size=(2, B, H, W, C))
    np.testing.assert_allclose(
        forget.esd_target(jnp.asarray(e_c), jnp.asarray(e_u), 1.5),
        e_u - 1.5 * (e_c - e_u),
        rtol=1e-5,
        atol=1e-6,
    )
    x_t, t = BATCH["x_t"], BATCH["t"]
    uncond = np.broadcast_to(BATCH["uncond_context"], BATCH["context"].shape)
    t0_c = np_apply(THETA0, x_t, t, BATCH["context"])
    t0_u = np_apply(THETA0, x_t, t, uncond)
    target = t0_u - 2.0 * (t0_c - t0_u)
    ref = np_mse(np_apply(THETA, x_t, t, BATCH["context"]), target)
    close(forget.esd_loss(MODEL, THETA, THETA0, BATCH, RNG, UnlearnHParams(eta=2.0))[0], ref)
    # The teacher is stop-gradient'ed even when it is the trained parameters themselves.
    const = jnp.asarray(
        np_apply(THETA, x_t, t, uncond) * 3 - 2 * np_apply(THETA, x_t, t, BATCH["context"]),
        jnp.float32,
    )
    want = jax.grad(lambda p: jnp.mean((apply_fn(p, x_t, t, BATCH["context"]) - const) ** 2))(THETA)
    got = jax.grad(lambda p: forget.esd_loss(MODEL, p, p, BATCH, RNG, UnlearnHParams(eta=2.0))[0])(
        THETA
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


def test_noise_loss_regresses_to_fresh_noise():
    x0, t, eps, x_t, _, _ = np_noised(BATCH, RNG)
    n = np.asarray(jax.random.normal(jax.random.fold_in(RNG, TARGET_NOISE_STREAM), x0.shape))
    assert not np.allclose(n, eps)
    ref = np_mse(np_apply(THETA, x_t, t, BATCH["context"]), n)
    close(forget.noise_loss(MODEL, THETA, THETA0, BATCH, RNG, HP)[0], ref)


# ---------------------------------------------------------------- retain terms


def test_retain_distill_matches_numpy():
    _, t, _, x_t, _, _ = np_noised(BATCH, RNG)
    uncond = np.broadcast_to(BATCH["uncond_context"], BATCH["context"].shape)
    cond = np_mse(
        np_apply(THETA, x_t, t, BATCH["context"]), np_apply(THETA0, x_t, t, BATCH["context"])
    )
    unc = np_mse(np_apply(THETA, x_t, t, uncond), np_apply(THETA0, x_t, t, uncond))
    hp = UnlearnHParams(uncond_weight=0.5)
    loss, aux = retain.retain_distill_loss(MODEL, THETA, THETA0, BATCH, RNG, hp)
    close(aux["mse_cond"], cond)
    close(aux["mse_uncond"], unc)
    close(loss, cond + 0.5 * unc)


def test_retain_distill_is_exactly_zero_with_zero_gradient_at_theta0():
    # Distinct buffers, both runtime arguments of the jitted function as in the train loop
    # (a closed-over θ0 would be constant-folded by XLA with other rounding).
    copy = jax.tree.map(lambda a: jnp.array(a, copy=True), THETA0)
    fn = lambda p, p0: retain.retain_distill_loss(MODEL, p, p0, BATCH, RNG, HP)
    (loss, aux), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(copy, THETA0)
    assert float(loss) == 0.0 and float(aux["mse_cond"]) == 0.0 and float(aux["mse_uncond"]) == 0.0
    for g in jax.tree.leaves(grads):
        assert not np.any(np.asarray(g))
    # Each branch alone also vanishes (not a cancellation between them); eager this time.
    for branch in ("mse_cond", "mse_uncond"):
        branch_grads = jax.grad(
            lambda p, b=branch: retain.retain_distill_loss(MODEL, p, THETA0, BATCH, RNG, HP)[1][b]
        )(copy)
        assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(branch_grads))


def test_anchor_loss_value_and_gradient():
    zero, _ = retain.anchor_loss(MODEL, THETA0, THETA0, BATCH, RNG, HP)
    assert float(zero) == 0.0
    ref = sum(
        float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
        for a, b in zip(jax.tree.leaves(THETA), jax.tree.leaves(THETA0))
    )
    loss, _ = retain.anchor_loss(MODEL, THETA, THETA0, BATCH, RNG, HP)
    close(loss, ref)
    grads = jax.grad(lambda p: retain.anchor_loss(MODEL, p, THETA0, BATCH, RNG, HP)[0])(THETA)
    want = jax.tree.map(lambda a, b: 2 * (a - b), THETA, THETA0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), grads, want)


# ---------------------------------------------------------------- registry


REALISTIC_PATHS = [
    ("conv_in", "kernel"),
    ("time_embedding", "linear_1", "kernel"),
    ("down_blocks", 0, "attentions", 0, "transformer_blocks", 0, "attn1", "to_k", "kernel"),
    ("down_blocks", 0, "attentions", 0, "transformer_blocks", 0, "attn2", "to_k", "kernel"),
    ("down_blocks", 0, "attentions", 0, "transformer_blocks", 0, "attn2", "to_v", "kernel"),
    ("down_blocks", 0, "attentions", 0, "transformer_blocks", 0, "attn2", "to_out", 0, "bias"),
    ("mid_block", "attentions", 0, "transformer_blocks", 0, "attn2", "to_q", "kernel"),
    ("up_blocks", 1, "resnets", 2, "conv1", "kernel"),
]


def test_trainable_mask_groups():
    xattn = [3, 4, 5, 6]
    assert trainable_mask(REALISTIC_PATHS, "full") == [True] * 8
    assert [i for i, m in enumerate(trainable_mask(REALISTIC_PATHS, "xattn")) if m] == xattn
    assert [i for i, m in enumerate(trainable_mask(REALISTIC_PATHS, "noxattn")) if m] == [
        0, 1, 2, 7,
    ]  # fmt: skip
    assert [i for i, m in enumerate(trainable_mask(REALISTIC_PATHS, r"attn2\.to_[kv]")) if m] == [
        3, 4,
    ]  # fmt: skip
    assert trainable_mask(REALISTIC_PATHS, r"^up_blocks\.1\.") == [False] * 7 + [True]


@pytest.mark.parametrize("group", ["xatn", "attn2[", "^nothing$"])
def test_trainable_mask_errors_list_groups(group):
    with pytest.raises(ValueError, match="full, xattn, noxattn"):
        trainable_mask(REALISTIC_PATHS, group)


def test_presets_are_consistent_and_unknown_names_list_valid_ones():
    expected = {"neggrad", "graddiff", "salun", "erasediff", "esd_x", "esd_u", "ablation"}
    expected |= {"distill", "distill_project", "esd_distill"}
    assert set(PRESETS) == expected
    for p in PRESETS.values():
        assert p.forget in FORGET_TERMS and p.combiner in COMBINERS
        assert p.retain is None or p.retain in RETAIN_TERMS
    assert get_preset("esd_x").params == "xattn" and get_preset("esd_u").params == "noxattn"
    assert get_preset("salun").saliency and get_preset("salun").hparams.target_model == "current"
    with pytest.raises(ValueError) as err:
        get_preset("esd")
    for name in expected:
        assert name in str(err.value)
    assert set(BATCH_KEYS) == set(FORGET_TERMS) | set(RETAIN_TERMS)


# ---------------------------------------------------------------- step


FULL_BATCH = {"forget": BATCH, "retain": make_batch(1)}


def test_partition_merge_roundtrip_and_paths():
    paths = step.param_paths(THETA)
    assert ("block", "attn2", "to_k", "kernel") in paths
    trainable, rest = step.partition_params(THETA, "xattn")
    assert jax.tree.leaves(trainable)[0] is THETA["block"]["attn2"]["to_k"]["kernel"]
    assert len(jax.tree.leaves(rest)) == 2
    merged = step.merge_params(trainable, rest)
    assert jax.tree.structure(merged) == jax.tree.structure(THETA)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), merged, THETA)


def test_step_graddiff_equals_sum_of_term_gradients():
    preset = dataclasses.replace(get_preset("graddiff"), hparams=UnlearnHParams(retain_weight=0.3))
    trainable, rest = step.partition_params(THETA, "full")
    grads, metrics = jax.jit(
        lambda tr, b, r: step.unlearn_step_grads(tr, rest, THETA0, b, r, preset, MODEL)
    )(trainable, FULL_BATCH, RNG)
    k_f = jax.random.fold_in(RNG, step.FORGET_STREAM)
    k_r = jax.random.fold_in(RNG, step.RETAIN_STREAM)
    g_f = jax.grad(lambda p: forget.neggrad_loss(MODEL, p, THETA0, BATCH, k_f, HP)[0])(THETA)
    g_r = jax.grad(
        lambda p: retain.retain_dm_loss(MODEL, p, THETA0, FULL_BATCH["retain"], k_r, HP)[0]
    )(THETA)
    want = jax.tree.map(lambda a, b: a + 0.3 * b, g_f, g_r)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, want)
    for key in ("forget/loss", "retain/loss", "grad/cos", "grad/norm"):
        assert np.isfinite(float(metrics[key]))


def test_step_differentiates_only_the_trainable_subtree_and_applies_saliency():
    trainable, rest = step.partition_params(THETA, "noxattn")
    preset = get_preset("salun")
    with pytest.raises(ValueError, match="saliency"):
        step.unlearn_step_grads(trainable, rest, THETA0, FULL_BATCH, RNG, preset, MODEL)
    sal_grads = step.forget_saliency_grads(trainable, rest, BATCH, RNG, MODEL)
    mask = combine.saliency_mask(sal_grads, preset.hparams.keep_fraction)
    grads, metrics = step.unlearn_step_grads(
        trainable, rest, THETA0, FULL_BATCH, RNG, preset, MODEL, saliency=mask
    )
    assert grads["block"]["attn2"]["to_k"]["kernel"] is None
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    kept = sum(int(np.sum(m)) for m in jax.tree.leaves(mask))
    nonzero = sum(int(np.count_nonzero(g)) for g in jax.tree.leaves(grads))
    assert nonzero <= kept == round(0.5 * (C * C + T * C))


@pytest.mark.parametrize("name", ["distill_project", "erasediff", "esd_distill", "esd_u"])
def test_step_runs_for_presets(name):
    trainable, rest = step.partition_params(THETA, get_preset(name).params)
    grads, metrics = step.unlearn_step_grads(
        trainable, rest, THETA0, FULL_BATCH, RNG, get_preset(name), MODEL
    )
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    if name == "erasediff":
        lam = float(metrics["combine/lambda"])
        np.testing.assert_allclose(lam, max(1.0 - float(metrics["grad/cos"]), 0.0), rtol=1e-5)
