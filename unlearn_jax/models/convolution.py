"""`lax.conv_general_dilated` with a faster form for inputs smaller than the kernel on CPU.

XLA:CPU swaps a convolution's operands when the kernel's window is larger than
the input (a 3x3 kernel over a 2x2 map, a 5x5 one over 3x3 or 4x4), and then
emits a loop nest for it instead of calling its convolution library. On this
package's 2-core test machine such a 512-to-512 channel 3x3 convolution of 36
2x2 maps took 293-299 ms (2 GFLOP/s) against 6 ms as one matmul; VGG16's last
block sees 2x2 maps for 32x32 images, so LPIPS-VGG of 18 such pairs spent about
0.9 of its 1.1 s there. A 3x3 map under a 3x3 kernel, or anything larger, runs
at the library's 160-200 GFLOP/s and is left alone.

`conv_general_dilated` computes those convolutions as the matmul of the padded
input's shifted windows (im2col: one [N, H', W', kh*kw*C] array) with the kernel
reshaped to [kh*kw*C, O]. The windows of a map smaller than the kernel are few,
so the patches are small. Only stride-1, undilated, ungrouped NHWC/HWIO
convolutions on CPU take this form; everything else is `lax.conv_general_dilated`.
Pass it as `nnx.Conv(..., conv_general_dilated=conv_general_dilated)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_CHANNELS_LAST = ("NHWC", "HWIO", "NHWC")


def smaller_than_kernel(input_hw: Sequence[int], kernel_hw: Sequence[int]) -> bool:
    """Whether XLA:CPU would swap this convolution's operands (input smaller than the
    kernel in either spatial dimension) and run it as a loop nest."""
    return any(i < k for i, k in zip(input_hw, kernel_hw, strict=True))


def _is_plain_nhwc(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                   dimension_numbers, feature_group_count, batch_group_count) -> bool:  # fmt: skip
    """A stride-1, undilated, ungrouped 2-D NHWC/HWIO convolution with explicit padding."""
    # None is lax's default layout, NCHW/OIHW (Flax always names its NHWC layout).
    if dimension_numbers is None or lhs.ndim != 4 or isinstance(padding, str):
        return False
    if feature_group_count != 1:
        return False
    if batch_group_count != 1 or any(s != 1 for s in window_strides):
        return False
    if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
        return False
    expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _CHANNELS_LAST)
    given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return given == expected


def im2col_conv(
    lhs: jax.Array, rhs: jax.Array, padding: Sequence[tuple[int, int]], precision=None
) -> jax.Array:
    """Stride-1 NHWC x HWIO convolution as one matmul of the shifted windows.

    Args:
      lhs: [N, H, W, C] input.
      rhs: [kh, kw, C, O] kernel.
      padding: ((top, bottom), (left, right)).
      precision: as for `lax.dot_general`.

    Returns:
      [N, H + top + bottom - kh + 1, W + left + right - kw + 1, O], as
      `lax.conv_general_dilated` computes it (up to float rounding).
    """
    (top, bottom), (left, right) = padding
    kh, kw, channels, out = rhs.shape
    padded = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    rows, cols = padded.shape[1] - kh + 1, padded.shape[2] - kw + 1
    windows = [padded[:, i : i + rows, j : j + cols, :] for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(windows, axis=-1)  # [N, rows, cols, kh*kw*C], kernel order
    return lax.dot_general(
        patches,
        rhs.reshape(kh * kw * channels, out),
        (((3,), (0,)), ((), ())),
        precision=precision,
    )


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
    """`lax.conv_general_dilated`, with inputs smaller than the kernel on CPU as a matmul
    (`im2col_conv`; see the module docstring). Same arguments and result."""
    plain = _is_plain_nhwc(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                           dimension_numbers, feature_group_count, batch_group_count)  # fmt: skip
    if (
        plain
        and preferred_element_type is None
        and out_sharding is None
        and jax.default_backend() == "cpu"
        and smaller_than_kernel(lhs.shape[1:3], rhs.shape[:2])
    ):
        return im2col_conv(lhs, rhs, tuple(tuple(p) for p in padding), precision)
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
    )
