"""Nothing lost, nothing silent: full disks, the user's own files, runs that never saved,
Ctrl-C, misleading advice. Each test reproduces a failure a new user hit (issue 16).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import resource
import signal
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_sd import MAX_LENGTH
from tiny_unlearn import REPO, config_fields, make_config, save_micro_pipeline

from unlearn_jax import atomic_files, cli, command_args
from unlearn_jax.data.prompts import PromptSetError, load_prompts
from unlearn_jax.metrics import lpips
from unlearn_jax.models import weights
from unlearn_jax.models.pipeline import PromptTruncatedWarning, load_pipeline
from unlearn_jax.trainer import commands, experiment, train
from unlearn_jax.trainer.checkpoints import check_run_record
from unlearn_jax.trainer.train import NonFiniteLossError, export
from unlearn_jax.trainer.writers import read_metrics

CONFIG = f"{REPO / 'configs' / 'distill_project.py'}:runlocal"


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    return save_micro_pipeline(tmp_path_factory.mktemp("micro_reliability") / "pipe")


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------------------
# Atomic outputs
# ---------------------------------------------------------------------------


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    atomic_files.write_json(target, {"old": 1})
    with pytest.raises(RuntimeError):
        with atomic_files.atomic_path(target) as tmp:
            tmp.write_text('{"new": ')  # half written when the failure comes
            raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"old": 1}
    assert _files(tmp_path) == ["report.json"]


def test_outputs_follow_the_umask_and_json_is_strict(tmp_path):
    old = os.umask(0o022)
    try:
        path = weights.write_component_weights(tmp_path, {"w": np.ones(3, np.float32)}, stem="m")
        png = atomic_files.write_bytes(tmp_path / "a.png", b"x")
    finally:
        os.umask(old)
    # safetensors and tempfile both create 0600 files; exported files must be 0644.
    assert path.stat().st_mode & 0o777 == 0o644 and png.stat().st_mode & 0o777 == 0o644
    text = atomic_files.dumps({"a": float("inf"), "b": [np.float32("nan")], "c": -float("inf")})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {
        "a": "inf",
        "b": ["nan"],
        "c": "-inf",
    }


def test_evaluate_prints_strict_json(monkeypatch, capsys, micro, tmp_path):
    monkeypatch.setattr(train, "evaluate", lambda config, workdir: {"step": 4, "psnr": np.inf})
    fields = [f"--config.{k}={v}" for k, v in config_fields(micro).items()]
    commands.main(["evaluate", "--config", CONFIG, "--workdir", str(tmp_path), *fields])
    out = capsys.readouterr().out
    assert "Infinity" not in out and json.loads(out)["psnr"] == "inf"


@pytest.fixture
def file_size_limit():
    """Sets RLIMIT_FSIZE (writes past it fail with EFBIG, as on a full disk) until the end."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def limit(nbytes: int | None) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft if nbytes is None else nbytes, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


def test_sample_on_a_full_disk_leaves_nothing_and_the_retry_works(
    micro, tmp_path, capsys, file_size_limit
):
    argv = ["sample", "--model", str(micro), "--prompt", "a red circle", "--prompt", "a dog"]
    argv += ["--steps", "2"]
    cli.main([*argv, "--out", str(tmp_path / "warm")])  # compiles outside the limit
    out = tmp_path / "full"
    file_size_limit(5000)  # the PNGs (< 1 KB) fit, images.npz (~7 KB) does not
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--out", str(out)])
    file_size_limit(None)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re_search(r"images.npz: the disk .* is full.*Nothing half-written", err)
    assert not out.exists()  # no truncated images.npz, no stray PNGs, no temporaries
    cli.main([*argv, "--out", str(out)])  # the retry is not refused
    with np.load(out / "images.npz") as data:
        np.testing.assert_array_equal(
            data["images"], np.load(tmp_path / "warm/images.npz")["images"]
        )


def re_search(pattern: str, text: str) -> bool:
    return re.search(pattern, text, re.S) is not None


