"""Smoke tests of the benchmark programs: they run end to end and write their JSON.

Never timed: only the structure of the results and the agreement of the images
(same work in both frameworks) are checked.
"""

from __future__ import annotations

import json
import os
import platform

import pytest

from unlearn_jax.benchmarks import common, sampling
from unlearn_jax.benchmarks.common import cpu_name, run_worker


def _run(tmp_path, *extra: str) -> dict:
    out = tmp_path / "results.json"
    argv = ["--num-images", "1", "--steps", "2", "--batch-size", "1", "--out", str(out), *extra]
    returned = sampling.main(argv)
    written = json.loads(out.read_text())
    assert written.keys() == returned.keys()
    return written


@pytest.mark.parametrize("levels", ["3", "2"])
def test_sampling_benchmark_in_process(tmp_path, capsys, levels):
    result = _run(tmp_path, "--skip-subprocess", "--tiny-levels", levels)
    assert result["config"]["model"].startswith(f"random {levels}-level tiny_model")
    assert result["config"]["unet_block_out_channels"] == [32, 64, 64][: int(levels)]
    assert {"config", "diffusers", "ours_in_process"} <= result.keys()
    assert {"num_images", "steps", "guidance", "batch_size", "load_average"} <= result[
        "config"
    ].keys()
    assert {"load_s", "wall_s", "images_per_s"} <= result["diffusers"].keys()
    ours = result["ours_in_process"]
    expected = {"first_call_s", "steady_s", "compile_s", "jax_compile_s", "images_per_s"}
    assert expected | {"speedup_vs_diffusers", "max_abs_diff_vs_diffusers"} <= ours.keys()
    assert ours["max_abs_diff_vs_diffusers"] < 2e-3  # the same work in both frameworks
    printed = capsys.readouterr().out
    assert "| method |" in printed
    assert f"cores of {cpu_name()}," in printed  # every result names its machine


@pytest.mark.slow
def test_sampling_benchmark_with_subprocesses(tmp_path):
    result = _run(tmp_path, "--compile-steps", "2,3", "--probe-images", "1")
    assert result["ours_process"]["max_abs_diff_vs_diffusers"] < 2e-3
    assert {"wall_s", "images_per_s", "speedup_vs_diffusers"} <= result["ours_process"].keys()
    # Every run after the first finds its programs in the CLI's compilation cache:
    # the same images (the same executables), sooner.
    warm = result["ours_process_warm_cache"]
    assert warm["max_abs_diff_vs_diffusers"] == result["ours_process"]["max_abs_diff_vs_diffusers"]
    assert result["headline"]["speedup_warm_cache"] == warm["speedup_vs_diffusers"]
    assert result["startup_s"] > 0
    probes = result["compile_vs_steps"]
    assert set(probes["runs"]) == {"2", "3"}
    assert {"ratio", "jax_ratio"} <= probes.keys()
    assert {"first_call_s", "steady_s", "compile_s", "jax_compile_s"} <= probes["runs"]["2"].keys()


