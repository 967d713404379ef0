"""The key table between our diffusers-named modules and an original (LDM) SD checkpoint.

A single-file Stable Diffusion 1.x/2.x checkpoint (AUTOMATIC1111, ComfyUI, the
CompVis/Stability releases) holds the three networks under fixed prefixes:

  model.diffusion_model.*   UNet   input_blocks / middle_block / output_blocks / time_embed / out
  first_stage_model.*       VAE    encoder.down.N.block.M / mid.block_1 / mid.attn_1 / ...
  cond_stage_model.*        text   SD 1.x: transformer.text_model.* (transformers names)
                                   SD 2.x: model.* (OpenCLIP names)

The table is built from a module's config and its PyTorch-layout keys (the
names `convert.to_torch_state` writes), one entry per LDM tensor. Every
diffusers tensor appears in exactly one entry, so reading and writing are the
two directions of one bijection and a round trip is exact by construction.
Two entries are not plain renames:

  - VAE attention projections: LDM stores them as 1x1 convs `[C, C, 1, 1]`,
    diffusers as Linear `[C, C]` (`conv1x1`);
  - OpenCLIP attention: `attn.in_proj_weight [3D, D]` is q, k and v stacked
    along dim 0 (`parts` lists the three diffusers tensors, in that order).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."

_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}
_VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
_VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}
_OPENCLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}
_OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


@dataclasses.dataclass(frozen=True)
class LdmTensor:
    """One tensor of an LDM checkpoint and the diffusers tensor(s) it holds.

    Attributes:
      parts: diffusers keys; several are concatenated along dim 0 (q, k, v -> in_proj).
      conv1x1: the LDM tensor is the diffusers Linear weight `[O, I]` as a conv `[O, I, 1, 1]`.
    """

    parts: tuple[str, ...]
    conv1x1: bool = False


LdmTable = dict[str, LdmTensor]  # full LDM key (with its prefix) -> entry


class KeyTableError(ValueError):
    """A module key has no place in the LDM layout (a config outside SD 1.x/2.x)."""


def _rename(key: str, prefixes: Mapping[str, tuple[str, Mapping[str, str]]]) -> str:
    """Maps `key` by its longest matching prefix, then renames its inner layer names."""
    for old in sorted(prefixes, key=len, reverse=True):
        if key.startswith(old):
            new, inner = prefixes[old]
            rest = key[len(old) :]
            for a, b in inner.items():
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
                    break
            return new + rest
    raise KeyTableError(f"{key}: no LDM name (is this an SD 1.x/2.x model?)")


def _levels(config: Mapping, what: str) -> tuple[int, int]:
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise KeyTableError(
            f"{what} layers_per_block={per_block!r}: the LDM layout needs one number "
            "(SD 1.x/2.x); this model cannot be written as a single file."
        )
    return len(config["block_out_channels"]), per_block


def unet_table(config: Mapping, keys: Iterable[str]) -> LdmTable:
    """The UNet's table: diffusers `UNet2DConditionModel` keys -> `model.diffusion_model.*`.

    LDM numbers the UNet's layers flat: `input_blocks.0` is conv_in, then each level
    has `layers_per_block` (resnet, attention) pairs and, except the last, a
    downsampler; `output_blocks` have `layers_per_block + 1` pairs per level and the
    upsampler sits after the last pair's attention (index 2) or resnet (index 1).
    """
    levels, per_block = _levels(config, "UNet")
    up_attention = [t == "CrossAttnUpBlock2D" for t in config["up_block_types"]]
    plain: dict[str, str] = {}
    prefixes = {
        "time_embedding.linear_1.": ("time_embed.0.", plain),
        "time_embedding.linear_2.": ("time_embed.2.", plain),
        "conv_in.": ("input_blocks.0.0.", plain),
        "conv_norm_out.": ("out.0.", plain),
        "conv_out.": ("out.2.", plain),
        "mid_block.resnets.0.": ("middle_block.0.", _UNET_RESNET),
        "mid_block.attentions.0.": ("middle_block.1.", plain),
        "mid_block.resnets.1.": ("middle_block.2.", _UNET_RESNET),
    }
    for b in range(levels):
        for j in range(per_block):
            i = 1 + b * (per_block + 1) + j
            prefixes[f"down_blocks.{b}.resnets.{j}."] = (f"input_blocks.{i}.0.", _UNET_RESNET)
            prefixes[f"down_blocks.{b}.attentions.{j}."] = (f"input_blocks.{i}.1.", plain)
        last = 1 + b * (per_block + 1) + per_block
        prefixes[f"down_blocks.{b}.downsamplers.0.conv."] = (f"input_blocks.{last}.0.op.", plain)
        for j in range(per_block + 1):
            i = b * (per_block + 1) + j
            prefixes[f"up_blocks.{b}.resnets.{j}."] = (f"output_blocks.{i}.0.", _UNET_RESNET)
            prefixes[f"up_blocks.{b}.attentions.{j}."] = (f"output_blocks.{i}.1.", plain)
        last = b * (per_block + 1) + per_block
        slot = 2 if up_attention[b] else 1
        prefixes[f"up_blocks.{b}.upsamplers.0.conv."] = (
            f"output_blocks.{last}.{slot}.conv.",
            plain,
        )
    return {UNET_PREFIX + _rename(k, prefixes): LdmTensor((k,)) for k in keys}


def vae_table(config: Mapping, keys: Iterable[str]) -> LdmTable:
    """The VAE's table: diffusers `AutoencoderKL` keys -> `first_stage_model.*`.

    The decoder's levels are numbered in reverse in LDM (`decoder.up.0` is the
    last, full-resolution level: diffusers' `decoder.up_blocks.{n-1}`).
    """
    levels, _ = _levels(config, "VAE")
    plain: dict[str, str] = {}
    prefixes = {
        "encoder.conv_norm_out.": ("encoder.norm_out.", plain),
        "decoder.conv_norm_out.": ("decoder.norm_out.", plain),
    }
    for part in ("encoder", "decoder"):
        for a in ("conv_in.", "conv_out."):
            prefixes[f"{part}.{a}"] = (f"{part}.{a}", plain)
        for i in (0, 1):
            prefixes[f"{part}.mid_block.resnets.{i}."] = (f"{part}.mid.block_{i + 1}.", _VAE_RESNET)
        prefixes[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", _VAE_ATTENTION)
    for b in range(levels):
        prefixes[f"encoder.down_blocks.{b}.resnets."] = (f"encoder.down.{b}.block.", plain)
        prefixes[f"encoder.down_blocks.{b}.downsamplers.0.conv."] = (
            f"encoder.down.{b}.downsample.conv.",
            plain,
        )
        up = levels - 1 - b
        prefixes[f"decoder.up_blocks.{b}.resnets."] = (f"decoder.up.{up}.block.", plain)
        prefixes[f"decoder.up_blocks.{b}.upsamplers.0.conv."] = (
            f"decoder.up.{up}.upsample.conv.",
            plain,
        )
    for a in ("quant_conv.", "post_quant_conv."):
        prefixes[a] = (a, plain)
    table = {}
    for key in keys:
        name = _rename(key, prefixes)
        # Resnet shortcuts inside down/up blocks: `block.M.conv_shortcut` -> `nin_shortcut`.
        name = name.replace(".conv_shortcut.", ".nin_shortcut.")
        attention = ".mid.attn_1." in name and name.endswith(".weight") and ".norm." not in name
        table[VAE_PREFIX + name] = LdmTensor((key,), conv1x1=attention)
    return table


def sd1_text_table(keys: Iterable[str]) -> LdmTable:
    """SD 1.x: the transformers CLIP names, under `cond_stage_model.transformer.`."""
    return {SD1_TEXT_PREFIX + k: LdmTensor((k,)) for k in keys}


def sd2_text_table(keys: Iterable[str]) -> LdmTable:
    """SD 2.x: OpenCLIP names under `cond_stage_model.model.`; q, k, v fused as in_proj.

    `transformer.resblocks.N.attn.in_proj_weight` is `[3D, D]` = concat(q, k, v) of
    `text_model.encoder.layers.N.self_attn.{q,k,v}_proj.weight`; likewise the bias.
    `positional_embedding` is a bare parameter (no `.weight`).
    """
    table: LdmTable = {}
    fused: dict[str, dict[str, str]] = {}
    for key in keys:
        if key in _OPENCLIP_TOP:
            table[SD2_TEXT_PREFIX + _OPENCLIP_TOP[key]] = LdmTensor((key,))
            continue
        head = "text_model.encoder.layers."
        if not key.startswith(head):
            raise KeyTableError(f"{key}: no OpenCLIP name (is this an SD 2.x text encoder?)")
        layer, rest = key[len(head) :].split(".", 1)
        block = f"{SD2_TEXT_PREFIX}transformer.resblocks.{layer}."
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            proj, leaf = rest.split(".")[1:]
            fused.setdefault(f"{block}attn.in_proj_{leaf}", {})[proj[0]] = key
            continue
        for a, b in _OPENCLIP_LAYER.items():
            if rest.startswith(a):
                table[block + b + rest[len(a) :]] = LdmTensor((key,))
                break
        else:
            raise KeyTableError(f"{key}: no OpenCLIP name")
    for name, qkv in fused.items():
        table[name] = LdmTensor((qkv["q"], qkv["k"], qkv["v"]))
    return table


def ema_key(ldm_key: str) -> str:
    """The `model_ema.*` name LDM's EMA keeps for a UNet key: its dots after `model.` dropped.

    `model.diffusion_model.out.0.weight` -> `model_ema.diffusion_modelout0weight`.
    """
    return EMA_PREFIX + "".join(ldm_key.split(".")[1:])


def ldm_shape(entry: LdmTensor, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The LDM tensor's shape from its diffusers parts' (PyTorch-layout) shapes."""
    first = tuple(shapes[entry.parts[0]])
    if len(entry.parts) > 1:
        first = (sum(shapes[p][0] for p in entry.parts), *first[1:])
    return (*first, 1, 1) if entry.conv1x1 else first


def to_ldm(table: LdmTable, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """diffusers (PyTorch-layout) tensors -> LDM tensors, for every entry of `table`."""
    out = {}
    for name, entry in table.items():
        arrays = [np.asarray(tensors[p]) for p in entry.parts]
        array = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        out[name] = array.reshape(*array.shape, 1, 1) if entry.conv1x1 else array
    return out


def from_ldm(table: LdmTable, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """LDM tensors -> diffusers (PyTorch-layout) tensors, for the entries present in `tensors`.

    A `conv1x1` entry accepts the conv `[O, I, 1, 1]` and the Linear `[O, I]` form
    (files converted from diffusers sometimes keep the latter).
    """
    out = {}
    for name, entry in table.items():
        if name not in tensors:
            continue
        array = tensors[name]
        if entry.conv1x1 and array.ndim == 4 and array.shape[2:] == (1, 1):
            array = array[:, :, 0, 0]
        if len(entry.parts) == 1:
            out[entry.parts[0]] = array
        else:
            for part, piece in zip(entry.parts, np.split(array, len(entry.parts)), strict=True):
                out[part] = piece
    return out
