"""CLIPScore (Hessel et al. 2021 without the 2.5 weight): 100 * max(cos(E_img, E_txt), 0).

Preprocessing follows transformers' `CLIPImageProcessor` for OpenAI CLIP
(`CLIPImageProcessorPil`, the PIL backend): resize the short side to the
model's `image_size` (224 for ViT-L/14) with PIL's BICUBIC filter, center crop
to a square, scale to [0, 1], normalise with the OpenAI CLIP mean/std.

PIL resamples 8-bit images in fixed point: separable passes (horizontal, then
vertical) whose coefficients are Keys' cubic (a = -0.5) stretched by the scale
factor when shrinking (antialiasing), renormalised at the borders, rounded to
22-bit integers; each pass rounds and clips its output to uint8. `preprocess`
reproduces that arithmetic exactly in int32 JAX ops (coefficient tables are
built in float64 NumPy from the static shapes, as PIL builds them in double),
so its output equals `CLIPImageProcessorPil` on the uint8 image
`round(255 * x)` up to float32 rounding of the final normalisation: the
resized uint8 pixels are identical, the output differs by at most 4.8e-7 in
normalised units (measured on uniform-noise images of 32x32, 24x40, 96x64,
300x260 and 512x512). `quantize=False` runs the same filter in float32
without the 8-bit rounding (differentiable, still clipped per pass like PIL);
it differs from the processor by up to 0.017 in normalised units, i.e.
~1.1/255 in pixel units, on those worst-case noise images.

Generated images are floats in [0, 1]; they are quantised with `round`
(half to even), as diffusers' `numpy_to_pil` and PNG export do, so the score
is the one a user gets from the saved PNGs.

All shapes are static, so `preprocess` and the embedding functions jit; large
image sets stream through in fixed-size chunks (the last one padded) so a run
compiles once per image resolution.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.diffusion.chunks import map_in_chunks
from unlearn_jax.models.clip_vision import CLIPModel

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point precision for 8-bit images (Resample.c)


def _bicubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic kernel (Keys, a = -0.5), support 2."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """PIL's BICUBIC resampling matrix [out_size, in_size] in float64 (rows sum to 1).

    A transcription of Pillow's `precompute_coeffs`: output pixel i is centred at
    (i + 0.5) * in/out in input coordinates; when shrinking, the kernel widens by
    in/out (antialiasing); taps outside the image are dropped and the rest
    renormalised (no edge padding).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        # int() truncates toward zero as the C cast does; negatives are clamped anyway.
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        taps = np.arange(xmin, xmax)
        w = _bicubic((taps - center + 0.5) / filterscale)
        total = w.sum()
        matrix[i, xmin:xmax] = w / total if total != 0.0 else w
    return matrix


def _fixed_point(matrix: np.ndarray) -> np.ndarray:
    """PIL's `normalize_coeffs_8bpc`: coefficients to int32, rounded half away from zero."""
    scaled = matrix * (1 << _PRECISION_BITS)
    return np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)


def _pass_uint8(x: jax.Array, kernel: np.ndarray, axis: int) -> jax.Array:
    """One PIL 8-bit resampling pass along `axis` of int32 pixels in [0, 255].

    The products and their sum stay below 2**31 (255 * sum|k| * 2**22 with
    sum|k| < 1.3 for the bicubic kernel), as in PIL's own INT32 accumulator.
    """
    k = jnp.asarray(_fixed_point(kernel))  # [out, in]
    x = jnp.moveaxis(x, axis, -1)
    acc = jnp.einsum("...i,oi->...o", x, k, preferred_element_type=jnp.int32)
    acc = acc + (1 << (_PRECISION_BITS - 1))  # PIL's rounding offset
    out = jnp.clip(jnp.right_shift(acc, _PRECISION_BITS), 0, 255)  # PIL's clip8
    return jnp.moveaxis(out, -1, axis)


def _pass_float(x: jax.Array, kernel: np.ndarray, axis: int) -> jax.Array:
    """The same pass in float32 on [0, 1] pixels, clipped like PIL's clip8 but not rounded."""
    x = jnp.moveaxis(x, axis, -1)
    out = jnp.einsum("...i,oi->...o", x, jnp.asarray(kernel, jnp.float32))
    return jnp.moveaxis(jnp.clip(out, 0.0, 1.0), -1, axis)


