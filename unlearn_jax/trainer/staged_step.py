"""The train step as a few shared programs: one UNet forward, one UNet backward ('staged').

`train.step_programs='staged'` (on CPU the default for two-term methods in runs of up
to `train_step.STAGED_MAX_STEPS` steps) compiles the network once, not once per use.
The split step (`train_step.jit_step_parts`) compiles each term's gradient as a
program of its own, and each holds the student's forward and backward and the
teacher's forward: a two-term step compiles the UNet's forward four times
and its backward twice. On XLA:CPU compile time grows with the number of kernels, so
that is most of the step's compile. Here every UNet evaluation of a step, the
student's and the teacher's, in the forget and in the retain term, is a call of one
compiled program; `staged_parts` says which programs, and builds them from the
registry's terms.

This module is how they are compiled and kept, apart from what they compute:
`compile_staged_step` jits them (or reuses those of an equal earlier call, `_JITTED`),
lowers each with the output info of the ones before it as its example arguments
(`_lower`), and compiles each on a worker thread as soon as it is lowered and a core
is free, a term's small programs after the others that wait (`_is_small`).

The price is speed: each network call is its own dispatch (a distill step makes six
forward and three backward calls), the teacher's forward writes residuals it does
not need, and XLA cannot schedule the student's and teacher's work together. On the
embedded model the staged distill step compiled in 15.5 s against the split step's
29.1 s and ran at 9.05 steps/s against 12.72 (`benchmarks.train_step`, 2 cores), so
it is the CPU default only for short runs of two-term methods. (With one term, the split
step too compiles the network's forward and backward once.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from unlearn_jax.diffusion.forward import DiffusionModel
from unlearn_jax.trainer.sharding import put_global
from unlearn_jax.trainer.staged_parts import StagedParts, jit_staged
from unlearn_jax.trainer.state import TrainState
from unlearn_jax.unlearn.hparams import UnlearnHParams
from unlearn_jax.unlearn.params import ParamSplit
from unlearn_jax.unlearn.registry import Preset

PyTree = Any

# Jitted staged programs by everything they are traced from: lowering the same jitted
# functions again for the same shapes is free, so runs that differ only in the
# learning rate or the data (a sweep, a resume, the tests) skip tracing them.
_JITTED: dict[tuple, StagedParts] = {}
_JITTED_MAX = 4


def _is_small(name: str) -> bool:
    """A term's `prepare` or `finish`: its draws, loss and cotangents, no network. These
    compile in 0.1-0.5 s alone; the network's programs and the update take seconds."""
    return name.endswith(("_prepare", "_finish"))


