"""The jitted train step and SalUn's saliency pass, as pure functions of explicit arguments.

    train_step(state, frozen_original, batch, train_key) -> (state, metrics)

`frozen_original` is θ0, the full UNet parameter pytree: an argument, never
donated and never closed over. Closing over it would bake θ0 into the
compiled program as constants that XLA may fold differently from the same
values arriving as arguments, and retain_distill's "exactly zero at θ = θ0"
would no longer hold. The state is donated: its buffers are reused for the
new state.

Gradient accumulation scans over the leading [micro_steps] axis of the batch;
each term's gradient is averaged over micro-batches and the combiner runs
once on the averages (combiners are not linear). Micro-batch i uses
`fold_in(fold_in(train_key, step), i)`.

The step is three parts (`make_step_parts`): the forget term's gradient, the
retain term's gradient, and the update (combination, optimizer, metrics).
Jitted whole they are one program ('fused': what accelerators run and the
planner measures); `jit_step_parts` compiles each as its own program
('split': the CPU default for long runs, `train.step_programs`), and the step
runs them in turn with the same results. On CPU the three compile side by side
in less time than the one (distill on 2 cores: 61 s against 78 s for the embedded
model, 73 s against 115 s for the tiny test model), and methods that share a term
share its compiled program. `staged_step` goes further for short CPU runs: the
network itself is compiled once (and the split step's update reused where no
term's student output comes in several chunks).

Gradients, the combination, the optimizer update and the saliency mask stay
per parameter ({name: float32 array}): each has its parameter's shape and
sharding, so under FSDP every device holds 1/fsdp of them, and nothing the
size of all parameters is ever concatenated (see `unlearn.params`).

Under FSDP (a mesh with fsdp > 1) every parameter is all-gathered where the
network reads it (`gather_at_use`), in the student's passes and the
teacher's alike. Left to itself, XLA's sharding propagation partitions the
student's matmuls (whose gradients are reduce-scattered) differently from
the teacher's: their sums then run in different orders, and
retain_distill's student and teacher, equal at θ = θ0, no longer agree bit
for bit (6e-14 instead of 0 on the micro model at fsdp=8).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import heapq
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unlearn_jax.diffusion.forward import DiffusionModel
from unlearn_jax.program_cache import compile_program
from unlearn_jax.trainer.batches import SHARED_KEYS
from unlearn_jax.trainer.staged_parts import STAGED_TERMS
from unlearn_jax.trainer.state import TrainState, float32_tree
from unlearn_jax.unlearn import combine
from unlearn_jax.unlearn.hparams import UnlearnHParams
from unlearn_jax.unlearn.params import ParamSplit
from unlearn_jax.unlearn.registry import Preset
from unlearn_jax.unlearn.step import combine_term_grads, forget_saliency_grads, term_grad

PyTree = Any
TrainStep = Callable[[TrainState, PyTree, dict, jax.Array], tuple[TrainState, dict]]


def _all_finite(metrics: dict[str, jax.Array]) -> jax.Array:
    values = [jnp.all(jnp.isfinite(v)) for v in metrics.values()]
    return jnp.all(jnp.stack(values))


def gather_at_use(model: DiffusionModel, mesh: Mesh | None) -> DiffusionModel:
    """`model` whose apply_fn all-gathers the parameters first when `mesh` has fsdp > 1.

    Each parameter is constrained to be replicated where the network reads it,
    so every device runs the whole network on its own examples, in the same
    order of operations for the student and the teacher (module docstring).
    The gradient of the gather is the reduce-scatter of FSDP. Other meshes
    (and None) return `model` unchanged.
    """
    if mesh is None or mesh.shape.get("fsdp", 1) <= 1:
        return model
    whole = NamedSharding(mesh, PartitionSpec())
    apply_fn = model.apply_fn

    def gathered(params, *args):
        params = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, whole), params)
        return apply_fn(params, *args)

    return dataclasses.replace(model, apply_fn=gathered)


@dataclasses.dataclass(frozen=True)
class StepParts:
    """A train step as its parts, each a pure function that can be its own program.

    Attributes:
      forget: (params, step, frozen_original, forget batch, train_key) ->
        (float32 gradient {name: array}, metrics): the forget term's gradient,
        averaged over the batch's leading [micro_steps] axis.
      retain: the same for the retain term; None when the preset has none.
      update: (state, g_f, g_r or None, term metrics) -> (new state, metrics): the
        combination, saliency mask, optimizer update and the step's metrics.
    """

    forget: Callable
    retain: Callable | None
    update: Callable

    def step(self) -> TrainStep:
        """train_step(state, frozen_original, batch, train_key) calling the three parts."""
        forget, retain, update = self.forget, self.retain, self.update

        def train_step(state, frozen_original, batch, train_key):
            args = (state.params, state.step, frozen_original)
            g_f, metrics = forget(*args, batch["forget"], train_key)
            g_r = None
            if retain is not None:
                g_r, retain_metrics = retain(*args, batch.get("retain", {}), train_key)
                metrics = {**metrics, **retain_metrics}
            return update(state, g_f, g_r, metrics)

        return train_step


def concatenated_reductions(mesh: Mesh | None) -> bool:
    """Whether the update's global reductions (the terms' Gram matrix, the norms) run over
    the leaves concatenated (`combine.tree_gram`): on CPU, where XLA compiles a kernel
    per reduction, and only with every leaf whole on each device (no FSDP: raveling a
    sharded leaf would gather it). The mesh's devices decide, not this process's backend:
    the planner lowers steps for accelerators from a CPU host."""
    if mesh is None:
        return jax.default_backend() == "cpu"
    return mesh.shape.get("fsdp", 1) <= 1 and mesh.devices.flat[0].platform == "cpu"


def make_step_parts(
    model: DiffusionModel,
    preset: Preset,
    hparams: UnlearnHParams,
    optimizer: optax.GradientTransformation,
    split: ParamSplit,
    mesh: Mesh | None = None,
) -> StepParts:
    """The train step's parts (`StepParts`); `make_train_step` joins them into one function.

    `mesh`: the mesh the step is jitted for; under FSDP the parameters are
    gathered at use (`gather_at_use`). None: no constraint (one device, or
    data parallelism).
    """
    model = gather_at_use(model, mesh)
    concatenate = concatenated_reductions(mesh)
    # Any optax transformation: those of `state.make_optimizer` take the clip's norm.
    optimizer = optax.with_extra_args_support(optimizer)

    def term_part(part: str) -> Callable:
        def grads(params, step, frozen_original, batch, train_key):
            rng = jax.random.fold_in(train_key, step)
            merge = lambda trainable: split.merge(trainable, frozen_original)
            per_example = {k: v for k, v in batch.items() if k not in SHARED_KEYS}
            shared = {k: v for k, v in batch.items() if k in SHARED_KEYS}
            leaves = jax.tree.leaves(per_example)
            micro_steps = leaves[0].shape[0] if leaves else 1

            def micro_grads(index, micro_batch):
                g, metrics = term_grad(
                    part,
                    params,
                    merge,
                    frozen_original,
                    {**micro_batch, **shared},
                    jax.random.fold_in(rng, index),
                    preset,
                    model,
                    hparams,
                )
                return float32_tree(g), metrics

            if micro_steps == 1:
                return micro_grads(jnp.int32(0), jax.tree.map(lambda x: x[0], per_example))
            zeros = {n: jnp.zeros(p.shape, jnp.float32) for n, p in params.items()}

            def micro_step(accumulated, inputs):
                g, metrics = micro_grads(*inputs)
                return jax.tree.map(jnp.add, accumulated, g), metrics

            total, metrics = jax.lax.scan(micro_step, zeros, (jnp.arange(micro_steps), per_example))
            mean = lambda g: g / micro_steps
            return jax.tree.map(mean, total), jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)

        grads.__name__ = f"{part}_grads"  # the program's name in XLA's dumps and logs
        return grads

    def combine_and_update(state: TrainState, g_f, g_r, term_metrics):
        grads, combine_metrics = combine_term_grads(
            g_f, g_r, preset, hparams, state.saliency, concatenate
        )
        params32 = float32_tree(state.params)
        # The clip's norm is the one combine_term_grads computed (`state.clip_by_global_norm`).
        norm = combine_metrics["grad/norm"]
        updates, opt_state = optimizer.update(grads, state.opt_state, params32, global_norm=norm)
        if state.saliency is not None:
            # Weight decay or momentum must not move parameters outside the mask either.
            updates = combine.apply_mask(updates, state.saliency)
        moved = jax.tree.map(jnp.add, params32, updates)
        params = {n: moved[n].astype(p.dtype) for n, p in state.params.items()}
        metrics = {**term_metrics, **combine_metrics}
        metrics["param/norm"] = combine.tree_norm(moved, concatenate=concatenate)
        metrics["finite"] = _all_finite(metrics)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    retain = term_part("retain") if preset.retain is not None else None
    return StepParts(term_part("forget"), retain, combine_and_update)


def make_train_step(
    model: DiffusionModel,
    preset: Preset,
    hparams: UnlearnHParams,
    optimizer: optax.GradientTransformation,
    split: ParamSplit,
    mesh: Mesh | None = None,
) -> TrainStep:
    """The (unjitted) train step for a method; see the module docstring for its contract.

    Arguments as `make_step_parts`. Jitted whole, it is one program ('fused');
    `jit_step_parts` compiles the parts separately ('split').

    Returns:
      train_step(state, frozen_original, batch, train_key) -> (new state, metrics) where
      metrics holds the terms' losses, gradient norms and cosine, 'param/norm'
      and 'finite' (bool: every metric and the new parameters are finite).
    """
    return make_step_parts(model, preset, hparams, optimizer, split, mesh).step()


STEP_PROGRAMS = ("auto", "fused", "split", "staged")
# 'auto' stages a two-term step on CPU for runs of at most this many steps. On the
# embedded model the staged distill step compiled in 15.5-16.9 s instead of 27.2-29.1 s
# and ran at 9.0 steps/s instead of 12.7-12.9 (`benchmarks.train_step`, 2 cores):
# ahead below ~300-430 steps. Re-measured after the update's kernels were cut
# (2026-12-07, two alternating pairs): 12.9-13.2 s against 23.1-23.2 s, at 7.7-9.0
# steps/s against 14.0-14.2: ahead below ~200-300 steps. A one-term step compiles the
# network once either way, so it stays split.
STAGED_MAX_STEPS = 200


def resolve_step_programs(
    setting: str,
    backend: str,
    *,
    steps: int | None = None,
    fsdp: int = 1,
    preset: Preset | None = None,
) -> str:
    """'fused', 'split' or 'staged' for `train.step_programs` on `backend`.

    'auto' is 'fused' on accelerators: one program lets XLA schedule the whole
    step, and it is what the planner measures. On CPU it is 'staged'
    (`staged_step`) for a `preset` with two terms that both run through the
    network, a run of at most `STAGED_MAX_STEPS` steps and no FSDP; 'split'
    otherwise (and whenever `steps` or `preset` is None). The split step compiles
    in 22-36% less time than one program (module docstring) and runs 5-6% slower;
    on the embedded model it comes out ahead on runs shorter than about 1,700 steps,
    and a method whose term another method already compiled skips that program. The
    staged step trades more of the step's speed for less compilation.

    Raises:
      ValueError: an unknown setting, or 'staged' under FSDP (`fsdp` > 1).
    """
    if setting not in STEP_PROGRAMS:
        raise ValueError(
            f"train.step_programs={setting!r}: expected one of {', '.join(STEP_PROGRAMS)}"
        )
    if setting == "staged" and fsdp > 1:
        raise ValueError(
            f"train.step_programs='staged' runs without FSDP; this mesh has fsdp={fsdp}. "
            "Fix: --config.train.step_programs=split (or auto), or --config.mesh.fsdp=1."
        )
    if setting != "auto":
        return setting
    if backend != "cpu":
        return "fused"
    short = steps is not None and steps <= STAGED_MAX_STEPS
    two_terms = preset is not None and preset.retain in STAGED_TERMS
    return "staged" if short and two_terms and fsdp == 1 else "split"


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where a train step's arguments live: the state's, θ0's and the batch's shardings."""

    state: PyTree
    frozen: PyTree
    batch: dict
    replicated: NamedSharding


