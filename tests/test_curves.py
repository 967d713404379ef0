"""Curves of a run: periodic evaluations, built-in world evaluators, one compile for many lrs.

Runs use the micro pipeline of `tiny_unlearn` with distill_project on cross-attention,
the shapes of tests/test_train.py, so that in one test process they share its compiled
train step.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny_unlearn import make_config, save_micro_pipeline

from unlearn_jax.program_cache import ProgramCache
from unlearn_jax.trainer import evaluation, step_programs, train
from unlearn_jax.trainer.checkpoints import Checkpoints
from unlearn_jax.trainer.evaluation import read_curve, register_forget_classifier
from unlearn_jax.trainer.restore import evaluate
from unlearn_jax.world import generator as world

EVAL_PROMPTS = ["a large blue circle on a grey background", "a small red square"]
FORGET_EVAL = ["a red circle", "a photo of a cat", "a blue circle"]


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    return save_micro_pipeline(tmp_path_factory.mktemp("micro") / "pipe")


def config(micro, **overrides):
    return make_config(micro, unlearn__params="xattn", **overrides)


@register_forget_classifier("test_curves_half")
def _half_classifier(config, pipe):
    """Calls an image the concept when its top-left pixel's red channel is above 0.5."""

    def classify(images):
        hit = (np.asarray(images)[:, 0, 0, 0] > 0.5).astype(np.float32)
        return np.stack([hit, 1.0 - hit], axis=1)

    return classify, 0


def test_periodic_points_use_a_prompt_subset_and_any_step_can_be_evaluated(micro, tmp_path):
    workdir = tmp_path / "run"
    cfg = config(
        micro,
        eval__every=2,
        eval__final=True,
        eval__seeds=1,
        eval__steps=2,
        eval__prompts=repr(EVAL_PROMPTS),
        eval__forget_prompts=repr(FORGET_EVAL),
        eval__classifier="test_curves_half",
        eval__periodic_prompt_stride=2,
        checkpoint__keep=0,
        train__steps=4,
    )
    result = train.train_and_evaluate(cfg, workdir)
    curve = read_curve(workdir)
    assert [r["step"] for r in curve] == [2, 4]
    # Step 2 is an intermediate point: every 2nd prompt; step 4 is final: all of them.
    assert curve[0]["prompts"] == {"retain": 1, "forget": 2, "seeds": 1}
    assert curve[1]["prompts"] == {"retain": 2, "forget": 3, "seeds": 1}
    pairs = np.load(workdir / "eval" / "step_000002" / "integrity" / "pairs.npz")
    assert list(pairs["prompts"]) == EVAL_PROMPTS[::2]
    assert curve[1]["integrity_lpips"] == result["integrity_lpips"]
    assert 0 < curve[0]["integrity_lpips"] != curve[1]["integrity_lpips"]

    # The full evaluation of step 2 from its checkpoint: all prompts, written where asked.
    out = tmp_path / "headline"
    full = evaluate(cfg, workdir, step=2, out_dir=out)
    assert full["step"] == 2
    record = json.loads((out / "metrics.json").read_text())
    assert record["prompts"] == {"retain": 2, "forget": 3, "seeds": 1}
    assert record["integrity_lpips"] == full["integrity_lpips"] > 0
    # The first prompt is the same pair as at the intermediate point (same noise and
    # parameters; another batch composition moves its tiny LPIPS by rounding only).
    assert full["integrity_lpips"] != curve[0]["integrity_lpips"]  # two prompts now
    per_prompt = json.loads((out / "integrity" / "integrity.json").read_text())["per_prompt"]
    subset = json.loads(
        (workdir / "eval" / "step_000002" / "integrity" / "integrity.json").read_text()
    )["per_prompt"]
    assert per_prompt[0]["prompt"] == subset[0]["prompt"]
    np.testing.assert_allclose(per_prompt[0]["lpips"], subset[0]["lpips"], rtol=1e-3)
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 3; saved steps: 2, 4"):
        evaluate(cfg, workdir, step=3)


def _first_update(micro, workdir: Path, lr: float) -> dict:
    cfg = config(micro, train__steps=1, optim__lr=lr, optim__name="adam")
    train.train_and_evaluate(cfg, workdir)
    checkpoints = Checkpoints(workdir, keep=0)
    try:
        state = checkpoints.manager.restore(1, args=ocp.args.StandardRestore())
    finally:
        checkpoints.close()
    return state


