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
    assert result["startup_s"] > 0
    probes = result["compile_vs_steps"]
    assert set(probes["runs"]) == {"2", "3"}
    assert {"ratio", "jax_ratio"} <= probes.keys()
    assert {"first_call_s", "steady_s", "compile_s", "jax_compile_s"} <= probes["runs"]["2"].keys()
