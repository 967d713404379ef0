"""The whole text-to-image path against diffusers' StableDiffusionPipeline from identical noise."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from unlearn_jax.diffusion import text_to_image
from unlearn_jax.models.pipeline import load_pipeline

PROMPTS = ["a red circle on a grey background", "a photo of a dog"]


@pytest.mark.parametrize(("variant", "guidance", "per_prompt"), [("sd1", 7.5, 2), ("sd2", 1.0, 1)])
def test_images_match_diffusers(variant, guidance, per_prompt, sd1_folder, sd2_folder):
    folder = sd1_folder if variant == "sd1" else sd2_folder
    ref = StableDiffusionPipeline.from_pretrained(str(folder))
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    pipe = load_pipeline(folder)

    n = len(PROMPTS) * per_prompt
    noise = np.random.default_rng(0).standard_normal((n, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = ref(
            PROMPTS,
            num_images_per_prompt=per_prompt,
            num_inference_steps=10,
            guidance_scale=guidance,
            latents=torch.from_numpy(noise),
            output_type="np",
        ).images
    images = text_to_image.generate(
        pipe,
        PROMPTS,
        num_images_per_prompt=per_prompt,
        steps=10,
        guidance=guidance,
        latents=noise.transpose(0, 2, 3, 1),
        batch_size=3,
        progress=False,
    )
    assert images.shape == expected.shape == (n, 16, 16, 3)
    diff = np.abs(images - expected).max()
    assert diff < 2e-3, diff


def test_noise_is_per_prompt_and_seeded():
    a = text_to_image.initial_noise(0, 3, 2, (4, 4, 4))
    b = text_to_image.initial_noise(0, 5, 2, (4, 4, 4))
    np.testing.assert_array_equal(a, b[:6])  # adding prompts never changes earlier noise
    assert not np.allclose(a[0], a[1])
    assert not np.allclose(a, text_to_image.initial_noise(1, 3, 2, (4, 4, 4)))


@pytest.mark.parametrize("shape", [(4, 4, 4), (16, 16, 4), (3, 5, 4)])
def test_noise_is_bit_identical_to_jax_random_normal(shape):
    """Row r is jax.random.normal(fold_in(key(seed), r), shape), bit for bit: the bits are
    compiled without LLVM's optimisations on CPU (integer-only), the float transform not."""
    got = text_to_image.initial_noise(11, 2, 3, shape)
    key = jax.random.key(11)
    want = np.stack([jax.random.normal(jax.random.fold_in(key, r), shape) for r in range(6)])
    assert got.dtype == np.float32 and got.shape == (6, *shape)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_noise_compiles_once_per_count_and_shape():
    text_to_image.initial_noise(0, 3, 1, (2, 2, 4))
    before = text_to_image._compiled_noise_bits.cache_info()
    text_to_image.initial_noise(5, 3, 1, (2, 2, 4))  # another seed: the same program
    after = text_to_image._compiled_noise_bits.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)


def test_a_second_load_of_the_model_compiles_nothing(sd1_folder):
    """The demo loads the pipeline again for each method and evaluates with the same
    settings: every program (noise, text encoder, sampler chunk, decoder) is reused, so
    the evaluation compiles once per process and shape, not once per method."""
    from unlearn_jax.benchmarks.common import jax_compile_seconds_by_program

    # The programs' caches are per process, shared with the tests that ran before this
    # one in the same worker (which ones depends on pytest-xdist's scheduling): emptied
    # here, so that the first call must compile at least the noise and the sampler.
    from unlearn_jax.diffusion import chunks

    text_to_image._compiled_noise_bits.cache_clear()
    chunks.CHUNK_PROGRAMS.clear()
    jax.clear_caches()

    def sample(pipe, seed: int) -> np.ndarray:
        return text_to_image.generate(
            pipe, PROMPTS, steps=2, batch_size=3, seed=seed, num_images_per_prompt=3,
            progress=False,
        )  # fmt: skip

    # (Loading traces the modules' abstract construction: not counted here.)
    first_pipe, second_pipe = load_pipeline(sd1_folder), load_pipeline(sd1_folder)
    _, first = jax_compile_seconds_by_program(lambda: sample(first_pipe, 0))
    assert {"_noise_bits", "_sample_loop"} <= first.keys()
    _, second = jax_compile_seconds_by_program(lambda: sample(second_pipe, 1))
    assert second == {}  # no tracing, lowering or compilation at all


def test_bad_sizes_and_empty_prompts(sd1_folder):
    pipe = load_pipeline(sd1_folder)
    with pytest.raises(ValueError, match="multiples of 4.*--height 20"):
        text_to_image.generate(pipe, ["a cat"], height=22, width=16, steps=2)
    with pytest.raises(ValueError, match="no prompts"):
        text_to_image.generate(pipe, [], steps=2)
    with pytest.raises(ValueError, match=r"expected \(2, 8, 8, 4\)"):
        text_to_image.generate(
            pipe,
            ["a cat"],
            num_images_per_prompt=2,
            steps=2,
            latents=np.zeros((1, 8, 8, 4), np.float32),
        )


def test_nan_images_are_reported():
    images = np.zeros((4, 2, 2, 3), np.float32)
    images[3, 0, 0, 0] = np.nan
    with pytest.raises(text_to_image.NonFiniteImagesError, match="1 of 4 images.*'dog'"):
        text_to_image.check_finite(images, ["cat", "dog"], per_prompt=2)
    text_to_image.check_finite(np.zeros((4, 2, 2, 3), np.float32), ["cat", "dog"], 2)


def test_precompile_while_loading_is_what_generate_runs(sd1_folder, caplog):
    from unlearn_jax.models.pipeline import read_structure

    settings = dict(steps=4, guidance=3.0, batch_size=3, num_images_per_prompt=2)
    n = len(PROMPTS) * settings["num_images_per_prompt"]
    structure = read_structure(sd1_folder)
    programs = text_to_image.precompile(
        structure, n, num_prompts=len(PROMPTS), steps=4, guidance=3.0, batch_size=3, mesh=None
    )
    pipe = load_pipeline(sd1_folder, structure=structure)
    assert pipe.unet is structure.unet  # the structure's modules received the weights
    for future in programs:
        future.result()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        images = text_to_image.generate(pipe, PROMPTS, progress=False, **settings)
    compiled = [r.getMessage() for r in caplog.records if "XLA compilation" in r.getMessage()]
    precompiled = ("_sample_loop", "_decode", "encode_ids")
    assert not [m for m in compiled if any(name in m for name in precompiled)], compiled
    # The check sees compiles: with JAX's caches emptied, the call compiles again.
    jax.clear_caches()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        pipe.encode_prompts(PROMPTS + [""])
    assert any("encode_ids" in r.getMessage() for r in caplog.records), "compile not logged"
    # The same programs compile on demand without precompile.
    fresh = text_to_image.generate(load_pipeline(sd1_folder), PROMPTS, progress=False, **settings)
    np.testing.assert_array_equal(images, fresh)
    with pytest.raises(ValueError, match="already holds loaded weights"):
        load_pipeline(sd1_folder, structure=structure)
    with pytest.raises(ValueError, match="dtype"):
        load_pipeline(sd1_folder, dtype=jax.numpy.bfloat16, structure=read_structure(sd1_folder))