def test_train_step_benchmark_cross_checks_loss_against_pytorch(tmp_path, capsys):
    """Our train step and the PyTorch/diffusers reference compute the same loss, both run.

    On the micro pipeline of the train-loop tests (one cross-attention level: the
    cheapest train step to compile), 1 example per term, 2 timed steps, 1 thread
    (torch's OpenMP threads crawl on a shared, busy machine), and the tests'
    persistent compilation cache (conftest) for our step.
    """
    import jax
    from tiny_unlearn import save_micro_pipeline

    from unlearn_jax.benchmarks import train_step

    model = save_micro_pipeline(tmp_path / "micro")
    out = tmp_path / "train_step.json"
    argv = ["--model", str(model), "--batch-size", "1", "--steps", "2", "--warmup", "0"]
    argv += ["--threads", "1", "--out", str(out)]
    cache = jax.config.jax_compilation_cache_dir
    returned = train_step.main([*argv, *(["--compilation-cache", cache] if cache else [])])
    result = json.loads(out.read_text())
    assert result.keys() == returned.keys()
    assert result["ours"]["steps_per_s"] > 0 and result["torch"]["steps_per_s"] > 0
    assert result["ours"]["compile_s"] > 0
    # Our worker collects Python's garbage as the `unlearn-jax` program does.
    from unlearn_jax.cli import COLLECT_EVERY

    assert result["ours"]["python_gc_threshold"] == COLLECT_EVERY
    # Compiled as the trainer compiles a 2-step run on CPU (train.step_programs="auto"):
    # staged, one UNet forward and backward shared by the terms' calls.
    assert result["ours"]["step_programs"] == "staged"
    programs = {"forget_prepare", "unet_forward", "unet_backward", "combine_and_update"}
    assert programs <= result["ours"]["compile_by_program_s"].keys()
    assert result["ours"]["trainable_parameters"] == result["torch"]["trainable_parameters"]
    check = result["cross_check"]
    # distill: the remap forget term and both retain_distill branches are compared.
    assert {"forget/loss", "retain/mse_cond", "retain/mse_uncond"} <= check["values"].keys()
    assert all(v["ours"] > 0 for v in check["values"].values())
    assert check["max_loss_rel_diff"] < 1e-4, check["values"]  # the same loss in both
    assert check["max_grad_rel_diff"] < 1e-3, check["values"]
    assert check["passed"]
    printed = capsys.readouterr().out
    assert "| framework |" in printed
    assert f"cores ({cpu_name()})" in printed and result["config"]["cpu"] == cpu_name()


def test_accelerator_benchmark_on_cpu(tmp_path, capsys):
    """`benchmarks.accelerator` end to end on CPU: every figure, ratios from the measured
    rates, our images equal to diffusers' from the same noise, the Markdown table.

    On the train loop's micro model (the cheapest train step to compile), 2 denoising
    steps, batch sizes 1 and 2, one timed train step; float32 on both sides (the CPU
    default), so the images must agree as closely as in the sampling parity tests.
    """
    import jax
    from tiny_unlearn import save_micro_pipeline

    from unlearn_jax.benchmarks import accelerator

    model = save_micro_pipeline(tmp_path / "micro")
    out = tmp_path / "bench"
    argv = ["--model", str(model), "--steps", "2", "--batch-sizes", "2,1", "--train-batch", "1"]
    argv += ["--train-steps", "1", "--threads", "1", "--time-budget", "3600", "--out", str(out)]
    cache = jax.config.jax_compilation_cache_dir
    returned = accelerator.main([*argv, *(["--compilation-cache", cache] if cache else [])])
    result = json.loads((out / "results.json").read_text())
    assert result == json.loads(json.dumps(returned))
    assert result["config"]["precision"] == "float32" and result["device"]["backend"] == "cpu"
    assert result["phases"] == {"diffusers": "done", "ours": "done", "train": "done"}
    assert result["complete"] is True

    sampling = result["sampling"]
    ours, theirs = sampling["ours"], sampling["diffusers"]
    for part in (ours, theirs):
        assert set(part["by_batch"]) == {"1", "2"} and part["skipped_batch_sizes"] == []
        rates = {int(b): r["images_per_s"] for b, r in part["by_batch"].items()}
        assert part["best_batch"] == max(rates, key=rates.get)
        assert part["images_per_s"] == rates[part["best_batch"]] > 0
    assert sampling["speedup_vs_diffusers"] == ours["images_per_s"] / theirs["images_per_s"]
    assert sampling["images"]["compared"] == 1  # the smallest batch of each
    assert sampling["images"]["max_abs_diff"] < 2e-3  # the same work in both frameworks

    device = result["device"]
    assert device["measured_matmul_tflops"] > 0 and device["datasheet_bf16_tflops"] is None
    assert sampling["flops_per_image"] > 0
    want = sampling["flops_per_image"] * ours["images_per_s"] / device["measured_matmul_tflops"]
    assert sampling["floor_share"]["ours"]["measured_matmul"] == pytest.approx(want / 1e12)
    assert sampling["floor_share"]["ours"]["datasheet"] is None  # a CPU is no planner chip

    train = result["train_step"]
    assert train["cross_check"]["passed"]
    assert train["flops_per_step"] > 0
    assert train["speedup_vs_torch"] == train["ours"]["steps_per_s"] / train["torch"]["steps_per_s"]
    want = (
        train["flops_per_step"] * train["torch"]["steps_per_s"] / device["measured_matmul_tflops"]
    )
    assert train["floor_share"]["torch"]["measured_matmul"] == pytest.approx(want / 1e12)

    compile_s = result["compile_s"]
    assert compile_s["train step (lower + compile)"] == train["ours"]["compile_s"] > 0
    assert compile_s["sampler, JAX trace + lower + compile events"] > 0
    programs = [k for k in compile_s if k.startswith("sampler program")]
    assert {"sampler program _sample_loop", "sampler program _decode"} <= set(programs)
    assert any("device memory" in note for note in result["not_measured"])

    table = (out / "results.md").read_text()
    assert table.strip() in capsys.readouterr().out
    for row in ("sampling, images/s at the best batch", "train step (distill, batch 1 per term)",
                "compile s: train step", "| batch | ours img/s |", "_sample_loop"):  # fmt: skip
        assert row in table
    assert f"{sampling['speedup_vs_diffusers']:.2f}x" in table
    assert f"{train['ours']['steps_per_s'] / train['torch']['steps_per_s']:.2f}x" in table


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--batch-sizes", "4,0"], "positive integers"),
        (["--batch-sizes", "four"], "positive integers"),
    ],
)
def test_accelerator_benchmark_rejects_bad_batch_sizes(argv, message, capsys):
    from unlearn_jax.benchmarks import accelerator

    with pytest.raises(SystemExit):
        accelerator.build_parser().parse_args(argv)
    assert message in capsys.readouterr().err


