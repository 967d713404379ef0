"""The staged train step's programs (`staged_step`), jitted, and the step that runs them.

Every UNet evaluation of a staged step, the student's and the teacher's, in the forget
and in the retain term, is a call of one compiled program. `jit_staged` builds the
programs and `StagedParts.step` runs them in turn:

  prepare (per term)   the term's draws and inputs: (x_t, t, context) of each network
                       call the term makes, in chunks of `rows` rows (below);
  unet_forward         (trainable, θ0, x_t, t, context) -> (output, the residuals of
                       its VJP with respect to the trainable parameters); the teacher
                       calls it with θ0's own trainable leaves and drops the residuals;
  finish (per term)    the term's loss from the calls' outputs, and its gradient with
                       respect to each student output;
  unet_backward        (the forward's inputs, its residuals, output cotangent) -> the
                       gradient, float32; with micro-batches, (..., accumulated
                       gradient) -> the sum. A residual that is an input of the
                       forward (a weight, the context) is read from the inputs, not
                       written by the forward;
  update               the split step's (`StepParts.update`), or, where a term's
                       student output comes in several chunks, the same with each
                       term's chunk gradients summed first (inside the program,
                       where XLA folds the sum into the update's own loops).

How a term calls the network is read from the term itself: `prepare` and `finish`
trace the registry's loss function with a model whose `apply_fn` records its inputs
and returns zeros (prepare), or replays the outputs (finish). The losses therefore
exist once, and the staged gradient is the split step's to float rounding (tested).
Student and teacher go through the same compiled forward on the same rows, so at
θ = θ0 their outputs agree bit for bit and `retain_distill`'s gradient is exactly 0.

Every call runs in chunks of one micro-batch's rows (a call over two contexts, 2B
rows, is two chunks), so one forward and one backward serve every term, and every
staged method with the same trainable parameters and batch size run later in the
process reuses them (so does the update, the split step's program where no term has
several student chunks).
Every registry term calls the network on B or 2B rows; a term that did otherwise is
refused with a message. Terms that read the parameters other than through the
network ('anchor') keep their split-step program.

How the programs are lowered, compiled and kept for later runs is `staged_step`'s
(`compile_staged_step`); this module is what they compute.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from unlearn_jax.diffusion.forward import DiffusionModel
from unlearn_jax.trainer.batches import SHARED_KEYS
from unlearn_jax.trainer.sharding import BATCH_AXES
from unlearn_jax.trainer.state import TrainState
from unlearn_jax.unlearn.registry import FORGET_TERMS, RETAIN_TERMS, Preset
from unlearn_jax.unlearn.step import FORGET_STREAM, RETAIN_STREAM

PyTree = Any
STUDENT, TEACHER = "student", "teacher"  # what a term receives as `params` / `frozen`
# Terms that read the parameters only through `model.apply_fn`, and so can be staged.
STAGED_TERMS = ("neggrad", "remap", "esd", "noise", "retain_dm", "retain_distill")


def _term(preset: Preset, part: str) -> tuple[Callable, str, int]:
    if part == "forget":
        return FORGET_TERMS[preset.forget], preset.forget, FORGET_STREAM
    return RETAIN_TERMS[preset.retain], preset.retain, RETAIN_STREAM


def _micro_batch(batch: dict, index) -> dict:
    """Micro-batch `index` of a [micro_steps, micro_batch, ...] part batch, shared keys whole."""
    return {k: v if k in SHARED_KEYS else v[index] for k, v in batch.items()}


def _traced_term(term, model: DiffusionModel, batch, rng, hp, output_of=None, outputs=None):
    """(network calls [(kind, x_t, t, context)], loss, aux) of `term` with the network
    replaced: by zeros of its output's shape and dtype (`output_of(x, t, context)`, a
    ShapeDtypeStruct), or by `outputs[i]` for call i."""
    calls = []

    def apply_fn(params, x, t, context):
        if not (isinstance(params, str) and params in (STUDENT, TEACHER)):
            raise TypeError("a staged term may call the network only with its params or frozen")
        if outputs is None:
            out = output_of(x, t, context)
            result = jnp.zeros(out.shape, out.dtype)
        else:
            result = outputs[len(calls)]
        calls.append((params, x, t, context))
        return result

    loss, aux = term(
        dataclasses.replace(model, apply_fn=apply_fn), STUDENT, TEACHER, batch, rng, hp
    )
    return calls, loss, aux


@dataclasses.dataclass(frozen=True)
class StagedTerm:
    """One term's `prepare` and `finish` (jitted), and the kind of each network call
    they stand for (STUDENT or TEACHER), one per chunk of rows."""

    part: str
    prepare: Callable
    finish: Callable
    kinds: tuple[str, ...]

    @property
    def student_chunks(self) -> int:
        """How many chunks of student output (each one backward) the term has."""
        return self.kinds.count(STUDENT)


@dataclasses.dataclass(frozen=True)
class StagedParts:
    """A staged train step's programs (jitted or compiled) and what runs them.

    Attributes:
      terms: {'forget': StagedTerm, 'retain': StagedTerm} for staged terms.
      whole_terms: {'retain': split-step part} for terms that are not staged.
      forward, backward: the UNet's forward (with VJP residuals) and backward.
      update: the split step's update; with `summed`, one taking each term's list
        of chunk gradients.
      micro_steps: micro-batches per step (the batch's leading axis). With more
        than one, the backward accumulates each term's gradient (one per term).
      summed: whether `update` takes lists of chunk gradients.
    """

    terms: dict[str, StagedTerm]
    whole_terms: dict[str, Callable]
    forward: Callable
    backward: Callable
    update: Callable
    micro_steps: int
    summed: bool

    def step(self, teacher: PyTree, zeros: PyTree | None) -> Callable:
        """train_step(state, frozen_original, batch, train_key) running the programs.

        `teacher`: θ0's trainable leaves ({name: array}); `zeros`: float32 zeros
        shaped like them (the backward's first accumulator), with micro-batches.
        """

        def term_grads(part, state, frozen, batch, train_key):
            term = self.terms[part]
            grads, metrics = [], []
            for index in range(self.micro_steps):
                rows = term.prepare(state.step, train_key, index, batch)
                outs, residuals = [], []
                for kind, (x, t, context) in zip(term.kinds, rows, strict=True):
                    trainable = state.params if kind == STUDENT else teacher
                    out, res = self.forward(trainable, frozen, x, t, context)
                    outs.append(out)
                    if kind == STUDENT:
                        residuals.append(((trainable, frozen, x, t, context), res))
                cotangents, m = term.finish(state.step, train_key, index, batch, outs)
                for (inputs, res), ct in zip(residuals, cotangents, strict=True):
                    if self.micro_steps > 1:
                        grads = [self.backward(inputs, res, ct, grads[0] if grads else zeros)]
                    else:
                        grads.append(self.backward(inputs, res, ct))
                metrics.append(m)
            if len(metrics) > 1:
                metrics = [jax.tree.map(lambda *v: sum(v) / len(v), *metrics)]
            return grads if self.summed else grads[0], metrics[0]

        def train_step(state: TrainState, frozen_original, batch, train_key):
            g, metrics = {}, {}
            for part in ("forget", "retain"):
                if part in self.terms:
                    g[part], m = term_grads(part, state, frozen_original, batch[part], train_key)
                elif part in self.whole_terms:
                    args = (state.params, state.step, frozen_original)
                    g[part], m = self.whole_terms[part](*args, batch.get(part, {}), train_key)
                    if self.summed:
                        g[part] = [g[part]]
                else:
                    continue
                metrics.update(m)
            return self.update(state, g["forget"], g.get("retain"), metrics)

        return train_step


def jit_staged(
    model, preset, hparams, split, parts, mesh, state, frozen_original, batch, train_key, shardings
) -> StagedParts:
    """`compile_staged_step`'s programs (`staged_step`), jitted, not yet lowered; the
    arguments are its own."""
    forget_batch = batch["forget"]
    per_example = [v for k, v in forget_batch.items() if k not in SHARED_KEYS]
    micro_steps, micro_batch = per_example[0].shape[:2]
    # As the forward is lowered (shardings included): its trace is then this one's.
    abstract = lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=getattr(x, "sharding", None)
    )
    trainable_shapes = jax.tree.map(abstract, state.params)
    frozen_shapes = jax.tree.map(abstract, frozen_original)
    row_sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    whole = None if mesh is None else NamedSharding(mesh, PartitionSpec())

    residual_tree = {}

    def forward(trainable, frozen, x, t, context):
        apply = lambda tr: model.apply_fn(split.merge(tr, frozen), x, t, context)
        out, vjp = jax.vjp(apply, trainable)
        leaves, residual_tree["tree"] = jax.tree.flatten(vjp)
        # A residual that is one of the call's own inputs (a weight the input's gradient
        # needs, the context) is not an output: the backward takes the inputs instead.
        # Each such output was a copy kernel to compile, and a copy every call wrote.
        inputs = {
            id(a): i for i, a in enumerate(jax.tree.leaves((trainable, frozen, x, t, context)))
        }
        residual_tree["sources"] = [inputs.get(id(leaf)) for leaf in leaves]
        return out, [leaf for leaf in leaves if id(leaf) not in inputs]

    def backward(inputs, residuals, cotangent, *accumulated):
        """`inputs`: the forward call's (trainable, frozen, x, t, context)."""
        input_leaves, kept = jax.tree.leaves(inputs), iter(residuals)
        sources = residual_tree["sources"]
        leaves = [next(kept) if i is None else input_leaves[i] for i in sources]
        (grads,) = jax.tree.unflatten(residual_tree["tree"], leaves)(cotangent)
        grads = {n: g.astype(jnp.float32) for n, g in grads.items()}
        if accumulated:  # micro-batches: one running sum per term
            grads = {n: accumulated[0][n] + g for n, g in grads.items()}
        return grads

    forward.__name__, backward.__name__ = "unet_forward", "unet_backward"
    params_sharding = None if shardings is None else shardings.state.params
    jit_forward = jax.jit(forward)
    if params_sharding is None:
        jit_backward = jax.jit(backward)
    else:
        jit_backward = jax.jit(backward, out_shardings=params_sharding)

    def output_of(x, t, context):
        """A network call's output (shape and dtype): the staged forward's, traced
        abstractly on one chunk of the call's rows. Its lowering later reuses this
        trace, so the terms' traces cost no trace of the UNet of their own."""
        chunk = lambda a: jax.ShapeDtypeStruct(
            (micro_batch, *a.shape[1:]), a.dtype, sharding=row_sharding
        )
        args = (trainable_shapes, frozen_shapes, chunk(x), chunk(t), chunk(context))
        out = jax.eval_shape(jit_forward, *args)[0]
        return jax.ShapeDtypeStruct((x.shape[0], *out.shape[1:]), out.dtype)

    def rng_of(step, train_key, index, stream):
        key = jax.random.fold_in(jax.random.fold_in(train_key, step), index)
        return jax.random.fold_in(key, stream)

    # Which calls each term makes, and how many rows each has: one abstract trace.
    plans = {}
    for part in ("forget", "retain"):
        if part == "retain" and preset.retain is None:
            continue
        term, name, stream = _term(preset, part)
        if name not in STAGED_TERMS:
            continue
        kinds = []

        def calls_of(step, key, part=part, term=term, stream=stream, kinds=kinds):
            mb = _micro_batch(batch.get(part, {}), 0)
            rng = rng_of(step, key, 0, stream)
            calls, _, _ = _traced_term(term, model, mb, rng, hparams, output_of)
            kinds[:] = [c[0] for c in calls]
            return [c[1] for c in calls]

        shapes = jax.eval_shape(calls_of, state.step, train_key)
        call_rows = [x.shape[0] for x in shapes]
        if any(n % micro_batch for n in call_rows):
            raise ValueError(
                f"train.step_programs='staged': the {name!r} term calls the network on "
                f"{call_rows} rows, not multiples of the micro-batch ({micro_batch}). "
                "Fix: --config.train.step_programs=split."
            )
        plans[part] = (term, stream, tuple(kinds), call_rows)
    # One row count for every call: a call of n rows runs as n / rows chunks.
    rows = micro_batch

    def make_term(part, term, stream, call_kinds, call_rows):
        counts = [n // rows for n in call_rows]  # chunks per call
        kinds = tuple(k for k, c in zip(call_kinds, counts, strict=True) for _ in range(c))

        def chunked(x):
            return [x[i : i + rows] for i in range(0, x.shape[0], rows)]

        def prepare(step, train_key, index, part_batch):
            mb = _micro_batch(part_batch, index)
            rng = rng_of(step, train_key, index, stream)
            calls, _, _ = _traced_term(term, model, mb, rng, hparams, output_of)
            per_input = [[chunked(a) for a in c[1:]] for c in calls]
            return [chunk for xs, ts, cs in per_input for chunk in zip(xs, ts, cs, strict=True)]

        def finish(step, train_key, index, part_batch, outs):
            mb = _micro_batch(part_batch, index)
            rng = rng_of(step, train_key, index, stream)
            real, start = [], 0
            for count in counts:
                real.append(jnp.concatenate(outs[start : start + count]))
                start += count
            students = [i for i, k in enumerate(call_kinds) if k == STUDENT]

            def loss_of(student_outs):
                replay = list(real)
                for i, out in zip(students, student_outs, strict=True):
                    replay[i] = out
                _, loss, aux = _traced_term(term, model, mb, rng, hparams, outputs=replay)
                return loss, aux

            (loss, aux), cts = jax.value_and_grad(loss_of, has_aux=True)(
                [real[i] for i in students]
            )
            scale = 1.0 / micro_steps
            cts = [
                chunk
                for i, ct in zip(students, cts, strict=True)
                for chunk in chunked((ct * scale).astype(real[i].dtype))
            ]
            return cts, {f"{part}/loss": loss, **{f"{part}/{k}": v for k, v in aux.items()}}

        prepare.__name__, finish.__name__ = f"{part}_prepare", f"{part}_finish"
        if mesh is None:
            jit_prepare, jit_finish = jax.jit(prepare), jax.jit(finish)
        else:
            jit_prepare = jax.jit(prepare, out_shardings=row_sharding)
            jit_finish = jax.jit(finish, out_shardings=(row_sharding, whole))
        return StagedTerm(part, jit_prepare, jit_finish, kinds)

    terms = {part: make_term(part, *plan) for part, plan in plans.items()}
    whole_terms = {}
    if parts.retain is not None and "retain" not in terms:
        whole_terms["retain"] = parts.retain
    # One micro-batch: each chunk's gradient is its own backward's output, and a term
    # with several student chunks hands the update all of them (no separate sums).
    summed = micro_steps == 1 and max((t.student_chunks for t in terms.values()), default=1) > 1
    update = _summed_update(parts.update, shardings, terms, whole_terms) if summed else parts.update
    return StagedParts(terms, whole_terms, jit_forward, jit_backward, update, micro_steps, summed)


def _summed_update(update, shardings, terms: dict, whole_terms: dict) -> Callable:
    """`update` (the split step's, jitted) as a program taking each term's list of
    chunk gradients and summing them first."""
    combine_and_update = update.__wrapped__  # the function jax.jit wrapped
    total = lambda grads: jax.tree.map(lambda *g: functools.reduce(operator.add, g), *grads)

    def summed(state, g_f, g_r, metrics):
        return combine_and_update(state, total(g_f), None if g_r is None else total(g_r), metrics)

    summed.__name__ = combine_and_update.__name__
    if shardings is None:
        return jax.jit(summed, donate_argnums=(0,))
    sh, params = shardings, shardings.state.params
    count = lambda part: terms[part].student_chunks if part in terms else 1
    g_r = [params] * count("retain") if "retain" in terms or "retain" in whole_terms else None
    return jax.jit(
        summed,
        in_shardings=(sh.state, [params] * count("forget"), g_r, sh.replicated),
        out_shardings=(sh.state, sh.replicated),
        donate_argnums=(0,),
    )