# ---------------------------------------------------------------------------
# export: the user's X.partial, a failure part-way, a run that never saved
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero_step_run(micro, tmp_path_factory):
    """A run record of train.steps=0 and no checkpoint: exporting it gives θ0."""
    workdir = tmp_path_factory.mktemp("zero_steps")
    cfg = make_config(micro, train__steps=0)
    spec = experiment.resolve_run(cfg)
    check_run_record(
        workdir, spec.fingerprint, json.loads(cfg.to_json_best_effort()), force_resume=False
    )
    return workdir


def test_export_never_touches_the_users_partial_folder(zero_step_run, micro, tmp_path):
    mine = tmp_path / "model.partial"
    mine.mkdir()
    (mine / "draft.txt").write_text("my notes")
    out = export(zero_step_run, tmp_path / "model")
    assert (mine / "draft.txt").read_text() == "my notes"
    # train.steps=0: θ0 comes out bit for bit, although there is no checkpoint.
    name = "unet/diffusion_pytorch_model.safetensors"
    assert (out / name).read_bytes() == (micro / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.partial"]


def test_export_that_fails_part_way_leaves_nothing(zero_step_run, tmp_path, monkeypatch):
    (tmp_path / "out.partial").mkdir()  # the user's, again

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a tensor")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weights, "save_file", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--workdir", str(zero_step_run), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.partial"]


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------


def test_a_mistyped_prompt_file_name_is_not_a_prompt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for typo in ("forget_promts", "prompts/forget.txt", "forget.txt"):
        with pytest.raises(PromptSetError, match="no such file; to give one prompt, pass a list"):
            load_prompts(typo, "forget.prompts")
    assert load_prompts(["cat"], "forget.prompts") == ["cat"]  # one word, as a list
    assert load_prompts("a photo of a cat", "forget.prompts") == ["a photo of a cat"]
    Path("forget_prompts").write_text("a cat\n# a comment\n")
    assert load_prompts("forget_prompts", "forget.prompts") == ["a cat"]


def test_cli_and_config_read_prompt_files_alike(tmp_path):
    file = tmp_path / "p.txt"
    file.write_text("# retain set v2\na red circle\n\n")
    from_cli = command_args.read_prompts(argparse.Namespace(prompt=[], prompts=file))
    assert from_cli == load_prompts(str(file), "retain.prompts") == ["a red circle"]


def test_a_long_prompt_warns_once_at_which_word(micro):
    pipe = load_pipeline(micro)
    words = ["a"] * (MAX_LENGTH - 2) + ["dog", "on", "grey"]
    prompt = " ".join(words)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        pipe.tokenize([prompt, prompt])
        pipe.tokenize([prompt])
        pipe.tokenize(["a red circle"])
    truncated = [w for w in caught if issubclass(w.category, PromptTruncatedWarning)]
    assert len(truncated) == 1
    assert "word 'dog'" in str(truncated[0].message)


# ---------------------------------------------------------------------------
# Integrity with one prompt
# ---------------------------------------------------------------------------


def test_integrity_says_the_interval_needs_two_prompts(micro, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lpips, "load_lpips", lambda net: net)
    fake = lambda net: lambda a, b: jnp.mean((jnp.asarray(a) - b) ** 2, axis=(1, 2, 3))
    monkeypatch.setattr(lpips, "make_lpips_fn", fake)
    out = tmp_path / "integrity"
    argv = ["integrity", "--original", str(micro), "--unlearned", str(micro), "--prompt", "a dog"]
    cli.main([*argv, "--seeds", "1", "--steps", "2", "--out", str(out)])
    report = json.loads((out / "integrity.json").read_text())
    assert report["ci95"] == [0.0, 0.0]
    assert ">= 2 prompts" in report["ci95_note"] and "zero width" in report["ci95_note"]
    assert "confidence interval needs >= 2 prompts" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# The trainer's advice and Ctrl-C
# ---------------------------------------------------------------------------


class _Quiet:
    def update(self, *_):
        pass

    def set_postfix(self, **_):
        pass

    write_scalars = flush = update


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_nan_advice_is_what_the_trainer_accepts(micro, tmp_path, grad_clip):
    tracker = train._StepMetrics(_Quiet(), _Quiet(), 1, lr=1e-3, grad_clip=grad_clip)
    tracker.last_saved = 2
    metrics = {"finite": np.float32(0), "forget/loss": np.float32(np.nan)}
    with pytest.raises(NonFiniteLossError) as error:
        tracker.check(3, metrics, tmp_path)
    advice = str(error.value)
    assert "--config.optim.lr=0.0001" in advice and "--config.train.force_resume=true" in advice
    assert ("--config.optim.grad_clip=1.0" in advice) == (grad_clip == 0.0)
    # The advice works: this workdir's run, resumed with the lower rate, is accepted.
    record = lambda cfg: (experiment.resolve_run(cfg).fingerprint, {})
    check_run_record(tmp_path, *record(make_config(micro, optim__lr=1e-3)), force_resume=False)
    lower = make_config(micro, optim__lr=1e-4, train__force_resume=True)
    assert check_run_record(tmp_path, *record(lower), force_resume=lower.train.force_resume)


def test_ctrl_c_names_the_kept_checkpoint_and_a_resume_logs_each_step_once(
    micro, tmp_path, monkeypatch, capsys
):
    workdir = tmp_path / "run"
    # A save killed earlier at step 0: set aside on start, deleted once step 0 is saved whole.
    (workdir / "checkpoints" / "0.orbax-checkpoint-tmp-99").mkdir(parents=True)

    def interrupted_loop(run, data, state, start, evaluator, writer):
        run.checkpoints.save(state)  # the checkpoint of step 0 ...
        for step in (1, 2):  # ... two steps logged, then Ctrl-C before the next save
            writer.write_scalars(step, {"forget/loss": 1.0})
        writer.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_train_loop", interrupted_loop)
    fields = [f"--config.{k}={v}" for k, v in config_fields(micro).items()]
    argv = ["unlearn", "--config", CONFIG, "--workdir", str(workdir), *fields]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(workdir) in err
    assert re_search(r"stopped by Ctrl-C; the checkpoint of step 0 is kept; rerun the same", err)
    assert not (workdir / "checkpoints.incomplete").exists()
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2]

    # The resume restarts from step 0: steps 1 and 2 will be logged again, not twice.
    def resumed_loop(run, data, state, start, evaluator, writer):
        assert start == 0
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_train_loop", resumed_loop)
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert read_metrics(workdir) == []


