"""Text-encoder unlearning (`unlearn.text_encoder`) end to end on the micro pipeline.

The runs train only the text encoder (`unlearn.params=none`) with `distill`
(remap + retain_distill) and share ONE compiled train step (the trainer caches
compiled steps by program); the rest is cheap: config errors fail before any
compilation, and the joint split is checked without training.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file
from tiny_unlearn import make_config, save_micro_pipeline

from unlearn_jax.models import convert
from unlearn_jax.models.clip import normalize_clip_keys
from unlearn_jax.trainer import experiment
from unlearn_jax.trainer.checkpoints import FingerprintMismatchError
from unlearn_jax.trainer.restore import restore_latest
from unlearn_jax.trainer.text_encoder import TEXT_ENCODER, UNET, unet_and_pipeline
from unlearn_jax.trainer.train import export, train_and_evaluate
from unlearn_jax.trainer.writers import read_metrics
from unlearn_jax.unlearn.registry import FORGET_TERMS

TEXT_FILE = "text_encoder/model.safetensors"


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    return save_micro_pipeline(tmp_path_factory.mktemp("micro_text") / "pipe")


ANCHORS = ["a red square", "a photo of a dog"]  # one per tiny_unlearn.FORGET prompt


def config(micro, **overrides):
    fields = {"unlearn__params": "none", "unlearn__text_encoder": "full", **overrides}
    fields.setdefault("forget__anchor_prompts", repr(ANCHORS))
    return make_config(micro, "distill", **fields)


@pytest.fixture(scope="module")
def text_run(micro, tmp_path_factory):
    """Four steps training only the text encoder, with a final integrity evaluation."""
    workdir = tmp_path_factory.mktemp("text_run")
    cfg = config(micro, eval__final=True, eval__seeds=1, eval__steps=2)
    return workdir, cfg, train_and_evaluate(cfg, workdir)


def train_rows(workdir):
    return [r for r in read_metrics(workdir) if not any(k.startswith("eval/") for k in r)]


def restored(cfg, workdir):
    """(model, latest step, θ as the joint tree) of a run."""
    model = experiment.load_model(cfg, experiment.resolve_run(cfg))
    step, trainable = restore_latest(model, workdir)
    return model, step, model.split.merge(jax.device_get(trainable), model.theta0)


def test_only_the_text_encoder_trains(text_run, micro):
    workdir, cfg, result = text_run
    assert result["step"] == 4
    fingerprint = json.loads((workdir / "run.json").read_text())["fingerprint"]
    assert fingerprint["unlearn.text_encoder"] == "full" and fingerprint["unlearn.params"] == "none"
    model, step, params = restored(cfg, workdir)
    assert step == 4
    # Only text-encoder leaves are differentiated and carry optimizer state.
    names = model.split.trainable_names
    assert names and all(n.startswith(f"{TEXT_ENCODER}.") for n in names)
    text_size = sum(x.size for x in jax.tree.leaves(model.theta0[TEXT_ENCODER]))
    assert model.split.size == text_size
    for a, b in zip(jax.tree.leaves(params[UNET]), jax.tree.leaves(model.theta0[UNET])):
        np.testing.assert_array_equal(a, b)  # the UNet is θ0's, bit for bit
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(params[TEXT_ENCODER]), jax.tree.leaves(model.theta0[TEXT_ENCODER])
        )
    ]
    assert sum(moved) > len(moved) // 2

    rows = train_rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # Step 1 runs at θ = θ0: student and teacher encode the prompts the same way.
    assert rows[0]["retain/loss"] == 0.0 and rows[0]["grad/retain_norm"] == 0.0
    assert rows[-1]["retain/loss"] > 0.0
    # The final evaluation samples with the trained text encoder (the UNet is unchanged,
    # so integrity is 0 only if it ignored the text encoder).
    assert result["integrity_lpips"] > 0.0


def test_forget_term_decreases_on_a_fixed_batch(text_run):
    """The remap term (predict for c_f what θ0 predicts for c_a) is lower after training."""
    workdir, cfg, _ = text_run
    model, _, params = restored(cfg, workdir)
    spec = experiment.resolve_run(cfg)
    data = experiment.build_data(cfg, spec, model.pipe, workdir / "cache")  # cached x0
    batch = data.batch(0, batch_size=4, micro_steps=1, seed=0)["forget"]
    batch = {k: v[0] for k, v in batch.items()}  # one micro-step; the anchor is per example
    assert batch["context"].dtype == np.int32  # token ids: the model encodes them itself
    # Each example carries the token ids of its own forget prompt's anchor.
    epoch = data.batch(0, batch_size=data.forget_size, micro_steps=1, seed=0)["forget"]
    forget_ids = [tuple(r) for r in model.pipe.tokenize(spec.forget_prompts)]
    prompt = [forget_ids.index(tuple(r)) for r in epoch["context"][0]]
    assert sorted(set(prompt)) == [0, 1]
    np.testing.assert_array_equal(epoch["anchor_context"][0], model.pipe.tokenize(ANCHORS)[prompt])
    term = jax.jit(
        lambda p: FORGET_TERMS["remap"](
            model.diffusion, p, model.theta0, batch, jax.random.key(7), spec.hparams
        )[0]
    )
    before, after = float(term(model.theta0)), float(term(params))
    assert 0.0 < after < 0.8 * before


def test_export_writes_the_text_encoder_that_diffusers_loads(text_run, micro, tmp_path):
    workdir, cfg, _ = text_run
    out = export(workdir, tmp_path / "exported")
    # Everything but the text-encoder weights is the original file, byte for byte.
    originals = sorted(p.relative_to(micro) for p in micro.rglob("*") if p.is_file())
    assert originals == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for rel in originals:
        if str(rel) != TEXT_FILE:
            assert (micro / rel).read_bytes() == (out / rel).read_bytes(), rel
    before, after = load_file(micro / TEXT_FILE), load_file(out / TEXT_FILE)
    assert before.keys() == after.keys()
    assert {k: v.dtype for k, v in before.items()} == {k: v.dtype for k, v in after.items()}
    with safe_open(str(out / TEXT_FILE), "np") as f, safe_open(str(micro / TEXT_FILE), "np") as g:
        assert f.metadata() == g.metadata()
    assert any(not np.array_equal(before[k], after[k]) for k in before)

    model, _, params = restored(cfg, workdir)
    nnx.update(model.pipe.text_encoder, params[TEXT_ENCODER])
    ours = convert.to_torch_state(model.pipe.text_encoder)

    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    theirs = normalize_clip_keys(pipe.text_encoder.state_dict())  # transformers 5: no prefix
    for key, value in ours.items():
        loaded = theirs[key].to(torch.float32).numpy()
        assert np.max(np.abs(loaded - value)) == 0.0, key
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        image = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


def test_resume_equals_uninterrupted_run(text_run, micro, tmp_path):
    workdir, cfg, _ = text_run
    resumed = tmp_path / "resumed"
    train_and_evaluate(config(micro, train__steps=2), resumed)
    assert train_and_evaluate(config(micro), resumed)["step"] == 4  # 2 -> 4
    assert train_rows(resumed) == train_rows(workdir)
    _, _, a = restored(cfg, workdir)
    _, _, b = restored(cfg, resumed)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_changing_the_option_is_refused(text_run, micro):
    workdir, _, _ = text_run
    with pytest.raises(FingerprintMismatchError, match=r'unlearn.text_encoder: "full" -> "layers'):
        train_and_evaluate(config(micro, unlearn__text_encoder=r"layers\.1\."), workdir)
    with pytest.raises(
        FingerprintMismatchError, match=r'unlearn.text_encoder: "full" -> "<absent>"'
    ):
        train_and_evaluate(
            config(micro, unlearn__params="xattn", unlearn__text_encoder="none"), workdir
        )


def test_regex_selecting_nothing_lists_example_paths(micro, tmp_path):
    cfg = config(micro, unlearn__text_encoder="attn2")
    pattern = r"(?s)'attn2' selects none of the \d+ text-encoder.*embeddings\..*final_layer_norm"
    with pytest.raises(ValueError, match=pattern):
        train_and_evaluate(cfg, tmp_path)
    assert not (tmp_path / "run.json").exists()
    with pytest.raises(ValueError, match="nor a valid regex"):
        experiment.resolve_run(config(micro, unlearn__text_encoder="layers("))
    with pytest.raises(ValueError, match="no parameter would train"):
        experiment.resolve_run(config(micro, unlearn__text_encoder="none"))


def test_default_is_off_and_text_encoder_and_unet_can_train_together(micro):
    default = experiment.resolve_run(make_config(micro, "distill"))
    assert default.text_encoder is None and "unlearn.text_encoder" not in default.fingerprint
    model = experiment.load_model(make_config(micro, "distill"), default)
    assert UNET not in model.theta0  # the UNet's own tree, as before the option existed

    cfg = config(micro, unlearn__params="xattn", unlearn__text_encoder=r"layers\.1\.self_attn")
    model = experiment.load_model(cfg, experiment.resolve_run(cfg))
    names = model.split.trainable_names
    unet = [n for n in names if n.startswith(f"{UNET}.")]
    text = [n for n in names if n.startswith(f"{TEXT_ENCODER}.")]
    assert unet and all(".attn2." in n for n in unet)
    assert len(text) == 8 and all(".encoder.layers.1.self_attn." in n for n in text)
    assert len(unet) + len(text) == len(names)

    # Evaluation samples θ with its own text encoder and θ0 with the pipeline's.
    unet_params, pipe = unet_and_pipeline(model.pipe, model.theta0)
    assert unet_params is model.theta0[UNET] and pipe is not model.pipe
    ids = ["a red circle"]
    np.testing.assert_array_equal(pipe.encode_prompts(ids), model.pipe.encode_prompts(ids))
    unet_params, pipe = unet_and_pipeline(model.pipe, model.theta0[UNET])
    assert unet_params is model.theta0[UNET] and pipe is model.pipe