def jit_step_parts(parts: StepParts, shardings: StepShardings | None = None) -> StepParts:
    """Each part jitted as its own program; `.step()` of the result runs them in turn.

    The update donates the state. The gradients leave the term programs in the
    parameters' shardings (under FSDP each device keeps its slice).
    """
    if shardings is None:
        term = lambda f: None if f is None else jax.jit(f)
        update = jax.jit(parts.update, donate_argnums=(0,))
        return StepParts(term(parts.forget), term(parts.retain), update)
    sh, params = shardings, shardings.state.params

    def term(f, part):
        if f is None:
            return None
        batch = sh.batch.get(part, {})
        ins = (params, sh.state.step, sh.frozen, batch, sh.replicated)
        return jax.jit(f, in_shardings=ins, out_shardings=(params, sh.replicated))

    g_r = params if parts.retain is not None else None
    update = jax.jit(
        parts.update,
        in_shardings=(sh.state, params, g_r, sh.replicated),
        out_shardings=(sh.state, sh.replicated),
        donate_argnums=(0,),
    )
    return StepParts(term(parts.forget, "forget"), term(parts.retain, "retain"), update)


def lower_step_parts(
    jitted: StepParts, state: TrainState, frozen_original: PyTree, batch: dict, train_key
) -> Iterator[tuple[str, jax.stages.Lowered]]:
    """('forget', ...), ('retain', ...) when there is one, ('update', ...): each jitted
    part lowered for these arguments, yielded as soon as it is lowered (so that
    `compile_all` compiles it while the next is traced). The update's gradient and
    metric arguments are the term programs' outputs (shapes, dtypes, shardings)."""
    args = (state.params, state.step, frozen_original)
    forget = jitted.forget.lower(*args, batch["forget"], train_key)
    yield "forget", forget
    g_f, metrics = forget.out_info
    g_r = None
    if jitted.retain is not None:
        retain = jitted.retain.lower(*args, batch.get("retain", {}), train_key)
        yield "retain", retain
        g_r, retain_metrics = retain.out_info
        metrics = {**metrics, **retain_metrics}
    yield "update", jitted.update.lower(state, g_f, g_r, metrics)


