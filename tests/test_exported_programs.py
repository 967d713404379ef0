"""Traced programs kept across processes: read back untraced, equal, named by their inputs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampler import make_inputs, make_model, make_plan

from unlearn_jax import exported_programs
from unlearn_jax.diffusion import chunks
from unlearn_jax.diffusion.chunks import precompile_chunks, sample_in_chunks


@pytest.fixture
def store(tmp_path):
    """exported_programs writing to a fresh folder; off again afterwards."""
    exported_programs.set_folder(tmp_path / "exported")
    chunks.CHUNK_PROGRAMS.clear()
    yield tmp_path / "exported"
    exported_programs.set_folder(None)
    chunks.CHUNK_PROGRAMS.clear()


def _sample(model_fn, identity: str | None) -> np.ndarray:
    """The precompiled sampler (as `unlearn-jax sample` runs it) over 7 examples, chunks of 3."""
    params, latents, cond, uncond = make_inputs(batch=7, seed=1)
    plan = make_plan(4)
    options = dict(guidance_scale=4.0, eta=0.5)
    precompile_chunks(
        model_fn,
        params,
        plan,
        total=7,
        latent_shape=latents.shape[1:],
        context_shape=cond.shape[1:],
        context_dtype=cond.dtype,
        batch_size=3,
        identity=identity,
        **options,
    ).result()
    return sample_in_chunks(
        model_fn,
        params,
        plan,
        np.asarray(latents),
        np.asarray(cond),
        uncond,
        batch_size=3,
        key=jax.random.key(11),
        progress=False,
        **options,
    )


def test_a_kept_sampler_is_read_back_untraced_and_computes_the_same(store):
    traced: list[int] = []
    first = _sample(make_model(calls=traced), identity="analytic model")
    assert traced == [6]  # traced once (a CFG-doubled chunk of 3)
    (kept,) = store.glob(f"sampler-*{exported_programs.SUFFIX}")

    # A later process: nothing in memory, the same model described the same way.
    chunks.CHUNK_PROGRAMS.clear()
    traced.clear()
    again = _sample(make_model(calls=traced), identity="analytic model")
    assert traced == []  # read back, not traced
    assert list(store.iterdir()) == [kept]
    np.testing.assert_array_equal(again, first)

    # And what the sampler computes without the store, bit for bit.
    exported_programs.set_folder(None)
    chunks.CHUNK_PROGRAMS.clear()
    np.testing.assert_array_equal(_sample(make_model(calls=traced), identity=None), first)
    assert traced == [6]


def test_without_an_identity_or_a_folder_nothing_is_kept(store):
    traced: list[int] = []
    _sample(make_model(calls=traced), identity=None)
    assert not store.exists()
    exported_programs.set_folder(None)
    chunks.CHUNK_PROGRAMS.clear()
    _sample(make_model(calls=traced), identity="analytic model")
    assert traced == [6, 6] and not store.exists()


def test_the_file_name_covers_everything_the_trace_depends_on(store, monkeypatch):
    x = jax.ShapeDtypeStruct((3, 4), jnp.float32)
    base = dict(name="sampler", identity="model A", static={"eta": 0.0}, args=({"w": x}, x))
    path = lambda **change: exported_programs.module_path(**{**base, **change})  # noqa: E731
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    sharded = jax.ShapeDtypeStruct(
        (3, 4), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    )
    variants = [
        path(),
        path(name="decoder"),
        path(identity="model B"),
        path(static={"eta": 0.5}),
        path(args=({"w": x}, jax.ShapeDtypeStruct((3, 5), jnp.float32))),
        path(args=({"w": x}, jax.ShapeDtypeStruct((3, 4), jnp.bfloat16))),
        path(args=({"w": x}, sharded)),
        path(args=({"v": x}, x)),
        path(args=({"w": x}, x, None)),
    ]
    assert path() == variants[0]  # deterministic
    assert len(set(variants)) == len(variants)
    monkeypatch.setenv("UNLEARN_JAX_CPU_DEVICES", "3")
    variants.append(path())
    monkeypatch.setattr(exported_programs, "source_digest", lambda: "other source")
    variants.append(path())
    assert len(set(variants)) == len(variants)


def test_the_source_digest_changes_with_any_module_of_the_package(tmp_path, monkeypatch):
    package = tmp_path / "package"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("A = 1\n")
    (package / "sub" / "b.py").write_text("B = 2\n")
    (package / "notes.txt").write_text("not source\n")
    monkeypatch.setattr(exported_programs, "_PACKAGE", package)

    def digest() -> str:
        exported_programs.source_digest.cache_clear()
        return exported_programs.source_digest()

    seen = [digest()]
    assert digest() == seen[0]
    (package / "notes.txt").write_text("edited\n")
    assert digest() == seen[0]  # only Python source counts
    (package / "sub" / "b.py").write_text("B = 3\n")
    seen.append(digest())
    (package / "sub" / "c.py").write_text("")
    seen.append(digest())
    (package / "sub" / "c.py").rename(package / "c.py")
    seen.append(digest())
    assert len(set(seen)) == len(seen)
    monkeypatch.undo()
    exported_programs.source_digest.cache_clear()


def test_an_unreadable_file_is_traced_again_and_replaced(store, caplog):
    double = jax.jit(lambda tree: {"y": tree["x"] * 2.0})
    args = ({"x": jax.ShapeDtypeStruct((3,), jnp.float32)},)
    path = exported_programs.module_path("double", "x2", {}, args)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a module")
    with caplog.at_level(logging.WARNING, logger=exported_programs.__name__):
        lowered = exported_programs.lower(double, args, name="double", identity="x2")
    assert "cannot be read back" in caplog.text
    out = lowered.compile()({"x": jnp.arange(3.0)})
    np.testing.assert_array_equal(out["y"], [0.0, 2.0, 4.0])
    assert jax.export.deserialize(bytearray(path.read_bytes())).in_avals[0].shape == (3,)


def test_a_program_for_other_inputs_is_not_used(store, caplog):
    """A file whose module takes other inputs (a collision, or a hand-copied file)."""
    args = (jax.ShapeDtypeStruct((3,), jnp.float32),)
    path = exported_programs.module_path("f", "id", {}, args)
    other = jax.export.export(jax.jit(lambda x: x + 1))(jax.ShapeDtypeStruct((5,), jnp.float32))
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(other.serialize()))
    with caplog.at_level(logging.WARNING, logger=exported_programs.__name__):
        lowered = exported_programs.lower(jax.jit(lambda x: x * 3), args, name="f", identity="id")
    assert "other inputs" in caplog.text
    np.testing.assert_array_equal(lowered.compile()(jnp.ones(3)), [3.0, 3.0, 3.0])


def test_a_program_export_cannot_keep_is_lowered_as_usual(store):
    """Host callbacks have no serialized form: traced every time, nothing written."""
    noted = []
    with_callback = jax.jit(lambda x: (jax.debug.callback(noted.append, x), x * 2)[1])
    args = (jax.ShapeDtypeStruct((2,), jnp.float32),)
    lowered = exported_programs.lower(with_callback, args, name="cb", identity="id")
    out = lowered.compile()(jnp.ones(2))
    np.testing.assert_array_equal(out, [2.0, 2.0])
    assert len(noted) == 1 and not store.exists()


def test_the_cli_keeps_the_sampler_once_and_samples_the_same(sd1_folder, tmp_path):
    """Two `unlearn-jax sample` runs: the second reads the first's trace (one file, named
    the same in both processes) and writes the same images."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["UNLEARN_JAX_COMPILATION_CACHE"] = str(tmp_path / "cache")
    images = []
    for run in ("first", "second"):
        out = tmp_path / run
        command = [sys.executable, "-m", "unlearn_jax.cli", "sample", "--model", str(sd1_folder),
                   "--prompts", str(prompts), "--steps", "3", "--batch-size", "2",
                   "--out", str(out)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        kept = sorted((tmp_path / "cache" / "exported").iterdir())
        assert len(kept) == 1 and kept[0].name.startswith("sampler-"), kept
        with np.load(out / "images.npz") as data:
            images.append(data["images"])
    np.testing.assert_array_equal(images[1], images[0])
