"""Forget/retain terms, presets, trainable groups and the train step, against references.

The model is a tiny linear noise predictor,
    f(x_t, t, c) = x_t W + E[t] + mean_L(c) W_c,
so every loss can be recomputed in NumPy from the t and eps the loss draws
(reproduced with the same keys through the public stream helpers).
"""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from unlearn_jax.diffusion.forward import (
    TARGET_NOISE_STREAM,
    DiffusionModel,
    denoising_loss,
    sample_timesteps_and_noise,
    standard_normal,
)
from unlearn_jax.trainer import experiment, train
from unlearn_jax.trainer.batches import SHARED_KEYS
from unlearn_jax.trainer.staged_step import compile_staged_step
from unlearn_jax.trainer.state import clip_by_global_norm, init_state, make_optimizer
from unlearn_jax.trainer.train_step import (
    STAGED_MAX_STEPS,
    compile_all,
    concatenated_reductions,
    jit_step_parts,
    lower_step_parts,
    make_step_parts,
    make_train_step,
    resolve_step_programs,
    split_step,
)
from unlearn_jax.unlearn import forget, retain, step
from unlearn_jax.unlearn.hparams import UnlearnHParams
from unlearn_jax.unlearn.params import ParamSplit, param_paths
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


@pytest.mark.parametrize("partitionable", [True, False])
def test_standard_normal_is_jax_random_normal_bit_for_bit(partitionable):
    # The losses draw their noise flat (it compiles faster); the values must not change.
    key = jax.random.fold_in(jax.random.key(3), 7)
    with jax.threefry_partitionable(partitionable):
        for shape in ((2, 3, 5, 4), (3, 8), (5,)):
            want = jax.random.normal(key, shape, jnp.float32)
            np.testing.assert_array_equal(
                jax.jit(standard_normal, static_argnums=1)(key, shape), want
            )


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


# ---------------------------------------------------------------- the step, as the trainer runs it


FULL_BATCH = {"forget": BATCH, "retain": make_batch(1)}
ATTN2 = "block.attn2.to_k.kernel"  # the only cross-attention leaf of THETA


def test_param_paths_and_split_roundtrip():
    paths = param_paths(THETA)
    assert paths == [("block", "attn2", "to_k", "kernel"), ("block", "proj", "kernel")] + [
        ("time", "embedding")
    ]
    split = ParamSplit.from_params(THETA, "noxattn")
    assert split.trainable_names == ("block.proj.kernel", "time.embedding")
    assert split.size == C * C + T * C
    trainable = split.select(THETA)
    assert trainable["block.proj.kernel"] is THETA["block"]["proj"]["kernel"]
    ordered = split.ordered(trainable)
    assert ordered == [THETA["block"]["proj"]["kernel"], THETA["time"]["embedding"]]
    back = split.named([jnp.copy(x) for x in ordered])
    jax.tree.map(np.testing.assert_array_equal, back, trainable)
    # The full tree: θ's trainable leaves, θ0's own frozen ones.
    merged = split.merge(back, THETA0)
    assert jax.tree.structure(merged) == jax.tree.structure(THETA)
    assert merged["block"]["attn2"]["to_k"]["kernel"] is THETA0["block"]["attn2"]["to_k"]["kernel"]
    np.testing.assert_array_equal(merged["time"]["embedding"], THETA["time"]["embedding"])
    assert ParamSplit.from_params(THETA, "xattn").trainable_names == (ATTN2,)
    with pytest.raises(ValueError, match="at least one parameter must train"):
        ParamSplit.from_mask(THETA, [False, False, False])


def trainable_values(split: ParamSplit, named: dict) -> np.ndarray:
    """{name: array} of the trainable leaves as one float64 vector, in the split's order."""
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in split.ordered(named)])


def trainable_part(split: ParamSplit, tree: dict) -> np.ndarray:
    """The trainable leaves of a full-structure tree as one float64 vector, in the split's order."""
    return trainable_values(split, split.select(tree))


def micro_batches(*batches: dict) -> dict:
    """`batches` as train_step takes them: per-example arrays stacked [micro_steps, B, ...],
    the shared keys (`batches.SHARED_KEYS`) of the first, unstacked."""
    return {
        part: {
            k: v if k in SHARED_KEYS else jnp.stack([b[part][k] for b in batches])
            for k, v in values.items()
        }
        for part, values in batches[0].items()
    }


