"""Loads a diffusers Stable Diffusion folder (or hub id, or single file) into Flax NNX modules.

`load_pipeline(path)` reads `model_index.json`, builds the UNet, VAE and CLIP
text encoder from their `config.json`, loads their safetensors weights through
the strict converter, and loads the tokenizer as transformers'
`CLIPTokenizer.from_pretrained(folder/tokenizer)` does (`clip_tokenizer`:
without importing transformers when the process caches tokenizers). Finding
and checking the folder, and writing one back (`save_pipeline`), is
`diffusers_folder`'s part.

A path to a file instead of a folder is a single-file checkpoint in the
original LDM layout (`.safetensors`; `.ckpt` only with `allow_pickle`): every
loader here reads it through `single_file` (its architecture from
`SingleFileOptions.model_config` or the tensors' shapes), so every command that
takes a model takes one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.models import convert, single_file, weights
from unlearn_jax.models.abstract import abstract_module
from unlearn_jax.models.clip import CLIPTextModel, is_clip_buffer, normalize_clip_keys
from unlearn_jax.models.clip_tokenizer import load_clip_tokenizer
from unlearn_jax.models.diffusers_folder import (
    PipelineError,
    read_json,
    read_model_index,
    resolve_model_path,
)
from unlearn_jax.models.single_file import SingleFileOptions, SingleFilePlan
from unlearn_jax.models.unet import UNet2DConditionModel
from unlearn_jax.models.vae import AutoencoderKL, normalize_vae_keys

log = logging.getLogger(__name__)


# transformers 5 writes CLIP text encoders without this prefix; older files have it.
_CLIP_PREFIX = "text_model."


def _vae_scale_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent pixel (8 for SD): 2 ** (number of VAE levels - 1)."""
    return 2 ** (len(vae.config["block_out_channels"]) - 1)


@dataclasses.dataclass
class PipelineStructure:
    """A pipeline folder's modules before their weights are read: configs, graphs, shapes.

    Enough to compile programs for the pipeline ahead of time (their inputs'
    shapes and dtypes are known) while the weights are still loading;
    `load_pipeline(..., structure=s)` then fills these very modules in.

    Attributes:
      unet, vae, text_encoder: modules whose variables are `jax.ShapeDtypeStruct`s.
      scheduler_config: the dict of `scheduler/scheduler_config.json`.
      source: the local folder (or single file).
      dtype, param_dtype: the compute and parameter dtypes the modules were built with.
      single_file: how a single-file checkpoint is read (None for a folder).
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    scheduler_config: dict
    source: Path
    dtype: Any
    param_dtype: Any
    single_file: SingleFilePlan | None = None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (8 for SD)."""
        return _vae_scale_factor(self.vae)


@dataclasses.dataclass
class StableDiffusion:
    """The components of a Stable Diffusion pipeline as Flax NNX modules.

    Attributes:
      unet, vae, text_encoder: NNX modules with diffusers/transformers names.
      tokenizer: transformers `CLIPTokenizer` from the folder's `tokenizer/`, or its
        cached equivalent (`clip_tokenizer.load_clip_tokenizer`).
      scheduler_config: the dict of `scheduler/scheduler_config.json`.
      source: the local folder (or single file) the pipeline was read from.
      file_dtypes: per component, the dtype its weights had on disk (for export).
      buffers: per component, non-parameter tensors (e.g. `position_ids`) to write back.
      strip_prefix: per component, a key prefix the source files did not have
        (written back without it, so an unchanged pipeline round-trips bit for bit).
      single_file: for a pipeline read from a single-file checkpoint, its plan (what
        `single_file_export` needs to write that layout back); None for a folder.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: Any
    scheduler_config: dict
    source: Path
    file_dtypes: dict[str, np.dtype]
    buffers: dict[str, dict[str, np.ndarray]]
    strip_prefix: dict[str, str] = dataclasses.field(default_factory=dict)
    single_file: SingleFilePlan | None = None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (8 for SD): 2 ** (number of VAE levels - 1)."""
        return _vae_scale_factor(self.vae)

    def tokenize(self, prompts: list[str]) -> np.ndarray:
        """Token ids [N, model_max_length], padded and truncated as diffusers does.

        A prompt longer than the window is cut there, as in diffusers; a
        `PromptTruncatedWarning` (once per prompt) says at which word.
        """
        warn_truncated(self.tokenizer, prompts)
        enc = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
        )
        return np.asarray(enc["input_ids"], dtype=np.int32)

    def encode_prompts(self, prompts: list[str]) -> jax.Array:
        """Text-encoder hidden states [N, L, D] that condition the UNet."""
        graphdef, state = nnx.split(self.text_encoder)
        # The ids go to the program as a NumPy array: jnp.asarray would first compile an
        # identity program for each new shape (0.2-1.2 s while the sampler compiles).
        return encode_ids(graphdef, state, self.tokenize(prompts))


