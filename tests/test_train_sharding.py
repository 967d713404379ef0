"""Data-parallel and FSDP training on 8 fake CPU devices equal one device (float32 tolerance).

The runs remap each forget prompt to its own anchor (forget.concept 'circle' ->
anchor_concept 'square'), so the per-example anchor contexts are sharded over
the mesh like every per-example array.

Runs in a subprocess (the device count is fixed when JAX starts) and compiles
three train steps, so it is marked slow (~3-5 minutes on two CPU cores).
SGD rather than Adam: Adam's first steps amplify rounding differences of
near-zero gradients into full-size updates of either sign.
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
    from pathlib import Path

    assert jax.device_count() == 8, jax.devices()
    sharding.MIN_FSDP_SIZE = 256  # shard the micro model's small kernels too
    root = Path({root!r})
    model = save_micro_pipeline(root / "pipe")
    FORGET = ["a red circle", "a small green circle on a grey background"]
    ANCHORS = ["a red square", "a small green square on a grey background"]
    out = {{}}
    for name, data, fsdp in [("single", 1, 1), ("data", 8, 1), ("fsdp", 2, 4)]:
        config = make_config(
            model, unlearn__params="xattn", train__steps=2, train__batch_size=8,
            optim__name="sgd", optim__lr=0.5, mesh__data=data, mesh__fsdp=fsdp,
            forget__prompts=repr(FORGET), forget__concept="circle",
            forget__anchor_concept="square",
        )
        assert experiment.resolve_run(config).anchor_prompts == ANCHORS
        result = train_and_evaluate(config, root / name)
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
    for name in ("data", "fsdp"):
        for key in ("forget/loss", "retain/loss", "grad/norm", "param/norm"):
            np.testing.assert_allclose(
                results[name][key], results["single"][key], rtol=2e-5, err_msg=(name, key)
            )
        single, other = np.load(tmp_path / "single.npz"), np.load(tmp_path / f"{name}.npz")
        assert sorted(single.files) == sorted(other.files)
        for key in single.files:
            np.testing.assert_allclose(other[key], single[key], rtol=1e-5, atol=1e-6, err_msg=key)
