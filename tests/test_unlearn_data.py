"""Prompt sets, config overrides, and the cached training data sources."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tiny_unlearn import REPO, save_micro_pipeline

from unlearn_jax.data import prompts, sources
from unlearn_jax.models.pipeline import load_pipeline
from unlearn_jax.trainer.config_file import load_config, split_overrides


def test_prompt_sets_from_lists_and_files(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# forget set\n a red circle \n\na photo of a cat\n", encoding="utf-8")
    assert prompts.load_prompts(str(path), "forget.prompts") == ["a red circle", "a photo of a cat"]
    assert prompts.load_prompts(path, "x") == ["a red circle", "a photo of a cat"]
    assert prompts.load_prompts(("a", "b "), "x") == ["a", "b"]
    assert prompts.load_prompts("a single prompt", "x") == ["a single prompt"]
    with pytest.raises(prompts.PromptSetError, match="empty prompt"):
        prompts.load_prompts(["a", " "], "retain.prompts")
    with pytest.raises(prompts.PromptSetError, match="does not exist"):
        prompts.load_prompts(str(tmp_path / "missing.txt"), "x")
    with pytest.raises(prompts.PromptSetError, match="x is empty"):
        prompts.load_prompts(None, "x")
    with pytest.warns(prompts.PromptOverlapWarning):
        assert prompts.warn_on_overlap(["A cat", "a dog"], ["a  cat"]) == ["A cat"]


def test_overrides_parse_by_field_type_and_switch_list_to_file():
    base = str(REPO / "configs" / "distill.py")
    overrides, rest = split_overrides(
        [
            "--config.train.steps=7",
            "--config.optim.lr",
            "3e-5",
            "--other",
            "--config.forget.prompts=['a', 'b']",
            "--config.retain.prompts=/data/retain.txt",
            "--config.unlearn.params=attn2\\.to_k",
            "--config.train.remat=True",
            "--config.unlearn.hparams.eta=2",
        ]
    )
    assert rest == ["--other"]
    config = load_config(f"{base}:runlocal", overrides)
    assert config.train.steps == 7 and config.optim.lr == 3e-5 and config.train.remat is True
    assert config.forget.prompts == ["a", "b"] and config.retain.prompts == "/data/retain.txt"
    assert config.unlearn.params == "attn2\\.to_k" and config.unlearn.hparams.eta == 2.0
    # A list where a file was, and back.
    config = load_config(base, [("retain.prompts", "x.txt"), ("retain.prompts", "['c']")])
    assert config.retain.prompts == ["c"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(save_micro_pipeline(tmp_path_factory.mktemp("micro_data") / "pipe"))


def test_generated_latents_are_cached(pipe, tmp_path, monkeypatch):
    kw = dict(per_prompt=2, steps=2, guidance=3.0, seed=5, cache_dir=tmp_path, progress=False)
    first = sources.generated_latents(pipe, ["a cat", "a dog"], **kw)
    assert first.x0.shape == (4, 8, 8, 4) and list(first.prompt_index) == [0, 0, 1, 1]
    assert len(list(tmp_path.glob("x0-*.npz"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(sources, "denoise", fail)
    again = sources.generated_latents(pipe, ["a cat", "a dog"], **kw)
    np.testing.assert_array_equal(first.x0, again.x0)
    with pytest.raises(AssertionError, match="regenerated"):  # another seed: another file
        sources.generated_latents(pipe, ["a cat", "a dog"], **{**kw, "seed": 6})


def test_image_folder_latents(pipe, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)  # cropped and resized
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    (folder / "notes.txt").write_text("not an image")
    latents = sources.folder_latents(pipe, folder, num_prompts=2, cache_dir=tmp_path)
    assert latents.x0.shape == (3, 8, 8, 4) and list(latents.prompt_index) == [0, 1, 0]
    assert np.isfinite(latents.x0).all()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.folder_latents(pipe, tmp_path / "nope", num_prompts=1)


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_tfds_latents_equal_the_same_images_as_files(pipe, tmp_path, file_format):
    from unlearn_jax.world import generator as world
    from unlearn_jax.world.tfds_builder import world_builder

    builder = world_builder(
        str(tmp_path / "tfds"), num_train=8, num_test=2, seed=5, file_format=file_format
    )
    builder.download_and_prepare()
    spec = f"tfds:{builder.data_dir}:train"
    latents = sources.folder_latents(pipe, spec, num_prompts=3, per_prompt=2)
    assert latents.x0.shape == (6, 8, 8, 4) and list(latents.prompt_index) == [0, 1, 2, 0, 1, 2]
    # The first 6 records, as PNG files in record order: the same latents.
    folder = tmp_path / "files"
    folder.mkdir()
    images = world.to_uint8(world.sample_world(6, seed=5, split="train").images)
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    from_files = sources.folder_latents(pipe, folder, num_prompts=3)
    np.testing.assert_array_equal(latents.x0, from_files.x0)

    with pytest.raises(ValueError, match="holds 8 examples in 'train', 9 are needed"):
        sources.folder_latents(pipe, spec, num_prompts=3, per_prompt=3)
    with pytest.raises(ValueError, match="no split 'validation'"):
        sources.folder_latents(pipe, f"tfds:{builder.data_dir}:validation", num_prompts=1)
    with pytest.raises(FileNotFoundError, match="not a prepared TFDS dataset"):
        sources.folder_latents(pipe, "tfds:no_such_dataset_here", num_prompts=1)


# ---------------------------------------------------------------- anchors in batches


def anchored_data(preset: str, anchor_context: np.ndarray, forget_context: np.ndarray):
    """UnlearnData of 3 forget prompts x 4 examples whose x0 holds the example's number."""
    from unlearn_jax.trainer.batches import UnlearnData
    from unlearn_jax.unlearn.registry import PRESETS

    prompt_index = np.repeat(np.arange(3, dtype=np.int32), 4)
    x0 = np.broadcast_to(np.arange(12.0)[:, None, None, None], (12, 2, 2, 1)).copy()
    return UnlearnData(
        preset=PRESETS[preset],
        forget_context=forget_context,
        anchor_context=anchor_context,
        uncond_context=np.full_like(anchor_context[:1], 7),
        anchor_index=np.array([1, 0, 1], np.int32),  # prompts 0 and 2 share anchor 1
        forget_latents=sources.Latents(x0, prompt_index),
        retain_context=forget_context[:2],
        retain_latents=sources.Latents(x0[:5], np.array([0, 1, 0, 1, 0], np.int32)),
    )


