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


def test_the_cli_keeps_each_program_once_and_samples_the_same(sd1_folder, tmp_path):
    """Two `unlearn-jax sample` runs: the second reads the first's traces (one file per
    program, named the same in both processes) and writes the same images."""
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
        kept = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "exported").iterdir())
        assert kept == ["sampler", "text_encoder", "vae_decoder"]
        with np.load(out / "images.npz") as data:
            images.append(data["images"])
    np.testing.assert_array_equal(images[1], images[0])


def test_a_folder_that_cannot_be_written_only_costs_the_trace(store, monkeypatch, caplog):
    def refuse(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(exported_programs.atomic_files, "write_bytes", refuse)
    args = (jax.ShapeDtypeStruct((2,), jnp.float32),)
    with caplog.at_level(logging.WARNING, logger=exported_programs.__name__):
        lowered = exported_programs.lower(jax.jit(lambda x: x - 1), args, name="f", identity="id")
    assert "cannot keep the traced program" in caplog.text
    np.testing.assert_array_equal(lowered.compile()(jnp.ones(2)), [0.0, 0.0])
    assert not store.exists()


def test_a_kept_program_that_cannot_be_called_is_traced_instead(store, monkeypatch, caplog):
    args = (jax.ShapeDtypeStruct((2,), jnp.float32),)
    triple = jax.jit(lambda x: x * 3)
    exported_programs.lower(triple, args, name="f", identity="id")  # keeps it

    def fail(exported, args):
        raise ValueError("sharding mismatch")

    monkeypatch.setattr(exported_programs, "_lower_call", fail)
    with caplog.at_level(logging.WARNING, logger=exported_programs.__name__):
        lowered = exported_programs.lower(triple, args, name="f", identity="id")
    assert "cannot be called here" in caplog.text and "sharding mismatch" in caplog.text
    np.testing.assert_array_equal(lowered.compile()(jnp.ones(2)), [3.0, 3.0])


def test_a_later_process_traces_none_of_the_three_programs(sd1_folder, store, monkeypatch):
    """Sampler, text encoder and decoder: kept by the first `precompile`, read back by a
    later one (here: this process with every cache emptied), and `generate` then runs
    them without tracing the modules again, to the same images."""
    from unlearn_jax.diffusion import text_to_image
    from unlearn_jax.models.clip import CLIPTextModel
    from unlearn_jax.models.pipeline import load_pipeline, read_structure
    from unlearn_jax.models.unet import UNet2DConditionModel
    from unlearn_jax.models.vae import AutoencoderKL

    traced: dict[str, int] = {}
    for cls, method in [
        (UNet2DConditionModel, "__call__"),
        (CLIPTextModel, "__call__"),
        (AutoencoderKL, "decode"),
    ]:
        original = getattr(cls, method)

        def counting(self, *args, _original=original, _name=cls.__name__, **kwargs):
            traced[_name] = traced.get(_name, 0) + 1  # Python runs only while tracing
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, counting)

    prompts = ["a red circle", "a blue square"]
    settings = dict(steps=3, guidance=3.0, batch_size=2)

    def run() -> tuple[np.ndarray, dict, dict]:
        chunks.CHUNK_PROGRAMS.clear()
        text_to_image.PRECOMPILED.clear()
        jax.clear_caches()
        traced.clear()
        structure = read_structure(sd1_folder)
        for future in text_to_image.precompile(structure, 2, num_prompts=2, **settings):
            future.result()
        precompiling = dict(traced)
        traced.clear()
        pipe = load_pipeline(sd1_folder, structure=structure)
        images = text_to_image.generate(pipe, prompts, progress=False, **settings)
        return images, precompiling, dict(traced)

    first, precompiling, generating = run()
    assert precompiling.keys() == {"UNet2DConditionModel", "CLIPTextModel", "AutoencoderKL"}
    assert generating == {}  # generate runs what precompile compiled
    kept = sorted(p.name.split("-")[0] for p in store.iterdir())
    assert kept == ["sampler", "text_encoder", "vae_decoder"]

    again, precompiling, generating = run()
    assert (precompiling, generating) == ({}, {})  # read back: nothing traced
    assert len(list(store.iterdir())) == 3
    np.testing.assert_array_equal(again, first)
    text_to_image.PRECOMPILED.clear()


def check_moved_state_decodes_through_jit(folder) -> None:
    """Run with 2 (fake CPU) devices: the VAE's state moved from the device it was loaded
    on (and precompiled for) to the other one."""
    from unlearn_jax.diffusion import text_to_image
    from unlearn_jax.models.pipeline import load_pipeline, read_structure

    assert jax.device_count() == 2, jax.device_count()
    structure = read_structure(folder)
    for future in filter(None, text_to_image.precompile(structure, 2, steps=2, batch_size=2)):
        future.result()
    pipe = load_pipeline(folder, structure=structure)
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    expected = text_to_image.decode_latents(pipe, latents, batch_size=2)
    assert text_to_image._decode._cache_size() == 0  # the precompiled program ran

    from flax import nnx

    nnx.update(pipe.vae, jax.device_put(nnx.state(pipe.vae), jax.devices()[1]))
    moved = text_to_image.decode_latents(pipe, latents, batch_size=2)
    assert text_to_image._decode._cache_size() == 1  # through jit's dispatch
    np.testing.assert_array_equal(moved, expected)


def test_a_state_moved_since_precompile_decodes_through_jit(sd1_folder):
    """The precompiled decoder takes the state on the device it was loaded on; moved since,
    the decode goes through jit's dispatch (not an error), to the same images."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    code = (
        f"import sys; sys.path.insert(0, {tests_dir!r}); import test_exported_programs as t; "
        f"t.check_moved_state_decodes_through_jit({str(sd1_folder)!r})"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
