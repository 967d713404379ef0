"""Smoke tests of the benchmark programs: they run end to end and write their JSON.

Never timed: only the structure of the results and the agreement of the images
(same work in both frameworks) are checked.
"""

from __future__ import annotations

import json

import pytest

from unlearn_jax.benchmarks import sampling


def _run(tmp_path, *extra: str) -> dict:
    out = tmp_path / "results.json"
    argv = ["--num-images", "1", "--steps", "2", "--batch-size", "1", "--out", str(out), *extra]
    returned = sampling.main(argv)
    written = json.loads(out.read_text())
    assert written.keys() == returned.keys()
    return written


def test_sampling_benchmark_in_process(tmp_path, capsys):
    result = _run(tmp_path, "--skip-subprocess")
    assert {"config", "diffusers", "ours_in_process"} <= result.keys()
    assert {"num_images", "steps", "guidance", "batch_size", "load_average"} <= result[
        "config"
    ].keys()
    assert {"load_s", "wall_s", "images_per_s"} <= result["diffusers"].keys()
    ours = result["ours_in_process"]
    expected = {"first_call_s", "steady_s", "compile_s", "jax_compile_s", "images_per_s"}
    assert expected | {"speedup_vs_diffusers", "max_abs_diff_vs_diffusers"} <= ours.keys()
    assert ours["max_abs_diff_vs_diffusers"] < 2e-3  # the same work in both frameworks
    assert "| method |" in capsys.readouterr().out


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
    assert result["ours"]["trainable_parameters"] == result["torch"]["trainable_parameters"]
    check = result["cross_check"]
    # distill: the remap forget term and both retain_distill branches are compared.
    assert {"forget/loss", "retain/mse_cond", "retain/mse_uncond"} <= check["values"].keys()
    assert all(v["ours"] > 0 for v in check["values"].values())
    assert check["max_loss_rel_diff"] < 1e-4, check["values"]  # the same loss in both
    assert check["max_grad_rel_diff"] < 1e-3, check["values"]
    assert check["passed"]
    assert "| framework |" in capsys.readouterr().out