def test_accelerator_benchmark_names_the_fix_for_an_unknown_model(tmp_path):
    from unlearn_jax.benchmarks import accelerator

    with pytest.raises(SystemExit, match="Fix: --model sd15, --model tiny"):
        accelerator._model_folder(str(tmp_path / "nothing"), tmp_path)


def test_cpu_name_reads_the_model_name_and_falls_back(monkeypatch):
    cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9454 48-Core\n"
    assert cpu_name(cpuinfo) == "AMD EPYC 9454 48-Core"
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    assert cpu_name("processor\t: 0\nmodel name\t:\n") == "arm"  # empty, as on some VMs
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert cpu_name("") == "unknown"
    assert cpu_name()  # this machine


def test_accelerator_report_keeps_sampling_when_the_train_step_fails():
    """A failed train step (e.g. out of GPU memory) is reported, the sampling figures kept."""
    import numpy as np

    from unlearn_jax.benchmarks import accelerator
    from unlearn_jax.benchmarks.accelerator_report import markdown_table, summarize

    device = {"backend": "gpu", "device_kind": "NVIDIA H100 80GB HBM3", "chip": "H100 SXM",
              "datasheet_bf16_tflops": 989.0, "matmul_dtype": "bfloat16",
              "measured_matmul_tflops": 790.0}  # fmt: skip
    batch = {"images_per_s": 6.0, "first_call_s": 40.0, "compile_s": 39.0, "jax_compile_s": 38.0,
             "compile_by_program_s": {"_sample_loop": 30.0}}  # fmt: skip
    ours = {"by_batch": {"8": batch}, "best_batch": 8, "images_per_s": 6.0, "dtype": "bfloat16",
            "skipped_batch_sizes": [16], "device_peak_mb": 9000.0, "flops_per_image": 70.2e12,
            "flop_count_compile_s": 20.0, "device": device}  # fmt: skip
    theirs = {"by_batch": {"8": {"images_per_s": 4.0}}, "best_batch": 8, "images_per_s": 4.0,
              "dtype": "float16", "skipped_batch_sizes": [], "device_peak_mb": 8000.0}  # fmt: skip
    config = {"model": "sd15", "precision": "half", "steps": 50, "guidance": 7.5, "cores": 16,
              "cpu": "AMD EPYC 9454", "load_average": [0.1], "load_average_after": [0.2],
              "train_method": "distill", "train_batch_per_term": 2}  # fmt: skip
    images = {"ours": np.zeros((8, 4, 4, 3)), "diffusers": np.full((8, 4, 4, 3), 0.25)}
    failed = {"error": "the ours worker failed:\n...\nRESOURCE_EXHAUSTED: Out of memory"}
    guess = accelerator.device_guess(True, "half", "NVIDIA H100 80GB HBM3")
    result = summarize(config, ours, theirs, failed, images, guess)
    result["elapsed_s"] = 400.0
    assert result["device"] == device  # our worker's, measured rate included
    assert result["sampling"]["speedup_vs_diffusers"] == 1.5
    assert result["sampling"]["floor_share"]["ours"]["datasheet"] == pytest.approx(
        70.2e12 * 6.0 / 989e12
    )
    assert result["sampling"]["images"]["max_abs_diff"] == 0.25
    assert result["train_step"] == failed
    assert any("Out of memory" in note for note in result["not_measured"])
    table = markdown_table(result)
    assert "| failed (see the notes) |" in table and "1.50x" in table
    assert "not measured: train step: failed, RESOURCE_EXHAUSTED: Out of memory" in table
    assert "42.6%" in table  # 70.2 TFLOP x 6 img/s of 989 TFLOP/s
    assert "{'ours': [16], 'diffusers': []}" in table  # what the time budget skipped
    assert "(incomplete" not in table  # no phase status given: a whole result
    assert "16 cores of AMD EPYC 9454" in table  # the host is named beside the card