def _signature(tree: PyTree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


def _lower(
    staged: StagedParts, params_sharding, state, frozen_original, batch, train_key
) -> Iterator[tuple[str, jax.stages.Lowered]]:
    """(name, Lowered) of each of `staged`'s programs, in an order where each one's
    example arguments are the output info of those before it."""
    terms, whole_terms = staged.terms, staged.whole_terms
    jit_forward, jit_backward, update = staged.forward, staged.backward, staged.update
    step_args = (state.step, train_key)
    forward_lowered = None
    metrics = {}
    grads_info = None
    for part, term in terms.items():
        prepare = term.prepare.lower(*step_args, 0, batch[part])
        yield f"{part}_prepare", prepare
        outs = []
        for x, t, context in prepare.out_info:
            if forward_lowered is None:
                forward_args = (state.params, frozen_original, x, t, context)
                forward_lowered = jit_forward.lower(*forward_args)
                yield "unet_forward", forward_lowered
            outs.append(forward_lowered.out_info[0])
        finish = term.finish.lower(*step_args, 0, batch[part], outs)
        yield f"{part}_finish", finish
        cts, term_metrics = finish.out_info
        metrics.update(term_metrics)
        if grads_info is None:
            accumulated = ()
            if staged.micro_steps > 1:
                zeros = {
                    n: jax.ShapeDtypeStruct(p.shape, jnp.float32) for n, p in state.params.items()
                }
                if params_sharding is not None:
                    zeros = {
                        n: jax.ShapeDtypeStruct(z.shape, z.dtype, sharding=params_sharding[n])
                        for n, z in zeros.items()
                    }
                accumulated = (zeros,)
            residuals = forward_lowered.out_info[1]
            backward_lowered = jit_backward.lower(forward_args, residuals, cts[0], *accumulated)
            yield "unet_backward", backward_lowered
            grads_info = backward_lowered.out_info
    g = {part: grads_info for part in terms}
    if staged.summed:
        g = {part: [grads_info] * term.student_chunks for part, term in terms.items()}
    args = (state.params, state.step, frozen_original)
    for part, whole_term in whole_terms.items():
        low = whole_term.lower(*args, batch.get(part, {}), train_key)
        yield part, low
        g[part], term_metrics = low.out_info
        if staged.summed:
            g[part] = [g[part]]
        metrics.update(term_metrics)
    yield "update", update.lower(state, g["forget"], g.get("retain"), metrics)


def _compiled(staged: StagedParts, compiled: dict[str, Any]) -> StagedParts:
    """`staged` with each program replaced by its compiled executable from `compiled`."""
    terms = {
        part: dataclasses.replace(
            term, prepare=compiled[f"{part}_prepare"], finish=compiled[f"{part}_finish"]
        )
        for part, term in staged.terms.items()
    }
    whole = {part: compiled[part] for part in staged.whole_terms}
    return dataclasses.replace(
        staged,
        terms=terms,
        whole_terms=whole,
        forward=compiled["unet_forward"],
        backward=compiled["unet_backward"],
        update=compiled["update"],
    )


def compile_staged_step(
    model: DiffusionModel,
    preset: Preset,
    hparams: UnlearnHParams,
    split: ParamSplit,
    parts,
    mesh: Mesh | None,
    state: TrainState,
    frozen_original: PyTree,
    batch: dict,
    train_key: jax.Array,
    shardings=None,
    compile_one: Callable | None = None,
) -> Callable:
    """The staged train step, compiled: its programs jitted (or reused, `_JITTED`), each
    lowered and compiled on a worker thread as soon as it is lowered
    (`train_step.compile_all(..., compile_one)`).

    `parts`: the split step's jitted `StepParts` for the same model, preset and
    optimizer (its update, and the program of a term that cannot be staged);
    `shardings`: its `StepShardings`, or None (one device). `state`,
    `frozen_original`, `batch` and `train_key` are examples of the step's arguments
    (arrays, as the step gets them).
    Returns train_step(state, frozen_original, batch, train_key) -> (state, metrics).
    """
    from unlearn_jax.trainer.train_step import compile_all

    key = (
        parts,
        preset,
        hparams,
        split,
        None if mesh is None else (mesh.axis_names, tuple(d.id for d in mesh.devices.flat)),
        _signature(batch),
        _signature(frozen_original),
        _signature(state.params),
        None if shardings is None else str(jax.tree.leaves(shardings.state.params)),
    )
    staged = _JITTED.get(key)
    if staged is None:
        staged = jit_staged(
            model,
            preset,
            hparams,
            split,
            parts,
            mesh,
            state,
            frozen_original,
            batch,
            train_key,
            shardings,
        )
        while len(_JITTED) >= _JITTED_MAX:
            _JITTED.pop(next(iter(_JITTED)))
        _JITTED[key] = staged

    params_sharding = None if shardings is None else shardings.state.params
    lowered = _lower(staged, params_sharding, state, frozen_original, batch, train_key)
    staged = _compiled(staged, compile_all(lowered, compile_one, is_small=_is_small))
    # Host zeros placed directly: no program compiled per shape.
    if staged.micro_steps == 1:
        zeros = None
    elif shardings is None:
        zeros = {n: jax.device_put(np.zeros(p.shape, np.float32)) for n, p in state.params.items()}
    else:
        zeros = {
            n: put_global(np.zeros(p.shape, np.float32), shardings.state.params[n])
            for n, p in state.params.items()
        }
    # The teacher's trainable leaves in the student's dtypes, as the forward was compiled
    # (θ0 may be held in bfloat16: `merge` casts them back, exactly).
    teacher = split.select(frozen_original)
    if any(x.dtype != state.params[n].dtype for n, x in teacher.items()):
        dtypes = {n: p.dtype for n, p in state.params.items()}
        teacher = jax.jit(lambda t: {n: x.astype(dtypes[n]) for n, x in t.items()})(teacher)
    return staged.step(teacher, zeros)
