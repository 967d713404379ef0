"""Running an attack: settings, the sharded jitted loop, orbax checkpoints, resume.

`run_attack(pipe, unet_params, prompts, concept, x0, settings, workdir=...)`
optimises the attack's parameters (v* or δ, see `objectives`) against the
frozen model `pipe` with UNet `unet_params`, on θ0's latents `x0` of the forget
prompts. Like the trainer it runs on a ('data', 'fsdp') mesh (`unlearn.sharding`):
the batch is split over both axes, the UNet is replicated or FSDP-sharded, the
attack's state is replicated and donated. Everything random depends on
(settings.seed, step) only: the batch of step s is drawn by
`numpy.random.default_rng([seed, s])`, its noise by `fold_in(key(seed), s)`.

With a `workdir`, the state is saved with orbax under `workdir/checkpoints/`
every `checkpoint_every` steps and at the end; a rerun resumes from the latest
step (raising `steps` extends the attack), and a workdir holding another
attack (other settings, prompts or model) is refused.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from unlearn_jax.attacks import objectives
from unlearn_jax.attacks.prompts import (
    PlaceholderPrompts,
    concept_templates,
    init_tokens,
    placeholder_ids,
)
from unlearn_jax.data.sources import Latents, encode_prompt_set
from unlearn_jax.diffusion.forward import DiffusionModel
from unlearn_jax.diffusion.schedule import schedule_from_config
from unlearn_jax.diffusion.text_to_image import unet_model_fn
from unlearn_jax.models.pipeline import StableDiffusion
from unlearn_jax.trainer.checkpoints import (
    CHECKPOINT_DIR,
    FingerprintMismatchError,
    fingerprint_differences,
    set_aside_incomplete,
    write_json_atomic,
)
from unlearn_jax.trainer.sharding import (
    batch_devices,
    batch_sharding,
    make_mesh,
    param_shardings,
    put_global,
    replicated,
)

log = logging.getLogger(__name__)

PyTree = Any
RUN_FILE = "attack_run.json"
OPTIMIZERS = ("adam", "sgd")


class NonFiniteAttackError(FloatingPointError):
    """An attack step produced NaN/inf values."""


@dataclasses.dataclass(frozen=True)
class AttackSettings:
    """What an attack does; every field is part of its fingerprint.

    Attributes:
      method: 'embedding' (textual inversion) or 'context' (bounded context perturbation).
      steps: optimisation steps (0: the initial parameters are evaluated).
      tokens: k, learned tokens per concept occurrence (embedding).
      lr: the optimizer's learning rate.
      batch_size: θ0 latents per step (divisible by the mesh's batch devices).
      epsilon: the context attack's bound, relative to each token's norm.
      init_word: the word whose embedding v* starts from ('' = the concept itself).
      optimizer: 'adam' or 'sgd'.
      seed: the root of the batch order and the noise.
      checkpoint_every: steps between saves with a workdir (0: only at the end).
    """

    method: str = "embedding"
    steps: int = 100
    tokens: int = 1
    lr: float = 5e-3
    batch_size: int = 8
    epsilon: float = 0.1
    init_word: str = ""
    optimizer: str = "adam"
    seed: int = 0
    checkpoint_every: int = 0

    def __post_init__(self):
        problems = []
        if self.method not in objectives.METHODS:
            problems.append(f"method {self.method!r}: expected one of {objectives.METHODS}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r}: expected one of {OPTIMIZERS}")
        for name, low in (("steps", 0), ("tokens", 0), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(f"{name}={value!r}: expected an integer >= {low}")
        if not (isinstance(self.lr, (int, float)) and np.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr={self.lr!r}: expected a finite number > 0")
        if not (isinstance(self.epsilon, (int, float)) and 0 <= self.epsilon < np.inf):
            problems.append(f"epsilon={self.epsilon!r}: expected a finite number >= 0")
        if problems:
            raise ValueError("attack setting(s) out of range: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class AttackOutcome:
    """The learned attack and what it cost.

    Attributes:
      settings: as run.
      params: v* [k, D] or δ [P, L, D], float32 NumPy.
      placeholders: the embedding attack's placeholder prompts (None for 'context').
      base_context: [P, L, D] the forget prompts' unperturbed contexts (context attack).
      steps: steps taken in total (resumed ones included).
      seconds: wall time of this call's optimisation (compilation included).
      losses: the denoising loss of each step this call ran.
    """

    settings: AttackSettings
    params: np.ndarray
    placeholders: PlaceholderPrompts | None
    base_context: np.ndarray | None
    steps: int
    seconds: float
    losses: list[float]


def _diffusion(pipe: StableDiffusion) -> tuple[DiffusionModel, str]:
    graphdef, _ = nnx.split(pipe.unet)
    schedule = schedule_from_config(pipe.scheduler_config)
    alphas = np.asarray(schedule.alphas_cumprod, np.float32)
    model = DiffusionModel(unet_model_fn(graphdef), jnp.asarray(alphas), schedule.prediction_type)
    return model, hashlib.sha256(alphas.tobytes()).hexdigest()


def make_optimizer(settings: AttackSettings) -> optax.GradientTransformation:
    return optax.adam(settings.lr) if settings.optimizer == "adam" else optax.sgd(settings.lr)


# Jitted attack steps by everything their closure computes with, so that attacks of
# several models of one structure in one process (the demo's) trace and compile once.
_STEPS: collections.OrderedDict[Any, Any] = collections.OrderedDict()
_STEPS_MAX = 4


def _jitted_step(pipe: StableDiffusion, settings: AttackSettings, mesh: Mesh, frozen_shardings):
    model, schedule_hash = _diffusion(pipe)
    text_graphdef, _ = nnx.split(pipe.text_encoder)
    key = (
        settings.method,
        settings.optimizer,
        settings.lr,
        settings.epsilon,
        nnx.split(pipe.unet)[0],
        text_graphdef,
        schedule_hash,
        model.prediction_type,
        tuple(d.id for d in mesh.devices.flat),
        mesh.axis_names,
        mesh.devices.shape,
        str(jax.tree.leaves(frozen_shardings)),
    )
    if key in _STEPS:
        _STEPS.move_to_end(key)
        return _STEPS[key]
    optimizer = make_optimizer(settings)
    if settings.method == "embedding":
        loss = functools.partial(
            objectives.embedding_attack_loss,
            model=model,
            text_fn=objectives.clip_text_fn(text_graphdef),
        )
        project = None
    else:
        loss = functools.partial(objectives.context_attack_loss, model=model)
        epsilon = settings.epsilon
        project = lambda delta, frozen: objectives.project_context(
            delta, frozen["context"], epsilon
        )
    step = objectives.make_attack_step(loss, optimizer, project)
    per_example = batch_sharding(mesh)
    jitted = jax.jit(
        step,
        in_shardings=(
            replicated(mesh),
            frozen_shardings,
            {"x0": per_example, "prompt_index": per_example},
            replicated(mesh),
        ),
        out_shardings=(replicated(mesh), replicated(mesh)),
        donate_argnums=(0,),
    )
    _STEPS[key] = jitted
    while len(_STEPS) > _STEPS_MAX:
        _STEPS.popitem(last=False)
    return jitted


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The examples of step `step`: [batch_size] int, without replacement when there are enough."""
    rng = np.random.default_rng([seed, step])
    return rng.choice(num_examples, batch_size, replace=num_examples < batch_size)


def _frozen(
    pipe: StableDiffusion,
    unet_params: PyTree,
    prompts: Sequence[str],
    concept: str,
    settings: AttackSettings,
) -> tuple[dict[str, Any], PlaceholderPrompts | None, np.ndarray | None]:
    unet = unet_params.to_pure_dict() if isinstance(unet_params, nnx.State) else unet_params
    if settings.method == "embedding":
        placeholders = placeholder_ids(
            pipe.tokenizer, concept_templates(prompts, concept), settings.tokens
        )
        text = nnx.state(pipe.text_encoder).to_pure_dict()
        frozen = {
            "unet": unet,
            "text": text,
            "ids": placeholders.ids,
            "mask": placeholders.mask,
            "slot": placeholders.slot,
        }
        return frozen, placeholders, None
    context = encode_prompt_set(pipe, prompts)
    return {"unet": unet, "context": context}, None, context


def initial_params(
    pipe: StableDiffusion, concept: str, settings: AttackSettings, base_context: np.ndarray | None
) -> np.ndarray:
    """v* from `init_word`'s (or the concept's) embedding, or δ = 0."""
    if settings.method == "context":
        return np.zeros_like(base_context, np.float32)
    table = np.asarray(
        pipe.text_encoder.text_model.embeddings.token_embedding.embedding.get_value()
    )
    return init_tokens(table, pipe.tokenizer, settings.init_word or concept, settings.tokens)


def _check_record(workdir: Path, fingerprint: dict[str, Any]) -> None:
    path = workdir / RUN_FILE
    new = json.loads(json.dumps(fingerprint, default=str))
    if path.is_file():
        old = json.loads(path.read_text())
        differences = fingerprint_differences(old, new)
        if differences:
            raise FingerprintMismatchError(
                f"{workdir} holds a different attack; refusing to resume it. Differing fields "
                "(workdir -> now):\n" + "\n".join(differences) + "\nFix: use a new folder "
                "for this attack, or remove the old one."
            )
        return
    if jax.process_index() == 0:
        write_json_atomic(path, new)


class AttackCheckpoints:
    """The attack's orbax `CheckpointManager` (synchronous saves, resume from the latest)."""

    def __init__(self, workdir: Path):
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        set_aside_incomplete(self.directory)
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: objectives.AttackState) -> None:
        step = int(jax.device_get(state.step))
        if step not in self.manager.all_steps():
            self.manager.save(step, args=ocp.args.StandardSave(state.to_checkpoint()))
            self.manager.wait_until_finished()

    def restore(self, target: objectives.AttackState, step: int) -> objectives.AttackState:
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(target.to_checkpoint()))
        return objectives.AttackState.from_checkpoint(restored)

    def close(self) -> None:
        self.manager.close()


