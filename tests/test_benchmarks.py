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
    result = summarize(config, ours, theirs, failed, images)
    result["elapsed_s"] = 400.0
    assert result["sampling"]["speedup_vs_diffusers"] == 1.5
    assert result["sampling"]["floor_share"]["ours"]["datasheet"] == pytest.approx(
        70.2e12 * 6.0 / 989e12
    )
    assert result["sampling"]["images"]["max_abs_diff"] == 0.25
    assert result["train_step"] == failed
    assert any("Out of memory" in note for note in result["not_measured"])
    table = markdown_table(result)
    assert "failed (see not measured)" in table and "1.50x" in table
    assert "42.6%" in table  # 70.2 TFLOP x 6 img/s of 989 TFLOP/s
    assert "{'ours': [16], 'diffusers': []}" in table  # what the time budget skipped
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
