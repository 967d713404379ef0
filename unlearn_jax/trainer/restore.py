"""Evaluate and export the latest checkpoint of an unlearning run's workdir.

Both rebuild what they need from the workdir: `export` from the config the run
stored in run.json (so `unlearn-jax export --workdir DIR --out PATH` needs
nothing else), `evaluate` from the config passed in, which must describe the
same run (only its `eval` section may differ). `export` writes a diffusers
folder or a single-file LDM checkpoint (`format="single-file"`);
`convert_model` does the same for a model without a run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx

from unlearn_jax.models.diffusers_folder import check_new_folder, save_pipeline
from unlearn_jax.models.pipeline import load_pipeline
from unlearn_jax.models.single_file import COMPONENTS, SingleFileOptions
from unlearn_jax.models.single_file_export import check_new_file, save_single_file
from unlearn_jax.trainer import experiment
from unlearn_jax.trainer.checkpoints import (
    CHECKPOINT_DIR,
    Checkpoints,
    FingerprintMismatchError,
    fingerprint_differences,
    read_run_record,
)
from unlearn_jax.trainer.config_checks import check_config_values
from unlearn_jax.trainer.evaluation import EVAL_DIR, Evaluator
from unlearn_jax.trainer.sharding import make_mesh
from unlearn_jax.trainer.text_encoder import (
    TEXT_ENCODER,
    UNET,
    text_encoder_group,
    trained_components,
)
from unlearn_jax.trainer.train_step import merged_params

log = logging.getLogger(__name__)


def restore_latest(
    model: experiment.Model, workdir: Path, step: int | None = None
) -> tuple[int, dict[str, jax.Array]]:
    """(step, trainable params) of checkpoint `step` (default: the latest).

    Reads only what evaluation and export need, the parameters, so it also reads
    checkpoints whose optimizer state has an older layout (`Checkpoints.restore_params`).

    Raises FileNotFoundError naming the saved steps when `step` was not saved. A
    workdir without a checkpoint gives θ0's own values only when its run asked
    for no training (train.steps=0 in run.json). Otherwise training stopped before
    its first save (a NaN, a crash, Ctrl-C): exporting or evaluating θ0 as if it
    were the result would be a silent wrong answer, so that is an error.
    """
    if not (workdir / CHECKPOINT_DIR).is_dir():  # opening the manager would create it
        return _without_checkpoint(model, workdir)
    checkpoints = Checkpoints(workdir, keep=0)
    try:
        if step is not None and step not in checkpoints.manager.all_steps():
            saved = sorted(checkpoints.manager.all_steps())
            raise FileNotFoundError(
                f"{workdir} has no checkpoint at step {step}; saved steps: "
                f"{', '.join(map(str, saved)) or 'none'}. Fix: pick one of them (checkpoints "
                "are kept every checkpoint.every steps, the last checkpoint.keep of them)."
            )
        step = checkpoints.latest_step() if step is None else step
        if step is None:
            return _without_checkpoint(model, workdir)
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = {
            name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=single)
            for name, x in model.split.select(model.theta0).items()
        }
        return step, checkpoints.restore_params(target, step)
    finally:
        checkpoints.close()


def _without_checkpoint(model: experiment.Model, workdir: Path) -> tuple[int, dict[str, jax.Array]]:
    """θ0's trainable values for a run of train.steps=0; an error for any other run."""
    asked = int(read_run_record(workdir)["config"].get("train", {}).get("steps", 0))
    if asked > 0:
        raise FileNotFoundError(
            f"{workdir} holds no checkpoint, although its run asked for "
            f"train.steps={asked}: training stopped before its first save (see that "
            "run's log, e.g. a non-finite loss). Fix: run `unlearn-jax unlearn` again "
            "with this --workdir (after a NaN: with a lower --config.optim.lr and "
            "--config.train.force_resume=true), or export the original model from a new "
            "workdir run with --config.train.steps=0."
        )
    log.info("%s: train.steps=0, so the result is the original parameters", workdir)
    return 0, model.split.select(model.theta0)


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    step: int | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Metrics of checkpoint `step` (default: the latest) of `workdir`; eval settings of `config`.

    The config must describe the run in the workdir (same fingerprint); its
    `eval` section may differ. Results go to `out_dir` (default workdir/eval/step_<N>/).
    """
    workdir = Path(workdir).absolute()
    check_config_values(config)
    spec = experiment.resolve_run(config)
    stored = read_run_record(workdir)
    new = json.loads(json.dumps(spec.fingerprint, default=str))
    differences = fingerprint_differences(stored["fingerprint"], new)
    if differences:
        raise FingerprintMismatchError(
            f"the config does not describe the run in {workdir}; differing fields "
            "(workdir -> config):\n" + "\n".join(differences) + "\nFix: pass the config the "
            "run was trained with (only eval.* may differ)."
        )
    model = experiment.load_model(config, spec)
    step, trainable = restore_latest(model, workdir, step)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
    evaluator = Evaluator(
        config,
        model.pipe,
        model.theta0,
        spec.eval_prompts,
        spec.eval_forget_prompts,
        mesh=mesh,
        cache_dir=workdir / experiment.CACHE_DIR,
    )
    scalars = evaluator(
        merged_params(model.split, trainable, model.theta0),
        step,
        Path(out_dir) if out_dir is not None else workdir / EVAL_DIR / f"step_{step:06d}",
    )
    return {"step": step, **scalars}


FORMATS = ("folder", "single-file")


def _check_output(out: Path, format: str, unet_only: bool) -> None:
    """Refuses a bad `out`/`format`/`unet_only` before any model loads."""
    if format not in FORMATS:
        raise ValueError(f"export format {format!r} is unknown; valid: {', '.join(FORMATS)}")
    if unet_only and format != "single-file":
        raise ValueError(
            "--unet-only applies to --format single-file (a folder export already writes "
            "only the trained networks' weights and copies the rest)."
        )
    if format == "single-file":
        check_new_file(out)
    else:
        check_new_folder(out)


def _save(pipe, out: Path, format: str, components: tuple[str, ...], unet_only: bool) -> Path:
    if format == "folder":
        return save_pipeline(pipe, out, components=components)
    if unet_only and "text_encoder" in components:
        raise ValueError(
            "--unet-only writes only the UNet, but this run also trained the text encoder "
            "(unlearn.text_encoder): its result would be lost. Fix: drop --unet-only."
        )
    return save_single_file(pipe, out, components=("unet",) if unet_only else COMPONENTS)


def convert_model(
    path: str | Path,
    out: str | Path,
    *,
    format: str = "single-file",
    unet_only: bool = False,
    options: SingleFileOptions | None = None,
    variant: str | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Writes the model at `path` (folder, single file, hub id) at `out` in `format`.

    A folder from a single file, a single file from a folder, or the same format
    again (an unchanged model comes out bit for bit).
    """
    out = Path(out)
    _check_output(out, format, unet_only)
    if unet_only and not Path(path).expanduser().is_file():
        raise ValueError(
            f"--unet-only puts the UNet on top of the original single file, but {path} is "
            "not a single-file checkpoint. Fix: drop --unet-only (the whole model is written)."
        )
    pipe = load_pipeline(
        path, variant=variant, allow_pickle=allow_pickle, single_file_options=options
    )
    return _save(pipe, out, format, COMPONENTS, unet_only)


