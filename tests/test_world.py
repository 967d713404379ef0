"""The embedded world, its evaluator, the shipped tiny model, the TFDS builder, pretraining."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from unlearn_jax.world import generator as world

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "pretrain_world.py")

# ----------------------------------------------------------------------------- the world


def test_world_is_deterministic_and_random_access():
    a = world.sample_world(24, seed=3)
    b = world.sample_world(24, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions
    # Example i does not depend on which others are drawn with it.
    tail = world.sample_world(8, seed=3, start=16)
    np.testing.assert_array_equal(tail.images, a.images[16:])
    other = world.sample_world(24, seed=4)
    assert not np.array_equal(other.images, a.images)
    assert a.images.shape == (24, 32, 32, 3) and a.images.dtype == np.float32
    assert 0.0 <= a.images.min() and a.images.max() <= 1.0


def test_captions_match_labels_and_pixels():
    batch = world.sample_world(300, seed=1)
    labels = batch.labels
    coverage = world.shape_coverage(labels)
    base_colours = np.array([world.COLOUR_RGB[c] for c in world.COLOURS]) / 255.0
    base_backgrounds = np.array([world.BACKGROUND_RGB[b] for b in world.BACKGROUNDS]) / 255.0
    for i, caption in enumerate(batch.captions):
        parsed = world.parse_caption(caption)
        assert parsed == {k: int(v[i]) for k, v in labels.attributes().items()}
        inside = batch.images[i][coverage[i] == 1.0]
        outside = batch.images[i][coverage[i] == 0.0]
        assert len(inside) >= 20 and len(outside) >= 100
        # Fully covered pixels carry the shape's colour, nearest to the caption's colour.
        np.testing.assert_allclose(inside, np.broadcast_to(labels.colour_rgb[i], inside.shape))
        nearest = np.argmin(np.abs(base_colours - inside.mean(0)).sum(1))
        assert world.COLOURS[nearest] in caption.split()
        nearest_bg = np.argmin(np.abs(base_backgrounds - outside.mean(0)).sum(1))
        assert world.BACKGROUNDS[nearest_bg] in caption.split()
    area = coverage.sum(axis=(1, 2))
    small, large = area[labels.size == 0], area[labels.size == 1]
    assert small.max() < large.min()  # 'small' and 'large' never overlap in area
    assert (area > 15).all()  # every shape is visible


def test_prompts_and_forget_retain_split():
    prompts = world.world_prompts()
    assert len(prompts) == len(set(prompts)) == 96
    forget, retain = world.forget_retain_prompts("circle")
    assert len(forget) == 24 and len(retain) == 72
    assert set(forget).isdisjoint(retain) and set(forget) | set(retain) == set(prompts)
    assert all("circle" in p for p in forget) and not any("circle" in p for p in retain)
    batch = world.sample_world(64, seed=2)
    assert [prompts[i] for i in world.prompt_index(batch.labels)] == batch.captions
    assert {w for p in prompts for w in p.split()} == set(world.world_words())
    with pytest.raises(ValueError, match="not an attribute"):
        world.forget_retain_prompts("dog")
    with pytest.raises(ValueError, match="not a caption"):
        world.parse_caption("a photo of a cat")


def test_held_out_split_is_a_disjoint_stream_over_the_same_prompts():
    def digests(images):
        return {hashlib.sha1(world.to_uint8(x).tobytes()).hexdigest() for x in images}

    train = world.sample_world(1500, split="train")
    test = world.sample_world(1500, split="test")
    assert digests(train.images).isdisjoint(digests(test.images))
    # Same distribution: every prompt occurs in both splits.
    assert set(train.captions) == set(test.captions) == set(world.world_prompts())
    with pytest.raises(ValueError, match="unknown split"):
        world.sample_world(1, split="validation")


# ----------------------------------------------------------------------------- evaluator


@pytest.fixture(scope="module")
def classifier():
    from unlearn_jax.world import classifier as world_classifier

    return world_classifier.load_world_classifier()  # the shipped weights


def test_shipped_classifier_is_accurate_on_fresh_world_images(classifier):
    from unlearn_jax.world import classifier as world_classifier

    # Seed 7 is used by no training stage: these images are new to the classifier.
    batch = world.sample_world(2000, seed=7, split="test")
    predicted = world_classifier.predict_attributes(batch.images, classifier)
    accuracy = {k: (predicted[k] == v).mean() for k, v in batch.labels.attributes().items()}
    assert accuracy["shape"] >= 0.99 and accuracy["colour"] >= 0.99, accuracy
    assert accuracy["size"] >= 0.98 and accuracy["background"] >= 0.99, accuracy


def test_classifier_plugs_into_forget_rate_and_fid(classifier):
    from unlearn_jax.metrics.fid import fid_between_image_sets
    from unlearn_jax.metrics.forget_rate import forget_rate
    from unlearn_jax.world import classifier as world_classifier

    batch = world.sample_world(256, seed=8, split="test")
    circle = world.attribute_index("shape", "circle")
    is_circle = batch.labels.shape == circle[0]
    shape_probs = world_classifier.world_classifier("shape", classifier)
    assert forget_rate(batch.images[is_circle], shape_probs, circle) == 1.0
    assert forget_rate(batch.images[~is_circle], shape_probs, circle) == 0.0

    features = world_classifier.world_feature_fn(classifier)
    assert features(batch.images[:5]).shape == (5, world_classifier.FEATURE_DIM)
    other = world.sample_world(256, seed=9, split="test")
    same = fid_between_image_sets(batch.images, other.images, features, batch_size=128)
    circles_only = fid_between_image_sets(
        batch.images, batch.images[is_circle], features, batch_size=128
    )
    assert same < circles_only  # a shifted distribution is farther away


# ----------------------------------------------------------------------------- shipped model


def test_embedded_model_loads_with_load_pipeline_and_diffusers():
    from unlearn_jax.models.pipeline import load_pipeline
    from unlearn_jax.world.embedded import embedded_model_path

    path = embedded_model_path()
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    pipe = load_pipeline(path)
    assert pipe.file_dtypes["unet"] == np.float16
    ids = pipe.tokenize(["a large red circle on a grey background"])
    assert ids.shape == (1, pipe.tokenizer.model_max_length)

    import diffusers
    import torch

    reference = diffusers.StableDiffusionPipeline.from_pretrained(str(path))
    assert type(reference.scheduler).__name__ == "DDIMScheduler"
    assert reference.vae.config.scaling_factor == pipe.vae.scaling_factor
    # Same weights: the first UNet conv of both frameworks agrees exactly.
    ours = np.asarray(pipe.unet.conv_in.kernel.get_value()).transpose(3, 2, 0, 1)
    theirs = reference.unet.conv_in.weight.detach().to(torch.float32).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_embedded_model_draws_what_it_is_asked(classifier):
    from unlearn_jax.models.pipeline import load_pipeline
    from unlearn_jax.world.classifier import generation_accuracy
    from unlearn_jax.world.embedded import embedded_model_path

    prompts = [
        "a large red circle on a grey background",
        "a small blue square on a white background",
        "a large yellow triangle on a black background",
        "a small green cross on a grey background",
    ]
    judged = generation_accuracy(
        load_pipeline(embedded_model_path()),
        prompts,
        per_prompt=4,
        classifier=classifier,
        steps=25,
        guidance=4.0,
        seed=0,
        batch_size=16,
    )
    assert judged["accuracy"] >= 0.9, judged  # shape and colour as prompted (the bar)


# ----------------------------------------------------------------------------- TFDS


def test_tfds_builder_serves_the_world(tmp_path):
    from unlearn_jax.world.tfds_builder import world_builder

    builder = world_builder(str(tmp_path), num_train=48, num_test=16, seed=5)
    builder.download_and_prepare()
    assert builder.info.splits["train"].num_examples == 48
    assert builder.info.splits["test"].num_examples == 16
    source = builder.as_data_source()
    for split, num in (("train", 48), ("test", 16)):
        expected = world.sample_world(num, seed=5, split=split)
        for i in (0, num - 1):
            record = source[split][i]
            np.testing.assert_array_equal(record["image"], world.to_uint8(expected.images[i]))
            assert record["caption"].decode() == expected.captions[i]
            assert record["labels"]["shape"] == expected.labels.shape[i]
            np.testing.assert_allclose(record["center"], expected.labels.center[i])


def test_world_tfds_imports_without_tensorflow_datasets():
    import importlib

    module = importlib.import_module("unlearn_jax.world.tfds_builder")
    assert callable(module.world_builder)  # importing never touched tfds


# ----------------------------------------------------------------------------- pretraining


def test_exported_configs_are_the_ones_diffusers_writes():
    import diffusers

    from unlearn_jax.world.pretrain_export import (
        load_config,
        scheduler_config,
        unet_config,
        vae_config,
    )

    config = load_config(CONFIG)
    for ours, cls in (
        (unet_config(config), diffusers.UNet2DConditionModel),
        (vae_config(config, 0.5), diffusers.AutoencoderKL),
        (scheduler_config(), diffusers.DDIMScheduler),
    ):
        theirs = dict(cls.from_config(ours).config)
        theirs = {k: v for k, v in theirs.items() if not k.startswith("_")}
        mine = {k: v for k, v in ours.items() if not k.startswith("_")}
        assert set(mine) == set(theirs), cls.__name__
        for key, value in mine.items():
            want = list(theirs[key]) if isinstance(theirs[key], tuple) else theirs[key]
            assert value == want, (cls.__name__, key)


def test_min_snr_loss_reduces_to_the_plain_denoising_loss():
    import jax
    import jax.numpy as jnp

    from unlearn_jax.diffusion import forward as denoising
    from unlearn_jax.world.pretrain_diffusion import min_snr_denoising_loss

    acp = jnp.cumprod(1.0 - jnp.linspace(1e-4, 0.02, 1000))
    model = denoising.DiffusionModel(lambda p, x, t, c: p * x + c.mean(), acp)
    rng = jax.random.key(0)
    batch = {"x0": jax.random.normal(rng, (6, 4, 4, 2)), "context": jnp.ones((6, 3, 5))}
    plain, _ = denoising.denoising_loss(model, 0.5, batch, rng)
    np.testing.assert_allclose(min_snr_denoising_loss(model, 0.5, batch, rng, 0.0), plain, 1e-6)
    # Weights are min(SNR, gamma) / SNR <= 1: never more than the plain loss.
    weighted = min_snr_denoising_loss(model, 0.5, batch, rng, 5.0)
    t, eps = denoising.sample_timesteps_and_noise(rng, batch["x0"], 1000)
    snr = acp[t] / (1 - acp[t])
    x_t = denoising.add_noise(model, batch["x0"], eps, t)
    errors = jnp.mean((0.5 * x_t + 1.0 - eps) ** 2, axis=(1, 2, 3))
    expected = jnp.mean(jnp.minimum(snr, 5.0) / snr * errors)
    np.testing.assert_allclose(weighted, expected, rtol=1e-5)


@pytest.mark.slow
def test_pretraining_runs_end_to_end(tmp_path):
    from unlearn_jax.models.pipeline import load_pipeline
    from unlearn_jax.world import pretrain
    from unlearn_jax.world.pretrain_export import load_config

    config = load_config(CONFIG + ":runlocal")
    metrics = pretrain.run(config, tmp_path, log=lambda _: None)
    assert set(metrics["seconds"]) == {"classifier", "vae", "unet", "generation"}
    pipe = load_pipeline(tmp_path / "tiny_world")
    assert pipe.tokenizer.model_max_length == config.text_encoder.max_length
    # A rerun finds every stage done and only re-exports and re-evaluates.
    again = pretrain.run(config, tmp_path, log=lambda _: None)
    assert again["unet"] == metrics["unet"]
