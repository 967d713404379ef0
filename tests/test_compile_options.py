"""How the sampler's and the trainer's programs compile (`program_cache.compile_program`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unlearn_jax import program_cache
from unlearn_jax.diffusion import (
    chunks,
    data_mesh,
    ddim_plan,
    sample_in_chunks,
    schedule_from_config,
)
from unlearn_jax.trainer import staged_step, train_step


def test_cpu_programs_compile_at_llvm_level_one_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert jax.default_backend() == "cpu"
    assert program_cache.cpu_compile_options() == {"xla_backend_optimization_level": 1}
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
    assert program_cache.cpu_compile_options() is None


def test_compile_program_passes_the_options_to_xla(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    lowered = jax.jit(lambda x: jnp.tanh(x) * 2).lower(jnp.ones(3))
    seen = []
    real = jax.stages.Lowered.compile

    def spy(self, compiler_options=None, **kwargs):
        seen.append(compiler_options)
        return real(self, compiler_options, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
    compiled = program_cache.compile_program(lowered)
    assert seen == [{"xla_backend_optimization_level": 1}]
    np.testing.assert_allclose(compiled(jnp.ones(3)), 2 * np.tanh(np.ones(3)), rtol=1e-6)
    # An option XLA does not know is refused, so the one passed is real.
    with pytest.raises(Exception, match="xla_no_such_option_here"):
        real(lowered, {"xla_no_such_option_here": 1})


def test_the_sampler_and_the_train_steps_parts_compile_through_it(monkeypatch):
    calls = []

    def spy(lowered):
        calls.append(lowered)
        return program_cache.compile_program(lowered)

    monkeypatch.setattr(chunks, "compile_program", spy)
    monkeypatch.setattr(train_step, "compile_program", spy)
    chunks.CHUNK_PROGRAMS.clear()
    model_fn = lambda params, x, t, c: x * params["a"] + c.mean(axis=(1, 2))[:, None, None, None]
    plan = ddim_plan(schedule_from_config({"num_train_timesteps": 1000}), 2)
    latents = np.ones((2, 4, 4, 1), np.float32)
    cond = np.ones((2, 3, 2), np.float32)
    sample_in_chunks(
        model_fn, {"a": jnp.float32(0.5)}, plan, latents, cond, np.ones((3, 2), np.float32),
        batch_size=2, mesh=data_mesh(jax.devices()[:1]), progress=False,
    )  # fmt: skip
    assert len(calls) == 1
    programs = [("double", jax.jit(lambda x: 2 * x).lower(jnp.ones(2)))]
    compiled = train_step.compile_all(programs)
    assert len(calls) == 2
    np.testing.assert_array_equal(compiled["double"](jnp.ones(2)), [2.0, 2.0])


def test_compile_all_takes_small_programs_after_every_other_waiting_one(monkeypatch):
    """With one core: while the first program compiles, four arrive; the free core then
    takes the large ones in their order of arrival, then the small ones."""
    import threading

    monkeypatch.setattr(train_step.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(train_step.os, "cpu_count", lambda: 1)
    all_lowered = threading.Event()
    order = []

    def compile_one(name, program):
        if not order:  # the first program: hold the only core until every program waits
            assert all_lowered.wait(timeout=60)
        order.append(name)
        return f"compiled {program}"

    def lowered():
        yield from [(n, n.upper()) for n in ("forward", "forget_prepare", "backward")]
        yield from [(n, n.upper()) for n in ("retain_finish", "update")]
        all_lowered.set()

    # The staged step's own predicate: a term's prepare and finish are the small ones.
    compiled = train_step.compile_all(lowered(), compile_one, is_small=staged_step._is_small)
    assert order == ["forward", "backward", "update", "forget_prepare", "retain_finish"]
    assert list(compiled) == ["forward", "forget_prepare", "backward", "retain_finish", "update"]
    assert compiled["update"] == "compiled UPDATE"
    # Without `is_small`, arrival order.
    order.clear()
    all_lowered.clear()
    train_step.compile_all(lowered(), compile_one)
    assert order == ["forward", "forget_prepare", "backward", "retain_finish", "update"]