def export(
    workdir: str | Path, out: str | Path, *, format: str = "folder", unet_only: bool = False
) -> Path:
    """Writes the latest checkpoint of `workdir` as a diffusers folder at `out`.

    The UNet is written from the checkpoint (parameters outside unlearn.params
    are θ0's and come out bit for bit); when the text encoder trained
    (unlearn.text_encoder), the components that hold a trained parameter are
    written (text_encoder/ with the source's keys and dtypes; unet/ unless
    unlearn.params was 'none'). Every other file is copied from the original
    model folder. Refuses an existing non-empty `out`.

    `format="single-file"` writes one LDM-layout `.safetensors` instead (the
    networks above from the checkpoint, the others from the original model);
    `unet_only` there puts only the UNet on top of the original single file,
    copying every other tensor byte for byte. An existing `out` is refused.
    """
    workdir = Path(workdir).absolute()
    record = read_run_record(workdir)
    config = ml_collections.ConfigDict(record["config"])
    # The absolute model path (the run may have been started from another directory).
    config.model.path = record["fingerprint"].get("model.path") or config.model.path
    if record["fingerprint"].get("model.config"):
        config.model.config = record["fingerprint"]["model.config"]
    out = Path(out)
    _check_output(out, format, unet_only)
    preset = experiment.get_preset(config.unlearn.method)
    group = config.unlearn.get("params") or preset.params
    # Export needs neither the prompts nor the compute dtype: a float32 UNet, split as trained.
    config.train.dtype = "float32"
    config.train.remat = False
    text_group = text_encoder_group(config)  # run.json of older runs has no such field
    spec = experiment.RunSpec(preset, group, preset.hparams, [], [], [], [], [], {}, text_group)
    model = experiment.load_model(config, spec)
    step, trainable = restore_latest(model, workdir)
    params = model.split.merge(jax.device_get(trainable), model.theta0)
    if text_group is None:
        nnx.update(model.pipe.unet, params)
        components = ("unet",)
    else:
        nnx.update(model.pipe.unet, params[UNET])
        nnx.update(model.pipe.text_encoder, params[TEXT_ENCODER])
        components = trained_components(model.split.trainable_names)
    path = _save(model.pipe, out, format, components, unet_only)
    log.info("exported step %d of %s to %s", step, workdir, path)
    return path
