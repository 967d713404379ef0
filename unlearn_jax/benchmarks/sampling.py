"""Sampling speed: our JAX sampler vs diffusers' PyTorch pipeline, same model, same work.

    python -m unlearn_jax.benchmarks.sampling --out sampling.json
    python -m unlearn_jax.benchmarks.sampling --model PATH/TO/DIFFUSERS_FOLDER --threads 2
    taskset -c 0,1 python -m unlearn_jax.benchmarks.sampling   # pin both frameworks to 2 cores

Default work: 64 prompts x 1 image, 20 DDIM steps, guidance 7.5 (so every
step runs the UNet on 2 x batch rows), on a small random SD-architecture model
built on the fly (`tiny_model.py`: 32x32 images, 16x16x4 latents); `--model`
takes any diffusers folder. Every method starts from the same explicit initial
latents, and the benchmark reports the max abs pixel difference between our
images and diffusers' (expect < 2e-3) to show it timed the same work, next to
diffusers' own change when its initial latents move by 1e-5 (a random model
under strong guidance can be chaotic; see `tiny_model.UNET_OUTPUT_SCALE`).

What is measured (wall clock, `time.perf_counter`):
  diffusers      `StableDiffusionPipeline` + `DDIMScheduler.from_config`, in this
                 process, torch threads = --threads; the timed calls come after
                 loading and after a 1-step warm-up call (import, load and warm-up
                 are reported, not counted): diffusers' most favourable case.
  ours steady    `generate(...)` in this process, second call (compiled).
  ours 1st call  the first call: includes tracing and XLA compilation of the
                 text encoder, the scan sampler and the VAE decoder.
  ours process   the whole `python -m unlearn_jax.cli sample --latents ...`
                 process: interpreter start, imports, loading, compilation,
                 sampling, writing images.npz and PNGs. This is the headline
                 (target: not slower than diffusers in-process).
  compile vs steps  fresh processes at 10 and 50 steps (8 images): first minus
                 second call, and JAX's own trace+lower+XLA-compile durations
                 (`jax.monitoring`). The scan's length is a loop bound, not
                 unrolled code, so the ratio should be ~1.
Both frameworks get the same batch: diffusers is called on --batch-size prompts
at a time, ours compiles one chunk of --batch-size images (the last one padded).
`--threads` sets torch's threads. Ours splits the cores into JAX CPU devices
as `unlearn-jax sample` does (`distributed.split_cpu_into_devices`; the JSON
records the count, and UNLEARN_JAX_CPU_DEVICES overrides it); use `taskset`
to restrict both frameworks to the same cores. A persistent JAX compilation
cache (JAX_COMPILATION_CACHE_DIR) is removed from the subprocesses'
environment so they compile cold, as a first-time user does.

Run it on a quiet machine: with other processes on the cores, torch's OpenMP
threads slow down many-fold (8 images x 20 steps: 3.9 s with 1 thread, 29 s
with 2 at load average 5 on 2 cores), which flatters us. The JSON records the
load average before and after, and CPU seconds next to every wall time.
Expected: compile time ~constant from 10 to 50 steps (ratio ~1); the headline
target is our whole process not slower than diffusers in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from unlearn_jax.benchmarks.common import (
    children_cpu_s,
    cores,
    cpu_name,
    jax_compile_seconds,
    markdown_rows,
    subprocess_env,
)

SENSITIVITY_IMAGES, SENSITIVITY_NUDGE = 8, 1e-5


def run_diffusers(folder, prompts, latents_nchw, args) -> dict:
    """diffusers' pipeline in this process: images [N,H,W,3] and timings."""
    start = time.perf_counter()
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from unlearn_jax.testing.tiny_model import quiet_hf_logging

    quiet_hf_logging()
    torch.set_num_threads(args.threads)
    loaded = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder), dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    _, _, h, w = latents_nchw.shape
    size = dict(height=h * pipe.vae_scale_factor, width=w * pipe.vae_scale_factor)
    batch = min(args.batch_size, len(prompts))

    def call(rows: slice, steps: int, latents: np.ndarray = latents_nchw) -> np.ndarray:
        with torch.inference_mode():
            return pipe(
                prompt=prompts[rows],
                latents=torch.from_numpy(latents[rows]),
                num_inference_steps=steps,
                guidance_scale=args.guidance,
                output_type="np",
                **size,
            ).images

    ready = time.perf_counter()
    call(slice(0, batch), 1)  # warm-up: oneDNN primitives, allocator
    warm, warm_cpu = time.perf_counter(), time.process_time()
    images = np.concatenate(
        [call(slice(i, i + batch), args.steps) for i in range(0, len(prompts), batch)]
    )
    done, done_cpu = time.perf_counter(), time.process_time()
    # How far diffusers' own images move when the initial latents move by 1e-5: the
    # scale below which any two float32 implementations must be called "equal".
    rows = slice(0, min(SENSITIVITY_IMAGES, len(prompts)))
    nudge = np.random.default_rng(1).standard_normal(latents_nchw.shape).astype(np.float32)
    moved = call(rows, args.steps, latents_nchw + SENSITIVITY_NUDGE * nudge)
    return {
        "import_s": loaded - start,
        "load_s": ready - loaded,
        "warmup_s": warm - ready,
        "wall_s": done - warm,
        "cpu_s": done_cpu - warm_cpu,
        "images_per_s": len(prompts) / (done - warm),
        "torch_threads": torch.get_num_threads(),
        "self_sensitivity": float(np.abs(moved - images[rows]).max()),
        "images": images,
    }


