"""Data-parallel and FSDP training on 8 fake CPU devices equal one device (float32 tolerance).

distill_project (retain_distill + the projection) on one device, data=8,
fsdp=8 and a mixed 2x4 mesh. The runs remap each forget prompt to its own
anchor (forget.concept 'circle' -> anchor_concept 'square'), so the
per-example anchor contexts are sharded over the mesh like every per-example
array.

  * At θ = θ0 (the first step) the distillation term and its gradient are
    exactly 0 on every mesh: student and teacher compile alike.
  * SGD: every mesh's weights equal one device's to within 1e-3 of how far
    the weights moved.
  * Adam (whose first steps amplify rounding differences of near-zero
    gradients into full-size updates of either sign, so weights are not
    compared): the losses agree to float32 noise.

Runs in a subprocess (the device count is fixed when JAX starts) and compiles
six train steps, so it is marked slow (~5 minutes on two CPU cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax
    import numpy as np
    from tiny_unlearn import make_config, save_micro_pipeline
    from unlearn_jax.trainer import experiment, sharding
    from unlearn_jax.trainer.checkpoints import Checkpoints
    from unlearn_jax.trainer.train import train_and_evaluate
    from unlearn_jax.trainer.writers import read_metrics
    from pathlib import Path

    assert jax.device_count() == 8, jax.devices()
    sharding.MIN_FSDP_SIZE = 256  # shard the micro model's small kernels too
    root = Path({root!r})
    model = save_micro_pipeline(root / "pipe")
    FORGET = ["a red circle", "a small green circle on a grey background"]
    ANCHORS = ["a red square", "a small green square on a grey background"]
    out = {{}}
    RUNS = [
        ("single", 1, 1, "sgd"), ("data", 8, 1, "sgd"), ("fsdp", 1, 8, "sgd"),
        ("mixed", 2, 4, "sgd"), ("adam_single", 1, 1, "adam"), ("adam_fsdp", 1, 8, "adam"),
    ]
    for name, data, fsdp, optimizer in RUNS:
        config = make_config(
            model, unlearn__params="xattn", train__steps=2, train__batch_size=8,
            optim__name=optimizer, optim__lr=0.5 if optimizer == "sgd" else 1e-3,
            mesh__data=data, mesh__fsdp=fsdp,
            forget__prompts=repr(FORGET), forget__concept="circle",
            forget__anchor_concept="square",
        )
        assert experiment.resolve_run(config).anchor_prompts == ANCHORS
        if name == "single":
            spec = experiment.resolve_run(config)
            loaded = experiment.load_model(config, spec)
            theta0 = loaded.split.select(loaded.theta0)
            np.savez(root / "theta0.npz", **{{k: np.asarray(v) for k, v in theta0.items()}})
        result = train_and_evaluate(config, root / name)
        result["first_step"] = read_metrics(root / name)[0]
        manager = Checkpoints(root / name)
        step = manager.latest_step()
        params = manager.manager.restore(step)["params"]
        manager.close()
        np.savez(root / f"{{name}}.npz", **{{k: np.asarray(v) for k, v in params.items()}})
        if fsdp > 1:  # the check is only meaningful if some weights were sharded
            specs = [sharding.param_spec(v.shape, fsdp) for v in params.values()]
            assert sum("fsdp" in tuple(s) for s in specs) >= 4, specs
        out[name] = result
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow
def test_data_parallel_and_fsdp_equal_one_device(tmp_path):
    tests = str(Path(__file__).parent)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(tests=tests, root=str(tmp_path))],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    results = json.loads(line[len("RESULT") :])
    for name, result in results.items():
        # θ = θ0 at the first step: the distillation term is exactly zero, on every mesh.
        first = result["first_step"]
        assert first["retain/loss"] == 0.0, (name, first)
        assert first["retain/mse_cond"] == first["retain/mse_uncond"] == 0.0, (name, first)
        assert first["grad/retain_norm"] == 0.0, (name, first)
        assert first["grad/forget_norm"] > 0.0, (name, first)
    theta0 = np.load(tmp_path / "theta0.npz")
    single = np.load(tmp_path / "single.npz")
    movement = np.sqrt(sum(np.sum((single[k] - theta0[k]) ** 2) for k in single.files))
    assert movement > 0
    for name in ("data", "fsdp", "mixed"):
        for key in ("forget/loss", "retain/loss", "grad/norm", "param/norm"):
            np.testing.assert_allclose(
                results[name][key], results["single"][key], rtol=2e-5, err_msg=(name, key)
            )
        other = np.load(tmp_path / f"{name}.npz")
        assert sorted(single.files) == sorted(other.files)
        for key in single.files:
            np.testing.assert_allclose(other[key], single[key], rtol=1e-5, atol=1e-6, err_msg=key)
        difference = np.sqrt(sum(np.sum((other[k] - single[k]) ** 2) for k in single.files))
        assert difference <= 1e-3 * movement, (name, difference, movement)
    for key in ("forget/loss", "retain/loss"):
        np.testing.assert_allclose(
            results["adam_fsdp"][key], results["adam_single"][key], rtol=1e-5, atol=1e-9
        )