def staged(model, preset, hp, opt, split):
    """The staged step (`staged_step.compile_staged_step`), compiled at its first call."""
    jitted, built = jit_step_parts(make_step_parts(model, preset, hp, opt, split)), []

    def train_step(state, frozen, batch, key):
        if not built:
            example = (state, frozen, batch, key)
            built.append(compile_staged_step(model, preset, hp, split, jitted, None, *example))
        return built[0](state, frozen, batch, key)

    return train_step


def jitted_step(programs: str, *args):
    """The train step of `make_step_parts(*args)` as the trainer runs it: one program
    ('fused'), its parts compiled on their own ('split'), or staged ('staged')."""
    if programs == "fused":
        return jax.jit(make_train_step(*args))
    if programs == "staged":
        train_step = staged(*args)
    else:
        train_step = jit_step_parts(make_step_parts(*args)).step()
    # The update donates the state: a copy, so that the test's arrays (and THETA's) live on.
    return lambda state, *rest: train_step(jax.tree.map(jnp.copy, state), *rest)


def optimizer(name: str = "sgd", **fields):
    config = dict(name=name, lr=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, momentum=0.0)
    return make_optimizer(ml_collections.ConfigDict({**config, **fields}))


@pytest.mark.parametrize("programs", ["fused", "split", "staged"])
@pytest.mark.parametrize(("group", "micro_steps"), [("full", 1), ("noxattn", 2)])
def test_train_step_gradient_of_graddiff_is_the_sum_of_term_gradients(group, micro_steps, programs):
    """One `train_step` with SGD at learning rate 1 moves θ by exactly −g: g must be the
    micro-batch mean of g_f + λ g_r over the trainable leaves, each term on its own key."""
    preset, hp = get_preset("graddiff"), UnlearnHParams(retain_weight=0.3)
    split = ParamSplit.from_params(THETA, group)
    opt = optimizer(lr=1.0)
    state = init_state(split.select(THETA), opt)
    batches = [FULL_BATCH, {"forget": make_batch(2), "retain": make_batch(3)}][:micro_steps]
    train_step = jitted_step(programs, MODEL, preset, hp, opt, split)
    new_state, metrics = train_step(state, THETA0, micro_batches(*batches), RNG)
    assert set(new_state.params) == set(split.trainable_names)  # nothing else is trained
    assert all(new_state.params[n].shape == p.shape for n, p in state.params.items())
    moved = trainable_values(split, state.params) - trainable_values(split, new_state.params)

    # Reference: each term differentiated on the whole tree θ (THETA's trainable leaves,
    # THETA0's frozen ones), micro-batch i on fold_in(fold_in(train_key, step 0), i).
    theta = split.merge(split.select(THETA), THETA0)
    forget_grad = jax.value_and_grad(forget.neggrad_loss, argnums=1, has_aux=True)
    retain_grad = jax.grad(retain.retain_dm_loss, argnums=1, has_aux=True)
    g_f, g_r, losses = np.zeros(split.size), np.zeros(split.size), []
    for i, batch in enumerate(batches):
        rng = jax.random.fold_in(jax.random.fold_in(RNG, 0), i)
        k_f = jax.random.fold_in(rng, step.FORGET_STREAM)
        k_r = jax.random.fold_in(rng, step.RETAIN_STREAM)
        (loss_f, _), grads_f = forget_grad(MODEL, theta, THETA0, batch["forget"], k_f, hp)
        grads_r, _ = retain_grad(MODEL, theta, THETA0, batch["retain"], k_r, hp)
        g_f += trainable_part(split, grads_f) / micro_steps
        g_r += trainable_part(split, grads_r) / micro_steps
        losses.append(float(loss_f))
    np.testing.assert_allclose(moved, g_f + 0.3 * g_r, rtol=1e-5, atol=1e-6)
    close(metrics["forget/loss"], np.mean(losses))
    close(metrics["grad/cos"], float(g_f @ g_r / np.linalg.norm(g_f) / np.linalg.norm(g_r)))
    close(metrics["grad/norm"], float(np.linalg.norm(g_f + 0.3 * g_r)))


