"""Scaled dot-product attention for the UNet and VAE, chosen for the backend.

On GPU and TPU this is `jax.nn.dot_product_attention` (XLA fuses it, cuDNN can
take it over). On CPU, XLA materialises the whole [batch, heads, q, k] logits
tensor and streams it through memory three times (logits, softmax, weighted
sum); for SD's 16x16..64x64 latents that tensor outgrows the caches and
attention alone took ~60% of a tiny UNet's forward pass. The CPU path loops
(`lax.map`) over heads and, when a head's logits would exceed
`BLOCK_BYTES`, over blocks of queries, with the batch axis kept whole in
each iteration: the UNet forward runs ~1.5x faster on one core than with
the fused form (see the README's speed section), and peak memory is bounded.

The loop never runs over the batch axis, because that is the axis sharded
over devices: XLA cannot split a loop over a sharded axis, so it gathers the
whole batch onto every device and each device computes attention for all
examples. (An earlier loop over (example, head) pairs did exactly that, and
made sampling on 2 CPU devices 1.5x slower than it should be.) Iterating over
heads and query blocks keeps every device on its own rows.

The arithmetic is the same in both paths: logits accumulated in float32,
scaled, softmax in float32, probabilities cast to the value dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
import jax.numpy as jnp

_accelerator_path = contextvars.ContextVar("accelerator_attention", default=False)


@contextlib.contextmanager
def accelerator_attention() -> Iterator[None]:
    """Within: trace `jax.nn.dot_product_attention` whatever the default backend.

    For programs traced on CPU but meant for GPU/TPU (the planner compiles
    the accelerators' program on CPU to count its FLOPs and memory; XLA
    counts a `lax.map` body once, not once per iteration).
    """
    token = _accelerator_path.set(True)
    try:
        yield
    finally:
        _accelerator_path.reset(token)


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


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float) -> jax.Array:
    """softmax(q k^T * scale) v with float32 logits and softmax.

    Args:
      q: [B, Tq, H, D] queries.
      k: [B, Tk, H, D] keys.
      v: [B, Tk, H, Dv] values.
      scale: logit scale, usually D ** -0.5.

    Returns:
      [B, Tq, H, Dv] in v's dtype. The implementation depends on the default
      backend at trace time (see module docstring) unless `accelerator_attention`
      is active; both compute the same function.
    """
    if jax.default_backend() == "cpu" and not _accelerator_path.get():
        return per_head_attention(q, k, v, scale=scale)
    return jax.nn.dot_product_attention(q, k, v, scale=scale)
