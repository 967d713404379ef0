"""GroupNorm as torch computes it, with a hand-written gradient.

`GroupNorm` subclasses nnx's module (same parameters, `scale` and `bias`, same state
paths) and computes what torch's `nn.GroupNorm` computes: the two-pass variance, the
statistics and the normalisation in float32, the result in the compute dtype.

With scale and bias (every GroupNorm of SD's UNet and VAE) it is a `jax.custom_vjp`
whose backward is the textbook one, from the saved input and the [B, 1, C]
statistics: dx = (g - mean(g) - x̂ mean(g x̂)) / σ with g = dy * scale and the means
over each group, the two per-channel sums it needs in one pass. Autodiff of the
same forward gives the same gradient to float rounding (tested), but saves the
centred input as well and emits more kernels: with this one the embedded UNet's
forward with its VJP residuals compiles to 931 XLA:CPU kernels instead of 1,040, its
backward to 1,259 instead of 1,415. (Its compile time fell less than that: on XLA:CPU
a few large kernels, not the many small ones, take most of it.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = jnp.dtype | type


class GroupNorm(nnx.GroupNorm):
    """torch's GroupNorm over channels-last activations: two-pass variance, statistics
    and normalisation in float32, the result in the compute dtype.

    The parameters (`scale`, `bias`) and the arithmetic are `nnx.GroupNorm`'s with
    `use_fast_variance=False`: the input and the parameters are read in the compute
    dtype, as every module here reads its weights (so a bfloat16 model computes the
    same from float32 and from bfloat16 weights), then the statistics and the
    normalisation run in float32. Only the order of the reductions differs.
    nnx reduces a [B, H, W, groups, C/groups] view over axes (1, 2, 4) at once,
    which keeps a strided axis in the middle: XLA:CPU spent 1.9 ms on one
    [16, 16, 16, 32] norm, ~10% of a tiny UNet's forward. Here each channel is
    summed over the positions first (a contiguous reduction), then the channels of
    each group: 0.45 ms.
    nnx options this project never sets (masks, explicit reduction axes, statistics
    across devices, the one-pass variance) are refused.
    """

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        unsupported = (mask, self.reduction_axes, self.axis_name, self.use_fast_variance or None)
        if any(option is not None for option in unsupported):
            raise NotImplementedError(
                "GroupNorm: masks, reduction_axes, axis_name and use_fast_variance"
            )
        dtype = self.dtype or x.dtype
        read = lambda param: param[...].astype(dtype).astype(jnp.float32)
        rows = x.astype(dtype).reshape(x.shape[0], -1, x.shape[-1])
        if self.scale is not None and self.bias is not None:
            y = _affine_group_norm(
                rows, read(self.scale), read(self.bias), self.num_groups, self.epsilon
            )
        else:
            _, centred, inverse = _group_statistics(rows, self.num_groups, self.epsilon)
            y = centred * (inverse if self.scale is None else inverse * read(self.scale))
            if self.bias is not None:
                y = y + read(self.bias)
        return y.reshape(x.shape).astype(dtype)


def _over_groups(per_channel: jax.Array, num_groups: int, count: int) -> jax.Array:
    """[B, C] sums per channel -> [B, 1, C]: each group's total over its channels,
    divided by `count`, repeated over the group's channels."""
    batch, channels = per_channel.shape
    by_group = per_channel.reshape(batch, num_groups, channels // num_groups).sum(-1) / count
    return jnp.repeat(by_group, channels // num_groups, axis=-1)[:, None, :]


def _group_statistics(rows: jax.Array, num_groups: int, epsilon: float):
    """(mean, x - mean, 1 / sqrt(variance + eps)) of [B, positions, C] rows in float32,
    the statistics [B, 1, C] per channel, the variance from the centred values (torch's
    two passes)."""
    flat = rows.astype(jnp.float32)
    count = flat.shape[1] * (flat.shape[-1] // num_groups)
    mean = _over_groups(flat.sum(1), num_groups, count)
    centred = flat - mean
    variance = _over_groups(jnp.square(centred).sum(1), num_groups, count)
    return mean, centred, jax.lax.rsqrt(variance + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _affine_group_norm(rows, scale, bias, num_groups, epsilon):
    """GroupNorm with scale and bias: (x - mean) * (scale / sqrt(variance + eps)) + bias."""
    return _affine_group_norm_forward(rows, scale, bias, num_groups, epsilon)[0]


def _affine_group_norm_forward(rows, scale, bias, num_groups, epsilon):
    mean, centred, inverse = _group_statistics(rows, num_groups, epsilon)
    return centred * (inverse * scale) + bias, (rows, mean, inverse, scale)


def _affine_group_norm_backward(num_groups, epsilon, residuals, dy):
    rows, mean, inverse, scale = residuals
    normal = (rows.astype(jnp.float32) - mean) * inverse
    dy = dy.astype(jnp.float32)
    zero = jnp.zeros((), jnp.float32)
    # Per example and channel, in one pass: sum of dy and of dy * normalised x.
    dy_sum, dy_normal = jax.lax.reduce(
        (dy, dy * normal), (zero, zero), lambda a, b: (a[0] + b[0], a[1] + b[1]), (1,)
    )
    count = rows.shape[1] * (rows.shape[-1] // num_groups)
    mean_dy = _over_groups(dy_sum * scale, num_groups, count)
    mean_dy_normal = _over_groups(dy_normal * scale, num_groups, count)
    d_rows = inverse * (dy * scale - mean_dy - normal * mean_dy_normal)
    return d_rows.astype(rows.dtype), dy_normal.sum(0), dy_sum.sum(0)


_affine_group_norm.defvjp(_affine_group_norm_forward, _affine_group_norm_backward)


def group_norm(
    num_channels: int,
    num_groups: int,
    eps: float,
    *,
    rngs: nnx.Rngs,
    dtype: Dtype,
    param_dtype: Dtype,
) -> GroupNorm:
    """A torch-equivalent GroupNorm: two-pass variance (torch's), stats in float32."""
    return GroupNorm(
        num_channels,
        num_groups=num_groups,
        epsilon=eps,
        use_fast_variance=False,
        rngs=rngs,
        dtype=dtype,
        param_dtype=param_dtype,
    )
