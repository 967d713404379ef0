"""The CLIP vision tower and the full two-tower CLIP model (transformers names), Flax NNX.

`CLIPVisionModel` is transformers' `CLIPVisionModel` / `CLIPVisionModelWithProjection`
(the ViT image encoder of OpenAI CLIP), `CLIPModel` is transformers' `CLIPModel`:
text tower + vision tower + `text_projection`, `visual_projection` and the
learned temperature `logit_scale`. Attribute names equal the PyTorch keys of
an HF CLIP folder (`openai/clip-vit-large-patch14`), so `convert.load_torch_state`
is a strict table onto them:

  vision_model.embeddings.class_embedding           [D]            (a raw Param)
  vision_model.embeddings.patch_embedding.weight    [D, 3, p, p]   (conv, no bias)
  vision_model.embeddings.position_embedding.weight [1 + (S/p)^2, D]
  vision_model.pre_layrnorm.*                       (sic, as in OpenAI's code)
  vision_model.encoder.layers.N.*                   (the same blocks as the text tower)
  vision_model.post_layernorm.*                     (applied to the class token only)
  visual_projection.weight, text_projection.weight  (no bias)
  logit_scale                                       scalar, log of the temperature
  text_model.*                                      (`clip.CLIPTextTransformer`)

Raw `nnx.Param` leaves such as `class_embedding` and `logit_scale` keep their
names through the converter, which only renames `kernel`/`scale`/`embedding`.
Files may also carry `position_ids` buffers (ignored).

Images enter NHWC (the Flax convention), not NCHW as in PyTorch; the patch
grid is flattened row-major like torch's `flatten(2)`, so the token order is
the same. Position-embedding interpolation for other resolutions is not
supported: images must have the config's `image_size` (see
`metrics.clip_score.preprocess`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.models import convert, weights
from unlearn_jax.models.abstract import abstract_module
from unlearn_jax.models.clip import (
    CLIPEncoder,
    CLIPTextTransformer,
    activation,
    is_clip_buffer,
    text_config,
)
from unlearn_jax.models.clip_tokenizer import load_clip_tokenizer
from unlearn_jax.models.config import FrozenConfig

# transformers' CLIPVisionConfig defaults (a vision_config nested in a CLIPConfig
# often lists only what differs from them).
_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
_CLIP_DEFAULTS: dict[str, Any] = {"projection_dim": 512, "logit_scale_init_value": 2.6592}
_VISION_TOP_LEVEL = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")


def vision_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The vision-tower config with transformers' defaults filled in.

    Accepts a `CLIPVisionConfig` dict or a full `CLIPConfig` dict, whose
    `vision_config` is used. The *top-level* `projection_dim` of a `CLIPConfig`
    wins over the nested one: transformers' `CLIPModel` sizes both projections from
    it, and files written by transformers 5 keep the sub-config default (512) beside it.
    """
    config = dict(config)
    if "vision_config" in config:
        vision = dict(config["vision_config"] or {})
        if "projection_dim" in config:
            vision["projection_dim"] = config["projection_dim"]
        config = vision
    cfg = {**_VISION_DEFAULTS, **config}
    activation(cfg["hidden_act"])
    if cfg["image_size"] % cfg["patch_size"]:
        raise ValueError(
            f"CLIP vision image_size {cfg['image_size']} is not a multiple of "
            f"patch_size {cfg['patch_size']}."
        )
    return cfg