@pytest.mark.parametrize(
    "kind,chip",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA A100-SXM4-40GB", "A100 80GB"),
        ("TPU v4", "TPU v4"),
        ("TPU v5 lite", "TPU v5e"),
        ("NVIDIA H100 PCIe", None),  # a lower peak than the planner's SXM card
        ("cpu", None),
    ],
)
def test_accelerator_benchmark_names_the_planner_chip(kind, chip):
    from unlearn_jax.benchmarks.accelerator import planner_chip

    found = planner_chip(kind)
    assert (found.name if found else None) == chip


@pytest.mark.parametrize(
    "body,want",
    [
        (  # what the kernel's out-of-memory killer does: no word on stderr
            "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
            r"the ours worker failed \(killed by SIGKILL, most likely by the out-of-memory "
            r"killer; the largest worker so far peaked at \d+(\.\d GiB| MiB) RSS\. Fix: a smaller",
        ),
        ("import sys; sys.stderr.write('boom'); sys.exit(3)", r"failed \(exit status 3\):\nboom$"),
        (
            "import os, signal; os.kill(os.getpid(), signal.SIGTERM)",
            r"failed \(killed by SIGTERM\)",
        ),
    ],
    ids=["oom-kill", "exit-status", "sigterm"],
)
def test_a_failed_worker_says_why(tmp_path, body, want):
    (tmp_path / "dying_worker.py").write_text(body)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    with pytest.raises(RuntimeError, match=want):
        run_worker("dying_worker", "ours", tmp_path, env=env)


def test_exit_reason_sizes_the_peak():
    assert common.exit_reason(3) == "exit status 3"
    assert common.exit_reason(-9, 22_883.0).endswith(  # the SD-1.5 dry run's train step
        "peaked at 22.3 GiB RSS. Fix: a smaller batch or model, or a machine with more memory"
    )
    assert "peaked at 12 MiB RSS" in common.exit_reason(-9, 12.0)
    assert common.exit_reason(-9).startswith("killed by SIGKILL, most likely by the out-of-memory")


def test_a_worker_past_its_timeout_is_killed(tmp_path):
    body = "import sys, time; sys.stderr.write('compiling'); sys.stderr.flush(); time.sleep(120)"
    (tmp_path / "slow_worker.py").write_text(body)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    want = r"the ours worker did not finish in 2 s and was killed:\ncompiling$"
    with pytest.raises(RuntimeError, match=want):
        run_worker("slow_worker", "ours", tmp_path, env=env, timeout=2)
    (tmp_path / "silent_worker.py").write_text("import time; time.sleep(120)")
    with pytest.raises(RuntimeError, match=r"killed \(it wrote nothing to stderr\)$"):
        run_worker("silent_worker", "ours", tmp_path, env=env, timeout=1)


