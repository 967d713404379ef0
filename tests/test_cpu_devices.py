"""Splitting a CPU host into several JAX devices (`distributed.split_cpu_into_devices`).

The device count is fixed when JAX's backends start, once per process, so
every case runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from unlearn_jax.testing.tiny_model import caption_prompts, save_tiny_model

PROBE = """
import json, sys, jax
from unlearn_jax.distributed import split_cpu_into_devices
if sys.argv[3] == "compute-first":
    jax.numpy.zeros(1).block_until_ready()
asked = split_cpu_into_devices(int(sys.argv[1]), int(sys.argv[2]))
print(json.dumps({"asked": asked, "devices": jax.device_count()}))
"""


def _env(**updates: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "UNLEARN_JAX_CPU_DEVICES")}
    env.update({k: v for k, v in updates.items() if v is not None})
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _probe(max_devices: int, replica_bytes: int, mode: str = "", **env: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(max_devices), str(replica_bytes), mode or "-"],
        env=_env(**env),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_one_device_per_core_up_to_the_batch_size():
    cores = len(os.sched_getaffinity(0))
    assert _probe(64, 1000) == {"asked": cores, "devices": cores}
    assert _probe(1, 1000) == {"asked": 1, "devices": 1}


def test_replicas_that_do_not_fit_in_half_the_memory_keep_one_device():
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert _probe(64, memory) == {"asked": 1, "devices": 1}


def test_the_users_choice_wins():
    assert _probe(64, 1000, UNLEARN_JAX_CPU_DEVICES="3") == {"asked": 3, "devices": 3}
    flags = "--xla_force_host_platform_device_count=5"
    assert _probe(2, 1000, XLA_FLAGS=flags) == {"asked": 0, "devices": 5}


def test_nothing_changes_once_jax_has_computed():
    assert _probe(64, 1000, "compute-first", UNLEARN_JAX_CPU_DEVICES="3") == {
        "asked": 0,
        "devices": 1,
    }


def test_bad_device_count_setting_is_refused(monkeypatch):
    from unlearn_jax.distributed import split_cpu_into_devices

    monkeypatch.setenv("UNLEARN_JAX_CPU_DEVICES", "two")
    with pytest.raises(ValueError, match="UNLEARN_JAX_CPU_DEVICES='two'"):
        split_cpu_into_devices(8, 1000)


def test_sample_command_on_split_cpu_equals_one_device(tmp_path):
    folder = save_tiny_model(tmp_path / "model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(caption_prompts(5)) + "\n")
    images = {}
    for devices in ("1", "2"):
        out = tmp_path / f"out{devices}"
        command = [sys.executable, "-m", "unlearn_jax.cli", "sample", "--model", str(folder),
                   "--prompts", str(prompts), "--steps", "3", "--batch-size", "4",
                   "--out", str(out)]  # fmt: skip
        env = _env(UNLEARN_JAX_CPU_DEVICES=devices, UNLEARN_JAX_COMPILATION_CACHE="off")
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        with np.load(out / "images.npz") as data:
            images[devices] = data["images"]
    assert images["1"].shape == (5, 32, 32, 3)
    # Each row is computed alone on its device either way: same numbers up to
    # the order XLA picks for reductions.
    np.testing.assert_allclose(images["2"], images["1"], atol=1e-5)
