"""Train-step speed: our jitted unlearning step vs the same loss in PyTorch + diffusers.

    python -m unlearn_jax.benchmarks.train_step --out train_step.json
    python -m unlearn_jax.benchmarks.train_step --model PATH/TO/DIFFUSERS_FOLDER --threads 2
    python -m unlearn_jax.benchmarks.train_step --method distill_project --remat --dtype bfloat16

Both sides run one step of the preset `--method` (default `distill`: remap
forget term + retain_distill retain term, conditional and unconditional
branch, `sum` combiner) on the same model, the same batch (precomputed x0
latents and text contexts, `--batch-size` examples per term; the remap
anchors per example, as the trainer pairs one anchor with each forget prompt)
and the same optimizer (Adam with global-norm clipping 1.0, as `configs/base.py`):

  ours   (`train_step_ours.py`) the trainer's own step: `experiment.load_model`
         (θ0, the split, the pure model), `state.init_state`,
         `train_step.make_step_parts`, compiled
         ahead of time as the trainer compiles it (`--step-programs`, default
         `auto` as `train.step_programs` for a run of `--steps` steps: on CPU the
         staged step (`staged_step`) for a two-term method up to 200 steps, else
         three programs compiled side by side; elsewhere one `jax.jit` with the
         state donated). The compile is
         timed on its own, then the first call, then the steady state.
  torch  (`torch_train_step.py`) a trainable diffusers `UNet2DConditionModel`
         and a frozen copy (no
         grad), the same term definitions and weights written in PyTorch,
         `torch.optim.Adam`, `clip_grad_norm_`, `loss.backward(); opt.step()`
         (`sum`) or one `autograd.grad` per term (`project`, `erasediff`).

Correctness first: both start from the same θ (θ0 with its trainable
parameters moved by `PERTURBATION` of their rms, so that retain_distill is
not trivially 0 at θ = θ0) and θ0 as the frozen original, both loaded from
diffusers folders. Ours records the timesteps and noise its first step draws
from its key (the loss functions' own helpers); PyTorch evaluates its loss on
exactly those, and the losses and gradient norms of both are compared
(float32: relative differences ~1e-6 measured, tolerance `LOSS_RTOL`).

Each framework runs in its own subprocess (the pattern of `sampling.py`), so
its peak RSS is its own: the high-water mark (VmHWM; `getrusage` where there
is no /proc) in total and its growth after the imports (see `PeakMemory`);
on GPUs also `torch.cuda.max_memory_allocated` and JAX's device
`peak_bytes_in_use`. `--threads N` pins both subprocesses to the same N cores
(CPU affinity, which XLA's thread pools follow) and sets torch's threads to N.
`--remat` and `--dtype bfloat16` apply to both: our `train.remat` /
`train.dtype`, diffusers' gradient checkpointing / bf16 autocast; the
cross-check tolerance widens for bf16. Timings are wall clock over `--steps`
steps after `--warmup` steps. Run it on a quiet machine; the JSON records the
load average.

Measured on the tiny default (batch 4 per term, float32, `--steps 30`) on this
project's 2-core machine, quiet, both frameworks on both cores: ours 0.98 steps/s
(split, compile 73.2 s), torch 0.96 (1.03x); with `--step-programs fused` 1.03
against 1.04 (0.99x), compile 115.1 s. Peak RSS 3.1 GiB against torch's 0.64 GiB.
On a busy machine torch's OpenMP threads spin (14.6 s/step once at load 5-11):
a number about the machine, not the frameworks; the JSON records the load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from unlearn_jax.benchmarks.common import (
    cores,
    cpu_name,
    markdown_rows,
    pin_threads,
    run_worker,
    serve_worker,
)
from unlearn_jax.benchmarks.torch_train_step import run_torch, torch_trainable
from unlearn_jax.benchmarks.train_step_ours import OPTIM, run_ours

PERTURBATION = 0.05  # θ = θ0 + 0.05 rms(p) N(0, 1) on every trainable leaf
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 5e-2}
GRAD_RTOL = {"float32": 1e-3, "bfloat16": 1e-1}
# The torch reference implements these terms and combiners (saliency: no).
TORCH_FORGET = ("neggrad", "remap", "noise", "esd")
TORCH_RETAIN = (None, "retain_dm", "retain_distill")
LOSS_KEYS = ("forget/loss", "retain/loss", "retain/mse_cond", "retain/mse_uncond")
GRAD_KEYS = ("grad/forget_norm", "grad/retain_norm", "grad/norm")
WORKER_MODULE = "unlearn_jax.benchmarks.train_step"


# ---------------------------------------------------------------------------
# Inputs (parent process): batch, contexts, the perturbed starting UNet
# ---------------------------------------------------------------------------


def prepare_inputs(folder: Path, spec: dict, workdir: Path) -> None:
    """Writes workdir/inputs.npz (NCHW latents, contexts) and workdir/start_unet/ (θ)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from unlearn_jax.testing.tiny_model import caption_prompts, quiet_hf_logging

    quiet_hf_logging()
    b = spec["batch_size"]
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval()

    def embed(prompts: list[str]) -> np.ndarray:
        ids = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt")
        with torch.no_grad():
            return encoder(ids.input_ids).last_hidden_state.float().numpy()

    # Forget, retain and anchor prompts: distinct captions, an anchor per forget example.
    prompts = caption_prompts(3 * b)
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet")).float()
    cfg = unet.config
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    num_timesteps = scheduler.get("num_train_timesteps", 1000)
    rng = np.random.default_rng(spec["seed"])
    latent = (b, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    arrays = {
        "forget_x0": rng.standard_normal(latent, dtype=np.float32),
        "forget_context": embed(prompts[:b]),
        "retain_x0": rng.standard_normal(latent, dtype=np.float32),
        "retain_context": embed(prompts[b : 2 * b]),
        "anchor_context": embed(prompts[2 * b :]),  # c_a of each forget example
        "empty_context": embed([""]),  # ∅
        # ESD's x_t and t come from θ0's trajectories in a real run; any values time the same.
        "esd_x_t": rng.standard_normal(latent, dtype=np.float32),
        "esd_t": rng.integers(0, num_timesteps, b).astype(np.int32),
    }
    np.savez(workdir / "inputs.npz", **arrays)
    gen = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if torch_trainable(name, spec["params"]):
                rms = p.pow(2).mean().sqrt()
                p.add_(PERTURBATION * rms * torch.randn(p.shape, generator=gen))
    unet.save_pretrained(str(workdir / "start_unet"), safe_serialization=True)


# ---------------------------------------------------------------------------
# Parent: inputs, the two subprocesses, the cross-check, the table
# ---------------------------------------------------------------------------


def cross_check(ours: dict, theirs: dict, dtype: str) -> dict:
    """Relative differences of the step-0 losses and gradient norms; pass/fail by tolerance."""
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-30)
    values = {
        k: {"ours": ours[k], "torch": theirs[k], "rel_diff": rel(ours[k], theirs[k])}
        for k in LOSS_KEYS + GRAD_KEYS
        if k in ours and k in theirs
    }
    loss_diff = max(v["rel_diff"] for k, v in values.items() if k in LOSS_KEYS)
    grad_diff = max(v["rel_diff"] for k, v in values.items() if k in GRAD_KEYS)
    return {
        "values": values,
        "max_loss_rel_diff": loss_diff,
        "max_grad_rel_diff": grad_diff,
        "loss_rtol": LOSS_RTOL[dtype],
        "grad_rtol": GRAD_RTOL[dtype],
        "passed": loss_diff <= LOSS_RTOL[dtype] and grad_diff <= GRAD_RTOL[dtype],
    }


