"""The unlearning trainer: `train_and_evaluate(config, workdir)`, `evaluate`, `export`.

Sections of `train_and_evaluate`, in order:

  1. Resolve the config and load the model; refuse a workdir holding another run.
  2. Mesh and shardings: batch over ('data', 'fsdp'), parameters replicated or FSDP.
  3. Data: text embeddings, θ0's generations / trajectories (cached in the workdir).
  4. State: restore the latest complete checkpoint, or start at step 0 (SalUn's
     saliency mask is accumulated here, once).
  5. Loop: one jitted step per iteration (state donated, θ0 an argument), the
     metrics of step s read back while step s+1 runs; a non-finite step stops
     the run before anything after the last good checkpoint is saved.
  6. Checkpoints every `checkpoint.every` steps and at the end; periodic
     evaluation every `eval.every` steps; final evaluation into workdir/eval/.

Everything random depends only on (seed, step): the batch of step s
(`batches.stream_indices`) and its noise (`fold_in(train_key, s)`), so a run
resumed from step k equals the uninterrupted run bit for bit on one device.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image
import tqdm

from unlearn_jax.trainer import experiment
from unlearn_jax.trainer.batches import UnlearnData
from unlearn_jax.trainer.checkpoints import (
    Checkpoints,
    check_run_record,
    write_json_atomic,
)
from unlearn_jax.trainer.config_checks import check_config_values
from unlearn_jax.trainer.evaluation import EVAL_DIR, Evaluator
from unlearn_jax.trainer.restore import evaluate, export
from unlearn_jax.trainer.sharding import (
    make_mesh,
    param_shardings,
    replicated,
)
from unlearn_jax.trainer.state import (
    TrainState,
    abstract_state,
    init_state,
    make_optimizer,
    set_learning_rate,
)
from unlearn_jax.trainer.step_programs import (
    Run,
    batch_shardings_for,
    check_batch_layout,
    compile_step,
    jitted_train_step,
    put_batch,
)
from unlearn_jax.trainer.train_step import (
    make_saliency_grad_fn,
    merged_params,
    resolve_step_programs,
)
from unlearn_jax.trainer.writers import create_writer
from unlearn_jax.unlearn import combine

log = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "evaluate", "export", "train_and_evaluate"]

PyTree = Any
CACHE_DIR = experiment.CACHE_DIR


class NonFiniteLossError(FloatingPointError):
    """A train step produced NaN/inf losses, gradients or parameters."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says which checkpoint is kept and how to resume."""


def _json_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


# ---------------------------------------------------------------------------
# Placement on the mesh
# ---------------------------------------------------------------------------


def _with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


# ---------------------------------------------------------------------------
# State: fresh (with SalUn's saliency) or restored
# ---------------------------------------------------------------------------


def _saliency_mask(run: Run, data: UnlearnData) -> dict[str, jax.Array]:
    """SalUn: top keep_fraction of trainable entries by |forget-loss gradient| over the forget set.

    Returns {name: bool array shaped like the parameter}. Ties at the threshold go
    to the earlier entries in the split's parameter order (`ParamSplit.ordered`).
    """
    config, split = run.config, run.model.split
    grad_fn = make_saliency_grad_fn(run.model.diffusion, split)
    key = jax.random.fold_in(jax.random.key(config.seed), experiment.SALIENCY_STREAM)
    total = None
    for i, (weight, chunk) in enumerate(data.saliency_chunks(config.train.batch_size)):
        chunk = jax.device_put(chunk, replicated(run.mesh))
        grads = grad_fn(run.frozen, chunk, jax.random.fold_in(key, i))
        grads = {n: weight * g for n, g in grads.items()}
        total = grads if total is None else jax.tree.map(jnp.add, total, grads)
    masks = combine.saliency_mask(split.ordered(total), run.spec.hparams.keep_fraction)
    kept = sum(int(m.sum()) for m in masks)
    log.info("SalUn saliency mask keeps %d of %d trainable entries", kept, split.size)
    return split.named(masks)


def frozen_theta0(config: ml_collections.ConfigDict, model: experiment.Model) -> PyTree:
    """θ0 as the train step and evaluation hold it: float32, or the compute dtype.

    train.frozen_dtype="compute" casts every floating leaf to train.dtype. The
    network casts its parameters to the compute dtype where it reads them, so a
    θ0 cast beforehand computes bit for bit the same and takes half the memory
    in bfloat16. The trainable parameters and the optimizer stay float32 (they
    start from the float32 θ0, `_initial_state`).
    """
    if config.train.get("frozen_dtype", "float32") != "compute":
        return model.theta0
    dtype = experiment.DTYPES[config.train.get("dtype", "float32")]
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree.map(cast, model.theta0)


def _initial_state(run: Run, data: UnlearnData) -> TrainState:
    """Step 0: a copy of θ0's trainable part (float32), fresh optimizer state, SalUn's mask."""
    saliency = _saliency_mask(run, data) if run.spec.preset.saliency else None
    split = run.model.split
    trainable = split.select(run.model.theta0)
    build = jax.jit(
        lambda trainable, mask: init_state(trainable, run.optimizer, mask),
        out_shardings=run.state_shardings,
    )
    return build(trainable, saliency)


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


