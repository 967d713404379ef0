"""The train loop end to end on a micro pipeline: train, export, resume, NaN guard, refusal.

All runs use distill_project on cross-attention only with the same shapes,
so they share ONE compiled train step (the trainer caches compiled steps by
program; the learning rate is optimizer state, not a constant): the module
costs one compilation (~30-60 s on two CPU cores) plus a few seconds per run.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from tiny_unlearn import make_config, save_micro_pipeline

from unlearn_jax.program_cache import ProgramCache
from unlearn_jax.trainer import commands, step_programs
from unlearn_jax.trainer import train as train_module
from unlearn_jax.trainer.checkpoints import (
    CheckpointLayoutError,
    Checkpoints,
    FingerprintMismatchError,
)
from unlearn_jax.trainer.evaluation import register_forget_classifier
from unlearn_jax.trainer.sharding import make_mesh
from unlearn_jax.trainer.state import TrainState, make_optimizer
from unlearn_jax.trainer.train import (
    NonFiniteLossError,
    evaluate,
    export,
    frozen_theta0,
    train_and_evaluate,
)
from unlearn_jax.trainer.writers import read_metrics

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    return save_micro_pipeline(tmp_path_factory.mktemp("micro") / "pipe")


def config(micro, **overrides):
    return make_config(micro, unlearn__params="xattn", **overrides)


@pytest.fixture(scope="module")
def full_run(micro, tmp_path_factory):
    """Four uninterrupted steps (checkpoints at 2 and 4, an evaluation at 2)."""
    workdir = tmp_path_factory.mktemp("full_run")
    cfg = config(micro, eval__every=2, eval__seeds=1, eval__steps=2)
    return workdir, train_and_evaluate(cfg, workdir)


def train_rows(workdir):
    return [r for r in read_metrics(workdir) if not any(k.startswith("eval/") for k in r)]


def test_only_trainable_parameters_change_and_export_loads_in_diffusers(full_run, micro, tmp_path):
    workdir, result = full_run
    assert result["step"] == 4
    assert np.isfinite(result["forget/loss"]) and np.isfinite(result["retain/loss"])
    rows = train_rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # runlocal logs every step
    # Step 1 runs at θ = θ0: distillation to θ0 is exactly zero (θ0 is an argument of
    # the compiled step, evaluated like the student), and its gradient too.
    assert rows[0]["retain/loss"] == 0.0 and rows[0]["grad/retain_norm"] == 0.0
    assert rows[-1]["retain/loss"] > 0.0
    periodic = [r for r in read_metrics(workdir) if "eval/integrity_lpips" in r]
    assert [r["step"] for r in periodic] == [2, 4] and periodic[0]["eval/integrity_lpips"] > 0
    assert (workdir / "eval" / "step_000002" / "integrity" / "integrity.json").is_file()
    assert (workdir / "run.json").is_file() and (workdir / "cache").is_dir()

    out = export(workdir, tmp_path / "exported")
    before, after = load_file(micro / UNET_FILE), load_file(out / UNET_FILE)
    assert before.keys() == after.keys()
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(".attn2." in k for k in changed)  # xattn only, and it moved
    for name in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (micro / name).read_bytes() == (out / name).read_bytes()
    with pytest.raises(FileExistsError, match="not empty"):
        export(workdir, out)

    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        image = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


def test_resume_after_interrupted_save_equals_uninterrupted_run(full_run, micro, tmp_path):
    workdir, _ = full_run
    resumed = tmp_path / "resumed"
    train_and_evaluate(config(micro, train__steps=2), resumed)
    # A kill while saving step 3 leaves orbax's temporary folder; a step folder
    # without orbax's metadata (a copy cut short) must not count either.
    partial = resumed / "checkpoints" / "3.orbax-checkpoint-tmp-1234567"
    (partial / "default").mkdir(parents=True)
    (partial / "default" / "junk").write_bytes(b"half a checkpoint")
    (resumed / "checkpoints" / "4" / "default").mkdir(parents=True)
    result = train_and_evaluate(config(micro), resumed)  # train.steps raised 2 -> 4
    assert result["step"] == 4
    # Both were set aside (not restored), then deleted by the complete save of step 4.
    assert not (resumed / "checkpoints.incomplete").exists()
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["2", "4"]

    # Bit for bit: the logged metrics of every step and the exported weights.
    assert train_rows(resumed) == train_rows(workdir)
    a = load_file(export(workdir, tmp_path / "a") / UNET_FILE)
    b = load_file(export(resumed, tmp_path / "b") / UNET_FILE)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


_KILL_DURING_SAVE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import jax
jax.config.update("jax_compilation_cache_dir", {cache!r})
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
from orbax.checkpoint._src.path import atomicity
from tiny_unlearn import make_config
from unlearn_jax.trainer.train import train_and_evaluate

commit = atomicity.AtomicRenameTemporaryPath.finalize

async def finalize(self, *args, **kwargs):
    # The save of step 4 has written its arrays into orbax's temporary folder;
    # the process dies before the atomic rename that commits them.
    if "4.orbax-checkpoint-tmp" in str(self.get()):
        os.kill(os.getpid(), signal.SIGKILL)
    return await commit(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = finalize
train_and_evaluate(make_config({model!r}, unlearn__params="xattn"), {workdir!r})
"""