def _check_supported(preset) -> None:
    supported = (
        preset.forget in TORCH_FORGET and preset.retain in TORCH_RETAIN and not preset.saliency
    )
    if not supported:
        raise SystemExit(
            f"--method {preset.name}: the PyTorch reference implements the forget terms "
            f"{', '.join(TORCH_FORGET)}, the retain terms retain_dm and retain_distill, and no "
            "saliency mask; e.g. distill, distill_project, graddiff, erasediff, esd_x, ablation."
        )


def run_benchmark(
    args, count_flops: bool = False, timeout: float | None = None, partial: bool = False
) -> dict:
    """Prepares the inputs, runs both workers, cross-checks; returns the JSON-able results.

    count_flops: our worker also counts the step's FLOPs (`step_flops`; one more trace).
    timeout: seconds for the whole call (inputs and both workers); a worker still running
      then is killed.
    partial: if PyTorch's worker fails, keep ours: "torch" is then {"error": why}, and
      the cross-check and the speed-up are None (otherwise its RuntimeError is raised).
    """
    import dataclasses

    from unlearn_jax.testing.tiny_model import save_tiny_model
    from unlearn_jax.unlearn.registry import get_preset

    end = None if timeout is None else time.time() + timeout  # inputs and workers, all of it
    left = lambda: None if end is None else max(end - time.time(), 1.0)
    preset = get_preset(args.method)
    _check_supported(preset)
    with tempfile.TemporaryDirectory(prefix="unlearn_jax_bench_") as tmp:
        workdir = Path(tmp)
        folder = Path(args.model) if args.model else save_tiny_model(workdir / "tiny_model")
        spec = {
            "model": str(folder.absolute()),
            "method": preset.name,
            "forget": preset.forget,
            "retain": preset.retain,
            "combiner": preset.combiner,
            "params": preset.params,
            "hparams": dataclasses.asdict(preset.hparams),
            "optim": OPTIM,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "threads": args.threads,
            "dtype": args.dtype,
            "remat": args.remat,
            "seed": args.seed,
            "compilation_cache": str(args.compilation_cache or ""),
            "count_flops": count_flops,
            "step_programs": args.step_programs,
        }
        (workdir / "spec.json").write_text(json.dumps(spec))
        load_before = [round(x, 2) for x in os.getloadavg()]
        prepare_inputs(folder, spec, workdir)
        ours = run_worker(WORKER_MODULE, "ours", workdir, timeout=left())  # it writes the draws
        try:
            theirs = run_worker(WORKER_MODULE, "torch", workdir, timeout=left())  # torch replays
        except RuntimeError as e:
            if not partial:
                raise
            theirs = {"error": str(e)[-2000:]}
    step0 = ours.pop("step0")
    check = None if "error" in theirs else cross_check(step0, theirs.pop("step0"), args.dtype)
    config = {
        **{k: v for k, v in spec.items() if k != "model"},
        "model": args.model or "random tiny_model (unlearn_jax.testing.tiny_model)",
        "cores": cores(),
        "cpu": cpu_name(),
        "load_average": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    return {
        "config": config,
        "ours": ours,
        "torch": theirs,
        "cross_check": check,
        "speedup_vs_torch": None if check is None else ours["steps_per_s"] / theirs["steps_per_s"],
    }


def markdown_table(result: dict) -> str:
    """The results as Markdown: speed and memory, then the loss cross-check."""
    c, ours, theirs = result["config"], result["ours"], result["torch"]
    header = ["framework", "steps/s", "s/step", "CPU s/step", "compile s", "1st step s", "load s",
              "peak RSS MiB", "RSS growth MiB", "device peak MiB", "vs torch"]  # fmt: skip
    row = lambda name, r, compile_s: [
        name, r["steps_per_s"], 1 / r["steps_per_s"], r["cpu_s"] / c["steps"], compile_s,
        r["first_step_s"], r["load_s"], r["peak_rss_mb"], r["rss_growth_mb"], r["device_peak_mb"],
        f"{r['steps_per_s'] / theirs['steps_per_s']:.2f}x",
    ]  # fmt: skip
    check = result["cross_check"]
    lines = [
        f"{c['method']} ({c['forget']} + {c['retain']}, {c['combiner']}), batch {c['batch_size']} "
        f"per term, {c['steps']} steps after {c['warmup']} warm-up, {c['dtype']}, remat "
        f"{'on' if c['remat'] else 'off'}, {c['threads']} threads of {c['cores']} cores "
        f"({c['cpu']}), load average {c['load_average']} -> {c['load_average_after']}",
        "",
        *markdown_rows(
            header,
            [
                row(f"ours: {ours['step_programs']} step, state donated", ours, ours["compile_s"]),
                row(f"PyTorch + diffusers ({theirs['device']})", theirs, None),
            ],
        ),
        "",
        f"ours / torch steps per second: **{result['speedup_vs_torch']:.2f}x** "
        f"(compile {ours['compile_s']:.1f} s not counted; JAX's own compile events "
        f"{ours['jax_compile_s']:.1f} s: "
        + ", ".join(f"{k} {v:.1f}" for k, v in ours["compile_by_program_s"].items())
        + "); trainable parameters: ours "
        f"{ours['trainable_parameters']}, torch {theirs['trainable_parameters']}",
        "",
        "cross-check at step 0 (same θ, θ0, batch, t and noise):",
        "",
        "| quantity | ours | torch | rel diff |",
        "|---|---|---|---|",
        *(
            f"| {k} | {v['ours']:.6e} | {v['torch']:.6e} | {v['rel_diff']:.1e} |"
            for k, v in check["values"].items()
        ),
        f"losses agree to {check['max_loss_rel_diff']:.1e} (tolerance {check['loss_rtol']:.0e}), "
        f"gradient norms to {check['max_grad_rel_diff']:.1e} (tolerance "
        f"{check['grad_rtol']:.0e}): {'PASSED' if check['passed'] else 'FAILED'}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="diffusers folder (default: build tiny_model)")
    p.add_argument("--method", default="distill", help="unlearning preset (registry name)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per term per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--threads", type=int, default=cores(), help="cores/threads for both")
    p.add_argument("--dtype", choices=tuple(LOSS_RTOL), default="float32", help="compute dtype")
    p.add_argument("--remat", action="store_true", help="recompute activations in backward")
    p.add_argument(
        "--step-programs",
        choices=("auto", "fused", "split", "staged"),
        default="auto",
        help="our step as one program, three, or staged (train.step_programs; auto: on CPU "
        "staged for a two-term method and --steps <= 200, else split)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compilation-cache",
        type=Path,
        default=None,
        help="persistent JAX compilation cache for our step (compile s then times a cache "
        "load; default: none, a cold compile as a new user sees it)",
    )
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    p.add_argument("--worker", choices=("ours", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.worker:  # child of common.run_worker()
        run = run_ours if args.worker == "ours" else run_torch

        def pinned(spec: dict, workdir: Path) -> dict:
            pin_threads(spec["threads"])  # before JAX/torch create their thread pools
            return run(spec, workdir)

        return serve_worker(args.workdir, pinned, ours=args.worker == "ours")
    result = run_benchmark(args)
    print(markdown_table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    if not result["cross_check"]["passed"]:
        print("WARNING: our loss and the PyTorch loss differ beyond tolerance", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
