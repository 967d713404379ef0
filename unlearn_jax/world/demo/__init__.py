"""`unlearn-jax demo`: the project's claim, tested offline on the embedded world.

The shipped tiny SD-architecture model draws "a large red circle on a grey
background" and the rest of its procedural world. The demo makes it forget
"circle" with baselines (ESD-x, Concept Ablation; with --full also SalUn, gradient
ascent and GradDiff) and the integrity-preserving methods (distill; with --full also
distill_project and ESD + distill), every method on a learning-rate grid with
evaluations along each run (`protocol.DEFAULT`, `protocol.FULL`), and writes into the
workdir:

  report.json   {"original": {...}, "methods": {NAME: {"forget_rate", "integrity_lpips",
                 "fid", "retain_accuracy", ..., "curve": [{"lr", "step", "forget_rate",
                 "integrity_lpips", "retain_accuracy", "fid"}, ...]}}, "analysis", ...}
  report.md     the tables and what they show, in words computed from the numbers
  forget_vs_integrity.png      each method's Pareto front, forget rate x integrity
  forget_vs_fid_accuracy.png   the same points judged by FID and by retain accuracy
  grid_forget.png, grid_retain.png   original vs each headline point, same noise

Metrics: forget rate = share of forget-prompt generations the world classifier
calls a circle; integrity = LPIPS-VGG between original and unlearned images from
identical noise on held-out retain prompts; FID between the two models' retain
generations with the world classifier's features; retain accuracy = share of
retain generations showing the prompted shape and colour (the world's text-image
agreement score, standing in for CLIPScore).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from unlearn_jax.world.demo.findings import conclusions
from unlearn_jax.world.demo.protocol import (
    DEFAULT,
    FULL,
    INTEGRITY_PRESERVING,
    METHODS,
    Protocol,
    demo_config,
    split_prompts,
)

__all__ = [
    "DEFAULT",
    "FULL",
    "INTEGRITY_PRESERVING",
    "METHODS",
    "Protocol",
    "add_demo_command",
    "conclusions",
    "demo_config",
    "run_demo",
    "split_prompts",
]


def run_demo(workdir, protocol: Protocol = DEFAULT, **kwargs):
    """Runs `protocol` and writes the report into `workdir` (see `demo.run.run_demo`)."""
    from unlearn_jax.world.demo.run import run_demo as run

    return run(workdir, protocol, **kwargs)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--lr takes learning rates separated by commas, e.g. 3e-4,1e-3; got {text!r}"
        ) from None
    if not values or not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"--lr values must be finite and > 0; got {text!r}")
    return values


def add_demo_command(sub) -> None:
    """Registers `unlearn-jax demo [--workdir DIR] [--full] [--methods a,b] [--lr x,y] ...`."""
    p = sub.add_parser("demo", help="the embedded-default experiment: forget 'circle', offline")
    p.add_argument("--workdir", type=Path, default=Path("unlearn_jax_demo"))
    p.add_argument(
        "--full",
        action="store_true",
        help="the complete protocol: every preset, 3 learning rates, 3 seeds, a 200-step "
        "attack (est. 50-60 min on an idle 2-core machine)",
    )
    p.add_argument("--steps", type=int, help="unlearning steps of every run")
    p.add_argument("--lr", type=_floats, help="one learning-rate grid for every method: a,b,c")
    p.add_argument("--seeds", type=int, help="training seeds of the headline points")
    p.add_argument("--methods", help="comma-separated presets (default: the protocol's)")
    p.add_argument(
        "--attack-steps",
        type=int,
        help="steps of the embedding attack on each headline point and the original (0: none)",
    )
    p.add_argument("--no-grids", action="store_true", help="skip the image grids")

    def run(args) -> None:
        from unlearn_jax.distributed import split_cpu_into_devices
        from unlearn_jax.world.embedded import embedded_model_path

        # On a CPU-only host each core becomes a JAX device: the demo's batches (8 per
        # term, 48 evaluation images) split over them (UNLEARN_JAX_CPU_DEVICES overrides).
        model = embedded_model_path()
        split_cpu_into_devices(8, 2 * sum(f.stat().st_size for f in model.rglob("*.safetensors")))
        protocol = (FULL if args.full else DEFAULT).with_overrides(
            methods=tuple(m for m in args.methods.split(",") if m) if args.methods else None,
            lrs=args.lr,
            steps=args.steps,
            seeds=args.seeds,
            attack_steps=args.attack_steps,
        )
        run_demo(args.workdir, protocol, grids=not args.no_grids)
        print((args.workdir / "report.md").read_text())

    p.set_defaults(func=run)
