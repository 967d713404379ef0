"""One call, every figure: sampling, the distill train step, compile times and the share of
the bf16 FLOP floor, ours vs diffusers' PyTorch, on the machine at hand.

    python -m unlearn_jax.benchmarks.accelerator --out bench/              # GPU: SD-1.5 size
    python -m unlearn_jax.benchmarks.accelerator --model tiny --out bench/  # CPU (CI)

`--model sd15` (the default on a GPU) builds a random model of SD-1.5's size
(`testing.tiny_model.save_sd15_model`: the planner's UNet config, SD-1.5's VAE and
text encoder) with diffusers' own initialisation and saves it as a diffusers folder;
both frameworks load that folder, so they run the same weights. No download.
`--model tiny` (the default on CPU) is the sampling benchmark's tiny model; any
diffusers folder works too (the tests use the train loop's micro model).

Every measurement runs in its own process (`common.run_worker`), one after the
other, so that each framework's peak memory is its own and JAX's GPU memory
pool never starves torch:
  diffusers  `StableDiffusionPipeline` + `DDIMScheduler`, SDPA attention
             (`AttnProcessor2_0`), fp16 on GPU (float32 with --precision float32);
             per batch size a 2-step warm-up call, then --repeats timed calls.
  ours       `load_pipeline` (bf16 compute and weights; float32 with --precision
             float32) and `generate` from the same initial latents: per batch size
             the first call (tracing + compilation, broken down per jitted program
             from JAX's own compile events) and --repeats timed calls. Then the
             FLOPs of one denoising step as the planner counts them
             (`planning.sampler_program.compile_sampler`, XLA's cost analysis, XLA's
             attention) and the card's measured bf16 matmul rate.
  train step `benchmarks.train_step` (the `distill` preset): the trainer's jitted
             step vs the same loss on diffusers' PyTorch UNet (bf16 autocast with
             --precision half), cross-checked at step 0; steps/s, compile time,
             peak device memory (JAX `memory_stats`, `torch.cuda.max_memory_allocated`;
             on CPU peak RSS, as no device memory is measurable there), and the
             step's FLOPs (lowered program, XLA's attention).
Images/s are at the best of the batch sizes tried for each framework. The share of
the floor is (FLOPs per image or step) x rate / peak, for the card's datasheet
bf16 peak (the planner's `CHIPS`, matched by device kind) and the measured matmul
rate. Sampling FLOPs count the denoising loop only (the planner's floor); the
measured time includes text encoding and VAE decoding.

`--time-budget S` (default 420 s) bounds the batch-size sweeps: the diffusers sweep
tries no larger batch once it has run for 20% of S, ours after 35% (a batch size is
a new compilation), leaving the rest for building the model, loading and the train
step. The SD-1.5 defaults (batch sizes 4 and 8, train batch 2 per term, 10 timed
train steps) are sized from estimates to finish in under 8 minutes on an H100:
build ~1 min, diffusers ~1 min, ours ~3 min (two sampler compiles and the FLOP-count
compile), train step ~3 min. Not yet run on a GPU: the first run's `elapsed_s` is
the check.

A GPU may be lent once, for minutes, so nothing measured is lost to one failure:
  - the three phases (diffusers' sampling, ours, the train step) run whatever happened
    to the others; a failure is recorded with its error (`phases` in the JSON, the
    notes under the table), and the run ends `complete: false`;
  - a batch size that fails (out of memory) is recorded, the larger ones skipped, the
    smaller ones kept; each worker writes its finished batch sizes as it goes, so a
    worker that dies or is killed keeps them; PyTorch's train step failing keeps ours;
  - `--deadline S` bounds the whole run: each phase gets what is left of S (less 10 s
    for the results) and is killed at its end; one with under 30 s left is not started;
  - with --out, results.json and results.md are rewritten after every phase, so a run
    stopped from outside still leaves the phases it finished;
  - `--only ours,train` reruns some phases (their results only).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from unlearn_jax import atomic_files
from unlearn_jax.benchmarks.accelerator_report import markdown_table, measured, summarize
from unlearn_jax.benchmarks.common import cores, cpu_name, run_worker, serve_worker

WORKER_MODULE = "unlearn_jax.benchmarks.accelerator"
DEFAULTS = {  # per model: denoising steps, sampling batch sizes, train batch per term
    "sd15": {"steps": 50, "batch_sizes": [4, 8], "train_batch": 2, "train_steps": 10},
    "tiny": {"steps": 20, "batch_sizes": [1, 4], "train_batch": 2, "train_steps": 5},
}
SWEEP_SHARE = {"diffusers": 0.20, "ours": 0.35}  # of the time budget, per sampling sweep
PHASES = ("diffusers", "ours", "train")  # in the order they run
MIN_PHASE_S = 30.0  # a phase is not started with less of --deadline left
RESULTS_MARGIN_S = 10.0  # of --deadline, kept for writing the results after the last phase
WARMUP_STEPS = 2


# ---------------------------------------------------------------------------
# Workers (each in its own process)
# ---------------------------------------------------------------------------


def _sweep(spec: dict, name: str, run_batch, progress: Path, header: dict) -> dict:
    """Calls `run_batch(b)` for each batch size, smallest first, until the sweep's share of
    the time budget is spent (the smallest always runs).

    A batch size that raises (out of device memory, say) is recorded under "failed" and
    no larger one is tried. After each batch size, `header` plus the sweep so far is
    written to `progress`, so that the parent keeps the finished ones if this worker
    dies or is killed later (`_worker_result`). Raises when no batch size ran.
    """
    deadline = time.time() + SWEEP_SHARE[name] * spec["time_budget_s"]
    by_batch, skipped, failed = {}, [], {}
    for b in spec["batch_sizes"]:
        if failed or (by_batch and time.time() > deadline):
            skipped.append(b)
            continue
        try:
            by_batch[str(b)] = run_batch(b)
        except Exception as e:  # the run goes on with what the smaller batches measured
            failed[str(b)] = f"{type(e).__name__}: {e}"[-2000:]
        sweep = _sweep_summary(by_batch, skipped, failed)
        atomic_files.write_text(progress, json.dumps({**header, **sweep}))  # never half-written
    if not by_batch:
        raise RuntimeError(f"{name}: no batch size ran; {failed}")
    summary = _sweep_summary(by_batch, skipped, failed)
    atomic_files.write_text(progress, json.dumps({**header, **summary}))  # with the skipped ones
    return summary


def _sweep_summary(by_batch: dict, skipped: list, failed: dict) -> dict:
    best = max(by_batch, key=lambda b: by_batch[b]["images_per_s"]) if by_batch else None
    return {
        "by_batch": by_batch,
        "best_batch": None if best is None else int(best),
        "images_per_s": None if best is None else by_batch[best]["images_per_s"],
        "skipped_batch_sizes": skipped,
        "failed": failed,
    }


def _inputs(spec: dict) -> tuple[list[str], np.ndarray]:
    """Prompts and NCHW float32 initial latents, enough for the largest batch."""
    from unlearn_jax.testing.tiny_model import caption_prompts

    unet = json.loads((Path(spec["model"]) / "unet" / "config.json").read_text())
    n = max(spec["batch_sizes"])
    shape = (n, unet["in_channels"], unet["sample_size"], unet["sample_size"])
    latents = np.random.default_rng(spec["seed"]).standard_normal(shape).astype(np.float32)
    return caption_prompts(n), latents


def diffusers_worker(spec: dict, workdir: Path) -> dict:
    """diffusers' pipeline: per batch size a warm-up, then timed calls; images of the first."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    from unlearn_jax.testing.tiny_model import quiet_hf_logging

    quiet_hf_logging()
    torch.set_num_threads(spec["threads"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if spec["precision"] == "half" else torch.float32
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        spec["model"], dtype=dtype, safety_checker=None, requires_safety_checker=False
    ).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.unet.set_attn_processor(AttnProcessor2_0())  # SDPA (torch's fused attention)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    prompts, latents = _inputs(spec)
    sync = torch.cuda.synchronize if cuda else lambda: None
    images = {}

    def call(b: int, steps: int) -> np.ndarray:
        with torch.inference_mode():
            return pipe(
                prompt=prompts[:b],
                latents=torch.from_numpy(latents[:b]).to(device, dtype),
                num_inference_steps=steps,
                guidance_scale=spec["guidance"],
                output_type="np",
            ).images

    def run_batch(b: int) -> dict:
        call(b, WARMUP_STEPS)  # cuDNN/oneDNN algorithm choice, allocator
        sync()
        start = time.perf_counter()
        for _ in range(spec["repeats"]):
            out = call(b, spec["steps"])
        sync()
        wall = time.perf_counter() - start
        if not images:  # the smallest finished batch's images, kept at once
            images["first"] = out
            np.save(workdir / "images_diffusers.npy", out)
        return {"wall_s": wall, "images_per_s": b * spec["repeats"] / wall}

    header = {
        "load_s": load_s,
        "dtype": str(dtype).removeprefix("torch."),
        "attention": "SDPA (AttnProcessor2_0)",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
    }
    result = _sweep(spec, "diffusers", run_batch, workdir / "progress_diffusers.json", header)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return {**result, **header, "device_peak_mb": peak}


def matmul_tflops(dtype_name: str, n: int, repeats: int = 10) -> float:
    """Measured rate of an n x n x n matrix product in `dtype_name` (TFLOP/s)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype_name))
    product = jax.jit(lambda x, y: x @ y)
    product(a, a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = product(a, a)
    out.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


# The planner's chips by the device kinds JAX reports for them (lower case, substrings).
CHIP_KINDS = {
    "TPU v4": ("tpu v4",),
    "TPU v5e": ("tpu v5 lite", "tpu v5e"),
    "A100 80GB": ("a100",),  # the 40 GB card has the same bf16 peak
    "H100 SXM": ("h100 80gb hbm3", "h100 sxm"),  # not the PCIe card (a lower peak)
    "H200 SXM": ("h200",),
}


def planner_chip(device_kind: str):
    """The planner's `Chip` for a JAX device kind ('NVIDIA H100 80GB HBM3'), else None."""
    from unlearn_jax.planning.models import CHIPS

    kind = device_kind.lower()
    for chip in CHIPS:
        if any(alias in kind for alias in CHIP_KINDS.get(chip.name, ())):
            return chip
    return None


def device_info(precision: str) -> dict:
    """The default device: backend, kind, the planner's chip (datasheet peak), measured rate."""
    import jax

    device = jax.devices()[0]
    kind = device.device_kind
    chip = planner_chip(kind)
    accelerator = jax.default_backend() != "cpu"
    dtype = "bfloat16" if precision == "half" else "float32"
    return {
        "backend": jax.default_backend(),
        "device_kind": kind,
        "device_count": jax.device_count(),
        "chip": chip.name if chip else None,
        "datasheet_bf16_tflops": chip.peak_tflops if chip else None,
        "matmul_dtype": dtype,
        "matmul_size": 8192 if accelerator else 1024,
        "measured_matmul_tflops": matmul_tflops(dtype, 8192 if accelerator else 1024),
    }


def ours_worker(spec: dict, workdir: Path) -> dict:
    """Our `generate`: per batch size the first call (compile) and timed calls; FLOPs."""
    import jax
    import jax.numpy as jnp

    from unlearn_jax.benchmarks.common import jax_compile_seconds_by_program
    from unlearn_jax.diffusion.text_to_image import generate
    from unlearn_jax.models.pipeline import load_pipeline
    from unlearn_jax.planning.costs import flops_of
    from unlearn_jax.planning.models import resolve_model
    from unlearn_jax.planning.sampler_program import compile_sampler

    if spec["compilation_cache"]:
        jax.config.update("jax_compilation_cache_dir", spec["compilation_cache"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    info = device_info(spec["precision"])
    dtype = jnp.bfloat16 if spec["precision"] == "half" else jnp.float32
    t0 = time.perf_counter()
    pipe = load_pipeline(spec["model"], dtype=dtype, param_dtype=dtype)
    load_s = time.perf_counter() - t0
    prompts, latents = _inputs(spec)
    latents_nhwc = latents.transpose(0, 2, 3, 1)
    images = {}

    def call(b: int) -> np.ndarray:
        return generate(
            pipe, prompts[:b], steps=spec["steps"], guidance=spec["guidance"],
            latents=latents_nhwc[:b], batch_size=b, progress=False,
        )  # fmt: skip

    def run_batch(b: int) -> dict:
        start = time.perf_counter()
        out, by_program = jax_compile_seconds_by_program(lambda: call(b))
        first = time.perf_counter() - start
        if not images:  # the smallest finished batch's images, kept at once
            images["first"] = out
            np.save(workdir / "images_ours.npy", out)
        start = time.perf_counter()
        for _ in range(spec["repeats"]):
            call(b)
        wall = time.perf_counter() - start
        return {
            "wall_s": wall,
            "images_per_s": b * spec["repeats"] / wall,
            "first_call_s": first,
            "compile_s": first - wall / spec["repeats"],  # first call minus a steady call
            "jax_compile_s": sum(by_program.values()),
            "compile_by_program_s": by_program,
        }

    header = {"load_s": load_s, "dtype": jnp.dtype(dtype).name, "device": info}
    result = _sweep(spec, "ours", run_batch, workdir / "progress_ours.json", header)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    result = {**result, **header, "device_peak_mb": peak / 2**20 if peak else None}
    # FLOPs of one denoising step at batch 1, counted as the planner counts them.
    start = time.perf_counter()
    try:
        one_step, _, _ = compile_sampler(
            resolve_model(spec["model"]), steps=1, unrolled=True, guidance=spec["guidance"],
            dtype="bfloat16" if spec["precision"] == "half" else "float32", data=1,
        )  # fmt: skip
        flops = flops_of(one_step) * spec["steps"]
    except Exception as e:  # keep the measured sampling; the notes say why FLOPs are missing
        return {**result, "flops_per_image": None, "flop_count_error": f"{type(e).__name__}: {e}"}
    return {**result, "flops_per_image": flops, "flop_count_compile_s": time.perf_counter() - start}


WORKERS = {"diffusers": diffusers_worker, "ours": ours_worker}


# ---------------------------------------------------------------------------
# Parent: the model folder, the workers, the train step, the summary
# ---------------------------------------------------------------------------


def _train_step(folder: Path, args, precision: str, timeout: float | None) -> dict:
    """`benchmarks.train_step` on the same folder: distill, both frameworks, FLOPs counted.
    A failure is recorded, not raised: PyTorch's inside the result (ours is kept), ours
    as the whole result's "error" (PyTorch's side replays our draws, so it cannot run)."""
    from unlearn_jax.benchmarks import train_step

    train_args = train_step.build_parser().parse_args(
        ["--model", str(folder), "--method", "distill", "--batch-size", str(args.train_batch),
         "--steps", str(args.train_steps), "--warmup", "2", "--threads", str(args.threads),
         "--dtype", "bfloat16" if precision == "half" else "float32"]
        + (["--compilation-cache", str(args.compilation_cache)] if args.compilation_cache else [])
    )  # fmt: skip
    try:
        return train_step.run_benchmark(train_args, count_flops=True, timeout=timeout, partial=True)
    except RuntimeError as e:  # our worker failed (e.g. out of memory): keep the rest
        return {"error": str(e)[-2000:]}
    except Exception as e:  # in this process, e.g. preparing the inputs: keep the rest too
        return {"error": f"{type(e).__name__}: {e}"[-2000:]}


def _worker_result(name: str, workdir: Path, timeout: float | None) -> dict:
    """A sampling worker's results; if it failed or was killed, {"error": why} plus what
    its progress file held (the batch sizes it finished, its device and load time)."""
    try:
        return run_worker(WORKER_MODULE, name, workdir, timeout=timeout)
    except Exception as e:  # failed, killed, or no result line: keep what it wrote
        progress = workdir / f"progress_{name}.json"
        kept = json.loads(progress.read_text()) if progress.is_file() else {}
        error = str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
        return {**kept, "error": error[-3000:]}


def _on_gpu() -> bool:
    """Whether JAX's default backend is a GPU, without taking its memory pool in this
    process (the workers need it); they start with JAX's defaults."""
    import jax

    previous = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # read when the backend starts
    try:
        return jax.default_backend() == "gpu"
    finally:
        if previous is None:
            del os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"]
        else:
            os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = previous


def device_guess(gpu: bool, precision: str, kind: str | None) -> dict:
    """The device as far as it is known without our worker (which reports it in full):
    the backend, and the kind diffusers' worker named (torch's device name)."""
    chip = planner_chip(kind) if kind else None
    return {
        "backend": "gpu" if gpu else "cpu",
        "device_kind": kind or "unknown",
        "device_count": None,
        "chip": chip.name if chip else None,
        "datasheet_bf16_tflops": chip.peak_tflops if chip else None,
        "matmul_dtype": "bfloat16" if precision == "half" else "float32",
        "matmul_size": None,
        "measured_matmul_tflops": None,
    }


def _status(part: dict | None) -> str:
    """A phase's line in `phases`: done, not run, or failed / incomplete (something kept)
    with the first line of its error (which worker, and its exit status or kill)."""
    if part is None:
        return "not run"
    error = part.get("error") or (part.get("torch") or {}).get("error")
    if error is None:
        return "done"
    first = (error.strip().splitlines() or ["no message"])[0]
    kept = measured(part) or (part.get("ours") or {}).get("steps_per_s") is not None
    return f"{'incomplete' if kept else 'failed'}: {first}"


def run_benchmark(args, on_progress: Callable[[dict], None] | None = None) -> dict:
    """Builds or finds the model, runs each phase in turn; returns the JSON-able results.

    The phases (`PHASES`, or those --only names) are diffusers' sampling, ours, and the
    train step. One that fails or is killed at the --deadline is recorded, and the
    others still run. `on_progress(result)` gets the results so far after each phase
    (`main` writes them to --out, so a run stopped from outside keeps what finished).
    """
    start = time.time()
    gpu = _on_gpu()
    model = args.model or ("sd15" if gpu else "tiny")
    defaults = DEFAULTS.get(model, DEFAULTS["tiny"])
    precision = args.precision or ("half" if gpu else "float32")
    for key in ("steps", "batch_sizes", "train_batch", "train_steps"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    selected = args.only or list(PHASES)
    phases = {p: "not run" if p in selected else "not run: not in --only" for p in PHASES}
    parts: dict[str, dict | None] = dict.fromkeys(PHASES)
    images: dict[str, np.ndarray] = {}
    load_before = [round(x, 2) for x in os.getloadavg()]

    def result() -> dict:
        kind = (parts["diffusers"] or {}).get("device") if gpu else "cpu"
        out = summarize(
            {**config, "load_average_after": [round(x, 2) for x in os.getloadavg()]},
            parts["ours"], parts["diffusers"], parts["train"], images,
            device_guess(gpu, precision, kind),
        )  # fmt: skip
        out["phases"] = dict(phases)
        out["complete"] = all(phases[p] == "done" for p in PHASES)
        out["elapsed_s"] = time.time() - start
        return out

    with tempfile.TemporaryDirectory(prefix="unlearn_jax_accel_") as tmp:
        workdir = Path(tmp)
        _log(start, f"building or reading the model ({model})")
        folder = _model_folder(model, workdir)
        spec = {
            "model": str(folder), "precision": precision, "steps": args.steps,
            "guidance": args.guidance, "batch_sizes": sorted(args.batch_sizes),
            "repeats": args.repeats, "threads": args.threads, "seed": args.seed,
            "time_budget_s": args.time_budget,
            "compilation_cache": str(args.compilation_cache or ""),
        }  # fmt: skip
        config = {
            **{k: v for k, v in spec.items() if k != "model"},
            "model": model,
            "model_built_s": time.time() - start,
            "train_method": "distill",
            "train_batch_per_term": args.train_batch,
            "train_steps": args.train_steps,
            "deadline_s": args.deadline,
            "cores": cores(),
            "cpu": cpu_name(),
            "load_average": load_before,
        }
        (workdir / "spec.json").write_text(json.dumps(spec))
        for phase in selected:
            left = None if args.deadline is None else args.deadline - (time.time() - start)
            if left is not None and left < MIN_PHASE_S:
                phases[phase] = f"not run: {max(left, 0):.0f} s of --deadline were left"
            else:
                timeout = None if left is None else left - RESULTS_MARGIN_S
                _log(start, f"{phase}: started" + (f", {timeout:.0f} s left" if timeout else ""))
                if phase == "train":
                    parts[phase] = _train_step(folder, args, precision, timeout)
                else:
                    parts[phase] = _worker_result(phase, workdir, timeout)
                    if (workdir / f"images_{phase}.npy").is_file():
                        images[phase] = np.load(workdir / f"images_{phase}.npy")
                phases[phase] = _status(parts[phase])
            _log(start, f"{phase}: {phases[phase]}")
            if on_progress:
                on_progress(result())
    return result()


def _log(start: float, message: str) -> None:
    print(f"[{time.time() - start:6.0f} s] {message}", flush=True)


def _model_folder(model: str, workdir: Path) -> Path:
    from unlearn_jax.testing import tiny_model

    if model == "sd15":
        return tiny_model.save_sd15_model(workdir / "sd15_random")
    if model == "tiny":
        return tiny_model.save_tiny_model(workdir / "tiny_model")
    folder = Path(model)
    if not (folder / "model_index.json").is_file():
        raise SystemExit(
            f"--model {model}: not sd15, tiny or a diffusers folder (no model_index.json "
            "there). Fix: --model sd15, --model tiny or the folder holding model_index.json."
        )
    return folder.absolute()


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers, e.g. 4,8,16")
    return values


def _phase_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in PHASES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected phases of {', '.join(PHASES)}, e.g. --only ours,train"
        )
    return [p for p in PHASES if p in names]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="sd15, tiny or a diffusers folder "
                   "(default: sd15 on a GPU, tiny otherwise)")  # fmt: skip
    p.add_argument("--precision", choices=("half", "float32"), default=None,
                   help="half: ours bf16, diffusers fp16, train bf16 (default on GPU)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="denoising steps (sd15: 50)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch-sizes", type=_int_list, default=None, help="e.g. 4,8,16")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per batch size")
    p.add_argument("--train-batch", type=int, default=None, help="train examples per term")
    p.add_argument("--train-steps", type=int, default=None, help="timed train steps")
    p.add_argument("--threads", type=int, default=cores(), help="CPU threads of both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds (see docstring)")
    p.add_argument("--compilation-cache", type=Path, default=None,
                   help="persistent JAX compilation cache for our programs (default: "
                   "none, cold compiles as a new user sees them)")  # fmt: skip
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds for the whole run: a phase still running then is killed and "
                   "recorded, later ones are not started (default: none; on a machine lent "
                   "for a fixed time, a little under it)")  # fmt: skip
    p.add_argument(
        "--only",
        type=_phase_list,
        default=None,
        help=f"comma-separated phases to run, of {','.join(PHASES)} (default: all)",
    )
    p.add_argument("--out", type=Path, default=None, help="folder for results.json/results.md "
                   "(written after every phase)")  # fmt: skip
    p.add_argument("--worker", choices=("diffusers", "ours"), help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.worker:  # child of common.run_worker()
        return serve_worker(args.workdir, WORKERS[args.worker], ours=args.worker == "ours")
    write = (lambda result: _write(args.out, result)) if args.out else None
    result = run_benchmark(args, on_progress=write)
    print(markdown_table(result))
    if args.out:
        _write(args.out, result)
        print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return result


def _write(out: Path, result: dict) -> None:
    """results.json and results.md in `out`, each replaced whole (never half-written)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_files.write_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    atomic_files.write_text(out / "results.md", markdown_table(result) + "\n")


if __name__ == "__main__":
    main()