def test_a_sweep_keeps_the_batch_sizes_before_a_failure(tmp_path):
    """A batch size that fails (out of device memory) is recorded, larger ones are not
    tried, and every finished one is in the progress file as soon as it finishes."""
    from unlearn_jax.benchmarks import accelerator

    progress = tmp_path / "progress_ours.json"
    seen = []

    def run_batch(b):
        seen.append(b)
        if b == 4:
            written = json.loads(progress.read_text())["by_batch"]
            assert written == {"1": {"images_per_s": 1.0}, "2": {"images_per_s": 3.0}}
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB")
        return {"images_per_s": {1: 1.0, 2: 3.0}[b]}

    spec = {"batch_sizes": [1, 2, 4, 8], "time_budget_s": 3600.0}
    result = accelerator._sweep(spec, "ours", run_batch, progress, {"dtype": "bfloat16"})
    assert seen == [1, 2, 4]
    assert result["best_batch"] == 2 and result["images_per_s"] == 3.0
    assert result["skipped_batch_sizes"] == [8]
    oom = "RuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB"
    assert result["failed"] == {"4": oom}
    assert json.loads(progress.read_text()) == {"dtype": "bfloat16", **result}

    def always_fails(b):
        raise ValueError("cuDNN rejected the attention")

    with pytest.raises(RuntimeError, match="ours: no batch size ran.*cuDNN rejected"):
        accelerator._sweep(spec, "ours", always_fails, progress, {})


def _fake_sampling_worker(name, workdir, b=2, rate=4.0):
    """What a sampling worker leaves behind: its images and progress file; its result."""
    import numpy as np

    from unlearn_jax.benchmarks import accelerator

    device = "NVIDIA H100 80GB HBM3"  # diffusers' worker: torch's device name
    if name == "ours":  # ours: JAX's device, the planner's chip, the measured rate
        device = {**accelerator.device_guess(True, "half", device), "measured_matmul_tflops": 790.0}

    np.save(workdir / f"images_{name}.npy", np.full((b, 4, 4, 3), 0.5 if name == "ours" else 0.25))
    batch = {"images_per_s": rate, "first_call_s": 30.0, "compile_s": 29.0, "jax_compile_s": 28.0,
             "compile_by_program_s": {"_sample_loop": 20.0}}  # fmt: skip
    result = {"by_batch": {str(b): batch}, "best_batch": b, "images_per_s": rate,
              "skipped_batch_sizes": [], "failed": {}, "dtype": "bfloat16",
              "device": device}  # fmt: skip
    (workdir / f"progress_{name}.json").write_text(json.dumps(result))
    return result


@pytest.fixture
def staged_accelerator_run(tmp_path, monkeypatch):
    """`accelerator.main` on a GPU as far as the parent sees: the model build and the
    workers replaced by `fakes[phase](workdir, timeout)`; the real phases, deadline,
    summary and writing around them. Returns (run(argv) -> result, fakes to fill, the
    calls made as (phase, timeout), the --out folder)."""
    from unlearn_jax.benchmarks import accelerator

    monkeypatch.setattr(accelerator, "_on_gpu", lambda: True)
    monkeypatch.setattr(accelerator, "_model_folder", lambda model, workdir: workdir)
    fakes, calls = {}, []

    def run_worker(module, name, workdir, timeout=None):
        calls.append((name, timeout))
        return fakes[name](workdir, timeout)

    def train_step(folder, args, precision, timeout):
        calls.append(("train", timeout))
        return fakes["train"](folder, timeout)

    monkeypatch.setattr(accelerator, "run_worker", run_worker)
    monkeypatch.setattr(accelerator, "_train_step", train_step)
    out = tmp_path / "bench"
    return (lambda argv: accelerator.main([*argv, "--out", str(out)])), fakes, calls, out