def compile_all(
    lowered: Iterable[tuple[str, jax.stages.Lowered]],
    compile_one: Callable | None = None,
    is_small: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """{name: compiled program} of (name, lowered) pairs, compiled on worker threads, one
    per core, as they arrive (XLA releases the GIL while it compiles, so the next program
    is traced meanwhile). `compile_one(name, lowered)`: default
    `program_cache.compile_program(lowered)`.

    A core that comes free takes the program that arrived first among those waiting,
    except that programs for which `is_small(name)` holds (those compiling in a fraction
    of a second) wait behind every other. The staged step's last program, the update,
    is its longest compile after the network's; queued behind the small programs that
    arrived before it, it started seconds later than it could.
    """
    compile_one = compile_one or (lambda name, program: compile_program(program))
    is_small = is_small or (lambda name: False)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    waiting: list[tuple[bool, int, str, jax.stages.Lowered]] = []  # a heap
    lock = threading.Lock()
    compiled: dict[str, Any] = {}

    def compile_next() -> None:  # one task per program: the first in the heap's order
        with lock:
            _, _, name, program = heapq.heappop(waiting)
        compiled[name] = compile_one(name, program)

    names, tasks = [], []
    with concurrent.futures.ThreadPoolExecutor(max(1, cores or 1)) as pool:
        for arrival, (name, program) in enumerate(lowered):
            with lock:
                heapq.heappush(waiting, (is_small(name), arrival, name, program))
            names.append(name)
            tasks.append(pool.submit(compile_next))
        for task in tasks:
            task.result()
    return {name: compiled[name] for name in names}


def split_step(compiled: dict[str, Any]) -> TrainStep:
    """The train step running `compile_all`'s programs in turn."""
    return StepParts(compiled["forget"], compiled.get("retain"), compiled["update"]).step()


def make_saliency_grad_fn(
    model: DiffusionModel, split: ParamSplit
) -> Callable[[PyTree, dict, jax.Array], dict[str, jax.Array]]:
    """Jitted (frozen_original, forget chunk {'x0','context'}, rng) -> gradient at θ0.

    The gradient of the forget denoising loss with respect to the trainable
    parameters, evaluated at θ = θ0 (SalUn's saliency is taken there), as
    {name: float32 array} of `split`'s trainable leaves.
    """

    def grad_fn(frozen_original, chunk, rng):
        merge = lambda trainable: split.merge(trainable, frozen_original)
        grads = forget_saliency_grads(split.select(frozen_original), merge, chunk, rng, model)
        return float32_tree(grads)

    return jax.jit(grad_fn)


@functools.partial(jax.jit, static_argnums=0)
def merged_params(split: ParamSplit, trainable: dict, full: PyTree) -> PyTree:
    """`split.merge(trainable, full)` as one compiled call."""
    return split.merge(trainable, full)