def test_cli_silences_library_start_up_noise(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", raising=False)
    probe = logging.getLogger("jax._src.xla_bridge")
    monkeypatch.setattr(probe, "level", logging.NOTSET)
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit):
        cli.main(["sample", "--model", "m", "--prompt", "a cat", "--out", str(tmp_path / "f")])
    probe.info("Unable to initialize backend 'tpu': libtpu.so not found")
    assert "libtpu" not in capsys.readouterr().err
    assert os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] == "1"


def test_a_full_disk_while_checkpointing_is_one_clear_error(tmp_path, monkeypatch):
    from unlearn_jax.trainer.checkpoints import Checkpoints

    class State:
        step = np.int32(3)

        def to_checkpoint(self):
            return {"step": self.step}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    checkpoints = Checkpoints(tmp_path)
    monkeypatch.setattr(checkpoints.manager, "save", full_disk)
    try:
        with pytest.raises(OSError, match=r"checkpoint of step 3 \(No space left.*none is kept"):
            checkpoints.save(State())
        with pytest.raises(OSError) as error:
            checkpoints.save(State())
    finally:
        checkpoints.close()
    assert cli._describe(error.value).count("Fix:") == 1
    message = cli._describe(OSError(errno.ENOSPC, "No space left on device", "w/images.npz"))
    assert "writing w/images.npz: the disk" in message and "Fix: free space" in message