@pytest.mark.parametrize("name", ["distill_project", "erasediff", "esd_distill", "esd_u"])
def test_train_step_runs_for_presets(name):
    preset = get_preset(name)
    split = ParamSplit.from_params(THETA, preset.params)
    opt = optimizer()
    state = init_state(split.select(THETA), opt)
    train_step = jax.jit(make_train_step(MODEL, preset, preset.hparams, opt, split))
    new_state, metrics = train_step(state, THETA0, micro_batches(FULL_BATCH), RNG)
    assert bool(metrics["finite"]) and int(new_state.step) == 1
    assert set(new_state.params) == set(split.trainable_names)
    assert all(np.all(np.isfinite(x)) for x in new_state.params.values())
    if name == "erasediff":
        lam = float(metrics["combine/lambda"])
        np.testing.assert_allclose(lam, max(1.0 - float(metrics["grad/cos"]), 0.0), rtol=1e-5)


SALIENCY_SEED = 3
# Two chunks of the forget set with far from equal weights: a mask that ignored
# the weights would differ.
SALIENCY_CHUNKS = [
    (0.9, {"x0": BATCH["x0"][:2], "context": BATCH["context"][:2]}),
    (0.1, {"x0": BATCH["x0"][2:], "context": BATCH["context"][2:]}),
]


def trainer_saliency_mask(split: ParamSplit, keep_fraction: float) -> np.ndarray:
    """`train._saliency_mask` of a stand-in run and forget set (the fields it reads)."""
    hparams = dataclasses.replace(get_preset("salun").hparams, keep_fraction=keep_fraction)
    run = types.SimpleNamespace(
        config=ml_collections.ConfigDict({"seed": SALIENCY_SEED, "train": {"batch_size": 2}}),
        model=types.SimpleNamespace(split=split, diffusion=MODEL),
        mesh=jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp")),
        frozen=THETA0,
        spec=types.SimpleNamespace(hparams=hparams),
    )
    data = types.SimpleNamespace(saliency_chunks=lambda batch_size: SALIENCY_CHUNKS)
    masks = train._saliency_mask(run, data)
    assert set(masks) == set(split.trainable_names)
    for name, mask in masks.items():
        assert mask.dtype == bool and mask.shape == split.select(THETA0)[name].shape
    return trainable_values(split, masks).astype(bool)


def reference_saliency(split: ParamSplit) -> np.ndarray:
    """Σ_i w_i ∇ denoising loss of chunk i at θ0, by whole-tree autodiff, float64 [size]."""
    key = jax.random.fold_in(jax.random.key(SALIENCY_SEED), experiment.SALIENCY_STREAM)
    total = np.zeros(split.size)
    for i, (weight, chunk) in enumerate(SALIENCY_CHUNKS):
        loss = lambda p, c=chunk, i=i: denoising_loss(MODEL, p, c, jax.random.fold_in(key, i))[0]
        total += weight * trainable_part(split, jax.grad(loss)(THETA0))
    return total


@pytest.mark.parametrize("keep_fraction", [0.3, 0.5])
def test_salun_mask_as_the_trainer_builds_it(keep_fraction):
    split = ParamSplit.from_params(THETA0, "noxattn")
    mask = trainer_saliency_mask(split, keep_fraction)
    magnitudes = np.abs(reference_saliency(split))
    keep = int(np.floor(keep_fraction * split.size + 0.5))
    order = np.argsort(-magnitudes, kind="stable")
    kth, next_one = magnitudes[order[keep - 1]], magnitudes[order[keep]]
    # Either clearly apart, or tied at exactly zero (time-embedding rows of timesteps
    # not drawn get no gradient): then the earliest entries win, as in a stable sort.
    assert kth - next_one > 1e-4 * magnitudes.max() or kth == next_one == 0.0
    want = np.zeros(split.size, bool)
    want[order[:keep]] = True
    assert mask.sum() == keep
    np.testing.assert_array_equal(mask, want)


