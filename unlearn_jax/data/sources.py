"""Forget/retain training data: text embeddings, x0 latents and ESD's partial trajectories.

Where no images are given, x0 comes from θ0's own generations for the prompts
(DDIM with guidance, `text_to_image.generate(..., return_latents=True)`); ESD
trains on x_t taken from partial θ0 trajectories for the forget prompts. Both
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
from unlearn_jax.diffusion.ddim import DDIMPlan, ddim_plan, ddim_step
from unlearn_jax.diffusion.sampler import ModelFn, guided_model_output, uses_guidance
from unlearn_jax.diffusion.schedule import schedule_from_config
from unlearn_jax.diffusion.text_to_image import generate, initial_noise, latent_shape, unet_model_fn
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
    prompts = list(prompts)
    size = max(1, min(chunk, len(prompts)))
    out = []
    for start in range(0, len(prompts), size):
        rows = prompts[start : start + size]
        padded = rows + [rows[-1]] * (size - len(rows))
        out.append(np.asarray(pipe.encode_prompts(padded), np.float32)[: len(rows)])
    return np.concatenate(out)


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
    """θ0's own generations for `prompts` as x0 latents (prompt-major), generated once.

    Image j of prompt i starts from `fold_in(key(seed), i * per_prompt + j)` noise.
    """
    key = cache_key(
        kind="x0",
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
        _, final = generate(
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
            return_latents=True,
        )
        return {"x0": np.asarray(final, np.float32)}

    arrays = load_or_build(cache_dir, "x0", key, build)
    index = np.repeat(np.arange(len(prompts), dtype=np.int32), per_prompt)
    return Latents(arrays["x0"], index)


def _trajectory_loop(
    model_fn: ModelFn,
    params,
    plan: DDIMPlan,
    latents: jax.Array,
    cond: jax.Array,
    uncond: jax.Array | None,
    guidance: jax.Array,
    use_guidance: bool,
) -> jax.Array:
    """Deterministic guided DDIM from `latents` [B,h,w,C]; the input of each step, [B,S,h,w,C]."""

    def step(x, i):
        t = plan.timesteps[i]
        out = guided_model_output(model_fn, params, x, t, cond, uncond, guidance, use_guidance)
        x_next = ddim_step(
            out,
            t,
            plan.prev_timesteps[i],
            x,
            plan.alphas_cumprod,
            plan.final_alpha_cumprod,
            prediction_type=plan.prediction_type,
            clip_sample=plan.clip_sample,
            clip_sample_range=plan.clip_sample_range,
        )
        return x_next, x

    _, inputs = jax.lax.scan(step, latents, jnp.arange(plan.num_steps))
    return jnp.swapaxes(inputs, 0, 1)


_trajectory_jit = jax.jit(_trajectory_loop, static_argnames=("model_fn", "use_guidance"))


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
    key = cache_key(
        kind="trajectories",
        model=model_id or str(pipe.source),
        prompts=list(prompts),
        per_prompt=per_prompt,
        steps=steps,
        guidance=guidance,
        seed=seed,
        size=[height, width],
        dtype=str(pipe.unet.dtype),
    )
    plan = ddim_plan(schedule_from_config(pipe.scheduler_config), steps)

    def build():
        shape = latent_shape(pipe, height, width)
        noise = initial_noise(seed, len(prompts), per_prompt, shape)
        cond = np.repeat(encode_prompt_set(pipe, prompts), per_prompt, axis=0)
        use_guidance = uses_guidance(guidance)
        uncond = jnp.asarray(encode_prompt_set(pipe, [""])[0]) if use_guidance else None
        graphdef, params = nnx.split(pipe.unet)
        n = noise.shape[0]
        chunk = max(1, min(batch_size, n))
        out = []
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            x, c = noise[rows], cond[rows]
            pad = chunk - x.shape[0]  # one compiled shape for every chunk
            if pad:
                x = np.concatenate([x, np.repeat(x[-1:], pad, 0)])
                c = np.concatenate([c, np.repeat(c[-1:], pad, 0)])
            result = _trajectory_jit(
                unet_model_fn(graphdef),
                params,
                plan,
                jnp.asarray(x),
                jnp.asarray(c),
                uncond,
                jnp.float32(guidance),
                use_guidance,
            )
            out.append(np.asarray(result, np.float32)[: chunk - pad])
        return {"x_t": np.concatenate(out)}

    arrays = load_or_build(cache_dir, "trajectories", key, build)
    index = np.repeat(np.arange(len(prompts), dtype=np.int32), per_prompt)
    return Trajectories(arrays["x_t"], np.asarray(plan.timesteps, np.int32), index)


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
        out = []
        chunk = max(1, min(batch_size, count))
        for start in range(0, count, chunk):
            images = np.stack([load(k) for k in range(start, min(start + chunk, count))])
            pad = chunk - images.shape[0]
            if pad:
                images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])
            out.append(np.asarray(_encode_images(pipe.vae, jnp.asarray(images)))[: chunk - pad])
        return {"x0": np.concatenate(out)}

    arrays = load_or_build(cache_dir, "images", key, build)
    index = (np.arange(count) % num_prompts).astype(np.int32)
    return Latents(arrays["x0"], index)
