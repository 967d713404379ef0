"""Streaming a prompt set through one compiled sampler, chunk by chunk, over a device mesh.

Every chunk has the same shape (the last one is padded by repeating its last
row, and the padding dropped), so the sampler compiles once however many
prompts there are. `pad_rows`, `padded_chunks` and `map_in_chunks` are that
padding for every fixed-shape program of the package (decoder, encoders,
metrics, classifiers). Each chunk's batch is sharded over the mesh axis 'data';
parameters, the solver plan and the empty-prompt embedding are placed on the
mesh once, replicated (parameters the caller already laid out on the mesh,
e.g. FSDP shards, stay as they are).

Compilation is explicit: the program for one chunk is lowered from abstract
inputs (`jax.ShapeDtypeStruct` with their shardings) and compiled ahead of
time, and the executable is kept, keyed by everything it is specialised to
(model function, solver kind and step count, shapes, dtypes, shardings, eta,
guidance on/off). `precompile_chunks` starts that compilation on a worker
thread and returns at once: XLA releases the GIL while it compiles, so a
caller can load weights and encode prompts meanwhile (`unlearn-jax sample`
does; on a small model that hides most of the compile time).
`sample_in_chunks` then waits for that executable instead of compiling its own.
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unlearn_jax import exported_programs
from unlearn_jax.diffusion.sampler import (
    ModelFn,
    Params,
    checked_options,
    placeholder_key,
    sample_jit,
)
from unlearn_jax.diffusion.solvers import SolverPlan
from unlearn_jax.models.attention import batch_mesh
from unlearn_jax.program_cache import ProgramCache, compile_program

DATA_AXIS = "data"

# Sampler programs by everything they are specialised to (see `_program_key_and_args`).
CHUNK_PROGRAMS = ProgramCache("sampler chunk programs", max_size=16)


@functools.cache
def _worker() -> concurrent.futures.ThreadPoolExecutor:
    """The precompile threads, started on first use. Three: XLA compiles a program on
    one thread, and the sampler should not wait behind the smaller programs (the text
    encoder and the VAE decoder) queued before it."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=3, thread_name_prefix="precompile")