def test_accelerator_phases_fail_alone_and_each_is_written_at_once(staged_accelerator_run):
    """diffusers killed after one batch size, ours done, the train step out of memory:
    every phase still runs, what the killed one finished is kept, and results.json
    holds each phase as soon as it ends (a run stopped from outside keeps them)."""
    import numpy as np

    run, fakes, calls, out = staged_accelerator_run
    killed = "the diffusers worker did not finish in 290 s and was killed"

    def diffusers(workdir, timeout):
        _fake_sampling_worker("diffusers", workdir, rate=2.0)
        raise RuntimeError(killed)

    def ours(workdir, timeout):
        written = json.loads((out / "results.json").read_text())
        assert written["phases"] == {"diffusers": f"incomplete: {killed}", "ours": "not run",
                                     "train": "not run"}  # fmt: skip
        assert written["complete"] is False
        assert written["sampling"]["diffusers"]["images_per_s"] == 2.0
        assert "(incomplete: see the notes)" in (out / "results.md").read_text()
        return {**_fake_sampling_worker("ours", workdir), "flops_per_image": 70.2e12}

    def train(folder, timeout):
        assert json.loads((out / "results.json").read_text())["phases"]["ours"] == "done"
        return {"error": "the ours worker failed (killed by SIGKILL, most likely by the "
                "out-of-memory killer)"}  # fmt: skip

    fakes.update(diffusers=diffusers, ours=ours, train=train)
    result = run(["--model", "sd15"])
    assert [name for name, _ in calls] == ["diffusers", "ours", "train"]
    assert all(timeout is None for _, timeout in calls)  # no --deadline
    assert result["phases"]["diffusers"].startswith("incomplete: the diffusers worker did not")
    assert result["phases"]["ours"] == "done"
    assert result["phases"]["train"].startswith("failed: the ours worker failed (killed by")
    assert result["complete"] is False
    sampling = result["sampling"]
    assert sampling["speedup_vs_diffusers"] == 2.0  # 4 img/s against the kept 2 img/s
    assert sampling["images"]["max_abs_diff"] == 0.25  # the killed worker's images kept
    assert result["device"]["chip"] == "H100 SXM"
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(result))
    table = (out / "results.md").read_text()
    assert "| 4 (batch 2) | 2 (batch 2) | 2.00x |" in table
    assert "not measured: diffusers' sampling: incomplete, kept what it finished before" in table
    assert "| train step (distill, batch 2 per term), steps/s | failed (see the notes) |" in table
    assert "a phase ran out of time. Fix: a larger --deadline" in table
    np.testing.assert_equal(result["config"]["batch_sizes"], [4, 8])  # the sd15 defaults


def test_accelerator_deadline_bounds_each_phase_and_skips_what_cannot_start(
    staged_accelerator_run, monkeypatch
):
    """--deadline: each phase gets what is left (less a margin for the results); a phase
    with under `MIN_PHASE_S` left is not started, and the results say so."""
    from unlearn_jax.benchmarks import accelerator

    run, fakes, calls, out = staged_accelerator_run
    now = [1000.0]
    monkeypatch.setattr(accelerator.time, "time", lambda: now[0])

    def after(seconds, result):
        def worker(workdir, timeout):
            now[0] += seconds
            return result(workdir)

        return worker

    fakes["diffusers"] = after(45.0, lambda w: _fake_sampling_worker("diffusers", w))
    fakes["ours"] = after(30.0, lambda w: _fake_sampling_worker("ours", w))
    result = run(["--model", "sd15", "--deadline", "100"])
    margin = accelerator.RESULTS_MARGIN_S
    assert calls == [("diffusers", 100 - margin), ("ours", 55 - margin)]
    assert result["phases"]["train"] == "not run: 25 s of --deadline were left"
    assert result["config"]["deadline_s"] == 100
    assert "not measured: train step: not run" in (out / "results.md").read_text()


def test_accelerator_only_runs_the_phases_asked_for(staged_accelerator_run, capsys):
    from unlearn_jax.benchmarks import accelerator

    run, fakes, calls, out = staged_accelerator_run
    fakes["ours"] = lambda w, t: _fake_sampling_worker("ours", w)
    result = run(["--model", "sd15", "--only", "ours"])
    assert calls == [("ours", None)]
    assert result["phases"] == {"diffusers": "not run: not in --only", "ours": "done",
                                "train": "not run: not in --only"}  # fmt: skip
    assert result["sampling"]["speedup_vs_diffusers"] is None
    printed = capsys.readouterr().out
    assert "| 4 (batch 2) | not run |" in printed
    assert "phase diffusers: not run: not in --only\nphase train: not run: not in --only" in printed
    with pytest.raises(SystemExit):
        accelerator.build_parser().parse_args(["--only", "ours,gpu"])
    assert "expected phases of diffusers, ours, train" in capsys.readouterr().err


