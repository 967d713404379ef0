"""A run's train step as compiled programs, and its batches' placement on the mesh.

`jitted_train_step` jits a run's step ('fused': one `jax.jit`; 'split' and
'staged': the jitted `StepParts`) and `compile_step` compiles it ('staged': with
`staged_step.compile_staged_step`). Both reuse what an equal run in this process
already built: `TRAIN_STEPS` holds jitted steps by everything their closure
computes with, `COMPILED_TRAIN_STEPS` compiled programs by their text. `Run` is
what a run's loop, checkpoints and evaluations share (`train.train_and_evaluate`
builds it).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from unlearn_jax.models.attention import batch_mesh
from unlearn_jax.program_cache import ProgramCache, compile_program
from unlearn_jax.trainer import experiment
from unlearn_jax.trainer.batches import SHARED_KEYS
from unlearn_jax.trainer.checkpoints import Checkpoints
from unlearn_jax.trainer.sharding import (
    batch_devices,
    batch_sharding,
    param_shardings,
    put_global,
    replicated,
)
from unlearn_jax.trainer.staged_step import compile_staged_step
from unlearn_jax.trainer.train_step import (
    StepShardings,
    compile_all,
    jit_step_parts,
    lower_step_parts,
    make_step_parts,
    split_step,
)

log = logging.getLogger(__name__)

PyTree = Any


@dataclasses.dataclass
class Run:
    """What a run's loop, checkpoints and evaluations share, built once by train_and_evaluate.

    Attributes:
      frozen: θ0 on the mesh (the train step's never-donated argument).
      state_shardings: NamedSharding of every leaf of the TrainState.
    """

    config: ml_collections.ConfigDict
    workdir: Path
    spec: experiment.RunSpec
    model: experiment.Model
    mesh: Mesh
    optimizer: optax.GradientTransformation
    frozen: PyTree
    state_shardings: PyTree
    checkpoints: Checkpoints


def batch_shardings_for(mesh, batch: dict[str, dict[str, np.ndarray]]) -> dict:
    per_example = batch_sharding(mesh, leading_dims=2)
    return {
        part: {k: replicated(mesh) if k in SHARED_KEYS else per_example for k in values}
        for part, values in batch.items()
    }


def put_batch(batch: dict, shardings: dict) -> dict:
    return {
        part: {k: put_global(v, shardings[part][k]) for k, v in values.items()}
        for part, values in batch.items()
    }


def check_batch_layout(config: ml_collections.ConfigDict, mesh) -> None:
    accum = config.train.grad_accum
    micro = config.train.batch_size // accum
    devices = batch_devices(mesh)
    if micro % devices:
        fixed = max(devices, micro // devices * devices) * accum
        raise ValueError(
            f"the micro-batch train.batch_size / train.grad_accum = {micro} must be divisible "
            f"by the {devices} devices the batch is split over (mesh.data x mesh.fsdp). Fix: "
            f"e.g. --config.train.batch_size={fixed}."
        )


# Compiled train-step programs by the hash of their lowered text. Runs in one
# process that differ in nothing a program depends on (tests, sweeps over the
# learning rate, a resume) skip XLA compilation, which dominates short runs; with
# split programs, methods that share a term (ablation's and distill's remap term)
# share its compiled gradient program too.
COMPILED_TRAIN_STEPS = ProgramCache("compiled train steps", max_size=8)


def compile_cached(lowered: jax.stages.Lowered, mesh, name: str):
    """`lowered` compiled; reused if the same program (text and devices) was compiled before.

    The key is the program text (shapes, shardings, donation and every constant
    are in it) plus the mesh's devices (which the text does not name) and the
    arguments' structure and types (for arguments the program does not use). The cache
    holds a future, so that programs compile side by side on other threads and a
    second thread wanting the same program waits for the first.
    """
    devices = ",".join(str(d.id) for d in mesh.devices.flat)
    # The arguments' structure and types too: jit drops unused arguments from the
    # program, so one text can stand for callers that pass different ones (a staged
    # term's contexts as embeddings or, with the text encoder training, token ids).
    args = f"{lowered.in_tree}{[(a.shape, a.dtype) for a in jax.tree.leaves(lowered.args_info)]}"
    key = hashlib.sha256((devices + args + lowered.as_text()).encode()).hexdigest()
    future, created = COMPILED_TRAIN_STEPS.get_or_create(key, concurrent.futures.Future)
    if created:
        log.info("compiling %s (first run of this program; cached afterwards)", name)
        try:
            future.set_result(compile_program(lowered))
        except BaseException as e:
            COMPILED_TRAIN_STEPS.discard(key)
            future.set_exception(e)
    return future.result()


def compile_step(run: Run, jitted: Any, programs: str, batch_shardings: dict, *example_args):
    """The runnable train step: one compiled program ('fused'), the split parts' or the
    staged programs' (`staged_step`)."""
    mesh = run.mesh
    compile_one = lambda name, program: compile_cached(program, mesh, f"the train step's {name}")
    with batch_mesh(mesh):  # kernels XLA cannot partition run per device (TPU attention)
        if programs == "fused":
            return compile_one("program", jitted.lower(*example_args))
        if programs == "staged":
            model, spec = run.model, run.spec
            return compile_staged_step(
                model.diffusion, spec.preset, spec.hparams, model.split, jitted, mesh,
                *example_args, step_shardings(run, batch_shardings), compile_one,
            )  # fmt: skip
        # Each part compiles on a worker thread while the next is traced.
        return split_step(compile_all(lower_step_parts(jitted, *example_args), compile_one))


# The jitted train steps themselves, by everything their closure computes with. A
# repeated lower() of the same jitted function with the same shapes is free, so runs
# that differ only in the learning rate or the data also skip tracing the step (several
# seconds for a tiny UNet's two-term step on two CPU cores, per run of a sweep).
TRAIN_STEPS = ProgramCache("jitted train steps", max_size=4)


def step_shardings(run: Run, batch_shardings: dict) -> StepShardings:
    frozen = param_shardings(run.mesh, run.frozen)
    return StepShardings(run.state_shardings, frozen, batch_shardings, replicated(run.mesh))


def jitted_train_step(run: Run, batch_shardings: dict, programs: str) -> Any:
    """The run's step jitted with its shardings ('fused': one `jax.jit`; 'split': the
    jitted `StepParts`), shared by equal runs."""
    model, spec, mesh = run.model, run.spec, run.mesh
    optim = json.loads(run.config.optim.to_json_best_effort())
    optim = {k: v for k, v in optim.items() if k != "lr"}
    frozen_shardings = param_shardings(mesh, run.frozen)
    key = (
        programs,
        model.program_key,
        spec.preset,
        spec.hparams,
        model.split,
        json.dumps(optim, sort_keys=True),  # lr is optimizer state, not part of the program
        tuple(d.id for d in mesh.devices.flat),
        mesh.axis_names,
        mesh.devices.shape,
        jax.tree.structure(batch_shardings),
        str(jax.tree.leaves(batch_shardings)),
        str(jax.tree.leaves(run.state_shardings)),
        str(jax.tree.leaves(frozen_shardings)),
    )

    def jit_step():
        parts = make_step_parts(
            model.diffusion, spec.preset, spec.hparams, run.optimizer, model.split, mesh
        )
        if programs in ("split", "staged"):  # staged: the split update and whole terms
            return jit_step_parts(parts, step_shardings(run, batch_shardings))
        return jax.jit(
            parts.step(),
            in_shardings=(
                run.state_shardings,
                frozen_shardings,
                batch_shardings,
                replicated(mesh),
            ),
            out_shardings=(run.state_shardings, replicated(mesh)),
            donate_argnums=(0,),
        )

    if model.program_key is None:  # a model without a structural key: never shared
        return jit_step()
    return TRAIN_STEPS.get_or_create(key, jit_step)[0]
