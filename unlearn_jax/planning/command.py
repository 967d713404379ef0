"""`unlearn-jax plan` and `python -m unlearn_jax.planning`: options, the run, the tables."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from unlearn_jax.planning.models import COMPUTE_DTYPES, resolve_model
from unlearn_jax.planning.programs import plan_train_step, train_config
from unlearn_jax.planning.report import (
    BYTE_UNITS,
    FLOP_UNITS,
    build_report,
    format_tables,
    program_label,
    scaled,
)
from unlearn_jax.planning.sampler_program import plan_sampler
from unlearn_jax.planning.targets import tpu_devices

_DESCRIPTION = (
    "Compile the unlearning train step and the integrity sampler ahead of time on abstract "
    "shapes (no weights) and report per-device memory, FLOPs and compile time, with the "
    "FLOP floor and fit on TPU v4/v5e/v5p/v6e, A100, H100 and H200; with --tpu, compiled by "
    "the TPU compiler for a TPU slice, on a machine without one."
)
_REMAT = {"off": [False], "on": [True], "both": [False, True]}
_DTYPE = {"float32": ["float32"], "bfloat16": ["bfloat16"], "both": list(COMPUTE_DTYPES)}


def _mesh(text: str) -> tuple[int, int]:
    try:
        data, fsdp = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected DATAxFSDP, e.g. 8x1 (data parallel) or 1x8 (FSDP)"
        ) from None
    return data, fsdp


def use_fake_cpu_devices(count: int) -> None:
    """Starts JAX with `count` CPU devices; must come before any JAX computation.

    Raises:
      ValueError: JAX had already started with other devices (naming the fix).
    """
    flag = f"--xla_force_host_platform_device_count={count}"
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*kept, flag])
    import jax

    jax.config.update("jax_platforms", "cpu")
    if jax.device_count() != count or jax.default_backend() != "cpu":
        raise ValueError(
            f"JAX already started with {jax.device_count()} {jax.default_backend()} "
            f"device(s), so --devices {count} cannot take effect. Fix: plan in a fresh "
            f"process, or start it as XLA_FLAGS={flag} JAX_PLATFORMS=cpu python -m "
            "unlearn_jax.planning ..."
        )


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """The planner's options (shared by `unlearn-jax plan` and `python -m unlearn_jax.planning`)."""
    p.add_argument("--model", default="sd15", help="sd15 | sd21 | tiny | a diffusers folder")
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="plan on N fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, "
        "set before JAX starts); default: the devices JAX sees",
    )
    p.add_argument(
        "--tpu",
        default=None,
        metavar="TOPOLOGY",
        help="compile for a TPU slice without one, with the TPU compiler (libtpu: pip install "
        '"jax[tpu]"), e.g. v5e:2x4, v6e:2x2, v4:2x2x1, v5p:2x2x2; the memory is that '
        "compiler's, not XLA:CPU's estimate",
    )
    p.add_argument("--only", choices=["train", "sample"], default=None)
    p.add_argument("--dtype", choices=list(_DTYPE), default="float32", help="compute dtype")
    p.add_argument(
        "--mesh",
        type=_mesh,
        action="append",
        default=None,
        help="train mesh DATAxFSDP, repeatable (default -1x1: data parallel on all devices)",
    )
    p.add_argument("--remat", choices=list(_REMAT), default="off")
    p.add_argument("--method", default=None, help="unlearning preset (default distill_project)")
    p.add_argument("--params", default=None, help="unlearn.params (default: the preset's)")
    p.add_argument("--batch", type=int, default=1, help="train examples per term per device")
    p.add_argument("--global-batch", type=int, default=None, help="train.batch_size instead")
    p.add_argument(
        "--config",
        default=None,
        help="trainer config FILE.py[:ARGS] (default configs/base.py); --config.a.b=value "
        "sets its fields (optimizer, hyperparameters, ...)",
    )
    p.add_argument("--steps", type=int, default=50, help="sampler DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="sampler CFG scale (<= 1: none)")
    p.add_argument("--sample-batch", type=int, default=1, help="sampler prompts per device")
    p.add_argument("--sample-mesh", type=_mesh, default=(-1, 1), help="sampler DATAxFSDP")
    p.add_argument("--height", type=int, default=None, help="default: the native image size")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables")
    p.add_argument("--render", type=Path, default=None, help="print a saved report's tables")


def run_plan(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    """Compiles what `args` asks for, prints the tables and writes --out; returns 0."""
    from unlearn_jax.trainer.config_file import split_overrides

    overrides, rest = split_overrides(extra)
    if rest:
        raise ValueError(f"unrecognized arguments: {' '.join(rest)}")
    if args.render is not None:
        print(format_tables(json.loads(args.render.read_text("utf-8")), args.markdown))
        return 0
    if args.devices is not None and args.tpu is not None:
        raise ValueError(
            "--devices (fake CPU devices) and --tpu (compile-only TPU devices) exclude each "
            "other. Fix: drop one; --tpu's slice sets the device count."
        )
    devices = None
    if args.devices is not None:
        use_fake_cpu_devices(args.devices)
    elif args.tpu is not None:
        devices = tpu_devices(args.tpu)
    model = resolve_model(args.model)
    config = train_config(args.method, config_file=args.config, overrides=overrides)
    size = dict(height=args.height, width=args.width)
    jobs = []
    if args.only in (None, "train"):
        train = functools.partial(
            plan_train_step,
            model,
            method=args.method,
            batch_per_device=args.batch,
            global_batch=args.global_batch,
            params=args.params,
            config=config,
            devices=devices,
            **size,
        )
        for data, fsdp in args.mesh or [(-1, 1)]:
            for dtype in _DTYPE[args.dtype]:
                for remat in _REMAT[args.remat]:
                    jobs.append(
                        functools.partial(train, data=data, fsdp=fsdp, dtype=dtype, remat=remat)
                    )
    if args.only in (None, "sample"):
        data, fsdp = args.sample_mesh
        for dtype in _DTYPE[args.dtype]:
            jobs.append(
                functools.partial(
                    plan_sampler,
                    model,
                    steps=args.steps,
                    guidance=args.guidance,
                    batch_per_device=args.sample_batch,
                    dtype=dtype,
                    data=data,
                    fsdp=fsdp,
                    devices=devices,
                    **size,
                )
            )
    programs = []
    for i, job in enumerate(jobs):
        print(f"[plan] compiling {i + 1}/{len(jobs)} ...", file=sys.stderr, flush=True)
        programs.append(job())
        report = build_report(programs, model, args.tpu)
        p = report["programs"][-1]
        if p.get("out_of_memory"):
            verdict = "does not fit: the compiler ran out of device memory"
        else:
            verdict = (
                f"peak {scaled(p['memory']['peak_estimate'], BYTE_UNITS)} per device, "
                f"{scaled(p['flops']['per_step'], FLOP_UNITS)} per step"
            )
        print(
            f"[plan] {program_label(p)}: {verdict}, compiled in {p['compile_s']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        if args.out is not None:  # after every program: a long run keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(format_tables(build_report(programs, model, args.tpu), markdown=args.markdown))
    return 0


def add_plan_command(subparsers: argparse._SubParsersAction) -> None:
    """Registers `unlearn-jax plan`; its `func(args, extra=()) -> int` runs the planner."""
    p = subparsers.add_parser(
        "plan",
        help="per-device memory and FLOPs of the train step and sampler (AOT, no weights)",
        description=_DESCRIPTION,
    )
    add_plan_arguments(p)
    p.set_defaults(func=run_plan)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m unlearn_jax.planning ...`; bad input raises ValueError."""
    parser = argparse.ArgumentParser(
        prog="python -m unlearn_jax.planning", description=_DESCRIPTION
    )
    add_plan_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    return run_plan(args, extra)