def test_kill_during_checkpoint_write_then_resume_equals_uninterrupted_run(
    full_run, micro, tmp_path
):
    import signal
    import subprocess
    import sys

    workdir, _ = full_run
    killed = tmp_path / "killed"
    script = _KILL_DURING_SAVE.format(
        tests=str(Path(__file__).parent),
        cache=str(Path(__file__).parents[1] / ".pytest_cache" / "jax"),
        model=str(micro),
        workdir=str(killed),
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    leftovers = [p.name for p in (killed / "checkpoints").iterdir()]
    assert "2" in leftovers and any(name.startswith("4.orbax-checkpoint-tmp") for name in leftovers)

    result = train_and_evaluate(config(micro), killed)  # resumes from step 2
    assert result["step"] == 4
    # Steps 3-4 were logged before the kill and again after the resume: the same values.
    by_step = {row["step"]: row for row in train_rows(killed)}
    assert list(by_step.values()) == train_rows(workdir)
    a = load_file(export(workdir, tmp_path / "a") / UNET_FILE)
    b = load_file(export(killed, tmp_path / "b") / UNET_FILE)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_tensorboard_summaries_hold_scalars_and_the_integrity_grid(full_run):
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    workdir, _ = full_run
    events = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
    events.Reload()
    tags = set(events.Tags()["tensors"])
    assert {"eval/integrity_lpips", "eval/integrity_grid", "forget/loss", "retain/loss"} <= tags
    logged = {r["step"]: r for r in read_metrics(workdir) if "eval/integrity_lpips" in r}
    board = {
        e.step: float(tensor_util.make_ndarray(e.tensor_proto))
        for e in events.Tensors("eval/integrity_lpips")
    }
    assert sorted(board) == sorted(logged) == [2, 4]  # eval.every=2
    for step, value in board.items():
        np.testing.assert_allclose(value, logged[step]["eval/integrity_lpips"], rtol=1e-6)


def test_export_after_zero_steps_reproduces_the_original_files(micro, tmp_path):
    train_and_evaluate(config(micro, train__steps=0), tmp_path / "run")
    out = export(tmp_path / "run", tmp_path / "out")
    originals = sorted(p.relative_to(micro) for p in micro.rglob("*") if p.is_file())
    assert originals == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for rel in originals:
        assert (micro / rel).read_bytes() == (out / rel).read_bytes(), rel


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(micro, tmp_path):
    workdir = tmp_path / "diverged"
    # Adam moves every weight by ~lr per step: with 1e17 the attention overflows
    # to NaN within a few steps (the step after a finite but broken state).
    cfg = config(micro, optim__lr=1e17, checkpoint__every=1)
    with pytest.raises(NonFiniteLossError, match=r"(?s)step \d.*last good checkpoint.*lr=1e\+17"):
        train_and_evaluate(cfg, workdir)
    checkpoints = Checkpoints(workdir)
    last_good = checkpoints.latest_step()
    checkpoints.close()
    assert last_good is not None and last_good < 4
    out = export(workdir, tmp_path / "out")  # the kept checkpoint is loadable
    assert all(np.isfinite(v).all() for v in load_file(out / UNET_FILE).values())


def test_flat_optimizer_state_checkpoint_is_refused_but_still_exports(full_run, micro, tmp_path):
    """A checkpoint of the earlier layout (Adam's moments over ONE padded vector of all
    trainable entries): resuming it names the problem and the fix; export and evaluate
    read its parameters."""
    workdir = tmp_path / "flat"
    shutil.copytree(full_run[0], workdir, ignore=shutil.ignore_patterns("checkpoints"))
    checkpoints = Checkpoints(full_run[0])
    step = checkpoints.latest_step()
    params = checkpoints.manager.restore(step)["params"]
    checkpoints.close()
    padded = -(-sum(x.size for x in params.values()) // 1024) * 1024
    optimizer = make_optimizer(config(micro).optim)
    flat_state = TrainState(jnp.int32(step), params, optimizer.init(jnp.zeros((padded,))))
    checkpoints = Checkpoints(workdir)
    checkpoints.save(flat_state)
    checkpoints.close()
    with pytest.raises(CheckpointLayoutError, match=r"(?s)one flat vector.*new --workdir"):
        train_and_evaluate(config(micro, train__steps=step + 2), workdir)
    exported = load_file(export(workdir, tmp_path / "flat_export") / UNET_FILE)
    reference = load_file(export(full_run[0], tmp_path / "export") / UNET_FILE)
    assert exported.keys() == reference.keys()
    for key, value in reference.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    cfg = config(micro, eval__seeds=1, eval__steps=2)
    reference_lpips = evaluate(cfg, full_run[0])["integrity_lpips"]
    assert evaluate(cfg, workdir)["integrity_lpips"] == reference_lpips


def test_bfloat16_theta0_trains_bit_for_bit_like_float32_theta0(micro, tmp_path, monkeypatch):
    """train.frozen_dtype="compute": θ0 held in bfloat16 when the compute dtype is bfloat16.

    The network casts its parameters to bfloat16 where it reads them, so the
    same run with a bfloat16 θ0 (half its memory) must give the same weights and
    metrics, and distillation is still exactly zero at θ0.
    """
    stand_in = types.SimpleNamespace(theta0={"w": jnp.ones(3), "ids": jnp.arange(3)})
    cast = frozen_theta0(
        config(micro, train__dtype="bfloat16", train__frozen_dtype="compute"), stand_in
    )
    assert cast["w"].dtype == jnp.bfloat16 and cast["ids"].dtype == jnp.int32
    assert frozen_theta0(config(micro, train__dtype="bfloat16"), stand_in) is stand_in.theta0
    # What the trainer actually holds as θ0 in each run.
    held = []
    spy = lambda cfg, model: held.append(frozen_theta0(cfg, model)) or held[-1]
    monkeypatch.setattr(train_module, "frozen_theta0", spy)
    results, weights = {}, {}
    for frozen_dtype in ("float32", "compute"):
        workdir = tmp_path / frozen_dtype
        cfg = config(micro, train__dtype="bfloat16", train__frozen_dtype=frozen_dtype)
        results[frozen_dtype] = train_and_evaluate(cfg, workdir)
        want = jnp.dtype(jnp.bfloat16 if frozen_dtype == "compute" else jnp.float32)
        assert {x.dtype for x in jax.tree.leaves(held[-1])} == {want}
        assert read_metrics(workdir)[0]["retain/loss"] == 0.0
        weights[frozen_dtype] = load_file(
            export(workdir, tmp_path / f"{frozen_dtype}_out") / UNET_FILE
        )
    assert results["compute"] == results["float32"]
    for key, value in weights["float32"].items():
        assert weights["compute"][key].dtype == value.dtype == np.float32
        np.testing.assert_array_equal(weights["compute"][key], value, err_msg=key)


@pytest.mark.parametrize("programs", ["fused", "split"])
def test_one_program_and_split_steps_train_like_the_staged_step(
    programs, full_run, micro, tmp_path, caplog
):
    """train.step_programs="fused" (the GPU/TPU default: one program) and "split" (CPU's
    default for long runs: three programs) against full_run (CPU's default for a 4-step
    run: staged, every network call one shared forward and backward): the same four
    steps, the same losses and weights to float32 rounding, and distillation exactly
    zero at θ0 in all three."""
    workdir = tmp_path / programs
    with caplog.at_level("INFO", logger=step_programs.__name__):
        train_and_evaluate(config(micro, train__step_programs=programs), workdir)
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiling")]
    # Not the staged step's update, compiled by full_run already: with one micro-batch
    # that one sums the retain term's two student chunks (cond, uncond) in-program.
    names = ["program"] if programs == "fused" else ["forget", "retain", "update"]
    assert compiled == [
        f"compiling the train step's {name} (first run of this program; cached afterwards)"
        for name in names
    ]
    other, staged = train_rows(workdir), train_rows(full_run[0])
    assert [r["step"] for r in other] == [r["step"] for r in staged] == [1, 2, 3, 4]
    assert other[0]["retain/loss"] == staged[0]["retain/loss"] == 0.0
    for row_other, row_staged in zip(other, staged, strict=True):
        for key in ("forget/loss", "retain/loss", "grad/norm", "param/norm"):
            np.testing.assert_allclose(row_other[key], row_staged[key], rtol=1e-4, err_msg=key)
    start = load_file(micro / UNET_FILE)
    weights = {
        name: load_file(export(w, tmp_path / f"{name}_out") / UNET_FILE)
        for name, w in ((programs, workdir), ("staged", full_run[0]))
    }
    moved = max(np.abs(weights["staged"][k] - start[k]).max() for k in start)
    assert moved > 0
    for key, value in weights["staged"].items():
        np.testing.assert_allclose(weights[programs][key], value, rtol=0, atol=1e-3 * moved)


def test_workdir_of_another_run_is_refused(full_run, micro):
    workdir, _ = full_run
    with pytest.raises(FingerprintMismatchError, match=r"(?s)seed: 0 -> 1.*force_resume"):
        train_and_evaluate(config(micro, seed=1), workdir)
    with pytest.raises(FingerprintMismatchError, match="unlearn.method"):
        train_and_evaluate(make_config(micro, "distill", unlearn__params="xattn"), workdir)
    # Per-prompt anchors are another run (the key appears only when they are in use).
    anchors = config(micro, forget__anchor_prompts=repr(["a red square", "a photo of a dog"]))
    with pytest.raises(FingerprintMismatchError, match=r'forget.anchor_prompts: "<absent>" ->'):
        train_and_evaluate(anchors, workdir)
    # Evaluation and checkpoint settings are not part of the run; nothing left to train.
    result = train_and_evaluate(config(micro, checkpoint__keep=5, eval__seeds=2), workdir)
    assert result["step"] == 4


def test_cli_commands(full_run, micro, tmp_path, capsys):
    workdir, _ = full_run
    base = ["--config", "configs/distill_project.py:runlocal", "--workdir", str(workdir)]
    overrides = [
        f"--config.model.path={micro}",
        "--config.forget.prompts=['a red circle', 'a photo of a cat']",
        "--config.retain.prompts",
        "['a blue square', 'a green dog', 'a small grey square']",
        "--config.eval.prompts=['a large blue circle on a grey background']",
        "--config.unlearn.params=xattn",
        "--config.eval.final=false",
        "--config.train.progress=false",
    ]
    # The run is complete: `unlearn` resolves, checks the fingerprint and returns.
    cwd = Path.cwd()
    try:
        import os

        os.chdir(Path(__file__).resolve().parents[1])
        assert commands.main(["unlearn", *base, *overrides]) == 0
        assert json.loads(capsys.readouterr().out)["step"] == 4
        with pytest.raises(ValueError, match="no field 'train.stepz'.*train.steps"):
            commands.main(["unlearn", *base, *overrides, "--config.train.stepz=3"])
    finally:
        os.chdir(cwd)
    assert commands.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "model_index.json").is_file()
    shutil.rmtree(tmp_path / "o")


@register_forget_classifier("test_every_image_is_the_concept")
def _always_concept(config, pipe):
    return (lambda images: np.tile([[0.0, 1.0]], (len(images), 1))), 1


def test_final_and_standalone_evaluation(full_run, micro):
    workdir, _ = full_run
    cfg = config(
        micro,
        eval__final=True,
        eval__seeds=1,
        eval__steps=2,
        eval__classifier="test_every_image_is_the_concept",
    )
    result = train_and_evaluate(cfg, workdir)  # complete: only the final evaluation runs
    assert 0 < result["integrity_lpips"] < 0.5
    assert result["forget_rate"] == result["forget_rate_original"] == 1.0
    final = json.loads((workdir / "eval" / "final.json").read_text())
    assert final["step"] == 4 and final["integrity_lpips"] == result["integrity_lpips"]
    report = workdir / "eval" / "step_000004" / "integrity"
    assert json.loads((report / "integrity.json").read_text())["num_prompts"] == 1
    assert (report / "grid.png").is_file()
    # θ0's evaluation images are sampled once and cached in the workdir.
    cached = sorted(p.name.split("-")[2] for p in (workdir / "cache").glob("eval-original-*"))
    assert cached == ["forget", "retain"]
    # `evaluate` measures the latest checkpoint again: same noise, same number.
    assert evaluate(cfg, workdir)["integrity_lpips"] == result["integrity_lpips"]


def test_compiled_step_cache_tells_apart_arguments_the_program_drops(monkeypatch):
    """jit drops unused arguments from the program text (a staged term's contexts are
    embeddings, or token ids when the text encoder trains): the cache must not hand one
    caller's executable to the other."""
    monkeypatch.setattr(step_programs, "COMPILED_TRAIN_STEPS", ProgramCache("test", 8))
    mesh = make_mesh(1, 1, jax.devices()[:1])
    double = jax.jit(lambda x, unused: x * 2)
    for unused in (jnp.zeros(3, jnp.float32), jnp.zeros((3, 2), jnp.int32)):
        compiled = step_programs.compile_cached(double.lower(jnp.ones(2), unused), mesh, "x")
        np.testing.assert_array_equal(compiled(jnp.ones(2), unused), np.full(2, 2.0))
