"""Launch scripts: syntax and lint, and a real two-process job on localhost through
the generic multi-node launcher (jax.distributed with CPU collectives)."""

from __future__ import annotations

import json
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


# ---------------------------------------------------------------------------
# A real unlearning job on two processes (one CPU device each) through multinode.sh
# ---------------------------------------------------------------------------

REPO = LAUNCH.parent
# SGD rather than Adam: Adam's first steps turn rounding differences of
# near-zero gradients into full-size updates (see test_train_sharding.py).
MULTI_OVERRIDES = {
    "unlearn.params": "xattn",
    "optim.name": "sgd",
    "optim.lr": "0.5",
    "train.steps": "4",
    "checkpoint.every": "2",
}


def _launch_unlearn(workdir: Path, model: Path, port: int) -> list[subprocess.Popen]:
    """Starts the two ranks of `multinode.sh unlearn ...`; rank 1 creates files with umask 077.

    The umask marks every file rank 1 creates (mode 0600/0700, rank 0's are
    0644/0755), so the test can tell which process wrote what in the shared workdir.
    """
    from tiny_unlearn import config_fields

    fields = {**config_fields(model), **MULTI_OVERRIDES}
    # `bash -c 'umask M && exec "$@"' umask bash multinode.sh ...`: the umask without a fork
    # of this (multithreaded, JAX-running) process.
    command = [
        "bash",
        "-c",
        'umask "$UMASK" && exec "$@"',
        "umask",
        "bash",
        str(LAUNCH / "multinode.sh"),
        "unlearn",
        "--config",
        f"{REPO / 'configs' / 'distill_project.py'}:runlocal",
        "--workdir",
        str(workdir),
        *(f"--config.{k}={v}" for k, v in fields.items()),
    ]
    env = lambda rank: dict(
        _job_env(rank, port),
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        UMASK="077" if rank else "022",
    )
    return [
        subprocess.Popen(
            command,
            env=env(rank),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]


def _finish(procs: list[subprocess.Popen]) -> list[tuple[dict, str]]:
    """(the printed result JSON, the log) of each rank; fails with the logs if one failed."""
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:  # a rank left waiting for a failed one is stopped (exec: the PID is python's)
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (proc, (_, err)) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank}:\n{err[-6000:]}"
    return [(json.loads(out[out.index("{") :]), err) for out, err in outputs]


def _files_by_rank(workdir: Path) -> dict[int, list[str]]:
    """Files and folders under `workdir` by the rank that created them (by mode, see above)."""
    found: dict[int, list[str]] = {0: [], 1: []}
    for path in sorted(workdir.rglob("*")):
        mode = path.stat().st_mode & 0o077
        found[0 if mode else 1].append(str(path.relative_to(workdir)))
    return found