def run_ours_in_process(folder, prompts, latents_nhwc, args) -> dict:
    """`generate` twice in this process: first call (with compile) and steady state."""
    from unlearn_jax.diffusion.chunks import data_mesh
    from unlearn_jax.diffusion.text_to_image import generate
    from unlearn_jax.models.pipeline import load_pipeline

    start = time.perf_counter()
    pipe = load_pipeline(folder)
    loaded = time.perf_counter()
    mesh = data_mesh()  # the CLI's layout: see `_split_cpu_like_the_cli`

    def call() -> np.ndarray:
        return generate(
            pipe,
            prompts,
            steps=args.steps,
            guidance=args.guidance,
            latents=latents_nhwc,
            batch_size=args.batch_size,
            mesh=mesh,
            progress=False,
        )

    t0, c0 = time.perf_counter(), time.process_time()
    images, jax_compile_s = jax_compile_seconds(call)
    t1, c1 = time.perf_counter(), time.process_time()
    images = call()
    t2, c2 = time.perf_counter(), time.process_time()
    return {
        "load_s": loaded - start,
        "first_call_s": t1 - t0,
        "steady_s": t2 - t1,
        "first_call_cpu_s": c1 - c0,
        "steady_cpu_s": c2 - c1,
        "compile_s": (t1 - t0) - (t2 - t1),
        "jax_compile_s": jax_compile_s,
        "images_per_s": len(prompts) / (t2 - t1),
        "images": images,
    }


def run_ours_process(
    folder, prompts, latents_nchw, args, workdir: Path, compilation_cache: Path | None = None
) -> dict:
    """The whole `unlearn-jax sample` process, start-up to written files.

    compilation_cache: None compiles cold; a folder uses (and fills) the CLI's
    persistent compilation cache there, as every run after a user's first does.
    """
    (workdir / "prompts.txt").write_text("\n".join(prompts) + "\n")
    np.save(workdir / "latents.npy", latents_nchw)
    out = workdir / ("cli_out_warm" if compilation_cache else "cli_out")
    if out.exists():
        shutil.rmtree(out)
    command = [
        sys.executable, "-m", "unlearn_jax.cli", "sample", "--model", str(folder),
        "--prompts", str(workdir / "prompts.txt"), "--latents", str(workdir / "latents.npy"),
        "--steps", str(args.steps), "--guidance", str(args.guidance),
        "--batch-size", str(args.batch_size), "--out", str(out),
    ]  # fmt: skip
    start, cpu = time.perf_counter(), children_cpu_s()
    proc = subprocess.run(
        command, capture_output=True, text=True, env=subprocess_env(compilation_cache)
    )
    wall, cpu = time.perf_counter() - start, children_cpu_s() - cpu
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    with np.load(out / "images.npz") as data:
        images = data["images"]
    return {"wall_s": wall, "cpu_s": cpu, "images_per_s": len(prompts) / wall, "images": images}


def startup_seconds() -> float:
    """Wall time of a process that only imports JAX and our sampler and touches the CPU."""
    code = (
        "import jax.numpy as jnp; from unlearn_jax.diffusion import text_to_image; "
        "from unlearn_jax.models import pipeline; jnp.zeros(1).block_until_ready()"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env())
    return time.perf_counter() - start