def run_attack(
    pipe: StableDiffusion,
    unet_params: PyTree,
    prompts: Sequence[str],
    concept: str,
    x0: Latents,
    settings: AttackSettings,
    *,
    workdir: str | Path | None = None,
    fingerprint: dict[str, Any] | None = None,
    mesh: Mesh | None = None,
    progress: Callable[[str], None] | None = None,
) -> AttackOutcome:
    """Optimises the attack on the frozen model (`pipe`'s text encoder, UNet `unet_params`).

    Args:
      pipe: the attacked pipeline (its tokenizer, text encoder and scheduler are used).
      unet_params: the attacked UNet's parameters (pure dict or nnx.State).
      prompts: the P forget prompts; each must name `concept` (embedding attack).
      concept: the erased concept's word.
      x0: θ0's latents of the prompts (`data.sources.generated_latents`), with the
        prompt of each row in `x0.prompt_index`.
      settings: the attack.
      workdir: where its orbax state and record live (None: nothing is saved).
      fingerprint: extra identity of the attack for the record (e.g. the models').
      mesh: a ('data', 'fsdp') mesh (default: all devices on 'data').
      progress: called with a line now and then.
    """
    mesh = mesh or make_mesh(-1, 1)
    if settings.batch_size % batch_devices(mesh):
        raise ValueError(
            f"the attack's batch size {settings.batch_size} must be divisible by the "
            f"{batch_devices(mesh)} devices it is split over. Fix: a batch size of "
            f"{max(1, settings.batch_size // batch_devices(mesh)) * batch_devices(mesh)}."
        )
    frozen, placeholders, base_context = _frozen(pipe, unet_params, prompts, concept, settings)
    params = initial_params(pipe, concept, settings, base_context)
    optimizer = make_optimizer(settings)
    frozen_shardings = {
        k: param_shardings(mesh, v) if k == "unet" else jax.tree.map(lambda _: replicated(mesh), v)
        for k, v in frozen.items()
    }
    frozen = jax.device_put(frozen, frozen_shardings)
    state = jax.device_put(objectives.init_attack_state(params, optimizer), replicated(mesh))
    checkpoints = None
    if workdir is not None:
        workdir = Path(workdir).absolute()
        workdir.mkdir(parents=True, exist_ok=True)
        # Flat, so that a refusal names the field (settings.lr: 0.01 -> 0.001).
        record = {f"settings.{k}": v for k, v in settings.to_json().items()}
        record.update(
            {
                "prompts": list(prompts),
                "concept": concept,
                "examples": int(x0.x0.shape[0]),
                "x0_sha256": hashlib.sha256(np.ascontiguousarray(x0.x0).tobytes()).hexdigest()[:16],
                **(fingerprint or {}),
            }
        )
        record.pop("settings.steps")  # raising steps extends an attack
        record.pop("settings.checkpoint_every")
        _check_record(workdir, record)
        checkpoints = AttackCheckpoints(workdir)
    try:
        start = 0
        if checkpoints is not None and checkpoints.latest_step() is not None:
            start = checkpoints.latest_step()
            target = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated(mesh)), state
            )
            state = checkpoints.restore(target, start)
            log.info("resuming the attack in %s from step %d", workdir, start)
        started, losses = time.time(), []
        if start < settings.steps:
            step_fn = _jitted_step(pipe, settings, mesh, frozen_shardings)
            key = jax.random.key(settings.seed)
            per_example = batch_sharding(mesh)
            pending = None
            every = settings.checkpoint_every
            for step in range(start, settings.steps):
                rows = batch_indices(x0.x0.shape[0], settings.batch_size, settings.seed, step)
                batch = {
                    "x0": put_global(x0.x0[rows], per_example),
                    "prompt_index": put_global(x0.prompt_index[rows].astype(np.int32), per_example),
                }
                state, metrics = step_fn(state, frozen, batch, key)
                if pending is not None:  # read back the previous step while this one runs
                    losses.append(_checked(*pending))
                pending = (step + 1, metrics)
                if checkpoints is not None and every and (step + 1) % every == 0:
                    losses.append(_checked(*pending))
                    pending = None
                    checkpoints.save(state)
                if progress and (step + 1) % max(1, settings.steps // 4) == 0:
                    progress(f"    attack step {step + 1}/{settings.steps}")
            if pending is not None:
                losses.append(_checked(*pending))
            if checkpoints is not None:
                checkpoints.save(state)
        seconds = time.time() - started
    finally:
        if checkpoints is not None:
            checkpoints.close()
    return AttackOutcome(
        settings=settings,
        params=np.asarray(jax.device_get(state.params), np.float32),
        placeholders=placeholders,
        base_context=base_context,
        steps=int(jax.device_get(state.step)),
        seconds=round(seconds, 2),
        losses=losses,
    )


def _checked(step: int, metrics: dict[str, jax.Array]) -> float:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not values.pop("finite"):
        raise NonFiniteAttackError(
            f"attack step {step}: non-finite values {values}. Fix: a lower attack learning rate."
        )
    return values["loss"]
