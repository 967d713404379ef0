"""Text to image with a loaded Stable Diffusion: noise, text embeddings, a solver, VAE decode.

The glue between `models.pipeline.StableDiffusion` and the generic scan
sampler. The UNet enters the sampler as `(graphdef, params)`: `unet_model_fn`
returns one model function per graph structure, so the original and an
unlearned UNet (same structure, other parameters) share one compiled sampler.

Initial noise follows the integrity metric's definition: image j of prompt i
starts from `normal(fold_in(key(seed), i * S + j))`, S images per prompt, so a
prompt's images do not depend on which other prompts are in the set.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from unlearn_jax import exported_programs
from unlearn_jax.diffusion.chunks import (
    in_background,
    map_in_chunks,
    precompile_chunks,
    sample_in_chunks,
)
from unlearn_jax.diffusion.sampler import ModelFn, uses_guidance
from unlearn_jax.diffusion.solvers import check_scheduler, make_plan
from unlearn_jax.models.pipeline import PipelineStructure, StableDiffusion, encode_ids
from unlearn_jax.program_cache import ProgramCache


class NonFiniteImagesError(FloatingPointError):
    """Generation produced NaN or infinite pixels."""


@functools.cache
def unet_model_fn(graphdef: nnx.GraphDef) -> ModelFn:
    """The sampler's `model_fn(params, latents, t, context)` for a UNet graph structure."""

    def apply(params, latents, timesteps, context):
        return nnx.merge(graphdef, params)(latents, timesteps, context)

    return apply


def latent_shape(
    pipe: StableDiffusion | PipelineStructure, height: int | None, width: int | None
) -> tuple:
    """(h, w, C) of the latents for an image size; default: the UNet's training size.

    Raises:
      ValueError: if the size does not divide by the model's total downsampling.
    """
    vae_factor = pipe.vae_scale_factor
    unet_factor = 2 ** (len(pipe.unet.config["down_block_types"]) - 1)
    default = pipe.unet.config["sample_size"] * vae_factor
    height, width = height or default, width or default
    factor = vae_factor * unet_factor
    if height % factor or width % factor:
        raise ValueError(
            f"height and width must be multiples of {factor} for this model (the VAE "
            f"downsamples by {vae_factor}, the UNet by {unet_factor}); got {height}x{width}. "
            f"Fix: e.g. --height {max(factor, height // factor * factor)} "
            f"--width {max(factor, width // factor * factor)}."
        )
    return height // vae_factor, width // vae_factor, pipe.unet.config["in_channels"]