def normalize_clip_vision_keys(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds the `vision_model.` prefix to keys written by transformers 5's `CLIPVisionModel`.

    Prefixed keys (`CLIPModel`, `CLIPVisionModelWithProjection`, transformers 4)
    and any other key pass unchanged.
    """
    out = {}
    for key, value in tensors.items():
        new = f"vision_model.{key}" if key.startswith(_VISION_TOP_LEVEL) else key
        if new in out:
            raise ValueError(f"CLIP weights hold both {key!r} and {new!r}; keep only one.")
        out[new] = value
    return out


class CLIPVisionEmbeddings(nnx.Module):
    """Patchify conv (no bias) + a learned class token + learned absolute positions."""

    def __init__(
        self, cfg: Mapping[str, Any], *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        dim, patch = cfg["hidden_size"], cfg["patch_size"]
        self.image_size = cfg["image_size"]
        self.dtype = dtype
        self.class_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (dim,), param_dtype) * dim**-0.5
        )
        self.patch_embedding = nnx.Conv(
            cfg["num_channels"],
            dim,
            kernel_size=(patch, patch),
            strides=(patch, patch),
            padding="VALID",
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        num_positions = (self.image_size // patch) ** 2 + 1
        self.position_embedding = nnx.Embed(
            num_positions, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """[B, S, S, C] normalised pixels -> [B, 1 + (S/p)^2, D] tokens (class token first)."""
        height, width = pixel_values.shape[1:3]
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(
                f"CLIP vision input is {height}x{width} but the model takes "
                f"{self.image_size}x{self.image_size}; resize and crop first "
                "(unlearn_jax.metrics.clip_score.preprocess)."
            )
        patches = self.patch_embedding(pixel_values.astype(self.dtype))  # [B, gh, gw, D]
        bsz, dim = patches.shape[0], patches.shape[-1]
        patches = patches.reshape(bsz, -1, dim)  # row-major grid, as torch's flatten(2)
        cls = jnp.broadcast_to(
            self.class_embedding.get_value().astype(patches.dtype), (bsz, 1, dim)
        )
        positions = self.position_embedding(jnp.arange(self.position_embedding.num_embeddings))
        return jnp.concatenate([cls, patches], axis=1) + positions[None]


class CLIPVisionTransformer(nnx.Module):
    """Embeddings -> pre_layrnorm -> encoder; pools the class token through post_layernorm."""

    def __init__(
        self, cfg: Mapping[str, Any], *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        dim, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.embeddings = CLIPVisionEmbeddings(cfg, **kw)
        # Two-pass variance like torch (see clip.CLIPEncoderLayer).
        self.pre_layrnorm = nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, **kw)
        self.encoder = CLIPEncoder(
            dim,
            cfg["intermediate_size"],
            cfg["num_hidden_layers"],
            cfg["num_attention_heads"],
            cfg["hidden_act"],
            eps,
            **kw,
        )
        self.post_layernorm = nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, **kw)

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, S, S, C] -> (last_hidden_state [B, T, D] (no final norm), pooled [B, D]).

        As transformers: the post-LayerNorm is applied to the pooled class token only.
        """
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        x, _ = self.encoder(x)  # no mask: every token sees every token
        return x, self.post_layernorm(x[:, 0])


class CLIPVisionModel(nnx.Module):
    """transformers `CLIPVisionModel` (optionally `CLIPVisionModelWithProjection`).

    Attributes:
      config: the vision config (`FrozenConfig`) with defaults filled in.
      vision_model: the ViT.
      visual_projection: bias-free Linear to `projection_dim`, only if `with_projection`.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        with_projection: bool = False,
    ):
        cfg = vision_config(config)
        self.config = FrozenConfig(cfg)  # hashable: NNX keeps it in the (static) graphdef
        self.vision_model = CLIPVisionTransformer(
            cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.visual_projection = (
            nnx.Linear(
                cfg["hidden_size"],
                cfg["projection_dim"],
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            if with_projection
            else None
        )

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, S, S, C] normalised pixels (NHWC) -> (last_hidden_state [B, T, D], pooled [B, D])."""
        return self.vision_model(pixel_values)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """The projected pooled output [B, projection_dim] (`image_embeds`, unnormalised)."""
        if self.visual_projection is None:
            raise ValueError("This CLIPVisionModel was built without with_projection=True.")
        return self.visual_projection(self.vision_model(pixel_values)[1])


class CLIPOutput(NamedTuple):
    """What transformers' `CLIPModel.forward` returns (embeddings L2-normalised)."""

    logits_per_image: jax.Array  # [B_img, B_txt]
    logits_per_text: jax.Array  # [B_txt, B_img]
    text_embeds: jax.Array  # [B_txt, P]
    image_embeds: jax.Array  # [B_img, P]


def _unit(x: jax.Array) -> jax.Array:
    # Plain x / ||x|| like transformers' _get_vector_norm (no eps), in float32.
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(nnx.Module):
    """transformers `CLIPModel`: both towers, both projections and `logit_scale`.

    Attributes:
      config: the full config as a `FrozenConfig` (`text_config`, `vision_config`, top-level
        `projection_dim`, `logit_scale_init_value`).
      text_model: `clip.CLIPTextTransformer`.
      vision_model: `CLIPVisionTransformer`.
      text_projection, visual_projection: bias-free Linears to `projection_dim`.
      logit_scale: scalar Param; logits are `exp(logit_scale) * cos`.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        config = {**_CLIP_DEFAULTS, **dict(config)}
        text = text_config(config)
        # clip.text_config keeps a nested projection_dim; CLIPModel uses the top-level one.
        text["projection_dim"] = config["projection_dim"]
        vision = vision_config(config)
        self.config = FrozenConfig({**config, "text_config": text, "vision_config": vision})
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.text_model = CLIPTextTransformer(text, **kw)
        self.vision_model = CLIPVisionTransformer(vision, **kw)
        proj = config["projection_dim"]
        self.visual_projection = nnx.Linear(vision["hidden_size"], proj, use_bias=False, **kw)
        self.text_projection = nnx.Linear(text["hidden_size"], proj, use_bias=False, **kw)
        self.logit_scale = nnx.Param(
            jnp.asarray(config["logit_scale_init_value"], dtype=param_dtype)
        )

    @property
    def image_size(self) -> int:
        """Side length of the square images the vision tower takes (224 for ViT-L/14)."""
        return int(self.config["vision_config"]["image_size"])

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """[B, S, S, 3] normalised pixels (NHWC) -> [B, P] projected, unnormalised."""
        return self.visual_projection(self.vision_model(pixel_values)[1])

    def get_text_features(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """[B, L] token ids -> [B, P] projected pooled (end-of-text) states, unnormalised."""
        return self.text_projection(self.text_model(input_ids, attention_mask)[1])

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array,
        attention_mask: jax.Array | None = None,
    ) -> CLIPOutput:
        """ids [B_txt, L] and pixels [B_img, S, S, 3] -> `CLIPOutput` (float32)."""
        image_embeds = _unit(self.get_image_features(pixel_values))
        text_embeds = _unit(self.get_text_features(input_ids, attention_mask))
        scale = jnp.exp(self.logit_scale.get_value().astype(jnp.float32))
        logits_per_text = scale * (text_embeds @ image_embeds.T)
        return CLIPOutput(logits_per_text.T, logits_per_text, text_embeds, image_embeds)


def load_clip(
    folder: str | Path,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    allow_pickle: bool = False,
) -> tuple[CLIPModel, Any]:
    """Loads an HF-format CLIP folder (`openai/clip-vit-large-patch14` layout), strictly.

    Args:
      folder: holds `config.json` (with `text_config` and `vision_config`),
        `model.safetensors` (keys `text_model.*`, `vision_model.*`,
        `text_projection.weight`, `visual_projection.weight`, `logit_scale`) and
        the tokenizer files (`vocab.json`, `merges.txt`, `tokenizer_config.json`).
      dtype: compute dtype.
      param_dtype: dtype the weights are loaded into, whatever the file dtype.
      allow_pickle: permit a `pytorch_model.bin` pickle (it can run code when loaded).

    Returns:
      (model, transformers `CLIPTokenizer` from the same folder, or its cached
      equivalent: `clip_tokenizer.load_clip_tokenizer`).

    Raises:
      convert.WeightMismatchError: missing, unexpected or wrong-shaped tensors.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: load_clip needs an HF CLIP folder "
            "(config.json, model.safetensors, vocab.json, merges.txt)."
        )
    config = json.loads(config_path.read_text())
    if "vision_config" not in config or "text_config" not in config:
        raise ValueError(
            f"{config_path} is not a two-tower CLIPConfig (no text_config/vision_config); "
            "load_clip needs a full CLIPModel folder, not a text or vision tower alone."
        )
    model = abstract_module(
        lambda rngs: CLIPModel(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    )
    tensors, source = weights.read_component_weights(folder, allow_pickle=allow_pickle)
    convert.load_torch_state(
        model, tensors, source=f"weights in {source}", ignore=is_clip_buffer, dtype=param_dtype
    )
    try:
        tokenizer = load_clip_tokenizer(folder)
    except Exception as e:
        raise ValueError(
            f"{folder} could not be loaded as a CLIPTokenizer ({e}). "
            "Fix: the CLIP folder needs vocab.json and merges.txt (and tokenizer_config.json)."
        ) from e
    return model, tokenizer
