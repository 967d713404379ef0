"""Launch scripts: syntax and lint, and a real two-process job on localhost through
the generic multi-node launcher (jax.distributed with CPU collectives)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_pass_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _job_env(rank: int, port: int, world: int = 2) -> dict:
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        COORDINATOR=f"127.0.0.1:{port}",
        NUM_PROCESSES=str(world),
        PROCESS_ID=str(rank),
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
    )
    return env


def test_multinode_selfcheck_two_local_processes():
    port = _free_port()
    procs = [
        subprocess.Popen(
            ["bash", str(LAUNCH / "multinode.sh"), "selfcheck"],
            env=_job_env(rank, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, out
        # 2 processes x 2 devices; device values are rank+1: 1+1+2+2.
        assert f"process {rank}/2: 2 local of 4 devices, sum=6" in out, out


def test_multinode_needs_rank_variables():
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in ("COORDINATOR", "MASTER_ADDR", "NUM_PROCESSES", "WORLD_SIZE", "PROCESS_ID", "RANK")
    }
    result = subprocess.run(
        ["bash", str(LAUNCH / "multinode.sh"), "selfcheck"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "set COORDINATOR=host:port" in result.stderr


def test_tpu_pod_dry_run_runs_on_all_workers():
    env = dict(os.environ, TPU_NAME="pod", ZONE="us-central2-b", DRY_RUN="1")
    result = subprocess.run(
        [
            "bash",
            str(LAUNCH / "tpu_pod.sh"),
            "unlearn",
            "--config",
            "configs/esd_x.py",
            "--workdir",
            "gs://b/run",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("git -C")
    assert all("--worker=all" in line for line in lines[1:]), lines
    assert "UNLEARN_JAX_DISTRIBUTED=auto" in lines[-1]
    assert "configs/esd_x.py" in lines[-1]
