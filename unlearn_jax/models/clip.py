"""The CLIP text transformer (transformers `CLIPTextModel`) as a Flax NNX module.

Attribute names follow the checkpoint files of Stable Diffusion text encoders
(`text_model.embeddings.token_embedding`, `text_model.encoder.layers.0.self_attn.q_proj`,
`text_model.final_layer_norm`, optional top-level `text_projection`), so
`convert.load_torch_state` maps `text_encoder/model.safetensors` onto it by a
strict table. Two facts about the files matter to loaders:

- they carry a non-parameter buffer `text_model.embeddings.position_ids`: skip it
  with `ignore=is_clip_buffer`;
- transformers 5 writes `CLIPTextModel` keys *without* the `text_model.` prefix
  (`embeddings.token_embedding.weight`, ...) while older files and every
  published SD checkpoint have it; `normalize_clip_keys` accepts both. We always
  write the prefixed names, which transformers 4 and 5 both load.

`CLIPAttention`, `CLIPMLP`, `CLIPEncoderLayer` and `CLIPEncoder` take plain
sizes rather than a text config so that a CLIP vision tower can reuse them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.models.activations import gelu
from unlearn_jax.models.config import FrozenConfig

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # SD 1.x (OpenAI CLIP)
    "gelu": gelu,  # SD 2.x (OpenCLIP): exact erf GELU
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}

# transformers' CLIPTextConfig defaults (a text_config nested in a CLIPConfig often
# lists only what differs from them).
_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}

_TOP_LEVEL = ("embeddings.", "encoder.", "final_layer_norm.")


def is_clip_buffer(key: str) -> bool:
    """True for tensors in CLIP files that are buffers, not parameters (`position_ids`).

    Pass as `ignore=` to `convert.load_torch_state`.
    """
    return key.endswith("position_ids")


def normalize_clip_keys(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds the `text_model.` prefix to keys written by transformers 5's `CLIPTextModel`.

    Keys that already have it (SD checkpoints, `CLIPTextModelWithProjection`,
    transformers 4) and any other key pass unchanged.
    """
    out = {}
    for key, value in tensors.items():
        new = f"text_model.{key}" if key.startswith(_TOP_LEVEL) else key
        if new in out:
            raise ValueError(f"CLIP weights hold both {key!r} and {new!r}; keep only one.")
        out[new] = value
    return out


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The elementwise function a CLIP config's `hidden_act` names; a clear error for others."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"CLIP hidden_act {name!r} is not supported ({sorted(_ACTIVATIONS)}).")
    return _ACTIVATIONS[name]


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with q/k/v/out projections (all with bias)."""

    def __init__(
        self, dim: int, num_heads: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        if dim % num_heads:
            raise ValueError(f"CLIP hidden_size {dim} is not divisible by {num_heads} heads.")
        self.num_heads = num_heads
        lin = lambda: nnx.Linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = lin(), lin(), lin(), lin()

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """[B, L, D] -> [B, L, D]; `mask` is boolean, broadcastable to [B, heads, L, L]."""
        bsz, length, dim = x.shape
        heads = lambda t: t.reshape(bsz, length, self.num_heads, dim // self.num_heads)
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (dim // self.num_heads) ** -0.5
        logits = logits.astype(jnp.float32)  # transformers takes the softmax in float32
        if mask is not None:
            # The most negative finite value (not -inf), like transformers: a fully
            # masked row then becomes uniform instead of NaN.
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(bsz, length, dim)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    """fc1 -> activation -> fc2."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        act: str,
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.act = activation(act)
        self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, L, D] -> [B, L, D]."""
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_heads: int,
        act: str,
        eps: float,
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.self_attn = CLIPAttention(dim, num_heads, **kw)
        # Two-pass variance like torch; statistics in float32 whatever `dtype`.
        self.layer_norm1 = nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, **kw)
        self.mlp = CLIPMLP(dim, hidden, act, **kw)
        self.layer_norm2 = nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """[B, L, D] -> [B, L, D]."""
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    """A stack of `CLIPEncoderLayer`s (shared by the text and vision towers)."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_layers: int,
        num_heads: int,
        act: str,
        eps: float,
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.layers = nnx.List(
            [
                CLIPEncoderLayer(
                    dim,
                    hidden,
                    num_heads,
                    act,
                    eps,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )

    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """[B, L, D] -> (output [B, L, D], hidden states: input + each layer's output).

        The hidden states cost nothing under `jit` when unused (dead code).
        """
        states = [x]
        for layer in self.layers:
            x = layer(x, mask)
            states.append(x)
        return x, tuple(states)


class CLIPTextEmbeddings(nnx.Module):
    """Token embedding + learned absolute position embedding."""

    def __init__(
        self,
        vocab_size: int,
        max_positions: int,
        dim: int,
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.token_embedding = nnx.Embed(vocab_size, dim, **kw)
        self.position_embedding = nnx.Embed(max_positions, dim, **kw)

    def __call__(self, input_ids: jax.Array, inputs_embeds: jax.Array | None = None) -> jax.Array:
        """[B, L] int -> [B, L, D].

        `inputs_embeds` [B, L, D], as in transformers, replaces the token-embedding
        lookup (e.g. with learned embeddings spliced in at some positions); the
        position embeddings are added either way.
        """
        length = input_ids.shape[-1]
        max_positions = self.position_embedding.num_embeddings
        if length > max_positions:
            raise ValueError(
                f"CLIP input has {length} tokens but max_position_embeddings is {max_positions}; "
                "tokenize with truncation to the tokenizer's model_max_length."
            )
        positions = self.position_embedding(jnp.arange(length))
        tokens = self.token_embedding(input_ids) if inputs_embeds is None else inputs_embeds
        return tokens + positions[None]


class CLIPTextTransformer(nnx.Module):
    """Embeddings -> causal encoder -> final LayerNorm; pools at the end-of-text token."""

    def __init__(
        self, cfg: Mapping[str, Any], *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        dim = cfg["hidden_size"]
        self.eos_token_id = int(cfg["eos_token_id"])
        self.embeddings = CLIPTextEmbeddings(
            cfg["vocab_size"], cfg["max_position_embeddings"], dim, **kw
        )
        self.encoder = CLIPEncoder(
            dim,
            cfg["intermediate_size"],
            cfg["num_hidden_layers"],
            cfg["num_attention_heads"],
            cfg["hidden_act"],
            cfg["layer_norm_eps"],
            **kw,
        )
        self.final_layer_norm = nnx.LayerNorm(
            dim, epsilon=cfg["layer_norm_eps"], use_fast_variance=False, **kw
        )

    def encode(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """[B, L] ids -> (encoder output before the final norm, all hidden states).

        `inputs_embeds` [B, L, D]: token embeddings to use instead of looking `input_ids` up.
        """
        length = input_ids.shape[-1]
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, Lq, Lk]
        if attention_mask is not None:  # key padding, combined with causality like transformers
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        return self.encoder(self.embeddings(input_ids, inputs_embeds), mask)

    def pool(self, last_hidden_state: jax.Array, input_ids: jax.Array) -> jax.Array:
        """The state at the end-of-text token, [B, D], chosen exactly as transformers does."""
        if self.eos_token_id == 2:
            # Configs from before transformers PR #24773 have a wrong eos_token_id; the
            # end-of-text token is then found as the largest id (OpenAI CLIP's rule).
            position = jnp.argmax(input_ids, axis=-1)
        else:
            # First occurrence: the pad token may equal the eos token (argmax = first max).
            position = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        return jnp.take_along_axis(last_hidden_state, position[:, None, None], axis=1)[:, 0]

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """[B, L] ids -> (last_hidden_state [B, L, D], pooled [B, D]).

        `inputs_embeds` [B, L, D] replaces the token-embedding lookup; `input_ids`
        still decide the pooled position (the end-of-text token).
        """
        x, _ = self.encode(input_ids, attention_mask, inputs_embeds)
        x = self.final_layer_norm(x)
        return x, self.pool(x, input_ids)


def text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The text-tower config with transformers' defaults filled in.

    Accepts a `CLIPTextConfig` dict (SD `text_encoder/config.json`) or a full
    `CLIPConfig` dict, whose `text_config` is used with the top-level `projection_dim`.
    """
    config = dict(config)
    if "text_config" in config:
        text = dict(config["text_config"] or {})
        if "projection_dim" in config:
            text["projection_dim"] = config["projection_dim"]  # the top level wins, as in CLIPModel
        config = text
    cfg = {**_TEXT_DEFAULTS, **config}
    activation(cfg["hidden_act"])
    return cfg


class CLIPTextModel(nnx.Module):
    """transformers `CLIPTextModel` (optionally `CLIPTextModelWithProjection`).

    Attributes:
      config: the text config dict with defaults filled in.
      text_model: the transformer.
      text_projection: bias-free Linear to `projection_dim`, only if `with_projection`.
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
        cfg = text_config(config)
        self.config = FrozenConfig(cfg)
        self.text_model = CLIPTextTransformer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text_projection = (
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

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """[B, L] int ids -> (last_hidden_state [B, L, D] after final_layer_norm, pooled [B, D]).

        `attention_mask` [B, L] (1 = token, 0 = padding) is optional; SD pipelines
        do not pass one. `inputs_embeds` [B, L, D] (transformers' argument) replaces
        the token-embedding lookup, e.g. with textual-inversion embeddings spliced in
        (`attacks.objectives.splice_tokens`); without it the path is unchanged.
        """
        return self.text_model(input_ids, attention_mask, inputs_embeds)

    def hidden_states(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> tuple[jax.Array, ...]:
        """Embeddings and each layer's output, num_hidden_layers + 1 arrays of [B, L, D].

        As transformers' `output_hidden_states` (no final norm applied). diffusers'
        `clip_skip=k` uses `text_model.final_layer_norm(hidden_states(ids)[-(k + 1)])`.
        """
        return self.text_model.encode(input_ids, attention_mask)[1]

    def get_text_features(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """The projected pooled output [B, projection_dim] (`text_embeds` in transformers)."""
        if self.text_projection is None:
            raise ValueError("This CLIPTextModel was built without with_projection=True.")
        _, pooled = self.text_model(input_ids, attention_mask)
        return self.text_projection(pooled)