def data_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: all) with the batch axis named 'data'."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def chunk_size(total: int, batch_size: int, mesh: Mesh) -> int:
    """Rows per chunk: batch_size (at most total), rounded up to a multiple of the data axis."""
    shards = mesh.shape[DATA_AXIS]
    # Never pad a small set up to a large batch_size: one compile either way.
    chunk = min(max(batch_size, 1), max(total, 1))
    return -(-chunk // shards) * shards


def _leaf_sharding(leaf: Any, mesh: Mesh) -> NamedSharding:
    """The leaf's own sharding when it already lives on `mesh`, else replicated."""
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
        return sharding
    return NamedSharding(mesh, PartitionSpec())


def _replicate_on(mesh: Mesh, tree: Any) -> Any:
    """Places leaves on `mesh` as `_leaf_sharding` says (a no-op for those already there)."""
    return jax.tree.map(lambda x: jax.device_put(x, _leaf_sharding(x, mesh)), tree)


def _spec(x: Any, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def _program_key_and_args(
    model_fn, params, plan, row_shapes, uncond, key, *, chunk, mesh, eta, use_guidance, trajectory
):
    """(cache key, abstract arguments) of the chunk program; row_shapes: per-row (shape, dtype)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    batch = lambda shape, dtype: jax.ShapeDtypeStruct((chunk, *shape), dtype, sharding=rows)
    (latent_shape, latent_dtype), (context_shape, context_dtype) = row_shapes
    args = (
        jax.tree.map(lambda x: _spec(x, _leaf_sharding(x, mesh)), params),
        jax.tree.map(lambda x: _spec(x, replicated), plan),
        batch(latent_shape, latent_dtype),
        batch(context_shape, context_dtype),
        None if uncond is None else _spec(uncond, replicated),
        jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated),
        _spec(key, replicated),
        batch((), jnp.int32),
    )
    leaves, treedef = jax.tree.flatten(args)
    return (model_fn, eta, use_guidance, trajectory, treedef, tuple(leaves)), args


def _program(
    model_fn,
    args,
    eta: float,
    use_guidance: bool,
    key,
    *,
    trajectory: bool = False,
    background: bool = False,
    identity: str | None = None,
) -> concurrent.futures.Future:
    """The future executable for `key`; compiles it (here, or on the worker) if nobody has.

    Tracing and lowering always run on the calling thread: they hold the GIL,
    and finishing them before the caller goes on to Python-heavy work (loading
    weights) starts XLA's GIL-free compilation as early as possible. Given the
    model's `identity` (see `exported_programs.module_path`), a program traced by
    an earlier process is read back instead of traced again.
    """
    future, created = CHUNK_PROGRAMS.get_or_create(key, concurrent.futures.Future)
    if not created:
        return future

    def fail(e: BaseException) -> None:  # raised to whoever waits for the future
        CHUNK_PROGRAMS.discard(key)
        future.set_exception(e)

    def compile_into_future(lowered) -> None:
        try:
            future.set_result(compile_program(lowered))
        except BaseException as e:
            fail(e)

    try:
        # The rows' mesh: kernels XLA cannot partition (TPU attention) run per device on it.
        with batch_mesh(jax.tree.leaves(args)[-1].sharding.mesh):
            lowered = exported_programs.lower(
                sample_jit,
                args,
                name="sampler",
                identity=identity,
                leading=(model_fn,),
                eta=eta,
                use_guidance=use_guidance,
                trajectory=trajectory,
            )
    except BaseException as e:
        fail(e)
        raise
    if background:
        _worker().submit(compile_into_future, lowered)
    else:
        compile_into_future(lowered)
    return future


def precompile_chunks(
    model_fn: ModelFn,
    params: Params,
    plan: SolverPlan,
    *,
    total: int,
    latent_shape: tuple[int, ...],
    context_shape: tuple[int, ...],
    context_dtype: Any,
    batch_size: int,
    guidance_scale: float = 7.5,
    eta: float = 0.0,
    mesh: Mesh | None = None,
    identity: str | None = None,
) -> concurrent.futures.Future:
    """Compiles, on a worker thread, the program `sample_in_chunks` will run; returns at once.

    Args:
      model_fn, plan: as `sample_in_chunks` will get them.
      params: the parameters or their abstract shapes (e.g. an `nnx.eval_shape`
        module's state): only shapes, dtypes and shardings are read.
      total: number of examples that will be sampled.
      latent_shape: per-example latent shape (h, w, C), float32.
      context_shape, context_dtype: per-example prompt embedding (L, D) and its dtype.
      batch_size, guidance_scale, eta, mesh: as `sample_in_chunks` will get them.
      identity: what `model_fn` computes, as a string (e.g. the model's class,
        config and dtypes): lets a later process read this trace back from
        `exported_programs.folder()`, when the CLI set one. None: traced every time.

    Returns:
      A future that is done when the program is compiled (or holds the error).
    """
    mesh = mesh if mesh is not None else data_mesh(jax.local_devices()[:1])
    use_guidance, key, uncond = checked_options(
        plan,
        guidance_scale,
        eta,
        placeholder_key(),  # generate()'s keys are jax.random.key(seed): the same spec
        jax.ShapeDtypeStruct(context_shape, context_dtype),
    )
    cache_key, args = _program_key_and_args(
        model_fn,
        params,
        plan,
        ((latent_shape, jnp.float32), (context_shape, context_dtype)),
        uncond,
        key,
        chunk=chunk_size(total, batch_size, mesh),
        mesh=mesh,
        eta=float(eta),
        use_guidance=use_guidance,
        trajectory=False,
    )
    return _program(
        model_fn, args, float(eta), use_guidance, cache_key, background=True, identity=identity
    )


def in_background(fn: Callable[[], Any]) -> concurrent.futures.Future:
    """Runs `fn` on a precompile worker thread."""
    return _worker().submit(fn)


def pad_rows(rows: Any, size: int) -> Any:
    """`rows` (an array or a list) with its last row repeated up to `size` rows along axis 0.

    Repeating a real example (rather than zeros) keeps padded rows well inside
    the model's input distribution, so they cannot produce NaNs or warnings.
    """
    missing = size - len(rows)
    if missing <= 0:
        return rows
    if isinstance(rows, list):
        return rows + [rows[-1]] * missing
    rows = np.asarray(rows)
    return np.concatenate([rows, np.repeat(rows[-1:], missing, axis=0)], axis=0)


def padded_chunks(*inputs: Any, size: int) -> Iterator[tuple[tuple[Any, ...], int]]:
    """(the inputs' rows of one chunk, each padded to the chunk size; the real row count).

    Every chunk has min(size, N) rows, so a jitted function of a chunk compiles
    once; the inputs (arrays or lists, N rows each) are read a chunk at a time.
    """
    total = len(inputs[0])
    if any(len(x) != total for x in inputs):
        raise ValueError(f"inputs of different lengths: {[len(x) for x in inputs]}")
    size = max(1, min(size, total))
    for start in range(0, total, size):
        rows = [x[start : start + size] for x in inputs]
        yield tuple(pad_rows(r, size) for r in rows), len(rows[0])


def map_in_chunks(fn: Callable[..., Any], *inputs: Any, size: int) -> Any:
    """fn over fixed-size chunks of `inputs` (see `padded_chunks`), outputs concatenated.

    Args:
      fn: chunk rows of each input -> an array or a pytree of arrays, rows first.
      inputs: N rows each (NumPy/JAX arrays or lists).
      size: rows per call (at most N).
    Returns:
      fn's output structure with N rows (the padding dropped), as NumPy arrays.
    """
    outs = [
        jax.tree.map(lambda a, n=real: np.asarray(a)[:n], fn(*rows))
        for rows, real in padded_chunks(*inputs, size=size)
    ]
    if not outs:
        raise ValueError("no rows to process")
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host; across processes (a multi-host mesh) every process gets it."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sample_in_chunks(
    model_fn: ModelFn,
    params: Params,
    plan: SolverPlan,
    latents: Any,
    cond_context: Any,
    uncond_context: Any | None = None,
    *,
    batch_size: int,
    guidance_scale: float = 7.5,
    eta: float = 0.0,
    key: jax.Array | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
    trajectory: bool = False,
) -> np.ndarray:
    """Samples a large prompt set in fixed-size chunks through one compiled program.

    The next chunk is dispatched before the previous one is copied to the
    host, so the devices stay busy. A mesh may span several processes
    (multi-host): every process then receives all N rows.

    Args:
      model_fn, params, plan: as in `sampler.sample`.
      latents: [N,h,w,C] initial noise (NumPy or JAX; read chunk by chunk).
      cond_context: [N,L,D] prompt embeddings.
      uncond_context: [L,D] empty-prompt embedding; needed iff guidance_scale > 1.
      batch_size: examples per chunk (before rounding up to the data axis' size).
      guidance_scale, eta, key: as in `sampler.sample`; example i uses noise
        stream i, so the result equals one `sample` over all N examples.
      mesh: mesh with a 'data' axis (e.g. `data_mesh()` for all devices);
        default: this process's first device alone.
      progress: show a tqdm progress bar over examples.
      trajectory: return every step's model input, [N,steps,h,w,C] (`sampler.sample`).

    Returns:
      [N,h,w,C] float32 NumPy array of final latents (or the trajectories).
    """
    total = latents.shape[0]
    if cond_context.shape[0] != total:
        raise ValueError(f"{total} latents but {cond_context.shape[0]} cond embeddings")
    if total == 0:
        steps = (plan.num_steps,) if trajectory else ()
        return np.zeros((0, *steps, *latents.shape[1:]), np.float32)
    mesh = mesh if mesh is not None else data_mesh(jax.local_devices()[:1])
    use_guidance, key, uncond_context = checked_options(
        plan, guidance_scale, eta, key, uncond_context
    )
    chunk = chunk_size(total, batch_size, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    params, plan = _replicate_on(mesh, (params, plan))
    if uncond_context is not None:
        # Host arrays go straight to the devices: jnp.asarray would compile (and, while
        # the sampler compiles on a worker, wait for) an identity program per new shape.
        if not isinstance(uncond_context, jax.Array):
            uncond_context = np.asarray(uncond_context)
        uncond_context = jax.device_put(uncond_context, replicated)
    # Scalars stay uncommitted: the program places them (device_put of a host
    # value onto devices of other processes is not allowed).
    guidance = jnp.float32(guidance_scale)
    cond_dtype = np.asarray(cond_context[:1]).dtype
    cache_key, args = _program_key_and_args(
        model_fn,
        params,
        plan,
        ((latents.shape[1:], np.asarray(latents[:1]).dtype), (cond_context.shape[1:], cond_dtype)),
        uncond_context,
        key,
        chunk=chunk,
        mesh=mesh,
        eta=float(eta),
        use_guidance=use_guidance,
        trajectory=trajectory,
    )
    program = _program(
        model_fn, args, float(eta), use_guidance, cache_key, trajectory=trajectory
    ).result()
    rows_sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))

    def launch(start: int) -> jax.Array:
        chunk_latents, chunk_cond, chunk_ids = jax.device_put(
            (
                pad_rows(np.asarray(latents[start : start + chunk]), chunk),
                pad_rows(np.asarray(cond_context[start : start + chunk]), chunk),
                np.arange(start, start + chunk, dtype=np.int32),
            ),
            rows_sharding,
        )
        return program(
            params, plan, chunk_latents, chunk_cond, uncond_context, guidance, key, chunk_ids
        )

    outputs: list[np.ndarray] = []
    with tqdm.tqdm(total=total, desc="sampling", unit="img", disable=not progress) as bar:

        def collect(start: int, result: jax.Array) -> None:
            rows = min(chunk, total - start)  # drop the padding
            outputs.append(_to_host(result)[:rows])
            bar.update(rows)

        pending = None  # (start, result still being computed on device)
        for start in range(0, total, chunk):
            launched = (start, launch(start))
            if pending is not None:
                collect(*pending)
            pending = launched
        collect(*pending)
    return np.concatenate(outputs, axis=0)
