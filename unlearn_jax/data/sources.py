"""Forget/retain training data: text embeddings, x0 latents and ESD's partial trajectories.

Where no images are given, x0 comes from θ0's own generations for the prompts
(DDIM with guidance, `text_to_image.denoise`: the sampler without the decoder); ESD
trains on x_t taken from θ0's trajectories for the forget prompts (the same sampler
with `trajectory=True`). Both
are generated once and cached in `<workdir>/cache/` (see `cache`), so a
resumed or repeated run reuses them and a changed setting can never pick up
stale data. An image folder or a prepared TFDS split (read by
`image_readers`) can replace the generations: its images are VAE-encoded
(posterior mode) instead.

Shapes: latents are NHWC, [N, h, w, C]; text embeddings [P, L, D].
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.data.cache import cache_key, load_or_build
from unlearn_jax.data.image_readers import (
    TFDS_PREFIX,
    fit_image,
    list_images,
    load_image,
    tfds_images,
)
from unlearn_jax.diffusion.chunks import map_in_chunks
from unlearn_jax.diffusion.ddim import ddim_plan
from unlearn_jax.diffusion.schedule import schedule_from_config
from unlearn_jax.diffusion.text_to_image import denoise, latent_shape
from unlearn_jax.models.pipeline import StableDiffusion


@dataclasses.dataclass
class Latents:
    """Clean latents of one set and the prompt each belongs to.

    Attributes:
      x0: [N, h, w, C] float32, in the diffusion latent space (VAE latents x scaling_factor).
      prompt_index: [N] int32 index into the set's prompts.
    """

    x0: np.ndarray
    prompt_index: np.ndarray


@dataclasses.dataclass
class Trajectories:
    """DDIM trajectories of θ0: x_t before each sampler step.

    Attributes:
      x_t: [N, S, h, w, C] float32; x_t[:, s] is the input of sampler step s.
      timesteps: [S] int32, the training timestep of each sampler step.
      prompt_index: [N] int32 index into the set's prompts.
    """

    x_t: np.ndarray
    timesteps: np.ndarray
    prompt_index: np.ndarray


def encode_prompt_set(pipe: StableDiffusion, prompts: Sequence[str], chunk: int = 64) -> np.ndarray:
    """Text embeddings [P, L, D] float32, encoded in fixed-size chunks (one compile)."""
    encode = lambda rows: np.asarray(pipe.encode_prompts(rows), np.float32)
    return map_in_chunks(encode, list(prompts), size=chunk)


def _theta0_denoised(
    pipe: StableDiffusion,
    prompts: Sequence[str],
    *,
    trajectory: bool,
    per_prompt: int,
    steps: int,
    guidance: float,
    seed: int,
    height: int | None,
    width: int | None,
    batch_size: int,
    cache_dir: Path | None,
    model_id: dict | str | None,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(θ0's final latents or trajectories for `prompts`, each row's prompt index), cached.

    Image j of prompt i starts from `fold_in(key(seed), i * per_prompt + j)` noise.
    """
    kind = "trajectories" if trajectory else "x0"
    key = cache_key(
        kind=kind,
        model=model_id or str(pipe.source),
        prompts=list(prompts),
        per_prompt=per_prompt,
        steps=steps,
        guidance=guidance,
        seed=seed,
        size=[height, width],
        dtype=str(pipe.unet.dtype),
    )

    def build():
        latents = denoise(
            pipe,
            prompts,
            num_images_per_prompt=per_prompt,
            steps=steps,
            guidance=guidance,
            height=height,
            width=width,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
            trajectory=trajectory,
        )
        return {kind: np.asarray(latents, np.float32)}

    arrays = load_or_build(cache_dir, kind, key, build)
    return arrays[kind], np.repeat(np.arange(len(prompts), dtype=np.int32), per_prompt)


def generated_latents(
    pipe: StableDiffusion,
    prompts: Sequence[str],
    *,
    per_prompt: int,
    steps: int,
    guidance: float,
    seed: int,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    cache_dir: Path | None = None,
    model_id: dict | str | None = None,
    progress: bool = True,
) -> Latents:
    """θ0's own generations for `prompts` as x0 latents (prompt-major), generated once."""
    x0, index = _theta0_denoised(pipe, prompts, trajectory=False, **_options(locals()))
    return Latents(x0, index)


def ddim_trajectories(
    pipe: StableDiffusion,
    prompts: Sequence[str],
    *,
    per_prompt: int,
    steps: int,
    guidance: float,
    seed: int,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    cache_dir: Path | None = None,
    model_id: dict | str | None = None,
) -> Trajectories:
    """θ0's DDIM trajectories for `prompts` (ESD's x_t source), generated once.

    ESD stops a guided DDIM run of the concept prompt at a random step and
    trains on that x_t; keeping every step's input of `per_prompt` full runs
    per prompt gives the same distribution with one sampler pass.
    """
    options = _options(locals(), progress=False)
    x_t, index = _theta0_denoised(pipe, prompts, trajectory=True, **options)
    timesteps = ddim_plan(schedule_from_config(pipe.scheduler_config), steps).timesteps
    return Trajectories(x_t, np.asarray(timesteps, np.int32), index)


def _options(arguments: dict, **extra) -> dict:
    """The keyword arguments of `generated_latents`/`ddim_trajectories` for `_theta0_denoised`."""
    return {k: v for k, v in arguments.items() if k not in ("pipe", "prompts")} | extra


@nnx.jit
def _encode_images(vae, images: jax.Array) -> jax.Array:
    return vae.encode(images).mode().astype(jnp.float32) * vae.scaling_factor


def folder_latents(
    pipe: StableDiffusion,
    folder: str | os.PathLike,
    num_prompts: int,
    *,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    cache_dir: Path | None = None,
    model_id: dict | str | None = None,
    per_prompt: int = 1,
) -> Latents:
    """VAE latents (posterior mode x scaling_factor) of user images, encoded once.

    `folder` is a folder of image files, or 'tfds:NAME[:SPLIT]' / 'tfds:DIR[:SPLIT]'
    for the first num_prompts x per_prompt examples of a prepared TFDS dataset
    (`tfds_images`). Image k (file-name or record order) is paired with prompt
    k mod `num_prompts`: name files so that this order matches the prompt list
    (e.g. 000_*.png ...).
    """
    h, w, _ = latent_shape(pipe, height, width)
    size = (h * pipe.vae_scale_factor, w * pipe.vae_scale_factor)
    if str(folder).startswith(TFDS_PREFIX):
        from PIL import Image

        arrays, identity = tfds_images(str(folder), num_prompts * per_prompt)
        count = len(arrays)

        def load(k: int) -> np.ndarray:
            return fit_image(Image.fromarray(arrays[k]), *size)

    else:
        files = list_images(folder)
        identity = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        count = len(files)

        def load(k: int) -> np.ndarray:
            return load_image(files[k], *size)

    key = cache_key(kind="images", model=model_id or str(pipe.source), files=identity, size=size)

    def build():
        def encode(indices: np.ndarray) -> jax.Array:
            images = np.stack([load(int(k)) for k in indices])
            return _encode_images(pipe.vae, jnp.asarray(images))

        return {"x0": map_in_chunks(encode, np.arange(count), size=batch_size)}

    arrays = load_or_build(cache_dir, "images", key, build)
    index = (np.arange(count) % num_prompts).astype(np.int32)
    return Latents(arrays["x0"], index)
