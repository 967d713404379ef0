"""From a config to what the train loop needs: the resolved run, the model, the data.

resolve_run(config)            -> RunSpec: method, trainable group, hyperparameters,
                                  prompt sets, and the fingerprint of the run. Cheap;
                                  every config error that needs no model is raised here.
load_model(config, spec)       -> Model: pipeline, θ0, the pure model function, the split.
build_data(config, spec, ...)  -> UnlearnData: text embeddings and cached latents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from unlearn_jax.data import prompts as prompt_sets
from unlearn_jax.data import sources
from unlearn_jax.data.anchors import resolve_anchor_prompts, uses_prompt_anchors
from unlearn_jax.data.cache import model_key
from unlearn_jax.diffusion.forward import DiffusionModel
from unlearn_jax.diffusion.schedule import schedule_from_config
from unlearn_jax.models.pipeline import StableDiffusion, load_pipeline
from unlearn_jax.models.single_file import SingleFileOptions
from unlearn_jax.models.unet import UNet2DConditionModel
from unlearn_jax.trainer.batches import UnlearnData
from unlearn_jax.trainer.text_encoder import (
    joint_apply_fn,
    joint_mask,
    joint_params,
    text_encoder_group,
)
from unlearn_jax.unlearn.hparams import UnlearnHParams
from unlearn_jax.unlearn.params import ParamSplit
from unlearn_jax.unlearn.registry import BATCH_KEYS, Preset, get_preset

log = logging.getLogger(__name__)

PyTree = Any
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CACHE_DIR = "cache"  # <workdir>/cache: θ0's generations (training x0 and evaluation images)
# fold_in / seed-derivation ids, one per random purpose of a run.
TRAIN_STREAM, SALIENCY_STREAM = 0, 1
FORGET_X0_SEED, RETAIN_X0_SEED, FORGET_TRAJECTORY_SEED = 1, 2, 3
_HPARAM_FIELDS = tuple(f.name for f in dataclasses.fields(UnlearnHParams))


def derived_seed(seed: int, stream: int) -> int:
    """A seed for one data-generation purpose, distinct per (seed, stream), < 2**31."""
    return (int(seed) * 1_000_003 + stream) % 2**31


@dataclasses.dataclass
class RunSpec:
    """A config resolved into what the run is.

    Attributes:
      preset: the method; params_group: the trainable group/regex; hparams: merged
      hyperparameters; *_prompts: the prompt sets; anchor_prompts: [Pf] c_a of each
      forget prompt, in its order (all equal to forget.anchor unless per-prompt
      anchors are configured, see `unlearn_jax.data.anchors`);
      fingerprint: JSON-able dict of every setting that changes the result
      (compared on resume; train.steps, eval and checkpoint settings excluded).
      text_encoder: `unlearn.text_encoder` ('full' or a regex), or None when the
      text encoder is frozen (see `unlearn_jax.trainer.text_encoder`).
    """

    preset: Preset
    params_group: str
    hparams: UnlearnHParams
    forget_prompts: list[str]
    retain_prompts: list[str]
    eval_prompts: list[str]
    eval_forget_prompts: list[str]
    anchor_prompts: list[str]
    fingerprint: dict[str, Any]
    text_encoder: str | None = None


def resolve_hparams(preset: Preset, overrides: ml_collections.ConfigDict | None) -> UnlearnHParams:
    """preset.hparams with every non-None field of `unlearn.hparams` replaced."""
    given = {} if overrides is None else dict(overrides.items())
    unknown = sorted(set(given) - set(_HPARAM_FIELDS))
    if unknown:
        raise ValueError(
            f"unlearn.hparams has unknown field(s) {', '.join(unknown)}; valid: "
            f"{', '.join(_HPARAM_FIELDS)}"
        )
    changes = {k: v for k, v in given.items() if v is not None}
    return dataclasses.replace(preset.hparams, **changes)


def _prompt_summary(prompts: list[str]) -> Any:
    """The prompts themselves for small sets; count, hash and head for large ones."""
    if len(prompts) <= 64:
        return prompts
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
    return {"count": len(prompts), "sha256": digest, "first": prompts[:3]}


def _section(config: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
    return json.loads(config[name].to_json_best_effort()) if name in config else {}


def _hparams_record(hparams: UnlearnHParams) -> dict[str, Any]:
    """The hyperparameters for the fingerprint; fields added later appear only when changed,
    so that runs recorded before them keep their fingerprint."""
    record = dataclasses.asdict(hparams)
    if record["project_rounding"] == UnlearnHParams.project_rounding:
        del record["project_rounding"]
    return record


def resolve_run(config: ml_collections.ConfigDict) -> RunSpec:
    """Validates the config and resolves defaults; raises ValueError with a fix on bad input."""
    preset = get_preset(config.unlearn.method)
    group = config.unlearn.get("params") or preset.params
    hparams = resolve_hparams(preset, config.unlearn.get("hparams"))
    text_group = text_encoder_group(config)
    if group == "none" and text_group is None:
        raise ValueError(
            "unlearn.params='none' freezes the UNet and unlearn.text_encoder is 'none': no "
            "parameter would train. Fix: --config.unlearn.text_encoder=full (train only the "
            "text encoder) or choose a UNet group (full, xattn, noxattn or a regex)."
        )
    if not config.model.get("path"):
        raise ValueError(
            "model.path is not set. Fix: --config.model.path=/path/to/diffusers/folder (the "
            "folder with model_index.json), a single-file FILE.safetensors, or a hub id."
        )
    forget = prompt_sets.load_prompts(config.forget.prompts, "forget.prompts")
    anchor_fields = dict(
        anchor=config.forget.anchor,
        anchor_prompts=config.forget.get("anchor_prompts"),
        concept=config.forget.get("concept", ""),
        anchor_concept=config.forget.get("anchor_concept", ""),
    )
    anchors = resolve_anchor_prompts(forget, **anchor_fields)
    needs_retain = preset.retain is not None and bool(BATCH_KEYS[preset.retain])
    retain_spec = config.retain.get("prompts")
    if needs_retain or retain_spec:
        retain = prompt_sets.load_prompts(retain_spec, "retain.prompts")
        prompt_sets.warn_on_overlap(forget, retain)
    else:
        retain = []
    eval_spec = config.eval.get("prompts")
    if eval_spec:
        eval_prompts = prompt_sets.load_prompts(eval_spec, "eval.prompts")
    else:
        eval_prompts = retain
        if retain and config.eval.integrity and (config.eval.every or config.eval.final):
            log.warning(
                "eval.prompts is not set: integrity is measured on the training retain prompts, "
                "not on held-out ones. Set --config.eval.prompts for a held-out measurement."
            )
    forget_spec = config.eval.get("forget_prompts")
    eval_forget = (
        prompt_sets.load_prompts(forget_spec, "eval.forget_prompts") if forget_spec else forget
    )
    batch, accum = int(config.train.batch_size), int(config.train.get("grad_accum", 1) or 1)
    if batch < 1 or accum < 1 or batch % accum:
        raise ValueError(
            f"train.batch_size={batch} must be a positive multiple of train.grad_accum={accum}"
        )
    if config.train.get("dtype", "float32") not in DTYPES:
        raise ValueError(
            f"train.dtype {config.train.dtype!r} is unknown; valid: {', '.join(DTYPES)}"
        )

    fingerprint = {
        "model.path": _model_path_key(config.model.path),
        "model.variant": config.model.get("variant"),
        "train.dtype": config.train.get("dtype", "float32"),
        # Not "train.frozen_dtype": a θ0 cast to the compute dtype computes the same.
        "forget.prompts": _prompt_summary(forget),
        "forget.anchor": config.forget.anchor,
        "forget.images": config.forget.get("images") or "",
        "forget.images_per_prompt": config.forget.images_per_prompt,
        "retain.prompts": _prompt_summary(retain),
        "retain.images": config.retain.get("images") or "",
        "retain.images_per_prompt": config.retain.images_per_prompt,
        "unlearn.method": preset.name,
        "unlearn.params": group,
        "unlearn.hparams": _hparams_record(hparams),
        "optim": _section(config, "optim"),
        "sample": _section(config, "sample"),
        "seed": config.seed,
        "train.batch_size": batch,
        "train.grad_accum": accum,
    }
    if text_group is not None:
        # Only when on, so that workdirs of runs from before the option still resume.
        fingerprint["unlearn.text_encoder"] = text_group
    # Likewise the single-file options, only when set.
    options = single_file_options(config)
    if options.model_config:
        fingerprint["model.config"] = _model_path_key(str(options.model_config))
    if options.prediction_type:
        fingerprint["model.prediction_type"] = options.prediction_type
    if options.ema:
        fingerprint["model.ema"] = True
    if uses_prompt_anchors(anchor_fields["anchor_prompts"], anchor_fields["anchor_concept"]):
        # Likewise only when in use: forget.anchor alone still says what the anchors are.
        fingerprint["forget.anchor_prompts"] = _prompt_summary(anchors)
    return RunSpec(
        preset,
        group,
        hparams,
        forget,
        retain,
        eval_prompts,
        eval_forget,
        anchors,
        fingerprint,
        text_group,
    )


def single_file_options(config: ml_collections.ConfigDict) -> SingleFileOptions:
    """`model.config`, `model.prediction_type`, `model.ema` (for single-file checkpoints)."""
    model = config.model
    return SingleFileOptions(
        model_config=model.get("config") or None,
        prediction_type=model.get("prediction_type") or None,
        ema=bool(model.get("ema", False)),
    )


def model_identity(config: ml_collections.ConfigDict) -> Any:
    """What identifies θ0 in cache keys: the model's files, plus how a single file is read."""
    options = single_file_options(config)
    if options == SingleFileOptions():
        return model_key(config.model.path)
    return {
        "model": model_key(config.model.path),
        "config": str(options.model_config),
        "prediction_type": options.prediction_type,
        "ema": options.ema,
    }


