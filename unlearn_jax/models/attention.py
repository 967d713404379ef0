"""Scaled dot-product attention for the UNet and VAE, chosen for the backend.

`choose_implementation` picks one of five forms of the same function, from the
backend, the dtype and the shapes alone (see its docstring for the rules):

  'cudnn'     `jax.nn.dot_product_attention(..., implementation="cudnn")`: cuDNN's
              fused flash attention, on CUDA GPUs (compute capability >= 8.0) for
              fp16/bf16 inputs with head dims cuDNN takes. The [q, k] logits are
              never written to memory.
  'tpu_flash' Pallas's flash attention kernels for TPU (forward and backward,
              `jax.experimental.pallas.ops.tpu.flash_attention`), for query and key
              lengths that are multiples of its 128-row blocks and head dims it
              takes (SD-1.5's self-attention at 64x64 and 32x32 latents). The
              [q, k] logits never reach HBM.
  'xla'       `jax.nn.dot_product_attention(..., implementation="xla")`: XLA's own
              fused form; TPU attention the kernels do not take (cross-attention to
              77 tokens, 8x8 latents), other GPUs and inputs cuDNN refuses (float32,
              SD's one-head VAE attention with head dim 512).
  'blockwise' the memory-efficient form of attention in plain JAX, where 'xla' would
              hold float32 logits larger than `LOGITS_BYTES` per device: query
              blocks, a custom gradient that saves only the output and the
              softmax's log-sum-exp, and recomputes each block's probabilities in
              the backward, as flash attention does. TPU and GPU attention the
              fused kernels do not take (float32 on GPU, lengths that are no
              multiple of 128 on TPU), and the planner's CPU-compiled accelerator
              programs, whose memory then resembles the fused kernels' (XLA:CPU
              kept up to 22 of SD-1.5's [B, 8, 4096, 4096] float32 probability
              tensors live for the backward with 'xla').
  'per_head'  the CPU path below, for logits larger than `CPU_LOOP_LOGITS_BYTES`.

On CPU, XLA materialises the whole [batch, heads, q, k] logits
tensor and streams it through memory three times (logits, softmax, weighted
sum); for SD's 16x16..64x64 latents that tensor outgrows the caches and
attention alone took ~60% of a tiny UNet's forward pass. The CPU path loops
(`lax.map`) over heads and, when a head's logits would exceed
`BLOCK_BYTES`, over blocks of queries, with the batch axis kept whole in
each iteration: the UNet forward runs ~1.5x faster on one core than with
the fused form (see docs/speed.md, "What made sampling faster than diffusers
on CPU"), and peak memory is bounded.
Logits of at most `CPU_LOOP_LOGITS_BYTES` per device stay in the caches; there
the fused form was no slower overall (faster for cross-attention to a few tokens)
and compiles to fewer kernels, so CPU attention that small is 'xla'.

The loop never runs over the batch axis, because that is the axis sharded
over devices: XLA cannot split a loop over a sharded axis, so it gathers the
whole batch onto every device and each device computes attention for all
examples. (An earlier loop over (example, head) pairs did exactly that, and
made sampling on 2 CPU devices 1.5x slower than it should be.) Iterating over
heads and query blocks keeps every device on its own rows.

The arithmetic is the same in every form: logits accumulated in float32,
scaled, softmax in float32, probabilities cast to the value dtype (cuDNN and the
Pallas kernels keep their running softmax in float32 too). Tests compare the 'xla',
'per_head' and 'blockwise' forms with a NumPy reference ('blockwise''s gradients with
XLA's), and 'tpu_flash' (values and gradients) in Pallas's TPU interpreter; 'cudnn'
can only be selected, not run, on a machine without a CUDA GPU.

Sharding: a Pallas kernel is opaque to XLA's partitioner, which would gather the
whole batch onto every device to run it, and the partitioner replicated
'blockwise''s loops. Under `batch_mesh(mesh)` (the train step, the sampler's chunks
and the planner set it) both run per device with `shard_map` over the batch axes.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp

_accelerator_path = contextvars.ContextVar("accelerator_attention", default=None)
_batch_mesh = contextvars.ContextVar("attention_batch_mesh", default=None)


@contextlib.contextmanager
def accelerator_attention(backend: str | None = None) -> Iterator[None]:
    """Within: trace the attention of an accelerator program, whatever the backend.

    Args:
      backend: None: XLA's `jax.nn.dot_product_attention`, or 'blockwise' where its
        logits would be large (for programs traced on CPU but meant for GPU/TPU, whose
        FLOPs and memory the planner counts: XLA counts a cuDNN call as 0 FLOPs; the
        planner adds the iterations of 'blockwise''s loop that XLA does not count).
        'tpu': the form a TPU runs ('tpu_flash' where it applies), for programs
        compiled for compile-only TPU devices.
    """
    token = _accelerator_path.set(backend or "xla")
    try:
        yield
    finally:
        _accelerator_path.reset(token)


@contextlib.contextmanager
def batch_mesh(mesh) -> Iterator[None]:
    """Within (at trace time): kernels XLA cannot partition run per device over `mesh`'s
    batch axes ('data', 'fsdp') with `shard_map`; None: no mesh (one device)."""
    token = _batch_mesh.set(mesh)
    try:
        yield
    finally:
        _batch_mesh.reset(token)


# Logits of one loop iteration (batch x query block x keys, float32) stay under
# this: about an L2 cache's worth, and a bound on attention's temporary memory.
BLOCK_BYTES = 4 * 2**20


def query_block(batch: int, queries: int, keys: int) -> int:
    """Queries per loop iteration: the largest divisor of `queries` within `BLOCK_BYTES`."""
    fits = max(1, BLOCK_BYTES // (4 * batch * keys))
    return max(d for d in range(1, min(fits, queries) + 1) if queries % d == 0)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """One head, one query block: q [B,Tq,D], k [B,Tk,D], v [B,Tk,Dv] -> [B,Tq,Dv]."""
    logits = jnp.einsum("bqd,bkd->bqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * jnp.float32(scale), axis=-1).astype(v.dtype)
    return jnp.einsum("bqk,bkd->bqd", probs, v)


def per_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float) -> jax.Array:
    """Attention as a `lax.map` over heads (and query blocks); layout as `dot_product_attention`."""
    batch, length, heads, depth = q.shape
    block = query_block(batch, length, k.shape[1])
    blocks = length // block
    # [heads, blocks, batch, block, depth]: the loops' axes lead, the batch stays whole.
    q_blocks = q.reshape(batch, blocks, block, heads, depth).transpose(3, 1, 0, 2, 4)
    heads_first = lambda t: jnp.moveaxis(t, 2, 0)

    def one_head(qkv):
        q_head, k_head, v_head = qkv
        if blocks == 1:
            return _attend(q_head[0], k_head, v_head, scale)[None]
        return jax.lax.map(lambda q_block: _attend(q_block, k_head, v_head, scale), q_head)

    out = jax.lax.map(one_head, (q_blocks, heads_first(k), heads_first(v)))
    # [heads, blocks, batch, block, Dv] -> [batch, length, heads, Dv]
    return out.transpose(2, 1, 3, 0, 4).reshape(batch, length, heads, v.shape[-1])


# Above this many bytes of float32 logits per device and call, 'xla' becomes 'blockwise'.
LOGITS_BYTES = 64 * 2**20
# On CPU, above this many bytes of float32 logits per device and call, 'xla' becomes
# 'per_head'. Measured on one core (2-core AMD EPYC, 2 heads): up to 1 MiB neither
# form was consistently faster on self-attention (XLA's forward took 0.81-1.14x the
# loop's time, its gradient 0.98-1.43x) and XLA's was faster on cross-attention to 16
# tokens; from 2 MiB of self-attention logits the loop's forward was 1.15-3.6x faster.
# The embedded model's train step (at most 0.5 MiB per call) compiles ~2 s faster with
# 'xla' and runs as fast (docs/speed.md, "XLA's attention for small logits on CPU").
CPU_LOOP_LOGITS_BYTES = 2**20


def blockwise_block(batch: int, heads: int, queries: int, keys: int) -> int:
    """Queries per 'blockwise' block: float32 logits [batch, heads, block, keys] within
    `LOGITS_BYTES`. The largest divisor of `queries` that fits, unless that is under half
    of what fits: then a multiple of 8 (the last block padded with zero rows)."""
    fits = max(1, LOGITS_BYTES // (4 * batch * heads * keys))
    if fits >= queries:
        return queries
    divisor = max(d for d in range(1, fits + 1) if queries % d == 0)
    return divisor if 2 * divisor >= fits or fits < 8 else fits - fits % 8


def _logits(q, k, scale):  # [B, Tq, H, D] x [B, Tk, H, D] -> float32 [B, H, Tq, Tk]
    return jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale


def _to_blocks(x: jax.Array, block: int) -> jax.Array:
    """[B, T, ...] -> [T/block, B, block, ...], zero rows padding T to a multiple."""
    pad = -x.shape[1] % block
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(x.shape[0], -1, block, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _from_blocks(x: jax.Array, length: int) -> jax.Array:
    """`_to_blocks`'s inverse: [n, B, block, ...] -> [B, length, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def blockwise_attention(q, k, v, scale: float, block: int) -> jax.Array:
    """softmax(q k^T * scale) v, one block of `block` queries per loop iteration;
    [B, T, H, D] layout.

    The arithmetic is `dot_product_attention`'s (float32 logits and softmax, the
    probabilities cast to v's dtype for the weighted sum). The gradient is flash
    attention's: only q, k, v, the output and the float32 log-sum-exp [B, Tq, H] are
    kept for it, and each block's probabilities are recomputed from them. The blocks
    are a `lax.scan`, not unrolled: XLA's schedulers may compute unrolled blocks side
    by side (XLA:CPU held ~90 of them live), a loop holds one block at a time.
    """
    return _blockwise_forward(q, k, v, scale, block)[0]


def _blockwise_forward(q, k, v, scale, block):
    def one_block(_, q_rows):
        logits = _logits(q_rows, k, scale)
        top = jnp.max(logits, axis=-1, keepdims=True)
        exp = jnp.exp(logits - top)
        total = jnp.sum(exp, axis=-1, keepdims=True)
        probs = (exp / total).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32)
        return None, (out.astype(v.dtype), (top + jnp.log(total))[..., 0])

    _, (outs, lses) = jax.lax.scan(one_block, None, _to_blocks(q, block))
    out = _from_blocks(outs, q.shape[1])
    lse = _from_blocks(jnp.moveaxis(lses, 3, 2), q.shape[1])  # [B, Tq, H]
    return out, (q, k, v, out, lse)