@pytest.mark.parametrize("kind", ["embeddings", "token ids"])
def test_batches_gather_each_examples_own_anchor(kind):
    from unlearn_jax.trainer.batches import SHARED_KEYS

    rng = np.random.default_rng(0)
    if kind == "embeddings":  # [A, L, D]
        anchors, contexts = rng.normal(size=(2, 5, 6)), rng.normal(size=(3, 5, 6))
    else:  # the text encoder trains: token ids [A, L]
        anchors, contexts = rng.integers(0, 99, (2, 5)), rng.integers(0, 99, (3, 5))
    data = anchored_data("distill", anchors, contexts)
    assert "anchor_context" not in SHARED_KEYS  # per example: sharded like x0
    for step in range(3):
        batch = data.batch(step, batch_size=8, micro_steps=2, seed=1)["forget"]
        assert batch["anchor_context"].shape == (2, 4, *anchors.shape[1:])
        example = batch["x0"][..., 0, 0, 0].astype(int)  # [micro_steps, micro_batch]
        prompt = example // 4
        np.testing.assert_array_equal(batch["context"], contexts[prompt])
        np.testing.assert_array_equal(batch["anchor_context"], anchors[[1, 0, 1]][prompt])
    # Without anchor_index every prompt has anchor row 0 (one shared anchor).
    data.anchor_index = None
    batch = data.batch(0, batch_size=8, micro_steps=1, seed=1)["forget"]
    np.testing.assert_array_equal(batch["anchor_context"][0], np.stack([anchors[0]] * 8))
    # Methods without a remap term carry no anchors (ESD: test_train_configs); SalUn's
    # saliency chunks neither.
    for preset in ("neggrad", "graddiff"):
        batch = anchored_data(preset, anchors, contexts).batch(0, 4, 1, 0)
        assert "anchor_context" not in batch["forget"]
    _, chunk = next(anchored_data("salun", anchors, contexts).saliency_chunks(4))
    assert set(chunk) == {"x0", "context"}


def test_build_data_encodes_each_distinct_anchor_once(pipe, tmp_path, monkeypatch):
    from tiny_unlearn import make_config

    from unlearn_jax.trainer import experiment
    from unlearn_jax.trainer.batches import FORGET_DATA_STREAM, stream_indices

    def fake_latents(config, pipe, prompts, section, seed, cache_dir, model_id):
        return sources.Latents(np.zeros((len(prompts), 8, 8, 4), np.float32), np.arange(3))

    monkeypatch.setattr(experiment, "section_latents", fake_latents)
    config = make_config(
        tmp_path / "unused",
        "distill",
        forget__prompts=repr(["a red circle", "a Circle on grey", "a photo of a cat"]),
        forget__anchor_prompts=repr(["a red square", "a red square", ""]),
    )
    spec = experiment.resolve_run(config)
    data = experiment.build_data(config, spec, pipe, tmp_path)
    np.testing.assert_array_equal(data.anchor_index, [0, 0, 1])
    np.testing.assert_allclose(
        data.anchor_context, sources.encode_prompt_set(pipe, ["a red square", ""]), rtol=1e-6
    )
    batch = data.batch(0, batch_size=3, micro_steps=1, seed=0)["forget"]
    order = stream_indices(0, FORGET_DATA_STREAM, 0, 3, 3)  # the examples of step 0
    want = sources.encode_prompt_set(pipe, ["a red square", "a red square", ""])[order]
    np.testing.assert_allclose(batch["anchor_context"][0], want, rtol=1e-6, atol=1e-6)