@pytest.mark.parametrize("programs", ["fused", "split", "staged"])
def test_salun_train_step_moves_nothing_outside_the_mask(programs):
    """Two `train_step`s of SalUn with its mask: bit for bit nothing moves outside it,
    adamw's weight decay included; everything inside moves."""
    split = ParamSplit.from_params(THETA0, "noxattn")
    mask = trainer_saliency_mask(split, 0.3)
    preset = get_preset("salun")
    opt = optimizer("adamw", weight_decay=0.5)
    train_step = jitted_step(programs, MODEL, preset, preset.hparams, opt, split)
    masks, offset = {}, 0
    for name, x in split.select(THETA0).items():
        masks[name] = jnp.asarray(mask[offset : offset + x.size].reshape(x.shape))
        offset += x.size
    state = init_state(split.select(THETA0), opt, masks)
    before = trainable_values(split, state.params)
    for _ in range(2):
        state, metrics = train_step(state, THETA0, micro_batches(FULL_BATCH), RNG)
        assert bool(metrics["finite"])
    after = trainable_values(split, state.params)
    np.testing.assert_array_equal(after[~mask], before[~mask])
    assert np.all(after[mask] != before[mask])


@pytest.mark.parametrize("name", ["distill_project", "neggrad"])
def test_split_step_programs_compute_what_the_fused_step_computes(name):
    """The three programs compiled side by side (`lower_step_parts`, `compile_all`), two
    Adam steps with two micro-batches: the same parameters, optimizer state and metrics
    as the step compiled as one program, to float32 rounding."""
    preset = get_preset(name)
    split = ParamSplit.from_params(THETA, preset.params)
    opt = optimizer("adam", lr=1e-3)
    args = (MODEL, preset, preset.hparams, opt, split)
    batch = micro_batches(FULL_BATCH, {"forget": make_batch(2), "retain": make_batch(3)})
    fused = jax.jit(make_train_step(*args))
    jitted = jit_step_parts(make_step_parts(*args))
    state = init_state(split.select(THETA), opt)
    lowered = dict(lower_step_parts(jitted, state, THETA0, batch, RNG))
    assert set(lowered) == (
        {"forget", "update"} if name == "neggrad" else {"forget", "retain", "update"}
    )
    split_fn = split_step(compile_all(lowered.items()))
    states, metrics = {}, {}
    for programs, train_step in (("fused", fused), ("split", split_fn)):
        s = init_state(split.select(THETA), opt)
        for _ in range(2):
            s, m = train_step(s, THETA0, batch, RNG)
        states[programs], metrics[programs] = s, m
    assert list(metrics["split"]) == list(metrics["fused"])  # same metrics, same order
    for key, value in metrics["fused"].items():
        np.testing.assert_allclose(metrics["split"][key], value, rtol=2e-5, atol=1e-7, err_msg=key)
    assert int(states["split"].step) == 2
    flat = lambda s: np.concatenate([np.ravel(x) for x in jax.tree.leaves(s)]).astype(float)
    moved = flat(states["fused"].params) - flat(init_state(split.select(THETA), opt).params)
    assert np.abs(moved).max() > 1e-4  # the steps did move the parameters
    np.testing.assert_allclose(
        flat(states["split"].params), flat(states["fused"].params), rtol=0, atol=1e-7
    )
    np.testing.assert_allclose(
        flat(states["split"].opt_state), flat(states["fused"].opt_state), rtol=1e-5, atol=1e-9
    )


# Presets covering every staged term: remap to the frozen and to the current model,
# ESD, the fresh-noise target, retain_dm and retain_distill; and 'anchor', which is
# not staged (its own program beside the staged forget term).
STAGED_PRESETS = {
    name: get_preset(name) for name in ("distill_project", "salun", "esd_distill", "neggrad")
}
STAGED_PRESETS["noise_anchor"] = dataclasses.replace(
    get_preset("graddiff"), name="noise_anchor", forget="noise", retain="anchor"
)