def _blockwise_backward(scale, block, saved, d_out):
    q, k, v, out, lse = saved
    # rowsum(dO * O) per query and head: softmax's backward without the probabilities.
    delta = jnp.einsum("bqhd,bqhd->bqh", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def one_block(carry, rows):
        d_k, d_v = carry
        q_rows, d_o, lse_rows, delta_rows = rows
        to_bhq = lambda x: jnp.moveaxis(x, 2, 1)[..., None]  # [B, q, H] -> [B, H, q, 1]
        probs = jnp.exp(_logits(q_rows, k, scale) - to_bhq(lse_rows))
        d_v += jnp.einsum(
            "bhqk,bqhd->bkhd", probs.astype(v.dtype), d_o, preferred_element_type=jnp.float32
        )
        d_probs = jnp.einsum("bqhd,bkhd->bhqk", d_o, v, preferred_element_type=jnp.float32)
        d_logits = (probs * (d_probs - to_bhq(delta_rows)) * scale).astype(q.dtype)
        d_q = jnp.einsum("bhqk,bkhd->bqhd", d_logits, k, preferred_element_type=jnp.float32)
        d_k += jnp.einsum("bhqk,bqhd->bkhd", d_logits, q_rows, preferred_element_type=jnp.float32)
        return (d_k, d_v), d_q

    # Padding rows: q = 0 gives logits 0 and probabilities exp(0 - 0) = 1, finite, and
    # d_out = 0 makes their share of every gradient 0.
    rows = tuple(_to_blocks(x, block) for x in (q, d_out, lse, delta))
    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    (d_k, d_v), d_qs = jax.lax.scan(one_block, zeros, rows)
    d_q = _from_blocks(d_qs, q.shape[1])
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


blockwise_attention.defvjp(_blockwise_forward, _blockwise_backward)


IMPLEMENTATIONS = ("cudnn", "tpu_flash", "xla", "blockwise", "per_head")
TPU_FLASH_BLOCK = 128  # query and key rows per Pallas block; lengths must be multiples
CUDNN_DTYPES = ("float16", "bfloat16")
CUDNN_MIN_COMPUTE_CAPABILITY = (8, 0)  # Ampere: cuDNN's flash attention kernels


def cudnn_max_head_dim(compute_capability: tuple[int, int]) -> int:
    """The largest head dim cuDNN's fp16/bf16 flash attention takes: 256 from Hopper, else 128."""
    return 256 if compute_capability >= (9, 0) else 128


def choose_implementation(
    backend: str,
    dtype,
    q_shape: tuple[int, ...],
    v_shape: tuple[int, ...],
    *,
    compute_capability: tuple[int, int] | None = None,
    accelerator_program: bool = False,
    local_batch: int | None = None,
) -> str:
    """Which form of attention runs (see module docstring).

    Args:
      backend: `jax.default_backend()` at trace time ('cpu', 'gpu', 'tpu', ...).
      dtype: the dtype of q, k and v.
      q_shape: [B, Tq, H, D]; v_shape: [B, Tk, H, Dv].
      compute_capability: (major, minor) of the CUDA GPU; None where the GPU is not
        a CUDA device (ROCm) or the backend is no GPU.
      accelerator_program: inside `accelerator_attention()`: the program is traced
        on CPU for an accelerator's FLOPs and memory, so 'xla' or 'blockwise' (XLA
        counts a cuDNN call as 0 FLOPs, and a loop body once).
      local_batch: examples per device (default q_shape[0]), for the logits' size.

    Rules: 'xla' for accelerator programs; on CPU 'per_head' when the float32 logits
    [local_batch, H, Tq, Tk] exceed `CPU_LOOP_LOGITS_BYTES`, else 'xla'; 'tpu_flash' on TPU when
    q's and v's head dims are equal, at most 128 or a multiple of 128 (SD-1.5's 160 at
    16x16 latents falls back to XLA), and the query and key lengths are multiples of
    `TPU_FLASH_BLOCK`; 'cudnn' on a CUDA
    GPU of compute capability >= 8.0 when the dtype is fp16/bf16 and q's and v's
    head dims are equal, a multiple of 8 and at most `cudnn_max_head_dim` (SD-1.5:
    40, 80 and 160 take cuDNN on an H100; on an A100 160 falls back to XLA);
    'xla' otherwise. Wherever the rules say 'xla', 'blockwise' replaces it when the
    float32 logits [local_batch, H, Tq, Tk] exceed `LOGITS_BYTES`.
    """
    batch, queries, heads, head_dim = q_shape
    logits_bytes = 4 * (local_batch or batch) * heads * queries * v_shape[1]
    xla = "blockwise" if logits_bytes > LOGITS_BYTES else "xla"
    if accelerator_program:
        return xla
    if backend == "cpu":
        return "per_head" if logits_bytes > CPU_LOOP_LOGITS_BYTES else "xla"
    value_head_dim = v_shape[-1]
    if backend == "tpu":
        blocks = q_shape[1] % TPU_FLASH_BLOCK == 0 and v_shape[1] % TPU_FLASH_BLOCK == 0
        # The kernels take head dims up to 128, and larger ones in multiples of 128.
        fits = head_dim == value_head_dim and (head_dim <= 128 or head_dim % 128 == 0)
        return "tpu_flash" if blocks and fits else xla
    if (
        backend in ("gpu", "cuda")
        and compute_capability is not None
        and compute_capability >= CUDNN_MIN_COMPUTE_CAPABILITY
        and jnp.dtype(dtype).name in CUDNN_DTYPES
        and head_dim == value_head_dim
        and head_dim % 8 == 0
        and head_dim <= cudnn_max_head_dim(compute_capability)
    ):
        return "cudnn"
    return xla


@functools.cache
def cuda_compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the default backend's first device when it is a CUDA GPU, else None."""
    if jax.default_backend() != "gpu":
        return None
    device = jax.devices()[0]
    if "cuda" not in getattr(device.client, "platform_version", "").lower():
        return None  # ROCm
    try:
        major, minor = str(device.compute_capability).split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, ValueError):
        return None


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float) -> jax.Array:
    """softmax(q k^T * scale) v with float32 logits and softmax.

    Args:
      q: [B, Tq, H, D] queries.
      k: [B, Tk, H, D] keys.
      v: [B, Tk, H, Dv] values.
      scale: logit scale, usually D ** -0.5.

    Returns:
      [B, Tq, H, Dv] in v's dtype. The form is `choose_implementation`'s, from the
      default backend at trace time; all three compute the same function.
    """
    target = _accelerator_path.get()
    mesh = _batch_mesh.get()
    local_batch = q.shape[0] // math.prod(mesh.shape[a] for a in _batch_axes(mesh, q.shape[0]))
    implementation = choose_implementation(
        target if target not in (None, "xla") else jax.default_backend(),
        q.dtype,
        q.shape,
        v.shape,
        compute_capability=cuda_compute_capability(),
        accelerator_program=target == "xla",
        local_batch=local_batch,
    )
    if implementation == "per_head":
        return per_head_attention(q, k, v, scale=scale)
    if implementation == "tpu_flash":
        return tpu_flash_attention(q, k, v, scale=scale, mesh=mesh)
    if implementation == "blockwise":
        block = blockwise_block(local_batch, q.shape[2], q.shape[1], k.shape[1])
        attend = lambda q, k, v: blockwise_attention(q, k, v, scale, block)
        return per_device(attend, mesh, q.shape[0])(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)


