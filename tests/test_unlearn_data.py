"""Prompt sets, config overrides, and the cached training data sources."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tiny_unlearn import REPO, save_micro_pipeline

from unlearn_jax.data import prompts, sources
from unlearn_jax.models.pipeline import load_pipeline
from unlearn_jax.unlearn.config_file import load_config, split_overrides


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

    monkeypatch.setattr(sources, "generate", fail)
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
    from unlearn_jax.data import world
    from unlearn_jax.data.world_tfds import world_builder

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