def _model_path_key(path: str) -> str:
    local = Path(path).expanduser()
    return str(local.absolute()) if local.exists() else str(path)


@dataclasses.dataclass
class Model:
    """The loaded model as the train loop sees it.

    Attributes:
      pipe: the pipeline (text encoder, VAE, scheduler; its UNet and text encoder hold θ0).
      theta0: θ0 as a pure dict: the UNet's parameters, or, when the text encoder
        trains, `text_encoder.joint_params` of the UNet's and the text encoder's.
      diffusion: the pure `DiffusionModel` (remat variant when train.remat); its
        contexts are token ids when the text encoder trains.
      split: trainable/frozen split of theta0 by `unlearn.params` (and
        `unlearn.text_encoder`).
      program_key: hashable; equal for two models whose `diffusion` computes the same
        function of (params, x_t, t, context), so compiled train steps can be shared.
    """

    pipe: StableDiffusion
    theta0: PyTree
    diffusion: DiffusionModel
    split: ParamSplit
    # Everything `diffusion.apply_fn` computes with besides its arguments: the module
    # structure(s) (graphdefs hold dtypes and the remat flag) and the schedule.
    program_key: Any = None


def load_model(config: ml_collections.ConfigDict, spec: RunSpec) -> Model:
    """Loads the pipeline (compute dtype train.dtype, float32 parameters) and splits θ0."""
    dtype = DTYPES[config.train.get("dtype", "float32")]
    pipe = load_pipeline(
        config.model.path,
        dtype=dtype,
        param_dtype=jnp.float32,
        variant=config.model.get("variant") or None,
        allow_pickle=bool(config.model.get("allow_pickle", False)),
        single_file_options=single_file_options(config),
    )
    graphdef, state = nnx.split(pipe.unet)
    if config.train.get("remat", False):
        # Same parameters, a graph whose resnet/transformer blocks recompute
        # their activations in the backward pass.
        remat_unet = nnx.eval_shape(
            lambda: UNet2DConditionModel(
                dict(pipe.unet.config), rngs=nnx.Rngs(0), dtype=dtype, remat=True
            )
        )
        graphdef = nnx.split(remat_unet)[0]
    text_graphdef = None
    if spec.text_encoder is None:
        theta0 = state.to_pure_dict()
        split = ParamSplit.from_params(theta0, spec.params_group)

        def apply_fn(params, x_t, t, context):
            return nnx.merge(graphdef, params)(x_t, t, context)

    else:
        text_graphdef, text_state = nnx.split(pipe.text_encoder)
        theta0 = joint_params(state.to_pure_dict(), text_state.to_pure_dict())
        split = ParamSplit.from_mask(
            theta0, joint_mask(theta0, spec.params_group, spec.text_encoder)
        )
        apply_fn = joint_apply_fn(graphdef, text_graphdef)

    schedule = schedule_from_config(pipe.scheduler_config)
    diffusion = DiffusionModel(
        apply_fn, jnp.asarray(schedule.alphas_cumprod, jnp.float32), schedule.prediction_type
    )
    trainable, total = split.sizes(theta0)
    log.info(
        "training %d of %d %s parameters (%.2f%%, unlearn.params=%r%s)",
        trainable,
        total,
        "UNet" if spec.text_encoder is None else "UNet + text-encoder",
        100.0 * trainable / total,
        spec.params_group,
        "" if spec.text_encoder is None else f", unlearn.text_encoder={spec.text_encoder!r}",
    )
    alphas = np.asarray(schedule.alphas_cumprod, np.float32)
    program_key = (
        graphdef,
        text_graphdef,
        schedule.prediction_type,
        hashlib.sha256(alphas.tobytes()).hexdigest(),
    )
    return Model(pipe, theta0, diffusion, split, program_key)


