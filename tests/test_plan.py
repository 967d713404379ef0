"""The memory/FLOP planner on the tiny model: what it reports, how it scales, its errors.

Train-step compiles dominate (~15-40 s each for the tiny UNet on two busy CPU cores),
so they use the cheapest preset (neggrad: one term) on cross-attention parameters
and are shared through module-scoped fixtures; the persistent compilation cache of
conftest.py makes reruns fast.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import pytest

from unlearn_jax import planning as plan

TINY = plan.resolve_model("tiny")
CHEAP = dict(method="neggrad", params="xattn")


@pytest.fixture(scope="module")
def train_b1() -> plan.ProgramReport:
    return plan.plan_train_step(TINY, batch_per_device=1, **CHEAP)


@pytest.fixture(scope="module")
def train_b2() -> plan.ProgramReport:
    return plan.plan_train_step(TINY, batch_per_device=2, **CHEAP)


def test_train_report_has_positive_memory_and_flops(train_b1):
    memory, flops = train_b1.memory, train_b1.flops
    for key in ("argument", "output", "temp", "peak_estimate"):
        assert memory[key] > 0, key
    assert flops["per_step"] > 0 and flops["per_image"] == flops["per_step"]
    # The donated train state aliases the new state: it is not counted twice.
    assert 0 < memory["alias"] <= memory["output"]
    assert memory["peak_estimate"] < memory["argument"] + memory["output"] + memory["temp"]
    settings = train_b1.settings
    assert settings["method"] == "neggrad" and settings["params"] == "xattn"
    assert 0 < settings["trainable_parameters"] < settings["unet_parameters"]
    assert settings["global_batch"] == settings["batch_per_device"] * jax.device_count()
    chips = train_b1.to_json()["chips"]
    assert set(chips) == {c.name for c in plan.CHIPS}
    assert all(c["fits"] and c["floor_ms_per_step"] > 0 for c in chips.values())
    # The same FLOPs on a faster chip give a lower floor.
    assert chips["H100 SXM"]["floor_ms_per_step"] < chips["A100 80GB"]["floor_ms_per_step"]


def test_train_flops_grow_linearly_with_batch(train_b1, train_b2):
    ratio = train_b2.flops["per_step"] / train_b1.flops["per_step"]
    assert 1.9 < ratio <= 2.0, ratio  # the optimizer update does not grow with the batch
    assert train_b2.flops["per_image"] == pytest.approx(train_b1.flops["per_image"], rel=0.05)
    assert train_b2.memory["temp"] > train_b1.memory["temp"]


def test_remat_recomputes_in_the_backward_pass(train_b2):
    remat = plan.plan_train_step(TINY, batch_per_device=2, remat=True, **CHEAP)
    assert remat.settings["remat"] and not train_b2.settings["remat"]
    assert remat.flops["per_step"] > train_b2.flops["per_step"]  # the recomputation
    assert remat.memory["argument"] == train_b2.memory["argument"]
    # Temporaries: the tiny UNet's activations are too small for remat to save memory
    # here (measured: +1.5%); the SD-sized plan in the README shows the saving.


def test_sampler_flops_scale_with_steps():
    report = plan.plan_sampler(TINY, steps=4, batch_per_device=2)
    per_step = report.flops["per_step"]
    assert per_step > 0 and report.flops["total"] == 4 * per_step
    # XLA counts the scan body once: the scan program's own count is about one step.
    assert report.flops["xla_scan_program"] == pytest.approx(per_step, rel=0.01)
    # Three steps unrolled by the Python loop cost three one-step programs, less the
    # step-invariant work XLA computes once for all three (1.6% of a step here, such
    # as the cross-attention keys and values of the fixed text context).
    unrolled, _, _ = plan.compile_sampler(TINY, steps=3, batch_per_device=2, unrolled=True)
    assert plan.flops_of(unrolled) == pytest.approx(3 * per_step, rel=0.02)
    assert plan.flops_of(unrolled) < 3 * per_step
    assert report.settings["unet_batch_per_device"] == 4  # guidance doubles the UNet batch
    unguided, _, _ = plan.compile_sampler(
        TINY, steps=1, batch_per_device=2, guidance=1.0, unrolled=True
    )
    assert plan.flops_of(unguided) == pytest.approx(per_step / 2, rel=0.1)


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "plan.json"
    args = ["--model", "tiny", "--only", "sample", "--steps", "2", "--sample-batch", "1"]
    assert plan.main([*args, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and report["devices"] == jax.device_count()
    (program,) = report["programs"]
    assert program["kind"] == "sample" and program["settings"]["steps"] == 2
    assert program["memory"]["peak_estimate"] > 0 and program["flops"]["total"] > 0
    assert set(program["chips"]) == {c.name for c in plan.CHIPS}
    printed = capsys.readouterr().out
    assert "sample 2 steps cfg 7.5" in printed and "H200 SXM" in printed
    markdown = plan.markdown_tables(report)
    assert markdown.count("\n|---|") == 2 and "| sample 2 steps cfg 7.5" in markdown
    assert plan.main(["--render", str(out), "--markdown"]) == 0
    assert capsys.readouterr().out.strip() == markdown.strip()


def test_bad_input_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="--model sd15, sd21 or tiny"):
        plan.resolve_model("sd3")
    with pytest.raises(ValueError, match="--model sd15, sd21 or tiny"):
        plan.main(["--model", str(tmp_path), "--only", "sample"])
    with pytest.raises(ValueError, match=r"multiple of the 2 devices.*--global-batch 2"):
        plan.plan_train_step(TINY, global_batch=3, data=2, fsdp=1)
    with pytest.raises(ValueError, match="unknown unlearning method"):
        plan.plan_train_step(TINY, method="forget_everything")
    with pytest.raises(ValueError, match="multiples of 2 .* Fix: e.g. --height 14"):
        plan.plan_sampler(TINY, height=15)
    with pytest.raises(ValueError, match="unrecognized arguments: --bogus"):
        plan.main(["--model", "tiny", "--bogus"])


def test_devices_after_jax_started_names_the_fix(monkeypatch):
    jax.devices()  # the backend has started
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    previous = jax.config.jax_platforms
    try:
        with pytest.raises(ValueError, match="fresh process"):
            plan.use_fake_cpu_devices(jax.device_count() + 3)
    finally:
        jax.config.update("jax_platforms", previous)


def config_only_folder(root, block_out_channels: list[int]):
    """A diffusers folder of configs only (the planner reads nothing else): the tiny model
    at other widths."""
    model = plan.resolve_model("tiny")
    files = {
        "model_index.json": {"_class_name": "StableDiffusionPipeline"},
        "unet/config.json": {**model.unet_config, "block_out_channels": block_out_channels},
        "scheduler/scheduler_config.json": dict(model.scheduler_config),
        "text_encoder/config.json": {"max_position_embeddings": 16, "hidden_size": 32},
        "vae/config.json": {"block_out_channels": [8, 8]},
    }
    for name, payload in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(payload))
    return root


def test_fsdp_shards_the_state_over_fake_devices(tmp_path):
    """--devices 2 in a fresh process: FSDP divides every per-parameter buffer.

    The UNet is the tiny one at 64 channels, so that its kernels exceed
    `sharding.MIN_FSDP_SIZE` and are sharded (smaller arrays stay replicated).
    """
    out = tmp_path / "plan.json"
    folder = config_only_folder(tmp_path / "wide", [64])
    cmd = [
        sys.executable,
        "-m",
        "unlearn_jax.plan",
        "--model",
        str(folder),
        "--devices",
        "2",
        "--only",
        "train",
        "--method",
        "neggrad",
        "--mesh",
        "2x1",
        "--mesh",
        "1x2",
        "--out",
        str(out),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    if jax.config.jax_compilation_cache_dir:  # conftest.py's cache: reruns skip XLA
        env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["devices"] == 2
    data_parallel, fsdp = report["programs"]
    assert data_parallel["settings"]["mesh"] == {"data": 2, "fsdp": 1}
    assert fsdp["settings"]["mesh"] == {"data": 1, "fsdp": 2}
    assert data_parallel["settings"]["batch_per_device"] == fsdp["settings"]["batch_per_device"]
    # Parameters, θ0 and Adam's moments (per parameter, each with its parameter's
    # sharding) are split in two under FSDP; arrays under MIN_FSDP_SIZE stay whole.
    assert fsdp["memory"]["argument"] < 0.65 * data_parallel["memory"]["argument"]
    assert fsdp["memory"]["peak_estimate"] < 0.85 * data_parallel["memory"]["peak_estimate"]


def test_model_from_a_diffusers_folder_reads_only_its_configs(sd2_folder):
    model = plan.resolve_model(str(sd2_folder))
    unet = json.loads((sd2_folder / "unet" / "config.json").read_text())
    assert dict(model.unet_config) == unet and unet["use_linear_projection"]
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    assert (model.context_length, model.context_dim) == (16, unet["cross_attention_dim"])
    assert model.latent_shape() == (unet["sample_size"], unet["sample_size"], 4)
    compiled, _, _ = plan.compile_sampler(model, steps=1, unrolled=True)
    assert plan.flops_of(compiled) > 0 and plan.memory_of(compiled)["peak_estimate"] > 0


def test_tpu_topology_and_option_errors_name_the_fix(monkeypatch):
    from unlearn_jax.planning import targets

    for bad in ("v5e", "v5e:2", "v3:2x2", "tpu:2x4", "v5e:2x4x1x1"):
        with pytest.raises(ValueError, match="expected GENERATION:SHAPE .* e.g. v5e:2x4"):
            targets.tpu_devices(bad)
    assert targets.tpu_chip("V5E:2x4") == "TPU v5e" and targets.tpu_chip("v4:2x2x1") == "TPU v4"
    assert targets.tpu_chip_count("v5e:2x4") == 8 and targets.tpu_chip_count("v4:2x2x2") == 8
    assert {targets.tpu_chip(f"{g}:2x2") for g in targets.TPU_GENERATIONS} <= {
        c.name for c in plan.CHIPS
    }
    with pytest.raises(ValueError, match="exclude each other"):
        plan.main(["--model", "tiny", "--devices", "2", "--tpu", "v5e:2x2"])
    monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` raises ImportError
    with pytest.raises(ValueError, match=r'--tpu needs libtpu.*pip install "jax\[tpu\]=='):
        targets.tpu_devices("v5e:2x2")


def test_tpu_plan_compiles_with_the_tpu_compiler(tmp_path):
    """--tpu v5e:2x2: compile-only TPU devices from libtpu (the test extra installs it),
    in a fresh process. The programs are the TPU compiler's: TPU devices, its generated
    code, the Pallas flash attention kernels a TPU runs (per device, under shard_map
    over the data or the fsdp axis), and FSDP dividing the state over the four chips."""
    out = tmp_path / "plan.json"
    folder = config_only_folder(tmp_path / "wide", [64])
    cmd = [sys.executable, "-m", "unlearn_jax.plan", "--model", str(folder), "--tpu", "v5e:2x2"]
    cmd += ["--only", "train", "--method", "neggrad", "--mesh", "4x1", "--mesh", "1x4"]
    cmd += ["--height", "32", "--width", "32"]  # 16x16 latents: 256 tokens, flash attention
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"  # no TPU here: the host backend stays the CPU
    result = subprocess.run(
        [*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["backend"] == "tpu (compile-only)" and report["tpu_topology"] == "v5e:2x2"
    assert report["device_kind"] == "TPU v5e" and report["devices"] == 4
    assert [c["name"] for c in report["chips"]] == ["TPU v5e"]
    assert any("TPU compiler (libtpu" in n for n in report["notes"])
    assert not any("XLA:CPU's buffer assignment" in n for n in report["notes"])
    data_parallel, fsdp = report["programs"]
    assert fsdp["settings"]["mesh"] == {"data": 1, "fsdp": 4}
    assert set(fsdp["chips"]) == {"TPU v5e"}
    for program in (data_parallel, fsdp):
        assert program["memory"]["generated_code"] > 0 and program["flops"]["per_step"] > 0
        assert plan.programs.PALLAS_FLOPS_NOTE in program["notes"]
    assert fsdp["memory"]["argument"] < 0.5 * data_parallel["memory"]["argument"]
    assert "Plan for" in result.stdout and "TPU v5e (16 GiB, 197 TFLOP/s)" in result.stdout


@pytest.fixture(scope="module")
def v5e_step():
    """The tiny model's train step at batch 8 on one v5e chip (16 GiB), by the TPU compiler."""
    from unlearn_jax.planning import targets

    devices = targets.tpu_devices("v5e:1x1")
    return functools.partial(
        plan.plan_train_step, TINY, batch_per_device=8, data=1, fsdp=1, devices=devices, **CHEAP
    )