def compile_probe(folder, steps: int, args) -> dict:
    """In a fresh process: our first and second call at `steps` steps."""
    command = [sys.executable, "-m", "unlearn_jax.benchmarks.sampling", "--compile-probe"]
    command += ["--model", str(folder), "--steps", str(steps), "--guidance", str(args.guidance)]
    command += ["--num-images", str(args.probe_images), "--batch-size", str(args.probe_images)]
    proc = subprocess.run(command, capture_output=True, text=True, env=subprocess_env())
    if proc.returncode:
        raise RuntimeError(f"compile probe failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _split_cpu_like_the_cli(folder, batch_size: int) -> int:
    """Gives this process the CPU device layout `unlearn-jax sample` uses (before any JAX work)."""
    from unlearn_jax.command_args import replica_bytes
    from unlearn_jax.distributed import split_cpu_into_devices

    return split_cpu_into_devices(batch_size, replica_bytes(Path(folder)))


def _inputs(folder, num_images: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Prompts and NCHW initial latents for the model's native size."""
    from unlearn_jax.testing.tiny_model import caption_prompts

    unet = json.loads((Path(folder) / "unet" / "config.json").read_text())
    shape = (num_images, unet["in_channels"], unet["sample_size"], unet["sample_size"])
    latents = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return caption_prompts(num_images), latents


def markdown_table(result: dict) -> str:
    """The results as Markdown: one speed table and one compile-vs-steps table."""
    c, ref = result["config"], result["diffusers"]
    rate = ref["images_per_s"]
    rows = [["diffusers (in-process, warm)", rate, ref["wall_s"], ref["cpu_s"], ref["load_s"], None,
             "1.00x"]]  # fmt: skip
    if ours := result.get("ours_in_process"):
        first_rate = c["num_images"] / ours["first_call_s"]
        rows += [
            ["ours in-process, steady", ours["images_per_s"], ours["steady_s"],
             ours["steady_cpu_s"], ours["load_s"], None, f"{ours['images_per_s'] / rate:.2f}x"],
            ["ours in-process, 1st call", first_rate, ours["first_call_s"],
             ours["first_call_cpu_s"], None, ours["compile_s"], f"{first_rate / rate:.2f}x"],
        ]  # fmt: skip
    if proc := result.get("ours_process"):
        rows.append(
            ["**ours: whole `unlearn-jax sample` process**", proc["images_per_s"], proc["wall_s"],
             proc["cpu_s"], None, None, f"**{proc['images_per_s'] / rate:.2f}x**"]
        )  # fmt: skip
    if warm := result.get("ours_process_warm_cache"):
        rows.append(
            ["ours: whole process, compilation cache warm (every run after the first)",
             warm["images_per_s"], warm["wall_s"], warm["cpu_s"], None, None,
             f"{warm['images_per_s'] / rate:.2f}x"]
        )  # fmt: skip
    lines = [
        f"{c['num_images']} images x {c['steps']} steps, guidance {c['guidance']}, batch "
        f"{c['batch_size']}, {c['cores']} cores of {c['cpu']}, load average "
        f"{c['load_average']}",
        "",
        *markdown_rows(
            ["method", "images/s", "wall s", "cpu s", "load s", "compile s", "vs diffusers"], rows
        ),
        "",
        "max |ours - diffusers| per pixel: "
        + ", ".join(
            f"{name} {part['max_abs_diff_vs_diffusers']:.1e}"
            for name, part in result.items()
            if isinstance(part, dict) and "max_abs_diff_vs_diffusers" in part
        )
        + f"; diffusers vs itself with the initial latents moved by {SENSITIVITY_NUDGE:.0e}: "
        f"{ref['self_sensitivity']:.1e} (a chaotic model amplifies round-off; "
        "diffs at or below this are the same computation)",
    ]
    if "startup_s" in result:
        lines.append(f"process start-up (python + imports + JAX init): {result['startup_s']:.2f} s")
    if probes := result.get("compile_vs_steps"):
        header = ["steps", "1st call s", "steady s", "compile s (1st - steady)", "JAX compile s"]
        keys = ("first_call_s", "steady_s", "compile_s", "jax_compile_s")
        rows = [[steps] + [run[k] for k in keys] for steps, run in probes["runs"].items()]
        lines += ["", f"compile time vs steps ({probes['num_images']} images):", ""]
        lines += markdown_rows(header, rows)
        lines.append(
            f"ratio {probes['steps'][-1]} / {probes['steps'][0]} steps: {probes['ratio']:.2f} "
            f"(JAX's own trace+lower+compile durations: {probes['jax_ratio']:.2f})"
        )
    return "\n".join(lines)


def run_benchmark(args) -> dict:
    """Runs every measurement; returns the JSON-able results."""
    from unlearn_jax.testing.tiny_model import save_tiny_model

    with tempfile.TemporaryDirectory(prefix="unlearn_jax_bench_") as tmp:
        workdir = Path(tmp)
        folder = (
            Path(args.model)
            if args.model
            else save_tiny_model(workdir / "tiny_model", levels=args.tiny_levels)
        )
        prompts, latents_nchw = _inputs(folder, args.num_images, args.seed)
        cpu_devices = _split_cpu_like_the_cli(folder, args.batch_size)
        result = {
            "config": {
                "model": args.model
                or f"random {args.tiny_levels}-level tiny_model (unlearn_jax.testing.tiny_model)",
                "unet_block_out_channels": json.loads(
                    (folder / "unet" / "config.json").read_text()
                )["block_out_channels"],
                "num_images": args.num_images,
                "steps": args.steps,
                "guidance": args.guidance,
                "batch_size": args.batch_size,
                "threads": args.threads,
                "cores": cores(),
                "cpu": cpu_name(),
                "jax_cpu_devices": cpu_devices or None,
                "latent_shape_nchw": list(latents_nchw.shape[1:]),
                "load_average": [round(x, 2) for x in os.getloadavg()],
            }
        }  # fmt: skip
        reference = run_diffusers(folder, prompts, latents_nchw, args)
        diffusers_images = reference.pop("images")
        result["diffusers"] = reference

        def compare(name: str, measured: dict) -> None:
            images = measured.pop("images")
            measured["max_abs_diff_vs_diffusers"] = float(np.abs(images - diffusers_images).max())
            measured["speedup_vs_diffusers"] = measured["images_per_s"] / reference["images_per_s"]
            result[name] = measured

        latents_nhwc = latents_nchw.transpose(0, 2, 3, 1)
        compare("ours_in_process", run_ours_in_process(folder, prompts, latents_nhwc, args))
        if not args.skip_subprocess:
            compare("ours_process", run_ours_process(folder, prompts, latents_nchw, args, workdir))
            # Every run after the first: the CLI's persistent compilation cache is warm.
            cache = workdir / "xla_cache"
            run_ours_process(folder, prompts, latents_nchw, args, workdir, cache)  # fills it
            compare(
                "ours_process_warm_cache",
                run_ours_process(folder, prompts, latents_nchw, args, workdir, cache),
            )
            result["startup_s"] = startup_seconds()
            runs = {str(s): compile_probe(folder, s, args) for s in args.compile_steps}
            first, last = (runs[str(s)] for s in (args.compile_steps[0], args.compile_steps[-1]))
            result["compile_vs_steps"] = {
                "steps": args.compile_steps,
                "num_images": args.probe_images,
                "runs": runs,
                "ratio": last["compile_s"] / max(first["compile_s"], 1e-9),
                "jax_ratio": last["jax_compile_s"] / max(first["jax_compile_s"], 1e-9),
            }
        result["config"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if "ours_process" in result:
        result["headline"] = {
            "ours_whole_process_s": result["ours_process"]["wall_s"],
            "diffusers_in_process_s": reference["wall_s"],
            "speedup": result["ours_process"]["speedup_vs_diffusers"],
            "ours_whole_process_warm_cache_s": result["ours_process_warm_cache"]["wall_s"],
            "speedup_warm_cache": result["ours_process_warm_cache"]["speedup_vs_diffusers"],
        }
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="diffusers folder (default: build tiny_model)")
    p.add_argument(
        "--tiny-levels",
        type=int,
        choices=(2, 3),
        default=3,
        help="UNet levels of the built tiny model: 3 (32/64/64) or 2 (32/64, a smaller workload)",
    )
    p.add_argument("--num-images", type=int, default=64, help="prompts, one image each")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch-size", type=int, default=16, help="images per call / compiled chunk")
    p.add_argument("--threads", type=int, default=cores(), help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial latents")
    p.add_argument("--skip-subprocess", action="store_true", help="in-process measurements only")
    p.add_argument(
        "--compile-steps",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[10, 50],
        help="step counts of the compile-time probes, comma-separated",
    )
    p.add_argument("--probe-images", type=int, default=8, help="images per compile probe")
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    p.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.compile_probe:  # child of compile_probe(): one JSON line on stdout
        prompts, latents = _inputs(args.model, args.num_images, args.seed)
        _split_cpu_like_the_cli(args.model, args.batch_size)
        run = run_ours_in_process(args.model, prompts, latents.transpose(0, 2, 3, 1), args)
        run.pop("images")
        print(json.dumps(run))
        return run
    result = run_benchmark(args)
    print(markdown_table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