def section_latents(
    config, pipe, prompts, section: str, seed: int, cache_dir: Path, model_id
) -> sources.Latents:
    """The training latents of `section` ('forget' or 'retain'): encoded from its
    `images` folder when one is given, else generated by θ0 from `prompts` (cached)."""
    cfg = config[section]
    images = cfg.get("images") or ""
    common = dict(
        height=config.sample.height,
        width=config.sample.width,
        batch_size=config.sample.batch_size,
        cache_dir=cache_dir,
        model_id=model_id,
    )
    if images:
        return sources.folder_latents(
            pipe, images, len(prompts), per_prompt=cfg.images_per_prompt, **common
        )
    return sources.generated_latents(
        pipe,
        prompts,
        per_prompt=cfg.images_per_prompt,
        steps=config.sample.steps,
        guidance=config.sample.guidance,
        seed=seed,
        progress=bool(config.train.get("progress", True)),
        **common,
    )


def build_data(
    config: ml_collections.ConfigDict, spec: RunSpec, pipe: StableDiffusion, cache_dir: Path
) -> UnlearnData:
    """Text embeddings (once) and the forget/retain latents (generated once, cached).

    When the text encoder trains, the prompts' token ids take the embeddings' place
    (the model encodes them itself, see `text_encoder`).
    """
    model_id = model_identity(config)
    preset = spec.preset
    if spec.text_encoder is None:
        embed = lambda prompts: sources.encode_prompt_set(pipe, prompts)
    else:
        embed = pipe.tokenize
    # Each distinct anchor is encoded once; batches gather it per example by prompt.
    distinct = list(dict.fromkeys(spec.anchor_prompts))
    row = {anchor: i for i, anchor in enumerate(distinct)}
    data = UnlearnData(
        preset=preset,
        forget_context=embed(spec.forget_prompts),
        anchor_context=embed(distinct),
        uncond_context=embed([""]),
        anchor_index=np.asarray([row[a] for a in spec.anchor_prompts], np.int32),
    )
    if preset.forget == "esd":
        data.forget_trajectories = sources.ddim_trajectories(
            pipe,
            spec.forget_prompts,
            per_prompt=config.forget.images_per_prompt,
            steps=config.sample.esd_steps,
            guidance=config.sample.esd_guidance,
            seed=derived_seed(config.seed, FORGET_TRAJECTORY_SEED),
            height=config.sample.height,
            width=config.sample.width,
            batch_size=config.sample.batch_size,
            cache_dir=cache_dir,
            model_id=model_id,
        )
    else:
        seed = derived_seed(config.seed, FORGET_X0_SEED)
        data.forget_latents = section_latents(
            config, pipe, spec.forget_prompts, "forget", seed, cache_dir, model_id
        )
    if data.needs_retain_data:
        data.retain_context = embed(spec.retain_prompts)
        seed = derived_seed(config.seed, RETAIN_X0_SEED)
        data.retain_latents = section_latents(
            config, pipe, spec.retain_prompts, "retain", seed, cache_dir, model_id
        )
    log.info(
        "data: %d forget examples%s",
        data.forget_size,
        f", {data.retain_latents.x0.shape[0]} retain examples" if data.needs_retain_data else "",
    )
    return data


def host_tree(tree: PyTree) -> PyTree:
    """A pytree of NumPy arrays (for saving or comparing)."""
    return jax.tree.map(np.asarray, tree)