@pytest.mark.parametrize("micro_steps", [1, 2])
@pytest.mark.parametrize("name", sorted(STAGED_PRESETS))
def test_staged_step_computes_what_the_fused_step_computes(name, micro_steps):
    """The staged step (every network call one shared forward and backward, `staged_step`),
    two Adam steps with one or two micro-batches of 3 examples (each two-context call runs
    as two chunks of 3 rows; with one micro-batch the update sums a term's chunk
    gradients, with two the backward accumulates them): the same parameters, optimizer
    state and metrics as the step compiled as one program, to float32 rounding."""
    preset = STAGED_PRESETS[name]
    split = ParamSplit.from_params(THETA, preset.params)
    opt = optimizer("adam", lr=1e-3)
    args = (MODEL, preset, preset.hparams, opt, split)
    second = {"forget": make_batch(2), "retain": make_batch(3)}
    batch = micro_batches(*[FULL_BATCH, second][:micro_steps])
    states, metrics = {}, {}
    for programs in ("fused", "staged"):
        train_step, s = jitted_step(programs, *args), init_state(split.select(THETA), opt)
        for _ in range(2):
            s, m = train_step(s, THETA0, batch, RNG)
        states[programs], metrics[programs] = s, m
    assert list(metrics["staged"]) == list(metrics["fused"])
    for key, value in metrics["fused"].items():
        np.testing.assert_allclose(metrics["staged"][key], value, rtol=2e-5, atol=1e-7, err_msg=key)
    for a, b in zip(jax.tree.leaves(states["staged"]), jax.tree.leaves(states["fused"])):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)
    flat = lambda s: np.concatenate([np.ravel(x) for x in jax.tree.leaves(s)]).astype(float)
    moved = flat(states["fused"].params) - flat(init_state(split.select(THETA), opt).params)
    assert np.abs(moved).max() > 1e-4


@pytest.mark.parametrize("on_mesh", [False, True], ids=["no_mesh", "mesh"])
@pytest.mark.parametrize("name", ["distill", "esd_distill"])
def test_staged_step_traces_the_network_once(name, on_mesh):
    """Compiling a staged step traces the network's apply once, in its forward: the
    terms find their calls' output shapes from that same trace (`jit_staged`'s
    `output_of`), and their own traces cost no trace of the network. Also on a mesh,
    with the step's arguments placed as the trainer places them, where the abstract
    trace must carry the shardings the forward is lowered with. (Counted on a fresh
    `apply_fn`, whose Python body runs only while JAX traces it.)"""
    from unlearn_jax.trainer.sharding import make_mesh, replicated
    from unlearn_jax.trainer.step_programs import batch_shardings_for
    from unlearn_jax.trainer.train_step import StepShardings

    traces = []

    def counted(params, x_t, t, context):
        traces.append(x_t.shape)
        return apply_fn(params, x_t, t, context)

    model = dataclasses.replace(MODEL, apply_fn=counted)
    preset = get_preset(name)
    split = ParamSplit.from_params(THETA, preset.params)
    opt = optimizer()
    state, frozen, batch = init_state(split.select(THETA), opt), THETA0, micro_batches(FULL_BATCH)
    mesh = shardings = None
    if on_mesh:
        mesh = make_mesh(1, 1, jax.devices()[:1])
        whole = replicated(mesh)
        place = lambda tree: jax.tree.map(lambda _: whole, tree)
        batch_sh = batch_shardings_for(mesh, batch)
        shardings = StepShardings(place(state), place(frozen), batch_sh, whole)
        state, frozen = jax.device_put(state, whole), jax.device_put(frozen, whole)
        batch = jax.device_put(batch, batch_sh)
    jitted = jit_step_parts(make_step_parts(model, preset, preset.hparams, opt, split), shardings)
    args = (state, frozen, batch, RNG)
    step = compile_staged_step(
        model, preset, preset.hparams, split, jitted, mesh, *args, shardings=shardings
    )
    _, metrics = step(*args)
    assert np.isfinite(float(metrics["forget/loss"]))
    assert traces == [(B, H, W, C)]  # one micro-batch's rows, traced once


def test_staged_retain_distill_is_exactly_zero_at_theta0():
    """Student and teacher run through the same compiled forward on the same rows: at
    θ = θ0 the retain term and its gradient are exactly 0, as in the one-program step."""
    preset = get_preset("distill")
    split = ParamSplit.from_params(THETA0, preset.params)
    opt = optimizer()
    train_step = jitted_step("staged", MODEL, preset, preset.hparams, opt, split)
    _, metrics = train_step(
        init_state(split.select(THETA0), opt), THETA0, micro_batches(FULL_BATCH), RNG
    )
    assert float(metrics["retain/loss"]) == 0.0 and float(metrics["grad/retain_norm"]) == 0.0
    assert float(metrics["forget/loss"]) > 0.0


