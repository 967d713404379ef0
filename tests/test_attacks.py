"""Recovery attacks: NumPy references, exact no-ops, determinism, resume, recovery on θ0.

The losses are checked against NumPy on a tiny linear noise predictor (as in
test_unlearn_losses); the splice into the real CLIP encoder is checked to be
bit-exact against its normal path; the attack loop runs on the micro pipeline
(compiles fast); the recovery test runs textual inversion on the shipped
tiny-world model, θ0 itself, and judges "a <v*>" images with the world classifier.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unlearn_jax.attacks import objectives
from unlearn_jax.attacks.evaluation import (
    attacked_contexts,
    evaluate_attack,
    sample_contexts,
    spliced_contexts,
)
from unlearn_jax.attacks.prompts import (
    AttackInputError,
    concept_templates,
    placeholder_ids,
)
from unlearn_jax.attacks.run import AttackSettings, run_attack
from unlearn_jax.data.sources import Latents, encode_prompt_set
from unlearn_jax.diffusion.forward import DiffusionModel, sample_timesteps_and_noise
from unlearn_jax.metrics.integrity import IntegritySettings
from unlearn_jax.models.pipeline import load_pipeline

B, H, W, C, L, D, T, P, V, K = 4, 4, 4, 2, 5, 6, 10, 3, 7, 2
ACP = np.cumprod(1.0 - np.linspace(1e-3, 0.2, T)).astype(np.float32)


def apply_fn(params, x_t, t, context):
    return (
        x_t @ params["w"]
        + params["e"][t][:, None, None, :]
        + (context.mean(1) @ params["wc"])[:, None, None, :]
    )


def toy_text_fn(text_params, ids, mask, slot, tokens):
    embeds = objectives.splice_tokens(text_params["table"][ids], mask, slot, tokens)
    return jnp.tanh(embeds @ text_params["wt"])


def np_text_fn(text_params, ids, mask, slot, tokens):
    embeds = np.asarray(text_params["table"], np.float64)[ids]
    if tokens.shape[0]:
        embeds = np.where(mask[..., None], np.asarray(tokens, np.float64)[slot], embeds)
    return np.tanh(embeds @ np.asarray(text_params["wt"], np.float64))


def np_denoising(params, x0, context, t, eps):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    a = np.sqrt(ACP[t])[:, None, None, None]
    s = np.sqrt(1 - ACP[t])[:, None, None, None]
    x_t = a * x0 + s * eps
    prediction = (
        x_t @ p["w"] + p["e"][t][:, None, None, :] + (context.mean(1) @ p["wc"])[:, None, None, :]
    )
    return np.mean((prediction - eps) ** 2)


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    mask = np.zeros((P, L), bool)
    mask[:, 2:4] = True
    slot = np.zeros((P, L), np.int32)
    slot[:, 2:4] = [0, 1]
    return {
        "model": DiffusionModel(apply_fn, jnp.asarray(ACP)),
        "unet": {"w": f(C, C), "e": f(T, C), "wc": f(D, C)},
        "text": {"table": f(V, D), "wt": f(D, D)},
        "ids": rng.integers(0, V, (P, L)).astype(np.int32),
        "mask": mask,
        "slot": slot,
        "context": f(P, L, D),
        "x0": f(B, H, W, C),
        "prompt_index": np.asarray([0, 2, 1, 2], np.int32),
        "tokens": f(K, D),
        "delta": 0.1 * f(P, L, D),
    }


def test_splice_and_projection_match_numpy(toy):
    embeds = toy["text"]["table"][toy["ids"]]
    got = objectives.splice_tokens(embeds, toy["mask"], toy["slot"], toy["tokens"])
    want = np.where(toy["mask"][..., None], toy["tokens"][toy["slot"]], embeds)
    np.testing.assert_array_equal(got, want)
    empty = objectives.splice_tokens(embeds, toy["mask"], toy["slot"], np.zeros((0, D)))
    np.testing.assert_array_equal(empty, embeds)  # k = 0 changes nothing
    delta, context = 3.0 * toy["delta"], toy["context"]
    got = objectives.project_context(delta, context, 0.2)
    bound = 0.2 * np.linalg.norm(context, axis=-1, keepdims=True)
    norm = np.linalg.norm(delta, axis=-1, keepdims=True)
    want = np.where(norm > bound, delta * bound / norm, delta)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert np.all(np.linalg.norm(got, axis=-1) <= 0.2 * np.linalg.norm(context, axis=-1) + 1e-5)
    np.testing.assert_array_equal(objectives.project_context(delta, context, 0.0), 0 * delta)


def test_attack_losses_match_numpy_references(toy):
    rng = jax.random.key(3)
    batch = {"x0": toy["x0"], "prompt_index": toy["prompt_index"]}
    t, eps = map(np.asarray, sample_timesteps_and_noise(rng, jnp.asarray(toy["x0"]), T))
    idx = toy["prompt_index"]
    frozen = {k: toy[k] for k in ("unet", "text", "ids", "mask", "slot")}
    loss, aux = objectives.embedding_attack_loss(
        toy["tokens"], frozen, batch, rng, model=toy["model"], text_fn=toy_text_fn
    )
    context = np_text_fn(
        toy["text"], toy["ids"][idx], toy["mask"][idx], toy["slot"][idx], toy["tokens"]
    )
    want = np_denoising(toy["unet"], toy["x0"], context, t, eps)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert aux["mse"] == loss
    frozen = {"unet": toy["unet"], "context": toy["context"]}
    loss, _ = objectives.context_attack_loss(toy["delta"], frozen, batch, rng, model=toy["model"])
    want = np_denoising(toy["unet"], toy["x0"], (toy["context"] + toy["delta"])[idx], t, eps)
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_attack_step_is_one_optimizer_update(toy):
    """SGD step = params - lr * grad (grad by central differences), projection applied."""
    import optax

    frozen = {"unet": toy["unet"], "context": toy["context"]}
    batch = {"x0": toy["x0"], "prompt_index": toy["prompt_index"]}
    loss_fn = lambda d, fr, b, r: objectives.context_attack_loss(d, fr, b, r, model=toy["model"])
    step = objectives.make_attack_step(loss_fn, optax.sgd(0.5))
    key = jax.random.key(0)
    state = objectives.init_attack_state(jnp.asarray(toy["delta"]), optax.sgd(0.5))
    new, metrics = jax.jit(step)(state, frozen, batch, key)
    grad = jax.grad(lambda d: loss_fn(d, frozen, batch, jax.random.fold_in(key, 0))[0])(
        toy["delta"]
    )
    np.testing.assert_allclose(new.params, toy["delta"] - 0.5 * np.asarray(grad), rtol=1e-5)
    assert int(new.step) == 1 and bool(metrics["finite"])
    h, i = 1e-2, (1, 2, 3)
    plus, minus = toy["delta"].copy(), toy["delta"].copy()
    plus[i] += h
    minus[i] -= h
    r = jax.random.fold_in(key, 0)
    numeric = (loss_fn(plus, frozen, batch, r)[0] - loss_fn(minus, frozen, batch, r)[0]) / (2 * h)
    np.testing.assert_allclose(grad[i], numeric, rtol=2e-2, atol=1e-4)
    bounded = objectives.make_attack_step(
        loss_fn, optax.sgd(100.0), lambda d, fr: objectives.project_context(d, fr["context"], 0.1)
    )
    new, _ = jax.jit(bounded)(state, frozen, batch, key)
    ratio = np.linalg.norm(new.params, axis=-1) / np.linalg.norm(toy["context"], axis=-1)
    assert ratio.max() <= 0.1 + 1e-5


# ------------------------------------------------------------------ the real text encoder


@pytest.fixture(scope="module")
def world():
    from unlearn_jax.world.embedded import embedded_model_path

    return load_pipeline(embedded_model_path())


def test_placeholders_and_splice_equal_the_encoders_normal_path(world):
    prompts = [
        "a large red circle on a grey background",
        "a small blue circle on a black background",
    ]
    templates = concept_templates(prompts, "circle")
    assert templates[0] == ("a large red ", " on a grey background")
    p = placeholder_ids(world.tokenizer, templates, 1)
    circle = world.tokenizer("circle", add_special_tokens=False)["input_ids"]
    assert len(circle) == 1
    ids = np.where(p.mask, circle[0], p.ids)
    np.testing.assert_array_equal(ids, world.tokenize(prompts))
    table = np.asarray(
        world.text_encoder.text_model.embeddings.token_embedding.embedding.get_value()
    )
    # v* = the concept's own embedding: exactly the prompt's usual context.
    got = spliced_contexts(world, p.ids, p.mask, p.slot, table[circle])
    np.testing.assert_array_equal(got, encode_prompt_set(world, prompts))
    # k = 0: the prompt without the concept's word, exactly as the normal path encodes it.
    p0 = placeholder_ids(world.tokenizer, templates, 0)
    got = spliced_contexts(world, p0.ids, p0.mask, p0.slot, np.zeros((0, table.shape[1])))
    without = ["a large red on a grey background", "a small blue on a black background"]
    np.testing.assert_array_equal(got, encode_prompt_set(world, without))
    assert not p0.mask.any()
    # Three tokens per occurrence, numbered 0..2.
    p3 = placeholder_ids(world.tokenizer, templates, 3)
    assert p3.mask.sum(axis=1).tolist() == [3, 3]
    assert p3.slot[p3.mask].tolist() == [0, 1, 2, 0, 1, 2]


def test_bad_attack_prompts_are_refused(world):
    with pytest.raises(AttackInputError, match="empty"):
        concept_templates([], "circle")
    with pytest.raises(AttackInputError, match=r"'circle' does not occur.*1 of 2.*'a red square'"):
        concept_templates(["a red circle", "a red square"], "circle")
    with pytest.raises(AttackInputError, match="circles"):  # whole words only
        concept_templates(["two red circles"], "circle")
    with pytest.raises(AttackInputError, match="longer than the text encoder's 16"):
        placeholder_ids(world.tokenizer, concept_templates(["a red circle"], "circle"), 14)
    with pytest.raises(ValueError, match="method 'nope'"):
        AttackSettings(method="nope")
    with pytest.raises(ValueError, match="lr=0"):
        AttackSettings(lr=0)


def _world_latents(pipe, prompts, per_prompt=2):
    from unlearn_jax.data.sources import generated_latents

    return generated_latents(
        pipe, prompts, per_prompt=per_prompt, steps=10, guidance=4.0, seed=1, progress=False
    )


@pytest.mark.slow  # ~1.5 min on 2 quiet cores (three compiles of the world model)
def test_embedding_attack_draws_a_circle_from_a_prompt_without_the_word(world):
    """Textual inversion on θ0 from the word 'square': "a <v*>" draws circles, "a square" not."""
    from unlearn_jax.world.classifier import world_classifier
    from unlearn_jax.world.generator import attribute_index, forget_retain_prompts

    forget, _ = forget_retain_prompts("circle")
    prompts = forget[::4]  # 6 prompts, every colour, size and background
    x0 = _world_latents(world, prompts)
    unet = nnx.state(world.unet)
    settings = AttackSettings(steps=30, lr=2e-2, init_word="square", seed=0)
    learned = run_attack(world, unet, prompts, "circle", x0, settings)
    start = run_attack(
        world, unet, prompts, "circle", x0, AttackSettings(steps=0, init_word="square")
    )
    sampling = IntegritySettings(seeds=1, steps=10, guidance=4.0, seed=7, batch_size=6)
    classifier, circle = world_classifier("shape"), attribute_index("shape", "circle")
    before, images = evaluate_attack(world, unet, start, prompts, classifier, circle, sampling)
    after, _ = evaluate_attack(world, unet, learned, prompts, classifier, circle, sampling)
    # Before learning, "a <v*>" is "a square" bit for bit: same ids but the placeholder,
    # same embedding there, same noise.
    from unlearn_jax.diffusion.text_to_image import generate

    square = generate(
        world,
        ["a square"] * len(prompts),
        steps=10,
        guidance=4.0,
        seed=7,
        batch_size=6,
        progress=False,
    )
    # (float32 rounding apart: the two paths batch the text encoder differently)
    np.testing.assert_allclose(images["template"], square, atol=1e-4)
    assert before["template_rate"] <= 0.2, before
    assert after["template_rate"] >= 0.8, after
    assert "circle" not in after["template"]
    assert after["forget_rate_attacked"] >= 0.8  # the forget prompts with v* for 'circle'
    assert learned.params.shape == (1, 64) and learned.steps == 30


# ------------------------------------------------------------------ the loop (micro model)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from tiny_unlearn import save_micro_pipeline

    pipe = load_pipeline(save_micro_pipeline(tmp_path_factory.mktemp("micro") / "pipe"))
    prompts = ["a red circle", "a small green circle on a grey background"]
    rng = np.random.default_rng(0)
    x0 = Latents(rng.standard_normal((4, 8, 8, 4)).astype(np.float32), np.asarray([0, 0, 1, 1]))
    return pipe, prompts, x0


def test_attack_is_deterministic_and_resumes_exactly(micro, tmp_path):
    pipe, prompts, x0 = micro
    unet = nnx.state(pipe.unet)
    for method in ("embedding", "context"):
        settings = AttackSettings(method=method, steps=3, tokens=2, lr=1e-2, batch_size=4)
        a = run_attack(pipe, unet, prompts, "circle", x0, settings)
        b = run_attack(pipe, unet, prompts, "circle", x0, settings)
        np.testing.assert_array_equal(a.params, b.params)
        assert a.losses == b.losses and a.steps == 3
        initial = run_attack(
            pipe,
            unet,
            prompts,
            "circle",
            x0,
            AttackSettings(method=method, steps=0, tokens=2, lr=1e-2, batch_size=4),
        )
        assert np.abs(a.params - initial.params).max() > 0  # the attack moved
        other = run_attack(
            pipe,
            unet,
            prompts,
            "circle",
            x0,
            AttackSettings(method=method, steps=3, tokens=2, lr=1e-2, batch_size=4, seed=1),
        )
        assert not np.array_equal(other.params, a.params)
        # Two steps saved with orbax, then extended to three: the uninterrupted result.
        workdir = tmp_path / method
        short = AttackSettings(method=method, steps=2, tokens=2, lr=1e-2, batch_size=4)
        run_attack(pipe, unet, prompts, "circle", x0, short, workdir=workdir)
        assert (workdir / "checkpoints" / "2").is_dir()
        resumed = run_attack(pipe, unet, prompts, "circle", x0, settings, workdir=workdir)
        assert resumed.steps == 3 and len(resumed.losses) == 1
        np.testing.assert_array_equal(resumed.params, a.params)
        with pytest.raises(ValueError, match=r"(?s)different attack.*settings.lr: 0.01 -> 0.001"):
            run_attack(
                pipe,
                unet,
                prompts,
                "circle",
                x0,
                AttackSettings(method=method, steps=4, tokens=2, lr=1e-3, batch_size=4),
                workdir=workdir,
            )


def test_zero_tokens_and_zero_epsilon_are_exact_no_ops(micro):
    pipe, prompts, x0 = micro
    unet = nnx.state(pipe.unet)
    none = run_attack(
        pipe, unet, prompts, "circle", x0, AttackSettings(tokens=0, steps=2, batch_size=4)
    )
    assert none.params.shape == (0, 32) and none.steps == 2
    without = ["a red", "a small green on a grey background"]
    np.testing.assert_array_equal(attacked_contexts(pipe, none), encode_prompt_set(pipe, without))
    zero = run_attack(
        pipe,
        unet,
        prompts,
        "circle",
        x0,
        AttackSettings(method="context", epsilon=0.0, steps=2, batch_size=4),
    )
    assert not zero.params.any()
    sampling = IntegritySettings(seeds=1, steps=3, guidance=2.0, batch_size=2)
    attacked = sample_contexts(pipe, unet, attacked_contexts(pipe, zero), sampling)
    plain = sample_contexts(pipe, unet, encode_prompt_set(pipe, prompts), sampling)
    np.testing.assert_array_equal(attacked, plain)


SHARDED = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    from flax import nnx
    from pathlib import Path
    from tiny_unlearn import save_micro_pipeline
    from unlearn_jax.attacks.run import AttackSettings, run_attack
    from unlearn_jax.data.sources import Latents
    from unlearn_jax.models.pipeline import load_pipeline
    from unlearn_jax.trainer import sharding

    assert jax.device_count() == 8, jax.devices()
    sharding.MIN_FSDP_SIZE = 256  # shard the micro model's small kernels too
    pipe = load_pipeline(save_micro_pipeline(Path({root!r}) / "pipe"))
    prompts = ["a red circle", "a small green circle on a grey background"]
    rng = np.random.default_rng(0)
    x0 = Latents(rng.standard_normal((8, 8, 8, 4)).astype(np.float32), np.arange(8) % 2)
    out = {{}}
    for method in ("embedding", "context"):
        # SGD: Adam's first steps turn rounding-level gradient differences into full steps.
        settings = AttackSettings(
            method=method, steps=3, tokens=2, lr=1.0, batch_size=8, optimizer="sgd"
        )
        for name, data, fsdp in [("single", 1, 1), ("data", 8, 1), ("fsdp", 2, 4)]:
            mesh = sharding.make_mesh(data, fsdp)
            unet = nnx.state(pipe.unet)
            result = run_attack(pipe, unet, prompts, "circle", x0, settings, mesh=mesh)
            out[method + "/" + name] = result.params.tolist()
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow
def test_attack_on_8_devices_equals_one_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    script = SHARDED.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    out = {k: np.asarray(v) for k, v in json.loads(line[len("RESULT") :]).items()}
    for method in ("embedding", "context"):
        single = out[f"{method}/single"]
        assert np.abs(single).max() > 0
        for name in ("data", "fsdp"):
            np.testing.assert_allclose(out[f"{method}/{name}"], single, rtol=1e-4, atol=1e-6)