def test_one_compiled_train_step_serves_two_learning_rates(micro, tmp_path, monkeypatch):
    monkeypatch.setattr(step_programs, "COMPILED_TRAIN_STEPS", ProgramCache("test", 8))
    monkeypatch.setattr(step_programs, "TRAIN_STEPS", ProgramCache("test", 4))
    traced = []
    make_step_parts = step_programs.make_step_parts
    counting = lambda *a, **k: traced.append(1) or make_step_parts(*a, **k)
    monkeypatch.setattr(step_programs, "make_step_parts", counting)
    compiled = []
    original_compile = jax.stages.Lowered.compile
    program_names = tuple(
        f"jit_{name}"
        for name in ("forget_prepare", "forget_finish", "retain_prepare", "retain_finish")
        + ("unet_forward", "unet_backward", "combine_and_update")
    )

    def counting_compile(self, *args, **kwargs):
        head = self.as_text()[:2000]
        compiled.extend(name for name in program_names if name in head)
        return original_compile(self, *args, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", counting_compile)
    slow = _first_update(micro, tmp_path / "slow", 1e-3)
    # On CPU a 1-step run is staged (train.step_programs="auto"): each program compiled once.
    assert sorted(compiled) == sorted(program_names)
    fast = _first_update(micro, tmp_path / "fast", 3e-3)
    # The second learning rate reused the first's traced step and its executables.
    assert len(traced) == 1 and len(compiled) == len(program_names)
    assert float(fast["opt_state"]["hyperparams"]["learning_rate"]) == pytest.approx(3e-3)

    # Adam's first update is -lr * g / (|g| + eps), about -lr * sign(g): the same
    # compiled step moved every parameter three times as far at three times the lr.
    from safetensors.numpy import load_file

    theta0 = load_file(micro / "unet" / "diffusion_pytorch_model.safetensors")
    name = next(n for n in slow["params"] if n.endswith("attn2.to_k.kernel"))
    key = name.replace(".kernel", ".weight")
    start = theta0[key].T
    delta_slow = np.asarray(slow["params"][name]) - start
    delta_fast = np.asarray(fast["params"][name]) - start
    moved = np.abs(delta_slow) > 0.5e-3
    assert moved.mean() > 0.5
    np.testing.assert_allclose(delta_fast[moved], 3 * delta_slow[moved], rtol=2e-3)


def test_world_evaluators_are_built_in_for_any_config():
    """eval.classifier='world_shape' and eval.retain_metrics='world' work without the demo."""
    assert "world_shape" in evaluation.FORGET_CLASSIFIERS
    assert "world" in evaluation.RETAIN_METRICS
    config = ml_collections.ConfigDict({"forget": {"concept": "circle"}})
    classify, concept = evaluation.FORGET_CLASSIFIERS["world_shape"](config, None)
    batch = world.sample_world(64, seed=3, split="test")
    is_circle = batch.labels.shape == world.ATTRIBUTES["shape"].index("circle")
    assert concept == [0]
    np.testing.assert_array_equal(np.argmax(classify(batch.images), 1) == 0, is_circle)
    with pytest.raises(ValueError, match="forget.concept is 'dog'.*one of circle"):
        evaluation.FORGET_CLASSIFIERS["world_shape"](
            ml_collections.ConfigDict({"forget": {"concept": "dog"}}), None
        )

    metric = evaluation.RETAIN_METRICS["world"](config, None)
    same = metric(batch.images, batch.images, batch.captions)
    assert same["retain_accuracy"] == same["retain_accuracy_original"] == 1.0
    assert abs(same["fid"]) < 1e-3
    other = world.sample_world(64, seed=4, split="test")  # other images, other captions
    moved = metric(batch.images, other.images, batch.captions)
    assert moved["retain_accuracy"] < 0.5 and moved["fid"] > 1.0


def test_unknown_evaluator_names_are_refused_before_training(micro):
    from unlearn_jax.trainer.evaluation import Evaluator

    cfg = config(micro, eval__retain_metrics="world,nope")
    with pytest.raises(ValueError, match="eval.retain_metrics 'nope' is not registered"):
        Evaluator(cfg, None, None, EVAL_PROMPTS, FORGET_EVAL)
    cfg = config(micro, eval__retain_metrics="world", eval__integrity=False)
    with pytest.raises(ValueError, match="eval.integrity is off"):
        Evaluator(cfg, None, None, EVAL_PROMPTS, FORGET_EVAL)


def test_eval_attack_reports_the_forget_rate_under_attack(micro, tmp_path):
    """eval.attack on `unlearn-jax evaluate`: the final evaluation attacks θ and says so."""
    forget = ["a red circle", "a blue circle"]
    cfg = config(
        micro,
        train__steps=2,
        eval__seeds=1,
        eval__steps=2,
        eval__prompts=repr(EVAL_PROMPTS),
        eval__forget_prompts=repr(forget),
        eval__classifier="test_curves_half",
        forget__concept="circle",
    )
    workdir = tmp_path / "run"
    train.train_and_evaluate(cfg, workdir)
    assert "forget_rate_attacked" not in json.dumps(read_curve(workdir))  # off by default
    cfg.eval.attack.method = "embedding"
    cfg.eval.attack.steps = 2
    out = tmp_path / "attacked"
    result = evaluate(cfg, workdir, out_dir=out)
    assert 0.0 <= result["forget_rate_attacked"] <= 1.0
    assert 0.0 <= result["template_rate"] <= 1.0
    report = json.loads((out / "attack" / "attack.json").read_text())
    assert report["attack_steps"] == 2
    assert report["forget_rate_attacked"] == result["forget_rate_attacked"]
    assert report["forget_rate"] == result["forget_rate"]  # the same images, unattacked
    assert len(report["per_prompt"]) == len(forget)
