"""What a single-file checkpoint is, from its safetensors header alone (no data, no torch).

`read_header(path)` parses the header (names, dtypes, shapes, metadata) and
says when a file is truncated or not safetensors at all. `identify(header)`
returns "sd1" or "sd2" for an SD 1.x/2.x checkpoint in the original LDM layout
and refuses anything else (a LoRA, an SDXL or SD3/Flux checkpoint, a VAE-only
file, a textual-inversion embedding, a diffusers component file) with a message
naming what it is. `infer_configs` reads the architecture from the shapes
where SD's conventions make it unambiguous.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unlearn_jax.models.ldm_keys import (
    EMA_PREFIX,
    SD1_TEXT_PREFIX,
    SD2_TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)
from unlearn_jax.models.weights import CorruptWeightsError

_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
SD1, SD2 = "sd1", "sd2"
PREDICTION_TYPES = ("epsilon", "v_prediction")
# The schedule every SD 1.x/2.x model was trained with (diffusers' single-file default).
SD_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


class NotStableDiffusionError(ValueError):
    """The file is a checkpoint, but not an SD 1.x/2.x one in the LDM layout."""


class AmbiguousArchitectureError(ValueError):
    """The tensors' shapes do not say the whole architecture; a config folder must."""


@dataclasses.dataclass(frozen=True)
class FileHeader:
    """A checkpoint's table of contents.

    Attributes:
      path: the file.
      dtypes: tensor name -> safetensors dtype ("F32", "F16", "BF16", "I64", ...).
      shapes: tensor name -> shape.
      metadata: the `__metadata__` strings (empty if none).
    """

    path: Path
    dtypes: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]


