r"""Text-encoder unlearning: CLIP text-encoder parameters train beside, or instead of, the UNet's.

`config.unlearn.text_encoder` chooses them, like `unlearn.params` does for the UNet:

  'none' (default)  the text encoder is frozen; batches carry the contexts it
                    computed once, and nothing below applies;
  'full'            every text-encoder parameter trains;
  a regex           those whose '.'-joined path (relative to the text encoder, e.g.
                    'text_model.encoder.layers.1.self_attn.q_proj.kernel') it matches
                    (`re.search`), e.g. 'layers\.1\.' or 'token_embedding'.

With `unlearn.params='none'` only the text encoder trains and the UNet stays
θ0's bit for bit; with any other UNet group both train.

When the text encoder trains, the network the losses see is text encoder ∘ UNet:

  params  = {'text_encoder': CLIP pure dict, 'unet': UNet pure dict}
  apply_fn(params, x_t, t, ids [B, L] int32)
          = UNet(params['unet'])(x_t, t, TextEncoder(params['text_encoder'])(ids))

and the batches carry token ids where they otherwise carry text embeddings
('context', 'anchor_context', 'uncond_context'). So the trainable side encodes
its prompts with its own text encoder inside the differentiated loss, and θ0's
predictions (the teachers' targets) encode them with θ0's text encoder: the
original encoder's contexts, computed in the same program as the student's, so
that at θ = θ0 a distillation term is exactly zero. The losses, the train step
and the gradient combiners are unchanged; `ParamSplit` names the leaves
'text_encoder.…' and 'unet.…', and only the selected ones are differentiated
and carry optimizer state.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from unlearn_jax.diffusion.forward import ApplyFn
from unlearn_jax.models.pipeline import StableDiffusion
from unlearn_jax.unlearn.params import param_paths
from unlearn_jax.unlearn.registry import ParamPath, trainable_mask

PyTree = Any
UNET, TEXT_ENCODER = "unet", "text_encoder"
OFF = "none"
_EXAMPLES = 6  # example paths shown when a regex selects nothing


def text_encoder_group(config: ml_collections.ConfigDict) -> str | None:
    """`unlearn.text_encoder` of a config: None when off ('none', '' or absent), else 'full'/regex.

    Raises:
      ValueError: for a string that is neither 'none', 'full' nor a valid regex.
    """
    value = config.unlearn.get("text_encoder")
    if value is None or str(value).strip().lower() in ("", OFF):
        return None
    group = str(value)
    if group != "full":
        try:
            re.compile(group)
        except re.error as e:
            raise ValueError(
                f"unlearn.text_encoder {group!r} is neither 'none', 'full' nor a valid regex: {e}"
            ) from None
    return group


def text_encoder_mask(paths: Sequence[ParamPath], group: str) -> list[bool]:
    """Which text-encoder parameters train: all for 'full', else those whose path `group` matches.

    Args:
      paths: text-encoder parameter paths (relative to the text encoder).
      group: 'full' or a regex searched in the '.'-joined path.
    Raises:
      ValueError: when nothing is selected, listing example paths to write a regex against.
    """
    names = [".".join(map(str, p)) for p in paths]
    if group == "full":
        return [True] * len(names)
    pattern = re.compile(group)
    mask = [pattern.search(n) is not None for n in names]
    if not any(mask):
        picks = np.unique(np.linspace(0, len(names) - 1, _EXAMPLES).round().astype(int))
        examples = "\n".join(f"  {names[i]}" for i in picks)
        raise ValueError(
            f"unlearn.text_encoder {group!r} selects none of the {len(names)} text-encoder "
            "parameters. It is a regex searched in '.'-joined paths such as:\n"
            f"{examples}\nFix: e.g. --config.unlearn.text_encoder=full, or "
            "'text_model\\.encoder\\.layers\\.0\\.' (one layer), or 'none' to freeze it."
        )
    return mask


def joint_params(unet_params: PyTree, text_encoder_params: PyTree) -> dict[str, PyTree]:
    """The parameter tree of text encoder ∘ UNet."""
    return {TEXT_ENCODER: text_encoder_params, UNET: unet_params}


def is_joint(params: PyTree) -> bool:
    """Whether `params` is a `joint_params` tree (a UNet's own tree has no such top-level keys)."""
    return isinstance(params, Mapping) and set(params) == {UNET, TEXT_ENCODER}


def joint_mask(params: dict[str, PyTree], unet_group: str, text_group: str) -> list[bool]:
    """Per leaf of `joint_params` (in `jax.tree.leaves` order), whether it trains.

    Args:
      unet_group: `unlearn.params` for the UNet leaves ('none' freezes the UNet).
      text_group: `unlearn.text_encoder` ('full' or a regex) for the text-encoder leaves.
    """
    paths = param_paths(params)
    parts = {UNET: [], TEXT_ENCODER: []}
    for path in paths:
        parts[path[0]].append(path[1:])
    masks = {
        UNET: iter(trainable_mask(parts[UNET], unet_group)),
        TEXT_ENCODER: iter(text_encoder_mask(parts[TEXT_ENCODER], text_group)),
    }
    return [next(masks[path[0]]) for path in paths]


def joint_apply_fn(unet_graphdef: nnx.GraphDef, text_encoder_graphdef: nnx.GraphDef) -> ApplyFn:
    """`apply_fn(joint params, x_t, t, ids [B, L] int32) -> [B, h, w, C]` of text encoder ∘ UNet.

    The contexts are float32 like the precomputed ones of a frozen text encoder.
    """

    def apply_fn(params, x_t, t, ids):
        text_encoder = nnx.merge(text_encoder_graphdef, params[TEXT_ENCODER])
        context = text_encoder(ids)[0].astype(jnp.float32)
        return nnx.merge(unet_graphdef, params[UNET])(x_t, t, context)

    return apply_fn


def with_text_encoder(pipe: StableDiffusion, text_encoder_params: PyTree) -> StableDiffusion:
    """A shallow copy of `pipe` whose text encoder holds `text_encoder_params` (nothing copied)."""
    graphdef, _ = nnx.split(pipe.text_encoder)
    return dataclasses.replace(pipe, text_encoder=nnx.merge(graphdef, text_encoder_params))


def unet_and_pipeline(pipe: StableDiffusion, params: PyTree) -> tuple[PyTree, StableDiffusion]:
    """(UNet parameters, the pipeline to sample with) for the trainer's parameters `params`.

    `params` is a UNet's tree (then `pipe` itself serves) or a `joint_params` tree
    (then a copy of `pipe` with that text encoder).
    """
    if not is_joint(params):
        return params, pipe
    return params[UNET], with_text_encoder(pipe, params[TEXT_ENCODER])


def trained_components(trainable_names: Sequence[str]) -> tuple[str, ...]:
    """The components ('unet', 'text_encoder') owning a trainable leaf of a joint split."""
    return tuple(
        c for c in (UNET, TEXT_ENCODER) if any(n.startswith(c + ".") for n in trainable_names)
    )