@pytest.fixture(scope="module")
def v5e_flash(v5e_step):
    """256 px: 128x128 latents, 16384 tokens, a multiple of the Pallas kernels' 128 rows."""
    return v5e_step(height=256, width=256)


def test_remat_lowers_the_tpu_compilers_peak(v5e_step, v5e_flash):
    """`train.remat` recomputes each block in the backward instead of keeping its
    activations: the TPU compiler's temporaries fall (measured: 9.3 -> 3.4 GiB with every
    parameter trainable). XLA:CPU's plans cannot show this: it drops the optimization
    barriers that keep the recomputation in the backward before it schedules."""
    remat = v5e_step(height=256, width=256, remat=True)
    assert remat.settings["remat"] and remat.out_of_memory is None
    assert remat.memory["temp"] < 0.6 * v5e_flash.memory["temp"]


def test_tpu_compiler_out_of_memory_is_reported_as_does_not_fit(v5e_step, v5e_flash):
    """The TPU compiler refuses a program that cannot fit HBM; the planner reports that
    refusal as the verdict (no memory or FLOP figures), and the tables say so. Attention
    never holds whole logits: the Pallas kernels where lengths are multiples of 128,
    'blockwise' where they are not; it is the activations that stop fitting."""
    step, flash = v5e_step, v5e_flash
    assert flash.out_of_memory is None and plan.programs.PALLAS_FLOPS_NOTE in flash.notes
    assert flash.memory["peak_estimate"] <= 0.9 * 16 * 2**30
    # 250 px: 125x125 latents, 15625 tokens, no multiple of 128. XLA's attention would
    # hold ~1 GiB of float32 logits per head and example, and did not fit; 'blockwise'
    # (query blocks in a loop, flash attention's gradient) does.
    blockwise = step(height=250, width=250)
    assert (
        blockwise.out_of_memory is None and plan.programs.PALLAS_FLOPS_NOTE not in blockwise.notes
    )
    assert any("'blockwise'" in note for note in blockwise.notes)
    assert blockwise.memory["peak_estimate"] <= 0.9 * 16 * 2**30
    # 512 px: 65536 tokens, four times the activations of 256 px: refused.
    program = step(height=512, width=512)
    assert program.out_of_memory and "RESOURCE_EXHAUSTED" in program.out_of_memory
    assert program.memory == {} and program.flops == {}
    assert program.settings["latent_shape"] == [256, 256, 4]
    report = plan.build_report([program], TINY, tpu="v5e:1x1")
    assert report["programs"][0]["chips"] == {"TPU v5e": {"floor_ms_per_step": None, "fits": False}}
    tables = plan.format_tables(report, markdown=True)
    assert "| out of memory | out of memory |" in tables
    assert "DOES NOT FIT (the compiler ran out of memory)" in tables
    assert "the compiler could not fit the train step: RESOURCE_EXHAUSTED" in tables


def test_sampler_out_of_memory_is_reported_as_does_not_fit(monkeypatch):
    """A sampler the compiler refuses becomes a 'does not fit' row, as the train step."""

    def refuse(*args, **kwargs):
        raise plan.OutOfDeviceMemory("RESOURCE_EXHAUSTED: Ran out of memory on HBM", 1.5)

    monkeypatch.setattr(plan.sampler_program, "compile_sampler", refuse)
    program = plan.plan_sampler(TINY, steps=2, batch_per_device=1)
    assert program.out_of_memory.startswith("RESOURCE_EXHAUSTED") and program.compile_s == 1.5
    assert program.settings["steps"] == 2 and program.settings["mesh"]["data"] >= 1
    chips = program.to_json()["chips"]
    assert all(c == {"floor_ms_per_step": None, "fits": False} for c in chips.values())
    tables = plan.format_tables(plan.build_report([program], TINY))
    assert "DOES NOT FIT (the compiler ran out of memory)" in tables