class PromptTruncatedWarning(UserWarning):
    """A prompt is longer than the text encoder's window; its end is ignored."""


def warn_truncated(tokenizer: Any, prompts: list[str]) -> list[str]:
    """Warns once per prompt that exceeds the tokenizer's window; returns those prompts."""
    window = tokenizer.model_max_length
    long = []
    for prompt in dict.fromkeys(prompts):
        ids = tokenizer(prompt, truncation=False)["input_ids"]
        if len(ids) <= window:
            continue
        long.append(prompt)
        kept = tokenizer.decode(ids[1 : window - 1], skip_special_tokens=True)
        words = prompt.split()
        first_lost = words[min(len(kept.split()), len(words) - 1)]
        # Raised from here (stacklevel 1) with the prompt in the text: Python's default
        # filter shows each distinct message once per process, whoever tokenizes it.
        warnings.warn(
            f"prompt {prompt[:60]!r}{'...' if len(prompt) > 60 else ''} is {len(ids)} tokens, "
            f"longer than the text encoder's {window}; it is truncated from about the word "
            f"{first_lost!r} on (as diffusers does). Fix: shorten it.",
            PromptTruncatedWarning,
            stacklevel=1,
        )
    return long


@functools.partial(jax.jit, static_argnums=0)
def encode_ids(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array) -> jax.Array:
    """The text encoder's hidden states [N, L, D] of token ids [N, L].

    A function of the split module (not `nnx.jit` of the module), so that
    `text_to_image.precompile` can compile it from a `PipelineStructure`'s
    shapes before the weights are loaded.
    """
    return nnx.merge(graphdef, state)(ids)[0]


def _load_component(
    module: nnx.Module, folder: Path, name: str, *, variant, allow_pickle, param_dtype
) -> tuple[np.dtype, dict[str, np.ndarray], str]:
    tensors, source = weights.read_component_weights(
        folder / name, variant=variant, allow_pickle=allow_pickle
    )
    strip = ""
    if name == "vae":
        tensors = normalize_vae_keys(tensors)  # old attention names in; new names out
    if name == "text_encoder":
        if not any(k.startswith(_CLIP_PREFIX) for k in tensors):
            strip = _CLIP_PREFIX
        tensors = normalize_clip_keys(tensors)
    buffers = {k: v for k, v in tensors.items() if is_clip_buffer(k)}
    convert.load_torch_state(
        module, tensors, source=f"weights in {source}", ignore=is_clip_buffer, dtype=param_dtype
    )
    float_dtypes = {
        v.dtype
        for k, v in tensors.items()
        if np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16"
    }
    file_dtype = float_dtypes.pop() if len(float_dtypes) == 1 else np.dtype(np.float32)
    return file_dtype, buffers, strip