class _StepMetrics:
    """Host-side bookkeeping: NaN guard, interval means for the writer, the progress bar."""

    def __init__(self, writer, bar, log_every: int, lr: float, grad_clip: float = 0.0):
        self.writer, self.bar, self.log_every, self.lr = writer, bar, log_every, lr
        self.grad_clip = grad_clip
        self.interval: list[dict[str, float]] = []
        self.last: dict[str, float] = {}
        self.last_saved: int | None = None

    def check(self, step: int, metrics: dict[str, jax.Array], workdir: Path) -> None:
        """Reads back the metrics of the update that produced `step`; raises if non-finite."""
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not values.pop("finite"):
            bad = {k: v for k, v in values.items() if not math.isfinite(v)}
            kept = "no checkpoint was written"
            if self.last_saved is not None:
                where = workdir / "checkpoints"
                kept = f"the last good checkpoint (step {self.last_saved}) is kept in {where}"
            # optim.lr is part of the run's fingerprint: resuming this workdir with
            # another rate needs force_resume, so the advice says so.
            clip = "" if self.grad_clip else " and --config.optim.grad_clip=1.0"
            raise NonFiniteLossError(
                f"step {step}: non-finite values {bad} (losses, gradient norms or updated "
                f"parameters); stopped without saving this state, {kept}. Fix: lower the "
                f"learning rate (optim.lr={self.lr:g}): rerun in a new workdir with "
                f"--config.optim.lr={self.lr / 10:g}{clip}, or in this one with those and "
                "--config.train.force_resume=true to continue from the kept checkpoint."
            )
        self.last = values
        self.interval.append(values)
        self.bar.update(1)
        self.bar.set_postfix(forget=f"{values['forget/loss']:.4g}", refresh=False)
        if step % self.log_every == 0:
            self.flush(step)

    def flush(self, step: int) -> None:
        if not self.interval:
            return
        means = {k: float(np.mean([m[k] for m in self.interval])) for k in self.interval[0]}
        self.writer.write_scalars(step, means)
        self.writer.flush()
        self.interval = []


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Runs (or resumes) unlearning in `workdir` and evaluates the result.

    Returns:
      {'step': final step, the last step's training metrics, final evaluation metrics}.
    Raises:
      ValueError (bad config), FingerprintMismatchError (workdir holds another run),
      NonFiniteLossError (training diverged; the last good checkpoint is kept).
    """
    workdir = Path(workdir).absolute()
    # 1. What the run is; every config error is raised before the workdir is touched.
    check_config_values(config)
    spec = experiment.resolve_run(config)
    model = experiment.load_model(config, spec)
    optimizer = make_optimizer(config.optim)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
    check_batch_layout(config, mesh)
    workdir.mkdir(parents=True, exist_ok=True)
    check_run_record(
        workdir, spec.fingerprint, _json_config(config), force_resume=config.train.force_resume
    )
    # 2. Placement on the mesh.
    frozen = jax.device_put(frozen_theta0(config, model), param_shardings(mesh, model.theta0))
    abstract = abstract_state(model.split, model.theta0, optimizer, spec.preset.saliency)
    state_shardings = param_shardings(mesh, abstract)
    checkpoints = Checkpoints(workdir, keep=config.checkpoint.keep)
    run = Run(config, workdir, spec, model, mesh, optimizer, frozen, state_shardings, checkpoints)
    writer = create_writer(workdir, tensorboard=bool(config.train.get("tensorboard", True)))
    try:
        # 3. Data (generated once, cached in the workdir).
        data = experiment.build_data(config, spec, model.pipe, workdir / CACHE_DIR)
        # 4. State: the latest complete checkpoint, or step 0.
        start = checkpoints.latest_step()
        if start is None:
            state, start = _initial_state(run, data), 0
        else:
            state = checkpoints.restore(_with_shardings(abstract, state_shardings), start)
            # The config's learning rate, also when force_resume let it change.
            state = state.replace(opt_state=set_learning_rate(state.opt_state, config.optim.lr))
            log.info("resuming %s from step %d", workdir, start)
        writer.resume_at(start)  # steps after the checkpoint are logged again, not twice
        # 5-6. Loop, checkpoints, evaluation.
        evaluator = Evaluator(
            config,
            model.pipe,
            frozen,
            spec.eval_prompts,
            spec.eval_forget_prompts,
            mesh=mesh,
            cache_dir=workdir / CACHE_DIR,
        )
        state, last_metrics = _train_loop(run, data, state, start, evaluator, writer)
        final_step = int(jax.device_get(state.step))
        checkpoints.save(state)
        result: dict[str, Any] = {"step": final_step, **last_metrics}
        if config.eval.final and (config.eval.integrity or config.eval.classifier):
            params = merged_params(model.split, state.params, frozen)
            scalars = _final_evaluation(evaluator, params, final_step, workdir)
            _write_eval(writer, final_step, scalars, workdir)
            result.update(scalars)
        return result
    except KeyboardInterrupt as e:
        step = checkpoints.latest_step()
        kept = (
            f"the checkpoint of step {step} is kept; rerun the same `unlearn-jax unlearn` "
            "command with this --workdir to resume from it"
            if step is not None
            else "no checkpoint was saved yet; rerun the same `unlearn-jax unlearn` command "
            "with this --workdir to start again"
        )
        raise TrainingInterrupted(f"training in {workdir} stopped by Ctrl-C; {kept}.") from e
    finally:
        writer.close()
        checkpoints.close()


def _train_loop(
    run: Run,
    data: UnlearnData,
    state: TrainState,
    start: int,
    evaluator: Evaluator,
    writer: Any,
) -> tuple[TrainState, dict[str, float]]:
    """Steps start..train.steps; returns the final state and the last step's metrics."""
    config, model, mesh, workdir = run.config, run.model, run.mesh, run.workdir
    total_steps = int(config.train.steps)
    if start >= total_steps:
        if start > total_steps:
            log.warning("latest checkpoint at step %d > train.steps=%d", start, total_steps)
        return state, {}
    train_key = jax.random.fold_in(jax.random.key(config.seed), experiment.TRAIN_STREAM)
    batch_size, micro_steps = config.train.batch_size, config.train.grad_accum
    first = data.batch(start, batch_size, micro_steps, config.seed)
    batch_shardings = batch_shardings_for(mesh, first)
    programs = resolve_step_programs(
        str(config.train.get("step_programs", "auto")),
        jax.default_backend(),
        steps=total_steps,
        fsdp=mesh.shape["fsdp"],
        preset=run.spec.preset,
    )
    train_step = compile_step(
        run,
        jitted_train_step(run, batch_shardings, programs),
        programs,
        batch_shardings,
        state,
        run.frozen,
        put_batch(first, batch_shardings),
        train_key,
    )
    show = bool(config.train.get("progress", True)) and jax.process_index() == 0
    bar = tqdm.tqdm(total=total_steps, initial=start, desc="unlearn", unit="step", disable=not show)
    tracker = _StepMetrics(
        writer,
        bar,
        max(1, int(config.train.log_every)),
        config.optim.lr,
        float(config.optim.get("grad_clip", 0.0) or 0.0),
    )
    tracker.last_saved = run.checkpoints.latest_step()
    every, eval_every = int(config.checkpoint.every or 0), int(config.eval.every or 0)
    pending = None  # (step, metrics) of the last dispatched update, not yet read back
    with bar, warnings.catch_warnings():
        # CPU backends cannot donate some buffers; harmless, and noisy every step.
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        for step in range(start, total_steps):
            batch = data.batch(step, batch_size, micro_steps, config.seed)
            state, metrics = train_step(
                state, run.frozen, put_batch(batch, batch_shardings), train_key
            )
            # Read back the previous step while this one runs: the device stays busy.
            if pending is not None:
                tracker.check(*pending, workdir)
            pending, done = (step + 1, metrics), step + 1
            save = every and done % every == 0
            # The last step's evaluation is the final one, when that is on.
            last_and_final = done == total_steps and config.eval.final
            run_eval = eval_every and done % eval_every == 0 and not last_and_final
            if save or run_eval:
                tracker.check(*pending, workdir)  # never save or evaluate an unchecked state
                pending = None
            if save:
                tracker.last_saved = run.checkpoints.save(state)
            if run_eval:
                params = merged_params(model.split, state.params, run.frozen)
                out = workdir / EVAL_DIR / f"step_{done:06d}"
                scalars = evaluator(params, done, out, periodic=True)
                _write_eval(writer, done, scalars, workdir)
        if pending is not None:
            tracker.check(*pending, workdir)
    tracker.flush(total_steps)
    return state, tracker.last


def _write_eval(writer: Any, step: int, scalars: dict[str, float], workdir: Path) -> None:
    """Evaluation scalars, and the integrity grid (original vs unlearned) as an image."""
    writer.write_scalars(step, {f"eval/{k}": v for k, v in scalars.items()})
    grid = workdir / EVAL_DIR / f"step_{step:06d}" / "integrity" / "grid.png"
    if grid.is_file():
        with PIL.Image.open(grid) as image:
            writer.write_images(step, {"eval/integrity_grid": np.asarray(image.convert("RGB"))})
    writer.flush()


def _final_evaluation(evaluator: Evaluator, params, step: int, workdir: Path) -> dict[str, float]:
    """Runs the evaluators once per step (a rerun of a finished run reuses eval/final.json)."""
    final = workdir / EVAL_DIR / "final.json"
    if final.is_file():
        previous = json.loads(final.read_text())
        if previous.get("step") == step:
            return {k: v for k, v in previous.items() if k != "step"}
    scalars = evaluator(params, step, workdir / EVAL_DIR / f"step_{step:06d}")
    if jax.process_index() == 0:
        write_json_atomic(final, {"step": step, **scalars})
    return scalars