@pytest.mark.parametrize("programs", ["fused", "staged"])
def test_clipping_uses_the_logged_gradient_norm_as_optax_would(programs):
    """With clipping active, one graddiff step equals optax's own chain
    (clip_by_global_norm, then SGD) applied to g_f + λ g_r: the step clips with the
    norm it logs as grad/norm (from the terms' Gram matrix), not another pass. (SGD:
    Adam's first step would hide the clip's scale.)"""
    preset, hp = get_preset("graddiff"), UnlearnHParams(retain_weight=0.3)
    split = ParamSplit.from_params(THETA, "full")
    opt = optimizer("sgd", lr=1.0, grad_clip=0.05)
    state = init_state(split.select(THETA), opt)
    train_step = jitted_step(programs, MODEL, preset, hp, opt, split)
    new_state, metrics = train_step(state, THETA0, micro_batches(FULL_BATCH), RNG)

    theta = split.merge(split.select(THETA), THETA0)
    rng = jax.random.fold_in(jax.random.fold_in(RNG, 0), 0)
    k_f, k_r = (jax.random.fold_in(rng, s) for s in (step.FORGET_STREAM, step.RETAIN_STREAM))
    g_f = jax.grad(forget.neggrad_loss, argnums=1, has_aux=True)
    g_r = jax.grad(retain.retain_dm_loss, argnums=1, has_aux=True)
    grads_f = split.select(g_f(MODEL, theta, THETA0, FULL_BATCH["forget"], k_f, hp)[0])
    grads_r = split.select(g_r(MODEL, theta, THETA0, FULL_BATCH["retain"], k_r, hp)[0])
    grads = {n: grads_f[n] + 0.3 * grads_r[n] for n in grads_f}
    norm = np.sqrt(sum(float(jnp.sum(g**2)) for g in grads.values()))
    assert norm > 0.5  # ten times the clip: clipping is active
    close(metrics["grad/norm"], norm)
    reference = optax.chain(optax.clip_by_global_norm(0.05), optax.sgd(1.0))
    params = split.select(THETA)
    updates, _ = reference.update(grads, reference.init(params), params)
    for name, p in params.items():
        np.testing.assert_allclose(
            new_state.params[name], p + updates[name], rtol=1e-5, atol=1e-6, err_msg=name
        )


def test_clip_keeps_gradients_below_the_bound_bit_for_bit_and_scales_those_above():
    clip = clip_by_global_norm(1.0)
    g = {"a": jnp.array([0.3, -0.2, 1e-30], jnp.float32), "b": jnp.array([[0.1]], jnp.bfloat16)}
    below, _ = clip.update(g, clip.init(g), global_norm=jnp.float32(0.999))
    for name, leaf in g.items():
        assert below[name].dtype == leaf.dtype
        np.testing.assert_array_equal(below[name], leaf)
    above, _ = clip.update(g, clip.init(g), global_norm=jnp.float32(4.0))
    np.testing.assert_allclose(above["a"], np.array([0.3, -0.2, 1e-30]) / 4, rtol=1e-7)
    assert above["b"].dtype == jnp.bfloat16 and float(above["b"][0, 0]) == float(g["b"][0, 0]) / 4
    # Without the norm passed in, the clip computes it itself and clips as optax does
    # (to rounding: a factor, not a division per element).
    large = {"a": g["a"] * 10, "b": g["b"]}  # norm 3.6
    own, _ = clip.update(large, clip.init(large))
    reference, _ = optax.clip_by_global_norm(1.0).update(large, optax.EmptyState())
    for name, rtol in (("a", 1e-6), ("b", 8e-3)):  # b: one bfloat16 rounding apart at most
        np.testing.assert_allclose(own[name].astype(float), reference[name].astype(float), rtol)
    assert float(own["a"][0]) < 0.3 * 10 / 3  # clipped


