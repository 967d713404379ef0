"""The UNet's attention path in Flax NNX, named like diffusers: `Attention` to `Transformer2DModel`.

`Attention` (self and cross), the GEGLU `FeedForward`, `BasicTransformerBlock`
and the `Transformer2DModel` that wraps a stack of them between `proj_in` and
`proj_out` inside the cross-attention down/mid/up blocks. Attribute names
mirror diffusers (`to_q`, `to_out.0`, `ff.net.0.proj`, `transformer_blocks.0.attn2`,
...), so a parameter's NNX state path is its PyTorch key with `weight` renamed.
Parameter-free PyTorch entries inside module lists (dropout at `to_out.1` and
`ff.net.1`) are kept as `Identity` placeholders so that list indices line up.

Token sequences are [B, L, D], images NHWC. Attention logits and the softmax
are always float32 (`unlearn_jax.models.attention`), which covers diffusers'
`upcast_attention`/`upcast_softmax` and keeps bfloat16 safe.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unlearn_jax.models.activations import gelu
from unlearn_jax.models.attention import dot_product_attention
from unlearn_jax.models.normalization import group_norm
from unlearn_jax.models.unet_blocks import Dtype, conv2d


class Identity(nnx.Module):
    """Parameter-free placeholder for a PyTorch list entry (dropout with p=0)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class Attention(nnx.Module):
    """Multi-head (cross-)attention as diffusers `Attention` with its default processor.

    `to_q/to_k/to_v` have no bias (SD's `attention_bias=False`), `to_out.0` has
    one and `to_out.1` is the parameter-free dropout slot.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        upcast_attention: bool = False,
        rngs: nnx.Rngs,
        dtype: Dtype,
        param_dtype: Dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner_dim = heads * dim_head
        kv_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.heads = heads
        self.dim_head = dim_head
        # Kept for the record: logits and softmax are float32 regardless (see module doc).
        self.upcast_attention = upcast_attention
        self.to_q = nnx.Linear(query_dim, inner_dim, use_bias=False, **kw)
        self.to_k = nnx.Linear(kv_dim, inner_dim, use_bias=False, **kw)
        self.to_v = nnx.Linear(kv_dim, inner_dim, use_bias=False, **kw)
        self.to_out = nnx.List([nnx.Linear(inner_dim, query_dim, **kw), Identity()])

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """x [B, N, query_dim], context [B, L, kv_dim] or None (self) -> [B, N, query_dim]."""
        context = x if context is None else context
        batch = x.shape[0]
        split = lambda t: t.reshape(batch, t.shape[1], self.heads, self.dim_head)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        # q.k accumulated in float32, softmax in float32, probs cast to v's dtype.
        out = dot_product_attention(q, k, v, scale=self.dim_head**-0.5)
        out = out.reshape(batch, x.shape[1], self.heads * self.dim_head)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nnx.Module):
    """Gated GELU projection: `proj` to 2x width, value * gelu(gate) (exact erf GELU)."""

    def __init__(
        self, dim_in: int, dim_out: int, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype
    ):
        self.proj = nnx.Linear(dim_in, 2 * dim_out, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., dim_in] -> [..., dim_out]."""
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * gelu(gate)


class FeedForward(nnx.Module):
    """diffusers `FeedForward` with GEGLU: `net.0.proj`, `net.1` (dropout), `net.2`."""

    def __init__(
        self, dim: int, mult: int = 4, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner_dim = dim * mult
        self.net = nnx.List(
            [GEGLU(dim, inner_dim, **kw), Identity(), nnx.Linear(inner_dim, dim, **kw)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., dim] -> [..., dim]."""
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nnx.Module):
    """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual."""

    def __init__(
        self,
        dim: int,
        *,
        num_attention_heads: int,
        attention_head_dim: int,
        cross_attention_dim: int,
        upcast_attention: bool = False,
        norm_eps: float = 1e-5,
        rngs: nnx.Rngs,
        dtype: Dtype,
        param_dtype: Dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        attn_kw = dict(
            heads=num_attention_heads,
            dim_head=attention_head_dim,
            upcast_attention=upcast_attention,
            **kw,
        )
        norm = lambda: nnx.LayerNorm(dim, epsilon=norm_eps, use_fast_variance=False, **kw)
        self.norm1 = norm()
        self.attn1 = Attention(dim, **attn_kw)
        self.norm2 = norm()
        self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **attn_kw)
        self.norm3 = norm()
        self.ff = FeedForward(dim, **kw)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x [B, N, dim], context [B, L, cross_attention_dim] -> [B, N, dim]."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """diffusers `Transformer2DModel` for continuous (image) inputs.

    GroupNorm (eps 1e-6), `proj_in` (1x1 conv for SD1, Linear for SD2's
    `use_linear_projection`), a stack of `transformer_blocks`, `proj_out`, and a
    residual connection around the whole.
    """

    def __init__(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        in_channels: int,
        *,
        num_layers: int = 1,
        cross_attention_dim: int,
        norm_num_groups: int,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        rngs: nnx.Rngs,
        dtype: Dtype,
        param_dtype: Dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner_dim = num_attention_heads * attention_head_dim
        self.norm = group_norm(in_channels, norm_num_groups, 1e-6, **kw)
        # A 1x1 conv and a Linear are the same map in NHWC; only the stored
        # weight layout differs, and that is what the checkpoint dictates.
        if use_linear_projection:
            self.proj_in = nnx.Linear(in_channels, inner_dim, **kw)
            self.proj_out = nnx.Linear(inner_dim, in_channels, **kw)
        else:
            self.proj_in = conv2d(in_channels, inner_dim, 1, **kw)
            self.proj_out = conv2d(inner_dim, in_channels, 1, **kw)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    inner_dim,
                    num_attention_heads=num_attention_heads,
                    attention_head_dim=attention_head_dim,
                    cross_attention_dim=cross_attention_dim,
                    upcast_attention=upcast_attention,
                    **kw,
                )
                for _ in range(num_layers)
            ]
        )

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x [B, H, W, C], context [B, L, cross_attention_dim] -> [B, H, W, C]."""
        batch, height, width, _ = x.shape
        h = self.proj_in(self.norm(x))
        h = h.reshape(batch, height * width, h.shape[-1])
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h.reshape(batch, height, width, h.shape[-1]))
        return h + x