@functools.partial(jax.jit, static_argnums=2)
def _noise_bits(key: jax.Array, ids: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 bits [len(ids), *shape]: row r is `jax.random.bits(fold_in(key, ids[r]), shape)`."""
    return jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(key, i), shape, jnp.uint32))(ids)


@functools.cache
def _compiled_noise_bits(count: int, shape: tuple[int, ...]) -> Callable:
    """`_noise_bits` for `count` rows of `shape`, compiled once per process.

    On CPU without LLVM's optimisations: XLA:CPU spends ~5 s optimising the
    (partitionable) threefry hash of even a small draw, 0.5 s without, and
    integer arithmetic gives the same bits either way (the float transform that
    could differ by an ulp is `_bits_to_normal`, compiled normally).
    """
    key = jax.eval_shape(lambda: jax.random.key(0))
    ids = jax.ShapeDtypeStruct((count,), jnp.uint32)
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
    return _noise_bits.lower(key, ids, shape).compile(compiler_options=options)


@jax.jit
def _bits_to_normal(bits: jax.Array) -> jax.Array:
    """Standard normal float32 from uint32 bits, as `jax.random.normal` maps its bits.

    Uniform on [nextafter(-1, 0), 1) from the 23 mantissa bits, then sqrt(2) erfinv(u);
    tests check bit-equality with `jax.random.normal` for the same key.
    """
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    mantissa = jax.lax.shift_right_logical(bits, jnp.uint32(32 - 23))
    one_to_two = jax.lax.bitcast_convert_type(mantissa | jnp.uint32(0x3F800000), jnp.float32)
    u = jax.lax.max(lo, (one_to_two - 1.0) * (np.float32(1.0) - lo) + lo)
    return np.float32(np.sqrt(2)) * jax.lax.erf_inv(u)


def initial_noise(seed: int, num_prompts: int, per_prompt: int, shape: Sequence[int]) -> np.ndarray:
    """Noise [P*S, *shape] float32, prompt-major; entry i*S+j is
    `jax.random.normal(fold_in(key(seed), i*S+j), shape)`.

    One compiled program per (count, shape), whatever the seed: evaluations of many
    runs in one process (the demo's) draw their noise without compiling again.
    """
    count, shape = num_prompts * per_prompt, tuple(int(d) for d in shape)
    ids = jnp.arange(count, dtype=jnp.uint32)
    bits = _compiled_noise_bits(count, shape)(jax.random.key(seed), ids)
    return np.asarray(_bits_to_normal(bits), dtype=np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef: nnx.GraphDef, state: nnx.State, latents: jax.Array) -> jax.Array:
    vae = nnx.merge(graphdef, state)
    image = vae.decode(latents / vae.scaling_factor)
    return jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def _decode_chunk(num_images: int, batch_size: int) -> int:
    return max(1, min(batch_size, num_images))


# The decoder's and the text encoder's programs that `precompile` compiled, by what they
# take. `generate` calls these instead of `jax.jit`'s dispatch, which would trace the
# module again when the program came from a kept trace (`exported_programs`).
PRECOMPILED = ProgramCache("precompiled decoder and text-encoder programs", max_size=8)


def _signature(kind: str, graphdef: nnx.GraphDef, state: nnx.State, rows) -> tuple:
    """What a precompiled program of `kind` takes: graph, state shapes, input shape."""
    shapes = tuple((tuple(np.shape(x)), str(x.dtype)) for x in jax.tree.leaves(state))
    return kind, graphdef, shapes, (tuple(np.shape(rows)), str(rows.dtype))


def _call_precompiled(kind: str, graphdef, state, rows, traced: Callable):
    """The precompiled program of `kind` on (state, rows), else `traced(graphdef, state, rows)`.

    The program was compiled for the state's placement at load time (one device); a
    state moved to other devices since goes through jit's own dispatch instead.
    """
    future = PRECOMPILED.get(_signature(kind, graphdef, state, rows))
    if future is not None:
        program = future.result()
        # None: an input the program does not read (the VAE's encoder, for the decoder).
        placed = jax.tree.leaves(program.input_shardings[0][0], is_leaf=lambda s: s is None)
        if all(_placed_as(x, s) for x, s in zip(jax.tree.leaves(state), placed, strict=True)):
            return program(state, rows)
    return traced(graphdef, state, rows)


def _placed_as(x, sharding: jax.sharding.Sharding) -> bool:
    """Whether `x` (an array; host values go anywhere) already lies as `sharding` says."""
    if sharding is None or not isinstance(x, jax.Array):
        return True
    return x.sharding.is_equivalent_to(sharding, x.ndim)


def decode_latents(pipe: StableDiffusion, latents: np.ndarray, batch_size: int) -> np.ndarray:
    """Images [N,H,W,3] in [0,1] from final latents [N,h,w,C], in fixed-size chunks."""
    n = latents.shape[0]
    if n == 0:
        return np.zeros((0,), np.float32)
    graphdef, state = nnx.split(pipe.vae)

    def decode(rows):  # NumPy rows, not jnp.asarray: see `StableDiffusion.encode_prompts`
        return _call_precompiled("vae_decoder", graphdef, state, np.asarray(rows), _decode)

    return map_in_chunks(decode, latents, size=_decode_chunk(n, batch_size))


def encode_prompts(pipe: StableDiffusion, prompts: list[str]) -> jax.Array:
    """`pipe.encode_prompts(prompts)`, through `precompile`'s program when there is one."""
    graphdef, state = nnx.split(pipe.text_encoder)
    return _call_precompiled("text_encoder", graphdef, state, pipe.tokenize(prompts), encode_ids)


def _abstract(tree):
    """Shapes and dtypes only (no shardings, no data) of a state's leaves."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


class Precompiled(NamedTuple):
    """Futures of `precompile`'s programs (each done, or holding its compile error)."""

    sampler: concurrent.futures.Future
    decoder: concurrent.futures.Future
    text_encoder: concurrent.futures.Future | None


def precompile(
    structure: PipelineStructure,
    num_images: int,
    *,
    num_prompts: int | None = None,
    steps: int = 50,
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    eta: float = 0.0,
    mesh: Mesh | None = None,
    scheduler: str = "ddim",
) -> Precompiled:
    """Starts compiling what `generate` with these settings will run.

    Compilation happens on worker threads from the structure's shapes alone,
    so the caller can load the weights meanwhile (`load_pipeline(...,
    structure=structure)`) and then call `generate` with the same settings,
    which picks the compiled programs up instead of compiling them again.
    The text encoder and the decoder are lowered first: they compile on the
    idle core while the sampler, the longest to compile, is still being traced
    (measured: lowering the sampler first made it compile 1.4 s longer, contended
    by both while the weights load).

    Args:
      structure: `pipeline.read_structure(...)`, before or while its weights load.
      num_images: P*S, the number of images `generate` will make.
      num_prompts: P, to compile the text encoder's one call for P prompts (and
        the empty prompt when guided); None: it compiles when first called.
      steps, guidance, height, width, batch_size, eta, mesh, scheduler: as for `generate`.

    Returns:
      The futures of the sampler's, the decoder's and the text encoder's
      (None without `num_prompts`) compilation.
    """
    check_scheduler(scheduler)
    shape = latent_shape(structure, height, width)
    # denoise()'s one text-encoder call: the prompts and, when guided, the empty prompt.
    # Lowered in any case: its output is the sampler's context shape.
    rows = 1 if num_prompts is None else num_prompts + int(uses_guidance(guidance))
    tokens = structure.text_encoder.config["max_position_embeddings"]
    text_lowered, text_signature = _lower_module(
        structure, structure.text_encoder, encode_ids, "text_encoder",
        jax.ShapeDtypeStruct((rows, tokens), jnp.int32),
    )  # fmt: skip
    context = text_lowered.out_info
    text_encoder = None
    if num_prompts is not None:
        text_encoder = _compile_in_background(text_lowered, text_signature)
    decoder = _compile_in_background(
        *_lower_module(
            structure, structure.vae, _decode, "vae_decoder",
            jax.ShapeDtypeStruct((_decode_chunk(num_images, batch_size), *shape), jnp.float32),
        )
    )  # fmt: skip
    graphdef, state = nnx.split(structure.unet)
    sampler = precompile_chunks(
        unet_model_fn(graphdef),
        _abstract(state),
        make_plan(scheduler, structure.scheduler_config, steps),
        total=num_images,
        latent_shape=shape,
        context_shape=context.shape[1:],
        context_dtype=context.dtype,
        batch_size=batch_size,
        guidance_scale=guidance,
        eta=eta,
        mesh=mesh,
        identity=_identity(structure, structure.unet),
    )
    return Precompiled(sampler, decoder, text_encoder)


def _lower_module(
    structure: PipelineStructure, module: nnx.Module, fn: Callable, name: str, rows
) -> tuple[jax.stages.Lowered, tuple]:
    """`fn(graphdef, state, rows)` of one of the structure's modules, lowered (through a
    kept trace, `exported_programs`), and the `PRECOMPILED` signature of its program."""
    graphdef, state = nnx.split(module)
    args = (_abstract(state), rows)
    identity = _identity(structure, module)
    lowered = exported_programs.lower(fn, args, name=name, identity=identity, leading=(graphdef,))
    return lowered, _signature(name, graphdef, *args)


def _compile_in_background(lowered: jax.stages.Lowered, signature: tuple):
    """Compiles `lowered` on a worker; `generate` finds the future in `PRECOMPILED`."""
    future = in_background(lowered.compile)
    PRECOMPILED.get_or_create(signature, lambda: future)
    return future


def _identity(structure: PipelineStructure, module: nnx.Module) -> str:
    """What a program of one of the structure's modules computes, beyond the package's
    source: the module's class, config and dtypes (`exported_programs` names a kept
    trace by it)."""
    return json.dumps(
        {
            "class": f"{type(module).__module__}.{type(module).__qualname__}",
            "config": module.config.to_dict(),
            "dtype": str(jnp.dtype(structure.dtype)),
            "param_dtype": str(jnp.dtype(structure.param_dtype)),
        },
        sort_keys=True,
        default=repr,
    )


def check_finite(images: np.ndarray, prompts: Sequence[str], per_prompt: int) -> None:
    """Raises NonFiniteImagesError naming the prompts whose images have NaN/inf pixels."""
    bad = ~np.isfinite(images.reshape(images.shape[0], -1)).all(axis=1)
    if bad.any():
        names = sorted({prompts[i // per_prompt] for i in np.flatnonzero(bad)})
        raise NonFiniteImagesError(
            f"{int(bad.sum())} of {len(images)} images contain NaN/inf pixels (prompts: "
            f"{', '.join(repr(p) for p in names[:5])}). Usual causes: fp16/bf16 overflow in "
            "the VAE or UNet (run with --dtype float32), or weights that diverged during "
            "unlearning (check the training loss)."
        )


def denoise(
    pipe: StableDiffusion,
    prompts: Sequence[str],
    *,
    num_images_per_prompt: int = 1,
    steps: int = 50,
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    latents: np.ndarray | None = None,
    unet_params: nnx.State | None = None,
    batch_size: int = 8,
    eta: float = 0.0,
    mesh: Mesh | None = None,
    progress: bool = True,
    scheduler: str = "ddim",
    trajectory: bool = False,
) -> np.ndarray:
    """`generate` without the VAE decoder: final latents [P*S, h, w, C], prompt-major.

    Args: as `generate`; `trajectory` returns the latents the UNet saw at every
    step instead, [P*S, steps, h, w, C] (ESD's x_t source).
    """
    prompts = list(prompts)
    check_scheduler(scheduler)
    if not prompts:
        raise ValueError("no prompts given. Fix: pass --prompt TEXT or a non-empty --prompts file.")
    n = len(prompts) * num_images_per_prompt
    shape = latent_shape(pipe, height, width)
    if latents is None:
        latents = initial_noise(seed, len(prompts), num_images_per_prompt, shape)
    elif tuple(latents.shape) != (n, *shape):
        raise ValueError(
            f"initial latents have shape {tuple(latents.shape)} (NHWC); expected {(n, *shape)} "
            f"for {len(prompts)} prompts x {num_images_per_prompt} images at this size."
        )
    # One text-encoder call (and compile) for the prompts and the empty prompt.
    with_empty = prompts + [""] if uses_guidance(guidance) else prompts
    encoded = np.asarray(encode_prompts(pipe, with_empty))
    uncond = encoded[len(prompts)] if uses_guidance(guidance) else None
    cond = np.repeat(encoded[: len(prompts)], num_images_per_prompt, axis=0)
    return denoise_contexts(
        pipe,
        cond,
        uncond,
        latents,
        steps=steps,
        guidance=guidance,
        unet_params=unet_params,
        batch_size=batch_size,
        eta=eta,
        seed=seed,
        mesh=mesh,
        progress=progress,
        scheduler=scheduler,
        trajectory=trajectory,
    )


def denoise_contexts(
    pipe: StableDiffusion,
    cond: np.ndarray,
    uncond: np.ndarray | None,
    latents: np.ndarray,
    *,
    steps: int,
    guidance: float,
    unet_params: nnx.State | None = None,
    batch_size: int = 8,
    eta: float = 0.0,
    seed: int = 0,
    mesh: Mesh | None = None,
    progress: bool = True,
    scheduler: str = "ddim",
    trajectory: bool = False,
) -> np.ndarray:
    """The sampler from given text contexts: `denoise` after its prompt encoding.

    Args:
      cond: [N, L, D] one context per image (e.g. with learned tokens spliced in).
      uncond: [L, D] the empty prompt's context; needed iff guidance > 1.
      latents: [N, h, w, C] initial noise.
      others: as `generate`.
    Returns:
      [N, h, w, C] final latents, or [N, steps, h, w, C] with `trajectory`.
    """
    check_scheduler(scheduler)
    graphdef, state = nnx.split(pipe.unet)
    return sample_in_chunks(
        unet_model_fn(graphdef),
        state if unet_params is None else unet_params,
        make_plan(scheduler, pipe.scheduler_config, steps),
        np.asarray(latents, np.float32),
        cond,
        uncond,
        batch_size=batch_size,
        guidance_scale=guidance,
        eta=eta,
        key=jax.random.key(seed) if eta > 0 else None,
        mesh=mesh,
        progress=progress,
        trajectory=trajectory,
    )


def generate(
    pipe: StableDiffusion,
    prompts: Sequence[str],
    *,
    num_images_per_prompt: int = 1,
    steps: int = 50,
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    latents: np.ndarray | None = None,
    unet_params: nnx.State | None = None,
    batch_size: int = 8,
    eta: float = 0.0,
    mesh: Mesh | None = None,
    progress: bool = True,
    scheduler: str = "ddim",
) -> np.ndarray:
    """Images [P*S, H, W, 3] float32 in [0,1], prompt-major, like diffusers' pipeline.

    Args:
      pipe: the loaded pipeline.
      prompts: P prompts; each is encoded once.
      num_images_per_prompt: S.
      steps, guidance, eta: denoising steps, CFG weight (<= 1: no guidance), DDIM eta.
      height, width: image size; default the UNet's native size.
      seed: seed of the initial noise (see module docstring) and of eta > 0 noise.
      latents: optional initial noise [P*S, h, w, C] (NHWC), instead of the seed's.
      unet_params: UNet state to use instead of `pipe.unet`'s (same structure),
        e.g. an unlearned model; shares the compiled sampler.
      batch_size: images per compiled chunk (rounded up to the mesh's data axis).
      mesh: optional mesh with a 'data' axis to shard each chunk over.
      progress: show progress bars.
      scheduler: the solver, one of `solvers.SCHEDULERS` ('ddim', 'dpmpp_2m',
        'euler'), built from the folder's scheduler config as diffusers'
        `<Scheduler>.from_config` builds it; eta applies to 'ddim' only.
    """
    final = denoise(
        pipe,
        prompts,
        num_images_per_prompt=num_images_per_prompt,
        steps=steps,
        guidance=guidance,
        height=height,
        width=width,
        seed=seed,
        latents=latents,
        unet_params=unet_params,
        batch_size=batch_size,
        eta=eta,
        mesh=mesh,
        progress=progress,
        scheduler=scheduler,
    )
    images = decode_latents(pipe, final, batch_size)
    check_finite(images, list(prompts), num_images_per_prompt)
    return images