def test_unlearn_on_two_processes_equals_one_process(tmp_path):
    """Two ranks of one job (2 global devices, one per process) vs one process, one device.

    Same weights within float32 tolerance; only rank 0 writes logs, metrics, the
    run record and the data cache; each rank writes its part of every orbax
    checkpoint, which a single process restores and exports; a second launch
    resumes from the multi-host checkpoint on both ranks.
    """
    import numpy as np
    from safetensors.numpy import load_file
    from tiny_unlearn import make_config, save_micro_pipeline

    from unlearn_jax.trainer.checkpoints import Checkpoints
    from unlearn_jax.trainer.train import export, train_and_evaluate
    from unlearn_jax.trainer.writers import read_metrics

    model = save_micro_pipeline(tmp_path / "pipe")
    multi, single = tmp_path / "multi", tmp_path / "single"
    procs = _launch_unlearn(multi, model, _free_port())
    try:  # the single-process reference runs here while the job runs
        overrides = {k.replace(".", "__"): v for k, v in MULTI_OVERRIDES.items()}
        reference = train_and_evaluate(make_config(model, **overrides), single)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    results = _finish(procs)
    # Every rank computed the same global steps; both equal the reference.
    for result, _ in results:
        assert result["step"] == 4
        for key in ("forget/loss", "retain/loss", "grad/norm", "param/norm"):
            np.testing.assert_allclose(result[key], reference[key], rtol=2e-5, err_msg=key)

    # Only rank 0 writes files; rank 1 only its own shards of the checkpoints.
    by_rank = _files_by_rank(multi)
    assert by_rank[1] and all("process_1" in path for path in by_rank[1]), by_rank[1]
    assert {"metrics.jsonl", "run.json", "cache"} <= set(by_rank[0])
    multi_rows, single_rows = read_metrics(multi), read_metrics(single)
    assert [r["step"] for r in multi_rows] == [1, 2, 3, 4]  # one writer, no duplicate rows
    for got, want in zip(multi_rows, single_rows):
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=1e-7, err_msg=key)

    # The multi-host checkpoint restores in a single process (export gives the
    # target layout: orbax refuses to guess it across topologies) and exports.
    checkpoints = Checkpoints(multi)
    try:
        assert checkpoints.manager.all_steps() == [2, 4]
    finally:
        checkpoints.close()
    unet = "unet/diffusion_pytorch_model.safetensors"
    a = load_file(export(multi, tmp_path / "multi_export") / unet)
    b = load_file(export(single, tmp_path / "single_export") / unet)
    original = load_file(model / unet)
    changed = [k for k in a if not np.array_equal(a[k], original[k])]
    assert changed and all(".attn2." in k for k in changed)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)

    # Both ranks restore the multi-host checkpoint (nothing left to train: no compile).
    for rank, (result, log) in enumerate(_finish(_launch_unlearn(multi, model, _free_port()))):
        assert result == {"step": 4}, (rank, result)
        assert "from step 4" in log, log[-3000:]
    assert len(read_metrics(multi)) == 4
    assert all("process_1" in path for path in _files_by_rank(multi)[1])


SAMPLER_CHECK = """
import sys
sys.path.insert(0, {tests!r})
import jax, numpy as np
from unlearn_jax.distributed import initialize_from_env
initialize_from_env()
from test_sampler import make_inputs, make_model, make_plan
from unlearn_jax.diffusion.chunks import data_mesh, sample_in_chunks
from unlearn_jax.diffusion.sampler import ddim_sample

model_fn, plan = make_model(), make_plan(3)
params, latents, cond, uncond = make_inputs(batch=5, seed=2)
kwargs = dict(guidance_scale=3.0, eta=0.3, key=jax.random.key(5))
local = np.asarray(ddim_sample(model_fn, params, plan, latents, cond, uncond, **kwargs))
# Chunks of 4 (rounded up from 3 to a multiple of the 2 global devices) and 1 (+3 padding).
mesh = data_mesh()
assert mesh.devices.size == 2 and jax.local_device_count() == 1
every = sample_in_chunks(
    model_fn, params, plan, latents, cond, uncond, batch_size=3, mesh=mesh, progress=False,
    **kwargs,
)
np.testing.assert_allclose(every, local, rtol=0, atol=1e-6)
print("rank", jax.process_index(), "rows", every.shape[0], flush=True)
"""


def test_sampling_over_a_mesh_of_two_processes_returns_every_row_on_every_process():
    """The evaluator's sampler with a multi-host mesh: each process gets all N images."""
    port = _free_port()
    code = SAMPLER_CHECK.format(tests=str(Path(__file__).parent))
    env = lambda rank: dict(
        _job_env(rank, port),
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        UNLEARN_JAX_COORDINATOR=f"127.0.0.1:{port}",
        UNLEARN_JAX_NUM_PROCESSES="2",
        UNLEARN_JAX_PROCESS_ID=str(rank),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env(rank),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, out[-4000:]
        assert f"rank {rank} rows 5" in out, out[-4000:]