def resize_shape(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """The (height, width) transformers resizes to: short side = `shortest_edge`.

    The long side is `int(shortest_edge * long / short)` (truncated, as transformers does).
    """
    if width <= height:
        return int(shortest_edge * height / width), shortest_edge
    return shortest_edge, int(shortest_edge * width / height)


def preprocess(
    images: jax.Array | np.ndarray,
    size: int = 224,
    crop_size: int | None = None,
    *,
    quantize: bool = True,
) -> jax.Array:
    """CLIPImageProcessor's pipeline on a batch: [N, H, W, 3] in [0, 1] -> [N, C, C, 3].

    Args:
      images: float RGB images in [0, 1] (values outside are clipped), NHWC.
        uint8 images are taken as they are.
      size: target length of the short side (`size["shortest_edge"]`).
      crop_size: side of the center crop (`crop_size`); default `size`.
      quantize: True: PIL's exact 8-bit arithmetic on `round(255 x)` (equals
        `CLIPImageProcessorPil`). False: the same filter in float32, no rounding.

    Returns:
      float32 NHWC pixels normalised with the CLIP mean/std, ready for
      `CLIPModel.get_image_features`.
    """
    crop = size if crop_size is None else crop_size
    images = jnp.asarray(images)
    height, width = images.shape[1:3]
    new_h, new_w = resize_shape(height, width, size)
    if images.dtype == jnp.uint8:
        pixels = images.astype(jnp.int32) if quantize else images.astype(jnp.float32) / 255.0
    elif quantize:
        pixels = jnp.round(jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255.0)
        pixels = pixels.astype(jnp.int32)
    else:
        pixels = jnp.clip(images.astype(jnp.float32), 0.0, 1.0)
    resample = _pass_uint8 if quantize else _pass_float
    # PIL skips a pass whose size does not change (that pass would be the identity).
    if new_w != width:
        pixels = resample(pixels, resize_weights(width, new_w), axis=2)
    if new_h != height:
        pixels = resample(pixels, resize_weights(height, new_h), axis=1)
    if quantize:
        pixels = pixels.astype(jnp.float32) / 255.0
    if crop > new_h or crop > new_w:
        raise ValueError(f"center crop {crop} is larger than the resized image {new_h}x{new_w}")
    top, left = (new_h - crop) // 2, (new_w - crop) // 2  # transformers' center_crop
    pixels = pixels[:, top : top + crop, left : left + crop]
    return (pixels - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


@functools.partial(nnx.jit, static_argnames=("quantize",))
def _image_embeds(model: CLIPModel, images: jax.Array, quantize: bool) -> jax.Array:
    pixels = preprocess(images, model.image_size, quantize=quantize)
    x = model.get_image_features(pixels).astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@nnx.jit
def _text_embeds(model: CLIPModel, ids: jax.Array) -> jax.Array:
    x = model.get_text_features(ids).astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _chunked(fn, model: CLIPModel, inputs: np.ndarray, batch_size: int, **kw) -> np.ndarray:
    """fn over fixed-size chunks of `inputs` (last one edge-padded): one compile per shape."""
    if len(inputs) == 0:
        raise ValueError("no inputs to embed")
    return map_in_chunks(lambda rows: fn(model, jnp.asarray(rows), **kw), inputs, size=batch_size)


def tokenize(tokenizer: Any, texts: Sequence[str]) -> np.ndarray:
    """Token ids [T, model_max_length] (padded and truncated like SD pipelines)."""
    enc = tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length
    )
    return np.asarray(enc["input_ids"], dtype=np.int32)


def image_embeddings(
    model: CLIPModel, images: np.ndarray | jax.Array, *, batch_size: int = 32, quantize: bool = True
) -> np.ndarray:
    """Unit-norm CLIP image embeddings [N, P] of images [N, H, W, 3] in [0, 1]."""
    return _chunked(_image_embeds, model, np.asarray(images), batch_size, quantize=quantize)


def text_embeddings(
    model: CLIPModel, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 64
) -> np.ndarray:
    """Unit-norm CLIP text embeddings [T, P]."""
    return _chunked(_text_embeds, model, tokenize(tokenizer, texts), batch_size)


def clip_score_from_embeddings(
    image_embeds: jax.Array | np.ndarray, text_embeds: jax.Array | np.ndarray
) -> jax.Array:
    """100 * max(cos, 0) of paired rows: [N, P] x [N, P] -> [N] (inputs need not be unit)."""
    img = jnp.asarray(image_embeds, jnp.float32)
    txt = jnp.asarray(text_embeds, jnp.float32)
    cos = jnp.sum(img * txt, -1) / (jnp.linalg.norm(img, axis=-1) * jnp.linalg.norm(txt, axis=-1))
    return 100.0 * jnp.maximum(cos, 0.0)


def clip_score(
    model: CLIPModel,
    tokenizer: Any,
    images: np.ndarray | jax.Array,
    texts: str | Sequence[str],
    *,
    batch_size: int = 32,
    quantize: bool = True,
) -> np.ndarray:
    """CLIPScore of each image with its text: images [N, H, W, 3] in [0, 1] -> [N] float32.

    Args:
      model, tokenizer: from `models.clip_vision.load_clip`.
      images: generations, any resolution (resized and cropped to the model's size).
      texts: one text per image, or a single text for all of them.
      batch_size: images per jitted call (also the padded chunk size).
      quantize: see `preprocess`; True matches transformers' processor exactly.
    """
    n = len(images)
    texts = [texts] * n if isinstance(texts, str) else list(texts)
    if len(texts) != n:
        raise ValueError(f"{n} images but {len(texts)} texts; give one text per image or one.")
    img = image_embeddings(model, images, batch_size=batch_size, quantize=quantize)
    # Embed each distinct text once (usually a handful of prompts for many images).
    unique = sorted(set(texts))
    txt = text_embeddings(model, tokenizer, unique)
    row = {t: i for i, t in enumerate(unique)}
    index = np.asarray([row[t] for t in texts])
    return np.asarray(clip_score_from_embeddings(img, txt[index]))