def read_header(path: str | Path) -> FileHeader:
    """Parses a safetensors header; refuses a truncated or non-safetensors file by name.

    Raises:
      CorruptWeightsError: the file is cut short, empty, or not safetensors.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if head[:4] == b"PK\x03\x04":  # torch.save's zip container
            raise CorruptWeightsError(
                f"{path} is a pickled PyTorch checkpoint (torch.save), not safetensors. Fix: "
                "rename it to .ckpt and pass --allow-pickle if you trust it (unpickling can "
                "run code), or convert it to safetensors."
            )
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > _MAX_HEADER:
            raise CorruptWeightsError(
                f"{path} is not a safetensors file ({size} bytes; no valid header). Fix: "
                "check that this is the checkpoint you meant, or download it again."
            )
        if 8 + length > size:
            raise CorruptWeightsError(
                f"{path} is truncated: its header alone should be {length} bytes, the file "
                f"holds {size} bytes in all. Fix: download or copy that file again."
            )
        try:
            raw = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptWeightsError(
                f"{path} is not a safetensors file (its header is not JSON: {e})."
            ) from e
    metadata = raw.pop("__metadata__", None) or {}
    try:
        dtypes = {k: v["dtype"] for k, v in raw.items()}
        shapes = {k: tuple(int(n) for n in v["shape"]) for k, v in raw.items()}
        end = max((int(v["data_offsets"][1]) for v in raw.values()), default=0)
    except (TypeError, KeyError, ValueError) as e:
        raise CorruptWeightsError(f"{path} has a malformed safetensors header ({e!r}).") from e
    if 8 + length + end > size:
        raise CorruptWeightsError(
            f"{path} is truncated: its header describes {8 + length + end} bytes, the file "
            f"holds only {size} ({100 * size / (8 + length + end):.0f}%): an interrupted "
            "download or copy. Fix: download or copy that file again."
        )
    return FileHeader(path, dtypes, shapes, dict(metadata))


def _under(keys, prefix: str) -> list[str]:
    return [k for k in keys if k.startswith(prefix)]


_LORA = re.compile(r"(^|[._])(lora_(up|down|A|B|te\d?|unet)|hada_w|lokr_w)")


def identify(shapes: Mapping[str, tuple[int, ...]], source: str) -> str:
    """ "sd1" (OpenAI CLIP text encoder) or "sd2" (OpenCLIP) for an LDM SD checkpoint.

    Raises:
      NotStableDiffusionError: naming what the file is instead.
    """
    keys = list(shapes)

    def refuse(what: str, fix: str) -> NotStableDiffusionError:
        return NotStableDiffusionError(
            f"{source} is {what}, not a Stable Diffusion 1.x/2.x checkpoint. Fix: {fix}"
        )

    lora = [k for k in keys if _LORA.search(k)]
    if lora:
        raise refuse(
            f"a LoRA/LyCORIS adapter ({len(lora)} low-rank tensors such as {lora[0]!r})",
            "pass the full base model; merge the adapter into it first in a tool that "
            "applies LoRAs if you want the adapted model.",
        )
    if "emb_params" in shapes or _under(keys, "string_to_param"):
        raise refuse(
            "a textual-inversion embedding", "pass the full model the embedding was made for."
        )
    if _under(keys, "conditioner.embedders."):
        raise refuse(
            "an SDXL checkpoint (conditioner.embedders.*)",
            "unlearn_jax supports SD 1.x and 2.x; use an SD 1.x/2.x model.",
        )
    if _under(keys, "control_model."):
        raise refuse("a ControlNet", "pass the base SD 1.x/2.x model.")
    unet = _under(keys, UNET_PREFIX)
    if unet and not _under(unet, UNET_PREFIX + "input_blocks."):
        kind = "an SD3" if any(".joint_blocks." in k for k in unet) else "a transformer"
        kind = "a Flux" if any(".double_blocks." in k for k in unet) else kind
        raise refuse(f"{kind} diffusion checkpoint", "use an SD 1.x/2.x (UNet) model.")
    if not unet:
        if _under(keys, VAE_PREFIX) or (
            _under(keys, "encoder.down.") and _under(keys, "decoder.up.")
        ):
            raise refuse(
                "a VAE-only file (an autoencoder, no UNet or text encoder)",
                "pass the full model; a separate VAE replaces the one inside a model in "
                "other tools, not here.",
            )
        if _under(keys, "down_blocks.") or _under(keys, "text_model.") or _under(keys, "encoder."):
            raise refuse(
                "a diffusers component file (one network with diffusers names)",
                "pass the diffusers folder it belongs to (the one holding model_index.json).",
            )
        raise refuse(
            f"an unknown checkpoint (no {UNET_PREFIX}* among its {len(keys)} tensors, e.g. "
            f"{', '.join(sorted(keys)[:3])})",
            "pass an SD 1.x/2.x single-file checkpoint or a diffusers folder.",
        )
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight", (0, 4))
    if conv_in[1] != 4 or _under(unet, UNET_PREFIX + "label_emb."):
        raise refuse(
            f"an inpainting, depth or upscaling model (its UNet takes {conv_in[1]} input "
            "channels or a class label)",
            "use a text-to-image SD 1.x/2.x model.",
        )
    has_text = {SD1: _under(keys, SD1_TEXT_PREFIX), SD2: _under(keys, SD2_TEXT_PREFIX)}
    if not _under(keys, VAE_PREFIX) or not (has_text[SD1] or has_text[SD2]):
        missing = [
            name
            for name, prefix in (("VAE", VAE_PREFIX), ("text encoder", "cond_stage_model."))
            if not _under(keys, prefix)
        ]
        raise refuse(
            f"an incomplete checkpoint (a UNet, but no {' and no '.join(missing)} tensors)",
            "pass a complete single-file checkpoint, or the diffusers folder.",
        )
    return SD2 if has_text[SD2] else SD1


def ema_names(shapes: Mapping[str, Any]) -> list[str]:
    """The file's EMA weight tensors (`model_ema.*` less its `decay`/`num_updates` scalars)."""
    return [
        k
        for k in shapes
        if k.startswith(EMA_PREFIX) and k not in ("model_ema.decay", "model_ema.num_updates")
    ]


def _count(shapes: Mapping[str, Any], prefix: str) -> int:
    """How many numbered children `prefix<N>.` the file has."""
    return len({k[len(prefix) :].split(".")[0] for k in shapes if k.startswith(prefix)})