def test_step_programs_setting_follows_backend_run_length_terms_and_fsdp():
    resolve = resolve_step_programs
    distill, esd_x = get_preset("distill"), get_preset("esd_x")
    limit = STAGED_MAX_STEPS
    assert resolve("auto", "gpu", steps=10, preset=distill) == "fused"
    assert resolve("auto", "tpu", steps=10, preset=distill) == "fused"
    assert resolve("auto", "cpu", steps=limit, preset=distill) == "staged"
    assert resolve("auto", "cpu", steps=limit + 1, preset=distill) == "split"
    assert resolve("auto", "cpu", steps=10, preset=esd_x) == "split"  # one term
    assert resolve("auto", "cpu", steps=10, preset=distill, fsdp=2) == "split"
    assert resolve("auto", "cpu") == "split"  # length or method unknown
    assert resolve("staged", "gpu") == "staged"  # asked for: honoured anywhere
    with pytest.raises(ValueError, match=r"fsdp=2.*step_programs=split"):
        resolve("staged", "cpu", fsdp=2)
    assert resolve("split", "gpu") == "split" and resolve("fused", "cpu") == "fused"
    with pytest.raises(ValueError, match="train.step_programs='one': expected one of auto"):
        resolve("one", "cpu")


def test_update_concatenates_leaves_for_its_reductions_only_where_leaves_are_whole_on_cpu():
    """On CPU, with every leaf whole on each device, the update's Gram matrix and norms
    reduce the concatenated leaves (`combine.tree_gram`); under FSDP or on an
    accelerator's mesh (the planner lowers those from a CPU host) leaf by leaf."""
    from unlearn_jax.trainer.sharding import make_mesh

    def mesh(fsdp: int, platform: str):  # the two attributes the choice reads
        devices = np.array([types.SimpleNamespace(platform=platform)] * fsdp)
        return types.SimpleNamespace(shape={"data": 1, "fsdp": fsdp}, devices=devices)

    assert concatenated_reductions(None) and concatenated_reductions(make_mesh(1, 1))
    assert concatenated_reductions(mesh(1, "cpu"))
    assert not concatenated_reductions(mesh(2, "cpu"))
    assert not concatenated_reductions(mesh(1, "tpu")) and not concatenated_reductions(
        mesh(1, "gpu")
    )


def test_the_cpu_update_reduces_as_many_times_for_40_leaves_as_for_10():
    """The train step's update as production builds it on CPU (`make_step_parts`, no
    mesh): its Gram matrix, clip norm and `param/norm` reduce the concatenated leaves,
    so the program's reductions do not grow with the number of trainable leaves."""
    preset, opt = get_preset("distill"), optimizer("adam", lr=1e-3, grad_clip=1.0)
    split = ParamSplit.from_params(THETA, "full")
    update = make_step_parts(MODEL, preset, preset.hparams, opt, split).update

    def reductions(leaves: int) -> int:
        params = {f"w{i:02d}": jnp.ones((4, 3), jnp.float32) for i in range(leaves)}
        state, g = init_state(params, opt), {n: jnp.ones((4, 3)) for n in params}
        eqns = jax.make_jaxpr(update)(state, g, g, {}).jaxpr.eqns
        return sum(e.primitive.name.startswith("reduce") for e in eqns)

    assert reductions(10) == reductions(40)


def test_staged_step_refuses_a_term_whose_calls_are_no_multiple_of_the_micro_batch(monkeypatch):
    def one_row(model, params, frozen, batch, rng, cfg):
        t = jnp.zeros((1,), jnp.int32)
        out = model.apply_fn(params, batch["x0"][:1], t, batch["context"][:1])
        return jnp.mean(jnp.square(out)), {}

    monkeypatch.setitem(FORGET_TERMS, "neggrad", one_row)
    preset = get_preset("neggrad")
    split = ParamSplit.from_params(THETA, preset.params)
    opt = optimizer()
    train_step = jitted_step("staged", MODEL, preset, preset.hparams, opt, split)
    with pytest.raises(ValueError, match=r"'neggrad' term calls the network on \[1\] rows.*split"):
        train_step(init_state(split.select(THETA), opt), THETA0, micro_batches(FULL_BATCH), RNG)