def tpu_flash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, mesh=None
) -> jax.Array:
    """Pallas's TPU flash attention in this module's [B, T, H, D] layout.

    Lengths must be multiples of `TPU_FLASH_BLOCK`. With `mesh`, each device runs the
    kernels on its own rows (`shard_map` over the batch axes the batch divides by).
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

    b = TPU_FLASH_BLOCK
    sizes = pallas_flash.BlockSizes(
        block_q=b, block_k_major=b, block_k=b, block_b=1,
        block_q_major_dkv=b, block_k_major_dkv=b, block_k_dkv=b, block_q_dkv=b,
        block_k_major_dq=b, block_k_dq=b, block_q_dq=b,
    )  # fmt: skip
    heads_first = lambda t: t.transpose(0, 2, 1, 3)  # [B, T, H, D] <-> [B, H, T, D]

    def attend(q, k, v):
        out = pallas_flash.flash_attention(
            heads_first(q), heads_first(k), heads_first(v), sm_scale=scale, block_sizes=sizes
        )
        return heads_first(out)

    return per_device(attend, mesh, q.shape[0])(q, k, v)


def per_device(attend, mesh, batch: int):
    """`attend(q, k, v)` run by each device on its own rows: `shard_map` over `mesh`'s
    batch axes (`_batch_axes`); `attend` itself without a mesh or batch axes.

    For forms XLA's partitioner cannot or does not split by rows: Pallas kernels are
    opaque to it, and it replicated 'blockwise''s loops over the batch, so that every
    device computed every example's attention (1.7x the step's FLOPs on 2 devices).
    """
    if not _batch_axes(mesh, batch):
        return attend
    # The rows' spec names the size-1 batch axis too: over an axis left out, the
    # transpose would psum the gradients (a no-op all-reduce per call), and leaving it
    # automatic instead is refused for Pallas kernels.
    rows = jax.sharding.PartitionSpec(tuple(a for a in ("data", "fsdp") if a in mesh.shape))
    return jax.shard_map(
        attend, mesh=mesh, in_specs=(rows, rows, rows), out_specs=rows, check_vma=False
    )


def _batch_axes(mesh, batch: int) -> tuple[str, ...]:
    """The mesh's batch axes of size > 1 that `batch` rows divide over (all or none)."""
    if mesh is None:
        return ()
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
    return axes if axes and batch % math.prod(mesh.shape[a] for a in axes) == 0 else ()