def infer_configs(
    shapes: Mapping[str, tuple[int, ...]], layout: str, prediction_type: str, source: str
) -> dict[str, dict[str, Any]]:
    """diffusers configs of an SD 1.x/2.x checkpoint's UNet, VAE, text encoder and scheduler.

    Channel counts, depths, block types and the context width come from the
    shapes. What no shape holds follows SD's conventions and is only assumed for
    the standard sizes (context 768 = SD 1.x with CLIP ViT-L, 1024 = SD 2.x with
    OpenCLIP ViT-H): attention heads (SD 1.x: 8 per block; SD 2.x and CLIP: 64
    channels per head), 32 norm groups, the VAE scaling factor 0.18215, and SD 2.x
    using all but the last of OpenCLIP's 24 layers. `upcast_attention` is left off
    (it changes only float16 PyTorch numerics).

    Args:
      shapes: LDM tensor name -> shape (EMA copies may be present; they are ignored).
      layout: "sd1" or "sd2", from `identify`.
      prediction_type: "epsilon" or "v_prediction" (never read from a file: the user's word).
      source: the file, for messages.

    Raises:
      AmbiguousArchitectureError: non-standard sizes; a config folder must describe them.
    """
    u = UNET_PREFIX
    levels_in = _count(shapes, u + "input_blocks.")
    ops = sorted(
        int(k[len(u + "input_blocks.") :].split(".")[0])
        for k in shapes
        if k.startswith(u + "input_blocks.") and k.endswith(".0.op.weight")
    )
    context = {
        s[1] for k, s in shapes.items() if k.startswith(u) and k.endswith("attn2.to_k.weight")
    }
    if layout == SD1:
        text_width = shapes.get(SD1_TEXT_PREFIX + "text_model.embeddings.token_embedding.weight")
    else:
        text_width = shapes.get(SD2_TEXT_PREFIX + "token_embedding.weight")
    standard = {SD1: 768, SD2: 1024}[layout]
    if not ops or context != {standard} or text_width is None or text_width[1] != standard:
        raise AmbiguousArchitectureError(
            f"{source}: the architecture cannot be read from its tensors alone (cross-attention "
            f"width {sorted(context)}, text width {text_width and text_width[1]}; the standard "
            f"{layout.upper()} value is {standard}), so the attention heads and other settings "
            "are unknown. Fix: pass --model-config DIR (config.model.config): a diffusers "
            "folder of this model, or one holding its unet/, vae/ and text_encoder/ config.json."
        )
    per_block = ops[0] - 1
    levels = levels_in // (per_block + 1)
    first = [1 + b * (per_block + 1) for b in range(levels)]
    channels = [shapes[f"{u}input_blocks.{i}.0.in_layers.2.weight"][0] for i in first]
    down_attention = [
        bool(_count(shapes, f"{u}input_blocks.{i}.1.transformer_blocks.")) for i in first
    ]
    up_attention = [
        bool(_count(shapes, f"{u}output_blocks.{b * (per_block + 1)}.1.transformer_blocks."))
        for b in range(levels)
    ]
    depth = _count(shapes, f"{u}middle_block.1.transformer_blocks.")
    unet = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 96 if layout == SD2 and prediction_type == "v_prediction" else 64,
        "in_channels": shapes[u + "input_blocks.0.0.weight"][1],
        "out_channels": shapes[u + "out.2.weight"][0],
        "block_out_channels": channels,
        "layers_per_block": per_block,
        "down_block_types": [
            "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attention
        ],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
        "cross_attention_dim": standard,
        "attention_head_dim": 8 if layout == SD1 else [c // 64 for c in channels],
        "use_linear_projection": len(shapes[u + "middle_block.1.proj_in.weight"]) == 2,
        "transformer_layers_per_block": depth,
        "norm_num_groups": 32,
        "upcast_attention": False,
    }
    v = VAE_PREFIX
    vae_levels = _count(shapes, v + "encoder.down.")
    vae = {
        "_class_name": "AutoencoderKL",
        "in_channels": shapes[v + "encoder.conv_in.weight"][1],
        "out_channels": shapes[v + "decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * vae_levels,
        "up_block_types": ["UpDecoderBlock2D"] * vae_levels,
        "block_out_channels": [
            shapes[f"{v}encoder.down.{i}.block.0.conv1.weight"][0] for i in range(vae_levels)
        ],
        "layers_per_block": _count(shapes, v + "encoder.down.0.block."),
        "latent_channels": shapes[v + "post_quant_conv.weight"][0],
        "norm_num_groups": 32,
        "sample_size": unet["sample_size"] * 2 ** (vae_levels - 1),
        "scaling_factor": 0.18215,
    }
    if layout == SD1:
        t = SD1_TEXT_PREFIX + "text_model."
        layers = _count(shapes, t + "encoder.layers.")
        intermediate = shapes[t + "encoder.layers.0.mlp.fc1.weight"][0]
        positions = shapes[t + "embeddings.position_embedding.weight"][0]
        act = "quick_gelu"
    else:
        t = SD2_TEXT_PREFIX
        # OpenCLIP ViT-H has 24 layers, SD 2.x conditions on the 23rd; a file written
        # from a diffusers folder holds only those 23.
        layers = min(_count(shapes, t + "transformer.resblocks."), 23)
        intermediate = shapes[t + "transformer.resblocks.0.mlp.c_fc.weight"][0]
        positions = shapes[t + "positional_embedding"][0]
        act = "gelu"
    text = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": text_width[0],
        "hidden_size": standard,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": standard // 64,
        "max_position_embeddings": positions,
        "hidden_act": act,
        "projection_dim": shapes.get(
            SD2_TEXT_PREFIX + "text_projection", (0, 512 if layout == SD2 else 768)
        )[1],
    }
    scheduler = {**SD_SCHEDULER, "prediction_type": prediction_type}
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": scheduler}