def read_structure(
    path_or_id: str | Path,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    single_file_options: SingleFileOptions | None = None,
    allow_pickle: bool = False,
) -> PipelineStructure:
    """The pipeline's modules without weights (configs and shapes only; fast).

    Args:
      path_or_id: local folder with model_index.json, a single-file checkpoint, or a
        hub id (online only).
      dtype, param_dtype, single_file_options, allow_pickle: as for `load_pipeline`.
    """
    folder = resolve_model_path(path_or_id)
    plan = None
    if folder.is_file():
        plan = single_file.plan_single_file(folder, single_file_options, allow_pickle=allow_pickle)
        configs = {n: plan.configs[n] for n in ("unet", "vae", "text_encoder")}
    else:
        if single_file_options not in (None, SingleFileOptions()):
            log.warning(
                "%s is a diffusers folder: its own configs and scheduler apply; the "
                "single-file options (model config, prediction type, EMA) are ignored",
                folder,
            )
        read_model_index(folder)
        configs = {
            n: read_json(folder / n / "config.json", f"the {n} config")
            for n in ("unet", "vae", "text_encoder")
        }
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    # Abstract modules: no random init of ~1B parameters that the files overwrite anyway.
    modules = {
        n: abstract_module(
            lambda rngs, c=c, n=n: c(configs[n], rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        )
        for n, c in classes.items()
    }
    if plan is not None:
        scheduler_config = plan.configs["scheduler"]
    else:
        scheduler_config = read_json(
            folder / "scheduler" / "scheduler_config.json", "the scheduler config"
        )
    return PipelineStructure(
        **modules,
        scheduler_config=scheduler_config,
        source=folder,
        dtype=dtype,
        param_dtype=param_dtype,
        single_file=plan,
    )


def load_pipeline(
    path_or_id: str | Path,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    variant: str | None = None,
    allow_pickle: bool = False,
    structure: PipelineStructure | None = None,
    single_file_options: SingleFileOptions | None = None,
) -> StableDiffusion:
    """Builds the NNX pipeline from a diffusers folder, a single-file checkpoint or hub id.

    Args:
      path_or_id: local folder with model_index.json, a single-file SD 1.x/2.x
        checkpoint (`.safetensors`; `.ckpt` with `allow_pickle`), or a hub id (online only).
      dtype: compute dtype of the modules (e.g. bf16 on accelerators).
      param_dtype: dtype the weights are loaded into, whatever the file dtype.
      variant: weight-file variant, e.g. "fp16".
      allow_pickle: permit `.bin` pickles (off by default: they can run code).
      structure: `read_structure(path_or_id, dtype=..., param_dtype=...)`, when
        already read (e.g. to compile while loading); its modules receive the
        weights. Default: read here.
      single_file_options: architecture, prediction type and EMA choice of a
        single-file checkpoint (see `single_file.SingleFileOptions`).
    """
    if structure is None:
        structure = read_structure(
            path_or_id,
            dtype=dtype,
            param_dtype=param_dtype,
            single_file_options=single_file_options,
            allow_pickle=allow_pickle,
        )
    elif (structure.dtype, structure.param_dtype) != (dtype, param_dtype):
        raise ValueError(
            f"the structure was built for dtype={structure.dtype}, param_dtype="
            f"{structure.param_dtype}; load_pipeline was asked for {dtype}, {param_dtype}."
        )
    if not isinstance(jax.tree.leaves(nnx.state(structure.unet))[0], jax.ShapeDtypeStruct):
        raise ValueError(
            "this PipelineStructure already holds loaded weights (its modules are the "
            "pipeline's); call read_structure again for another pipeline."
        )
    folder = structure.source
    modules = {n: getattr(structure, n) for n in ("unet", "vae", "text_encoder")}
    file_dtypes, buffers, strip_prefix = {}, {}, {}
    plan = structure.single_file
    if plan is not None:
        file_dtypes, buffers = single_file.read_single_file_weights(plan, modules, param_dtype)
        tokenizer = _single_file_tokenizer(plan)
    else:
        for name, module in modules.items():
            file_dtypes[name], buffers[name], strip_prefix[name] = _load_component(
                module,
                folder,
                name,
                variant=variant,
                allow_pickle=allow_pickle,
                param_dtype=param_dtype,
            )
        try:
            tokenizer = load_clip_tokenizer(folder / "tokenizer")
        except Exception as e:
            raise PipelineError(
                f"{folder / 'tokenizer'} could not be loaded as a CLIPTokenizer ({e}). "
                "Fix: it needs vocab.json and merges.txt (and tokenizer_config.json)."
            ) from e
    return StableDiffusion(
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=tokenizer,
        scheduler_config=structure.scheduler_config,
        source=folder,
        file_dtypes=file_dtypes,
        buffers=buffers,
        strip_prefix=strip_prefix,
        single_file=plan,
    )


def _single_file_tokenizer(plan: SingleFilePlan) -> Any:
    """The CLIP tokenizer of a single-file model: from --model-config, else the usual hub repo.

    A single file holds no tokenizer. SD 1.x uses OpenAI CLIP ViT-L/14's, SD 2.x its
    own copy (same vocabulary, "!" as padding); from the transformers cache when offline.
    """
    from transformers import CLIPTokenizer

    where, subfolder = plan.tokenizer_location()
    try:
        return CLIPTokenizer.from_pretrained(where, subfolder=subfolder)
    except Exception as e:
        raise PipelineError(
            f"{plan.path} holds no tokenizer, and loading {where} {subfolder} failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Fix: pass "
            "--model-config DIR (config.model.config), a diffusers folder of the same model "
            "family whose tokenizer/ holds vocab.json and merges.txt."
        ) from e
