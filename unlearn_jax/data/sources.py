"""Forget/retain training data: text embeddings, x0 latents and ESD's partial trajectories.

Where no images are given, x0 comes from θ0's own generations for the prompts
(DDIM with guidance, `text_to_image.generate(..., return_latents=True)`); ESD
trains on x_t taken from partial θ0 trajectories for the forget prompts. Both
are generated once and cached in `<workdir>/cache/` as .npz files named by a
hash of everything that produced them (model files, prompts, sampler
settings, seed), so a resumed or repeated run reuses them and a changed
setting can never pick up stale data. An image folder can replace the
generations: its images are VAE-encoded (posterior mode) instead.

Shapes: latents are NHWC, [N, h, w, C]; text embeddings [P, L, D].
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.diffusion.ddim import DDIMPlan, ddim_plan, ddim_step
from unlearn_jax.diffusion.sampler import ModelFn, guided_model_output, uses_guidance
from unlearn_jax.diffusion.schedule import schedule_from_config
from unlearn_jax.diffusion.text_to_image import generate, initial_noise, latent_shape, unet_model_fn
from unlearn_jax.models.pipeline import StableDiffusion
from unlearn_jax.models.weights import find_weight_files

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the content of a cached array changes meaning
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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


def model_identity(path: str | os.PathLike) -> dict:
    """What identifies a model folder's content cheaply: its path and weight files' sizes/times."""
    folder = Path(path).expanduser().absolute()
    files = {}
    for component in ("unet", "vae", "text_encoder"):
        for f in find_weight_files(folder / component):
            stat = f.stat()
            files[f"{component}/{f.name}"] = [stat.st_size, stat.st_mtime_ns]
    return {"path": str(folder), "files": files}


def model_key(path: str | os.PathLike) -> dict | str:
    """What identifies a model in cache keys: a folder's `model_identity`, or a hub id's name
    (a hub snapshot is immutable)."""
    return model_identity(path) if Path(path).expanduser().exists() else str(path)


def cache_key(**fields) -> str:
    """A short hex digest of the JSON of `fields` (sorted keys)."""
    payload = json.dumps({"version": CACHE_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_or_build(cache_dir: Path | None, name: str, key: str, build) -> dict[str, np.ndarray]:
    """The arrays cached as `<cache_dir>/<name>-<key>.npz`, or `build()`, cached atomically."""
    path = None if cache_dir is None else Path(cache_dir) / f"{name}-{key}.npz"
    if path is not None and path.is_file():
        with np.load(path) as data:
            log.info("using cached %s from %s", name, path)
            return {k: data[k] for k in data.files}
    arrays = build()
    if path is not None and jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    return arrays


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


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files of a folder (not recursive), sorted by name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder {folder} does not exist. Fix: point forget.images / retain.images "
            "to a folder of .png/.jpg files, or leave it empty to use θ0's generations."
        )
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"image folder {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return files


def _fit_image(image, height: int, width: int) -> np.ndarray:
    """A PIL image as RGB [H, W, 3] float32 in [-1, 1]: center crop to the aspect ratio, resize."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    scale = min(w / width, h / height)
    cw, ch = round(width * scale), round(height * scale)
    left, top = (w - cw) // 2, (h - ch) // 2
    image = image.crop((left, top, left + cw, top + ch)).resize((width, height), Image.BICUBIC)
    return np.asarray(image, np.float32) / 127.5 - 1.0


def _load_image(path: Path, height: int, width: int) -> np.ndarray:
    """An image file as RGB [H, W, 3] float32 in [-1, 1] (see `_fit_image`)."""
    from PIL import Image

    with Image.open(path) as image:
        return _fit_image(image, height, width)


TFDS_PREFIX = "tfds:"


def tfds_images(spec: str, count: int, image_key: str = "image") -> tuple[list[np.ndarray], dict]:
    """The first `count` images of a prepared TFDS split, in record order (never downloads).

    Args:
      spec: 'tfds:NAME[/CONFIG][:SPLIT]' (a dataset prepared under the TFDS data dir,
        `TFDS_DATA_DIR` or ~/tensorflow_datasets) or 'tfds:DIR[:SPLIT]' (a prepared
        dataset's version folder, e.g. .../unlearn_jax_world/small/1.0.0). SPLIT
        defaults to 'train'.
      count: how many examples; fewer in the split is an error.
    Returns:
      (uint8 [H, W, 3] arrays, what identifies them for the cache).
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            f"{spec!r} needs tensorflow-datasets: pip install 'unlearn_jax[tfds]', or give a "
            "folder of image files instead."
        ) from e
    name, _, split = spec[len(TFDS_PREFIX) :].partition(":")
    split = split or "train"
    if name.startswith("unlearn_jax_world"):
        from unlearn_jax.data.world_tfds import builder_class

        builder_class()  # registers the embedded world's builder with TFDS
    try:
        if Path(name).expanduser().is_dir():
            builder = tfds.builder_from_directory(str(Path(name).expanduser()))
        else:
            builder = tfds.builder(name)
        if split not in builder.info.splits:
            known = ", ".join(builder.info.splits)
            raise ValueError(f"{spec!r}: no split {split!r}; the dataset has {known}")
        available = builder.info.splits[split].num_examples
        if available < count:
            raise ValueError(
                f"{spec!r} holds {available} examples in {split!r}, {count} are needed "
                "(prompts x images_per_prompt). Fix: lower images_per_prompt or use a bigger split."
            )
        if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:  # random access
            source = builder.as_data_source(split=split)
            images = [np.asarray(source[k][image_key]) for k in range(count)]
        else:  # tfrecord: read in order
            dataset = builder.as_dataset(split=f"{split}[:{count}]", shuffle_files=False)
            images = [np.asarray(example[image_key]) for example in tfds.as_numpy(dataset)]
    except (tfds.core.registered.DatasetNotFoundError, AssertionError) as e:
        raise FileNotFoundError(
            f"{spec!r} is not a prepared TFDS dataset ({e}). Fix: prepare it first "
            "(builder.download_and_prepare() on a machine that can), or give its version folder "
            "as tfds:DIR[:SPLIT]."
        ) from e
    identity = {"dataset": builder.info.full_name, "split": split, "count": count}
    return images, identity


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
            return _fit_image(Image.fromarray(arrays[k]), *size)

    else:
        files = list_images(folder)
        identity = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        count = len(files)

        def load(k: int) -> np.ndarray:
            return _load_image(files[k], *size)

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