def test_train_step_benchmark_keeps_ours_when_pytorch_fails(tmp_path, monkeypatch):
    """`partial=True` (the accelerator benchmark): PyTorch's worker failing leaves ours'
    figures, with its error in their place; without it the error is raised."""
    from unlearn_jax.benchmarks import accelerator, train_step
    from unlearn_jax.benchmarks.accelerator_report import markdown_table, summarize

    monkeypatch.setattr(train_step, "prepare_inputs", lambda folder, spec, workdir: None)
    timeouts = []

    def run_worker(module, name, workdir, timeout=None):
        timeouts.append(timeout)
        if name == "torch":
            raise RuntimeError("the torch worker failed (exit status 1):\nCUDA out of memory")
        return {"steps_per_s": 3.0, "compile_s": 50.0, "step0": {}, "device_peak_mb": 30000.0}

    monkeypatch.setattr(train_step, "run_worker", run_worker)
    args = train_step.build_parser().parse_args(["--model", str(tmp_path), "--method", "distill"])
    result = train_step.run_benchmark(args, timeout=300.0, partial=True)
    assert result["ours"]["steps_per_s"] == 3.0
    error = "the torch worker failed (exit status 1):\nCUDA out of memory"
    assert result["torch"] == {"error": error}
    assert result["cross_check"] is None and result["speedup_vs_torch"] is None
    assert accelerator._status(result) == "incomplete: the torch worker failed (exit status 1):"
    config = {"model": "sd15", "precision": "half", "steps": 50, "guidance": 7.5, "cores": 16,
              "cpu": "AMD EPYC 9454", "load_average": [0.1], "load_average_after": [0.2],
              "train_method": "distill", "train_batch_per_term": 2}  # fmt: skip
    guess = accelerator.device_guess(True, "half", "NVIDIA H100 80GB HBM3")
    report = summarize(config, None, None, result, {}, guess)
    report.update(elapsed_s=300.0)
    table = markdown_table(report)
    assert (
        "| train step (distill, batch 2 per term), steps/s | 3 | failed (see the notes) |  |"
        in table
    )
    assert "| train step, peak device memory MiB | 30000 |  |  |" in table
    assert "not measured: train step, PyTorch: failed, CUDA out of memory" in table
    assert all(0 < t <= 300.0 for t in timeouts)  # both workers within the one budget
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        train_step.run_benchmark(args)


def test_accelerator_report_without_our_worker_names_the_card_from_torch():
    """Our sampling failed before it measured anything (a cuDNN error, say): the card is
    still named (from diffusers' worker, with its datasheet peak), and the table and
    notes say what is missing and why."""
    from unlearn_jax.benchmarks import accelerator
    from unlearn_jax.benchmarks.accelerator_report import markdown_table, summarize

    theirs = {"by_batch": {"8": {"images_per_s": 4.0}}, "best_batch": 8, "images_per_s": 4.0,
              "dtype": "float16", "skipped_batch_sizes": [32],
              "failed": {"16": "OutOfMemoryError: CUDA out of memory"},
              "device": "NVIDIA H100 80GB HBM3"}  # fmt: skip
    ours = {"error": "the ours worker failed (exit status 1):\nXlaRuntimeError: cuDNN rejected"}
    config = {"model": "sd15", "precision": "half", "steps": 50, "guidance": 7.5, "cores": 16,
              "cpu": "AMD EPYC 9454", "load_average": [0.1], "load_average_after": [0.2],
              "train_method": "distill", "train_batch_per_term": 2}  # fmt: skip
    guess = accelerator.device_guess(True, "half", theirs["device"])
    result = summarize(config, ours, theirs, None, {}, guess)
    result.update(elapsed_s=100.0, complete=False)
    assert result["device"]["chip"] == "H100 SXM" and result["device"]["datasheet_bf16_tflops"]
    assert result["sampling"]["speedup_vs_diffusers"] is None
    assert result["sampling"]["images"] is None and result["compile_s"] == {}
    table = markdown_table(result)
    assert (
        "| sampling, images/s at the best batch | failed (see the notes) | 4 (batch 8) |  |"
        in table
    )
    assert "not measured: our sampling: failed, XlaRuntimeError: cuDNN rejected" in table
    assert "not measured: measured matmul rate: our worker did not report one" in table
    assert "not measured: train step: not run" in table
    assert "| 16 |  |  |  | failed |" in table  # the sweep row of the size that failed
    assert "diffusers, batch 16: failed, OutOfMemoryError: CUDA out of memory" in table
    assert "{'ours': None, 'diffusers': [32]}" in table  # skipped: above the failed size
