"""Pixel-level similarity reported beside LPIPS: PSNR and SSIM.

Both take NHWC float images in [0, 1] and return one value per pair. SSIM
uses the usual Gaussian window (11 taps, sigma 1.5, K1=0.01, K2=0.03) over the
valid region, per channel, averaged; images smaller than the window use a
window as large as the image, so tiny models still get a value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """PSNR in dB, [B]; +inf for identical images (data range 1)."""
    mse = jnp.mean((x.astype(jnp.float32) - y.astype(jnp.float32)) ** 2, axis=(1, 2, 3))
    return -10.0 * jnp.log10(mse)


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(coords**2) / (2 * sigma**2))
    return (g / g.sum()).astype(np.float32)


def ssim(x: jax.Array, y: jax.Array, *, window: int = 11, sigma: float = 1.5) -> jax.Array:
    """Mean SSIM over the valid region and channels, [B]; 1 for identical images."""
    size = min(window, x.shape[1], x.shape[2])
    return _ssim(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(y, jnp.float32),
        jnp.asarray(_gaussian_window(size, sigma)),
    )


@jax.jit
def _ssim(x: jax.Array, y: jax.Array, g: jax.Array) -> jax.Array:
    c1, c2 = 0.01**2, 0.03**2
    channels = x.shape[-1]

    # Separable Gaussian, depthwise over channels, 'VALID' like TF's tf.image.ssim.
    kernels = (
        jnp.tile(g[:, None, None, None], (1, 1, 1, channels)),
        jnp.tile(g[None, :, None, None], (1, 1, 1, channels)),
    )

    def blur(img):
        for kernel in kernels:
            img = jax.lax.conv_general_dilated(
                img,
                kernel,
                (1, 1),
                "VALID",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=channels,
                precision=jax.lax.Precision.HIGHEST,
            )
        return img

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return jnp.mean(num / den, axis=(1, 2, 3))
