"""The planner's report: JSON, and text or Markdown tables."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from unlearn_jax.planning.models import CHIPS, GB, USABLE_HBM_FRACTION, GiB, ModelSpec
from unlearn_jax.planning.programs import ProgramReport

CPU_NOTE = (
    "Planned on CPU: the memory is XLA:CPU's buffer assignment, an estimate of what an "
    "accelerator needs, not a measurement. Arguments (parameters, optimizer state, batch) "
    "are exact; temporaries depend on the backend: TPUs pad minor dimensions to (8, 128) "
    "tiles, GPUs add convolution workspaces, fusion and scheduling differ, and XLA:CPU may "
    "keep bf16 intermediates in f32. Attention: the program planned on CPU uses XLA's "
    "jax.nn.dot_product_attention, or 'blockwise' (query blocks in a loop, flash "
    "attention's gradient) where XLA's float32 logits would exceed 64 MiB per device; on "
    "CUDA GPUs the trainer runs cuDNN's fused attention and on TPUs Pallas flash kernels, "
    "which hold less. Plan with --tpu for a TPU's own program and memory, or on the "
    "accelerator itself."
)
TPU_NOTE = (
    "Compiled for a TPU {topology} slice by the TPU compiler (libtpu {libtpu}) on "
    "compile-only devices, without a TPU: the memory is that compiler's buffer assignment "
    "for this chip (its tiling, fusion and schedule), not a measurement of a run."
)
GENERAL_NOTES = (
    "Per device. Peak estimate = arguments + outputs - donated (aliased) + temporaries + "
    "generated code, from XLA's buffer assignment of the compiled program.",
    f"'fits': peak estimate <= {USABLE_HBM_FRACTION:.0%} of the chip's HBM (the rest for the "
    "runtime and fragmentation; JAX on GPU preallocates 75% of the memory unless "
    "XLA_PYTHON_CLIENT_MEM_FRACTION is raised).",
    "Floor: FLOPs per device / the chip's dense bf16 peak, a lower bound on the time per "
    "step; real steps are slower (memory-bound norms and attention, communication, and "
    "float32 compute runs below the bf16 peak).",
    "FLOPs: XLA's count for one device's share of the program, which counts a loop body "
    "once; the train step's loop iterations after the first are added from its jaxpr.",
)


def build_report(
    programs: Sequence[ProgramReport], model: ModelSpec, tpu: str | None = None
) -> dict[str, Any]:
    """The JSON-able report of a planning run.

    Args:
      tpu: the topology the programs were compiled for on compile-only TPU devices
        (`--tpu`); the report then names that chip alone, whose compiler it measured.
    """
    import jax

    if tpu is None:
        backend, kind, count = jax.default_backend(), jax.devices()[0].device_kind, None
        chips = CHIPS
        target_note = [CPU_NOTE] if backend == "cpu" else []
    else:
        from unlearn_jax.planning.targets import libtpu_version, tpu_chip, tpu_chip_count

        backend, kind, count = "tpu (compile-only)", tpu_chip(tpu), tpu_chip_count(tpu)
        chips = [c for c in CHIPS if c.name == kind]
        target_note = [TPU_NOTE.format(topology=tpu, libtpu=libtpu_version())]
    return {
        "model": model.name,
        "backend": backend,
        "device_kind": kind,
        "devices": count or jax.device_count(),
        **({"tpu_topology": tpu} if tpu else {}),
        "usable_hbm_fraction": USABLE_HBM_FRACTION,
        "chips": [dataclasses.asdict(c) for c in chips],
        "programs": [p.to_json(chips) for p in programs],
        "notes": [GENERAL_NOTES[0], *target_note, *GENERAL_NOTES[1:]],
    }


def program_label(program: Mapping[str, Any]) -> str:
    """A row name: 'train distill_project 8x1 bf16 remat', 'sample 50 steps cfg 7.5 8x1 bf16'."""
    s = program["settings"]
    mesh = f"{s['mesh']['data']}x{s['mesh']['fsdp']}"
    dtype = {"float32": "f32", "bfloat16": "bf16"}[s["dtype"]]
    if program["kind"] == "train":
        extras = [
            "remat" if s["remat"] else "",
            f"{dtype} θ0" if s.get("frozen_dtype") == "compute" and dtype != "f32" else "",
            "bf16 mu" if s.get("mu_dtype") == "bfloat16" else "",
        ]
        return " ".join([f"train {s['method']} {mesh} {dtype}", *filter(None, extras)])
    return f"sample {s['steps']} steps cfg {s['guidance']:g} {mesh} {dtype}"


def scaled(value: float, units: Sequence[tuple[str, float]], digits: int = 2) -> str:
    for unit, size in units:
        if value >= size:
            return f"{value / size:.{digits}f} {unit}"
    unit, size = units[-1]
    return f"{value / size:.{digits}f} {unit}"


BYTE_UNITS = (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))
FLOP_UNITS = (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("FLOP", 1))
SECOND_UNITS = (("s", 1.0), ("ms", 1e-3), ("us", 1e-6))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _bytes(program: Mapping[str, Any], key: str) -> str:
    value = program["memory"].get(key)
    return "out of memory" if value is None else scaled(value, BYTE_UNITS)


def _flops(program: Mapping[str, Any], key: str) -> str:
    value = program["flops"].get(key)
    return "n/a" if value is None else scaled(value, FLOP_UNITS)


def format_tables(report: Mapping[str, Any], markdown: bool = False) -> str:
    """Memory and FLOPs per program; floor and fit per chip; the notes. Text or Markdown."""
    programs = report["programs"]
    header = [
        "program",
        "batch/device",
        "arguments",
        "outputs",
        "donated",
        "temporaries",
        "peak estimate",
        "FLOP/step",
        "FLOP/image",
        "compile",
    ]
    rows = [
        [
            program_label(p),
            str(p["settings"]["batch_per_device"]),
            *(_bytes(p, k) for k in ("argument", "output", "alias", "temp", "peak_estimate")),
            _flops(p, "per_step"),
            _flops(p, "per_image"),
            f"{p['compile_s']:.0f} s",
        ]
        for p in programs
    ]
    chip_header = ["floor per step, fit"]
    for c in report["chips"]:
        hbm = f"{c['hbm_bytes'] // GiB} GiB" if c["hbm_bytes"] % GiB == 0 else None
        hbm = hbm or f"{c['hbm_bytes'] / GB:g} GB"
        chip_header.append(f"{c['name']} ({hbm}, {c['peak_tflops']:g} TFLOP/s)")
    chip_rows = []
    for p in programs:
        cells = [program_label(p)]
        for c in report["chips"]:
            chip = p["chips"][c["name"]]
            if p.get("out_of_memory"):
                cells.append("DOES NOT FIT (the compiler ran out of memory)")
                continue
            floor = scaled(chip["floor_ms_per_step"] / 1e3, SECOND_UNITS)
            cells.append(f"{floor}, {'fits' if chip['fits'] else 'DOES NOT FIT'}")
        chip_rows.append(cells)
    notes = dict.fromkeys([n for p in programs for n in p["notes"]] + list(report["notes"]))
    title = (
        f"Plan for {report['model']} on {report['devices']} {report['backend']} device(s) "
        f"({report['device_kind']}). Train: one update step, FLOP/image per example of "
        "each term. Sample: one denoising step, FLOP/image for the whole generation."
    )
    bullet = "- " if markdown else "* "
    return "\n\n".join(
        [
            title,
            _table(header, rows, markdown),
            _table(chip_header, chip_rows, markdown),
            "\n".join(bullet + n for n in notes),
        ]
    )


def markdown_tables(report: Mapping[str, Any]) -> str:
    """The report as Markdown tables, to paste into the README."""
    return format_tables(report, markdown=True)
