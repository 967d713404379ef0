"""Shared fixtures: tiny diffusers pipelines on disk, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Never reach a model hub from a test, whatever the machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tests run on CPU (fake devices where they need several). The test extra installs
# libtpu for the TPU planner, and JAX would otherwise spend ~10 s probing for a TPU in
# this process and in every command-line subprocess, which inherits this.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402

# Tests compile the same tiny models many times, in both pytest-xdist workers: a
# persistent compilation cache shares those compiles (results are identical; XLA
# only skips recompiling).
jax.config.update(
    "jax_compilation_cache_dir", str(Path(__file__).parents[1] / ".pytest_cache" / "jax")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory) -> Path:
    from tiny_sd import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("sd1") / "pipe", "sd1", seed=0)


@pytest.fixture(scope="session")
def sd2_folder(tmp_path_factory) -> Path:
    from tiny_sd import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("sd2") / "pipe", "sd2", seed=1)
