"""Single-file SD 1.x/2.x checkpoints (the LDM layout of A1111, ComfyUI, ...), in and out.

    plan = plan_single_file(path, SingleFileOptions(...))   # header only: kind, configs
    ... build the modules from plan.configs ...
    read_single_file_weights(plan, modules, param_dtype)    # strict, torch-free
    save_single_file(pipe, "model.safetensors")             # the LDM layout back

The architecture comes from `--model-config DIR` (a diffusers folder, or one
holding unet/, vae/, text_encoder/ config.json) or, for standard SD 1.x/2.x
sizes, from the tensors' shapes (`ldm_detect.infer_configs`). Whether the model
predicts noise or velocity is never guessed: it comes from the config folder's
scheduler or from `prediction_type`. Tensors of the file outside our three
networks (schedule buffers, `model_ema.*`, OpenCLIP's `text_projection` and
unused last layer) are not loaded and are written back byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open

from unlearn_jax.models import convert, ldm_detect, ldm_keys
from unlearn_jax.models.clip import is_clip_buffer
from unlearn_jax.models.ldm_detect import SD1, SD2, FileHeader
from unlearn_jax.models.weights import CorruptWeightsError, MissingWeightsError

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_PREFIXES = {"unet": ldm_keys.UNET_PREFIX, "vae": ldm_keys.VAE_PREFIX}
SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
}
# Where the tokenizer of a file read without a config folder lives (transformers cache/hub).
_TOKENIZERS = {
    SD1: ("openai/clip-vit-large-patch14", ""),
    SD2: ("stabilityai/stable-diffusion-2", "tokenizer"),
}


@dataclasses.dataclass(frozen=True)
class SingleFileOptions:
    """How to read a single-file checkpoint (ignored for diffusers folders).

    Attributes:
      model_config: diffusers folder (or one with unet/, vae/, text_encoder/ configs)
        describing the architecture; default: read from the tensors' shapes.
      prediction_type: "epsilon" or "v_prediction"; required unless `model_config`
        holds a scheduler config (it then overrides that config's value).
      ema: load the UNet from the file's `model_ema.*` copy instead of its weights.
    """

    model_config: str | Path | None = None
    prediction_type: str | None = None
    ema: bool = False


@dataclasses.dataclass
class SingleFilePlan:
    """A single-file checkpoint read as far as its header: what it is and how to build it.

    Attributes:
      header: the file's tensor names, dtypes, shapes and metadata.
      layout: "sd1" or "sd2".
      configs: diffusers configs of "unet", "vae", "text_encoder" and "scheduler".
      config_folder: the `model_config` folder, if one was given.
      ema: the UNet is read from `model_ema.*`.
      pickled: the file is a torch pickle (its tensors, already read, in `tensors`).
      tensors: the pickle's tensors (empty for safetensors, which are read on demand).
    """

    header: FileHeader
    layout: str
    configs: dict[str, dict[str, Any]]
    config_folder: Path | None
    ema: bool
    pickled: bool = False
    tensors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def path(self) -> Path:
        return self.header.path

    def tokenizer_location(self) -> tuple[str, str]:
        """(folder or hub id, subfolder) of the CLIP tokenizer to load."""
        if self.config_folder is not None and (self.config_folder / "tokenizer").is_dir():
            return str(self.config_folder / "tokenizer"), ""
        return _TOKENIZERS[self.layout]


def _read_pickle(path: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    if not allow_pickle:
        raise MissingWeightsError(
            f"{path} is a pickled checkpoint; unpickling can run arbitrary code, so it is "
            "refused by default. Fix: use the .safetensors release of this model, or, if you "
            "trust the file, pass --allow-pickle (config.model.allow_pickle=True)."
        )
    import torch

    try:
        # weights_only: tensors and plain containers only, even when pickles are allowed.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise CorruptWeightsError(
            f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {first}). "
            "Fix: check that this is the model file you meant (a .safetensors file must be "
            "named .safetensors), or download it again."
        ) from e
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.dtype == torch.bfloat16:
            out[key] = value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[key] = value.numpy()
    return out


def _header_of(path: Path, tensors: Mapping[str, np.ndarray]) -> FileHeader:
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    return FileHeader(
        path,
        {k: names.get(v.dtype, str(v.dtype)) for k, v in tensors.items()},
        {k: tuple(v.shape) for k, v in tensors.items()},
        {},
    )


def _config_folder(folder: Path) -> dict[str, dict[str, Any]]:
    configs = {}
    for name in COMPONENTS:
        path = folder / name / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"--model-config {folder} has no {name}/config.json. Fix: pass a diffusers "
                "folder of this model family (or one holding its unet/, vae/ and "
                "text_encoder/ config.json)."
            )
        configs[name] = json.loads(path.read_text())
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        configs["scheduler"] = json.loads(scheduler.read_text())
    return configs


def plan_single_file(
    path: str | Path, options: SingleFileOptions | None = None, *, allow_pickle: bool = False
) -> SingleFilePlan:
    """Identifies a single-file checkpoint and resolves its architecture (no weights read).

    Raises:
      ldm_detect.NotStableDiffusionError: a LoRA, SDXL, VAE-only, ... file (named).
      CorruptWeightsError: a truncated or non-safetensors file.
      AmbiguousArchitectureError: the architecture or prediction type is not known.
    """
    options = options or SingleFileOptions()
    path = Path(path)
    tensors: dict[str, np.ndarray] = {}
    if path.suffix.lower() in PICKLE_SUFFIXES:
        tensors = _read_pickle(path, allow_pickle)
        header = _header_of(path, tensors)
    else:
        header = ldm_detect.read_header(path)
    layout = ldm_detect.identify(header.shapes, str(path))
    ema = ldm_detect.ema_names(header.shapes)
    if options.ema and not ema:
        raise ValueError(
            f"{path} holds no EMA weights (model_ema.*), so --ema cannot select them. Fix: "
            "drop --ema (config.model.ema) to load its weights."
        )
    if ema and not options.ema:
        log.info("%s: ignoring its %d EMA tensors (model_ema.*); --ema loads them", path, len(ema))
    folder = Path(options.model_config).expanduser() if options.model_config else None
    prediction = options.prediction_type
    if prediction is not None and prediction not in ldm_detect.PREDICTION_TYPES:
        raise ValueError(
            f"prediction type {prediction!r} is unknown; valid: "
            f"{', '.join(ldm_detect.PREDICTION_TYPES)}"
        )
    configs = _config_folder(folder) if folder is not None else {}
    if prediction is None and "scheduler" not in configs:
        raise ldm_detect.AmbiguousArchitectureError(
            f"{path} does not say whether its model predicts noise (epsilon: SD 1.x and "
            "SD 2.x-base) or velocity (v_prediction: SD 2.x 768-v), and unlearn_jax does not "
            "guess. Fix: pass --prediction-type epsilon|v_prediction "
            "(config.model.prediction_type), or --model-config DIR with a scheduler/ config."
        )
    if folder is None:
        configs = ldm_detect.infer_configs(header.shapes, layout, prediction, str(path))
        log.info("%s: %s architecture read from the tensors' shapes", path, layout.upper())
    elif prediction is not None:
        stated = configs.get("scheduler", {}).get("prediction_type", prediction)
        if stated != prediction:
            log.warning("%s says prediction_type=%r; using %r as asked", folder, stated, prediction)
        configs["scheduler"] = {**configs.get("scheduler", ldm_detect.SD_SCHEDULER)}
        configs["scheduler"]["prediction_type"] = prediction
    return SingleFilePlan(
        header, layout, configs, folder, bool(options.ema), bool(tensors), tensors
    )


def ldm_tables(layout: str, modules: Mapping[str, nnx.Module]) -> dict[str, ldm_keys.LdmTable]:
    """The LDM key table of each of `modules` ("unet", "vae", "text_encoder")."""
    tables = {}
    for name, module in modules.items():
        keys = list(convert.param_keys(module))
        if name == "unet":
            tables[name] = ldm_keys.unet_table(module.config, keys)
        elif name == "vae":
            tables[name] = ldm_keys.vae_table(module.config, keys)
        elif layout == SD1:
            tables[name] = ldm_keys.sd1_text_table(keys)
        else:
            tables[name] = ldm_keys.sd2_text_table(keys)
    return tables


def torch_shapes(module: nnx.Module) -> dict[str, tuple[int, ...]]:
    """PyTorch-layout shape of each parameter (Linear `[out, in]`, Conv `[O, I, H, W]`)."""
    shapes = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        shape = tuple(var.get_value().shape)
        if str(path[-1]) == "kernel" and len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif str(path[-1]) == "kernel" and len(shape) == 2:
            shape = shape[::-1]
        shapes[convert.path_to_key(path)] = shape
    return shapes


def _kept_extra(name: str, key: str, layout: str, text_layers: int) -> bool:
    """Tensors under a network's prefix that are not parameters of our module (kept, unread)."""
    if name == "vae":
        return key.startswith(ldm_keys.VAE_PREFIX + "loss.")  # LDM's training-loss weights
    if name != "text_encoder":
        return False
    if layout == SD1:
        return is_clip_buffer(key)
    rest = key.removeprefix(ldm_keys.SD2_TEXT_PREFIX)
    unused = f"transformer.resblocks.{text_layers}."  # SD 2.x skips OpenCLIP's last layer
    return rest in ("text_projection", "logit_scale", "attn_mask") or rest.startswith(unused)


def _component_prefix(name: str) -> str:
    if name == "text_encoder":
        return "cond_stage_model."
    return _PREFIXES[name]


def _check(
    plan: SingleFilePlan, name: str, table: ldm_keys.LdmTable, module: nnx.Module
) -> list[str]:
    """The mismatch lines of one network (empty when the file matches the module)."""
    shapes = plan.header.shapes
    sizes = torch_shapes(module)
    expected = {k: ldm_keys.ldm_shape(e, sizes) for k, e in table.items()}
    read_as = (lambda k: ldm_keys.ema_key(k)) if (plan.ema and name == "unet") else (lambda k: k)
    prefix = _component_prefix(name)
    if plan.ema and name == "unet":
        present = set(ldm_detect.ema_names(shapes))
        wanted = {read_as(k): k for k in expected}
    else:
        layers = int(module.config.get("num_hidden_layers", 0)) if name == "text_encoder" else 0
        present = {
            k
            for k in shapes
            if k.startswith(prefix) and not _kept_extra(name, k, plan.layout, layers)
        }
        wanted = {k: k for k in expected}
    missing = sorted(set(wanted) - present)
    unexpected = sorted(present - set(wanted))
    bad = []
    for file_key in sorted(set(wanted) & present):
        want, have = expected[wanted[file_key]], shapes[file_key]
        squeezed = table[wanted[file_key]].conv1x1 and have == want[:2]
        if have != want and not squeezed:
            bad.append(f"    {file_key}: file has {have}, config expects {want}")
    lines = []
    if missing:
        lines.append(f"  missing tensors ({len(missing)}): {convert.format_names(missing)}")
    if unexpected:
        lines.append(
            f"  unexpected tensors ({len(unexpected)}): {convert.format_names(unexpected)}"
        )
    if bad:
        lines.append(f"  wrong shapes ({len(bad)}):")
        lines.extend(bad[:20])
    return lines


def read_tensors(plan: SingleFilePlan, names: list[str]) -> dict[str, np.ndarray]:
    """The named tensors, in the file's dtypes (bf16 as ml_dtypes.bfloat16)."""
    if plan.pickled:
        return {k: plan.tensors[k] for k in names}
    with safe_open(str(plan.path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in names}


def read_single_file_weights(
    plan: SingleFilePlan, modules: Mapping[str, nnx.Module], param_dtype: Any
) -> tuple[dict[str, np.dtype], dict[str, dict[str, np.ndarray]]]:
    """Loads the file's UNet, VAE and text encoder into `modules`, strictly, in place.

    Returns:
      (per network: its dtype in the file; per network: buffers to write back to a folder).

    Raises:
      convert.WeightMismatchError: listing every missing, unexpected or wrong-shaped
        tensor of every network, by its name in the file.
    """
    tables = ldm_tables(plan.layout, modules)
    problems = []
    for name, table in tables.items():
        lines = _check(plan, name, table, modules[name])
        if lines:
            problems += [f" {name}:", *lines]
    if problems:
        origin = (
            f"the configs in {plan.config_folder}"
            if plan.config_folder
            else "the architecture read from its shapes"
        )
        raise convert.WeightMismatchError(
            "\n".join(
                [
                    f"{plan.path} does not match {origin}:",
                    *problems,
                    "  Fix: pass --model-config DIR of this very model (same variant and "
                    "sizes), or check that the file is the checkpoint you meant.",
                ]
            )
        )
    file_dtypes, buffers = {}, {}
    for name, table in tables.items():
        renamed = {(ldm_keys.ema_key(k) if plan.ema and name == "unet" else k): k for k in table}
        tensors = {renamed[k]: v for k, v in read_tensors(plan, list(renamed)).items()}
        convert.load_torch_state(
            modules[name],
            ldm_keys.from_ldm(table, tensors),
            source=f"weights in {plan.path}",
            dtype=param_dtype,
        )
        dtypes = {v.dtype for v in tensors.values()}
        file_dtypes[name] = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)
        buffers[name] = {}
    position_ids = ldm_keys.SD1_TEXT_PREFIX + "text_model.embeddings.position_ids"
    if plan.layout == SD1 and position_ids in plan.header.shapes:
        buffers["text_encoder"] = {
            position_ids.removeprefix(ldm_keys.SD1_TEXT_PREFIX): read_tensors(plan, [position_ids])[
                position_ids
            ]
        }
    return file_dtypes, buffers
