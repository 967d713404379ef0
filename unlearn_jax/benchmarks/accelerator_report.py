"""The accelerator benchmark's results: ratios and floor shares from the measured figures,
and the Markdown table (`accelerator.py` measures, this module only computes and prints).

Any part may be missing, since the results are written after every phase and a phase
may fail or run out of time: a part is then None (not run) or carries an "error" (why
it failed or was killed), with whatever it finished before that, e.g. a sweep's
finished batch sizes. The figures that need a missing part are None, and the table and
the notes say why.
"""

from __future__ import annotations

import numpy as np

from unlearn_jax.benchmarks.common import markdown_rows


def floor_share(flops: float | None, per_second: float, peak_tflops: float | None) -> float | None:
    """The share of a peak rate that `flops` done `per_second` times a second is."""
    if not flops or not peak_tflops:
        return None
    return flops * per_second / (peak_tflops * 1e12)


def measured(part: dict | None, rate: str = "images_per_s") -> bool:
    """Whether a part (a sampling sweep, a train-step side) has its rate."""
    return bool(part) and part.get(rate) is not None


def _missing(part: dict | None) -> str:
    """Why a part has no rate, for a table cell."""
    return "not run" if part is None else "failed (see the notes)"


def _shares(flops, per_second: float, device: dict) -> dict:
    return {
        "datasheet": floor_share(flops, per_second, device["datasheet_bf16_tflops"]),
        "measured_matmul": floor_share(flops, per_second, device["measured_matmul_tflops"]),
    }


def _last_line(error: str) -> str:
    lines = error.strip().splitlines()
    return lines[-1] if lines else "no message"


def _part_notes(name: str, part: dict | None) -> list[str]:
    if part is None:
        return [f"{name}: not run"]
    if "error" not in part:
        return []
    if measured(part):  # a sweep that finished some batch sizes before it failed
        return [f"{name}: incomplete, kept what it finished before: {_last_line(part['error'])}"]
    return [f"{name}: failed, {_last_line(part['error'])}"]


def _not_measured(device: dict, ours: dict | None, theirs: dict | None, train) -> list[str]:
    notes = _part_notes("our sampling", ours) + _part_notes("diffusers' sampling", theirs)
    if device["backend"] == "cpu":
        notes.append(
            "device memory: a CPU has no device allocator to ask (JAX memory_stats() is "
            "None, no torch.cuda); the train step's peak RSS per process is reported instead"
        )
    if device["datasheet_bf16_tflops"] is None:
        notes.append(
            f"datasheet peak: {device['device_kind']!r} is none of the planner's chips; "
            f"shares use the measured {device['matmul_dtype']} matmul rate only"
        )
    if device["measured_matmul_tflops"] is None:
        notes.append("measured matmul rate: our worker did not report one")
    if train is None or "error" in train:
        notes += _part_notes("train step", train)
    else:
        notes += _part_notes("train step, PyTorch", train["torch"])
        if train["ours"].get("flops_per_step") is None:
            notes.append("train-step FLOPs: XLA's cost analysis gave none")
    if ours and ours.get("flop_count_error"):
        notes.append(f"sampling FLOPs: the count failed, {_last_line(ours['flop_count_error'])}")
    return notes


def _compare_images(images: dict) -> dict | None:
    if not {"ours", "diffusers"} <= images.keys():
        return None
    ours_img, theirs_img = images["ours"], images["diffusers"]
    if ours_img.shape != theirs_img.shape:  # each is its smallest finished batch
        shapes = f"ours {ours_img.shape}, diffusers {theirs_img.shape}"
        return {"error": f"image shapes differ: {shapes}"}
    diff = np.abs(ours_img.astype(np.float64) - theirs_img.astype(np.float64))
    return {
        "compared": int(ours_img.shape[0]),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
    }


def summarize(
    config: dict, ours: dict | None, theirs: dict | None, train, images: dict, device: dict
) -> dict:
    """Every figure plus the ratios, shares and image agreement computed from them.

    device: what is known of the device without our worker (`accelerator.device_guess`);
    our worker's own `device` entry, when it has one, replaces it.
    """
    if ours is not None:
        ours = dict(ours)
        device = ours.pop("device", None) or device
    flops_image = ours.get("flops_per_image") if ours else None
    both = measured(ours) and measured(theirs)
    compile_s = {}
    if measured(ours):
        best = ours["by_batch"][str(ours["best_batch"])]
        compile_s = {
            "sampler, first call - steady call": best["compile_s"],
            "sampler, JAX trace + lower + compile events": best["jax_compile_s"],
            **{f"sampler program {k}": v for k, v in best["compile_by_program_s"].items()},
        }
    if ours and ours.get("flop_count_compile_s") is not None:
        compile_s["1 denoising step for the FLOP count"] = ours["flop_count_compile_s"]
    if train is not None and "error" not in train:
        flops_step = train["ours"].get("flops_per_step")
        sides = [k for k in ("ours", "torch") if measured(train[k], "steps_per_s")]
        shares = {k: _shares(flops_step, train[k]["steps_per_s"], device) for k in sides}
        train = {**train, "flops_per_step": flops_step, "floor_share": shares}
        compile_s["train step (lower + compile)"] = train["ours"]["compile_s"]
    return {
        "config": config,
        "device": device,
        "sampling": {
            "ours": ours,
            "diffusers": theirs,
            "speedup_vs_diffusers": (
                ours["images_per_s"] / theirs["images_per_s"] if both else None
            ),
            "flops_per_image": flops_image,
            "floor_share": {
                name: _shares(flops_image, part["images_per_s"], device) if measured(part) else None
                for name, part in (("ours", ours), ("diffusers", theirs))
            },
            "images": _compare_images(images),
        },
        "train_step": train,
        "compile_s": compile_s,
        "not_measured": _not_measured(device, ours, theirs, train),
    }


def _pct(share: float | None) -> str | None:
    return None if share is None else f"{100 * share:.1f}%"


def _mib(value: float | None) -> str | None:
    return None if value is None else f"{value:.0f}"


def _share_cells(shares: dict, kind: str, names: tuple[str, str]) -> list:
    return [_pct((shares.get(n) or {}).get(kind)) for n in names]


def _train_rows(t, c: dict, sheet: str, rate: str, memory_key: str) -> list[list]:
    """The train step's rows of the headline table (one row saying why, if it has none)."""
    name = f"train step ({c['train_method']}, batch {c['train_batch_per_term']} per term)"
    if t is None or "error" in t:
        return [[f"{name}, steps/s", _missing(t), None, None]]
    ours, torch, shares = t["ours"], t["torch"], t["floor_share"]
    theirs_rate = f"{torch['steps_per_s']:.3g}" if measured(torch, "steps_per_s") else None
    speedup = t.get("speedup_vs_torch")
    memory = "device memory" if memory_key == "device_peak_mb" else "RSS"
    names = ("ours", "torch")
    return [
        [f"{name}, steps/s", f"{ours['steps_per_s']:.3g}", theirs_rate or _missing(torch),
         None if speedup is None else f"{speedup:.2f}x"],
        [f"train step, share of the bf16 floor ({sheet})",
         *_share_cells(shares, "datasheet", names), None],
        [f"train step, share of the {rate}", *_share_cells(shares, "measured_matmul", names), None],
        [f"train step, peak {memory} MiB", _mib(ours[memory_key]),
         _mib(torch.get(memory_key)), None],
        ["compile s: train step", f"{ours['compile_s']:.1f}", None, None],
    ]  # fmt: skip


def _rate_cell(part: dict | None) -> str:
    if not measured(part):
        return _missing(part)
    return f"{part['images_per_s']:.3g} (batch {part['best_batch']})"


def _sweep_rows(ours: dict | None, theirs: dict | None) -> list[list]:
    """Per batch size: ours' rate, first call and compile, diffusers' rate ("failed" where
    that batch size failed, empty where it was not tried)."""
    parts = [p or {} for p in (ours, theirs)]
    sizes = set()
    for p in parts:
        sizes |= {int(b) for b in p.get("by_batch", {})} | {int(b) for b in p.get("failed", {})}

    def get(part: dict, b: int, key: str):
        if str(b) in part.get("failed", {}):
            return "failed"
        return part.get("by_batch", {}).get(str(b), {}).get(key)

    o, t = parts
    return [
        [b, get(o, b, "images_per_s"), get(o, b, "first_call_s"), get(o, b, "compile_s"),
         get(t, b, "images_per_s")]
        for b in sorted(sizes)
    ]  # fmt: skip


def markdown_table(result: dict) -> str:
    """The figures as Markdown: headline table, batch sweep, compile times, notes."""
    c, d, s, t = result["config"], result["device"], result["sampling"], result["train_step"]
    ours, theirs = s["ours"], s["diffusers"]
    shares = s["floor_share"]
    device_memory = d["backend"] != "cpu"
    sheet = f"datasheet {d['datasheet_bf16_tflops']:.0f} TFLOP/s" if d["chip"] else "datasheet"
    measured_rate = d["measured_matmul_tflops"]
    rate = f"measured {d['matmul_dtype']} matmul " + (
        f"{measured_rate:.3g} TFLOP/s" if measured_rate else "rate"
    )
    speedup = s["speedup_vs_diffusers"]
    names = ("ours", "diffusers")
    rows = [
        ["sampling, images/s at the best batch", _rate_cell(ours), _rate_cell(theirs),
         None if speedup is None else f"{speedup:.2f}x"],
        [f"sampling, share of the bf16 floor ({sheet})", *_share_cells(shares, "datasheet", names),
         None],
        [f"sampling, share of the {rate}", *_share_cells(shares, "measured_matmul", names), None],
        ["sampling, peak device memory MiB", _mib((ours or {}).get("device_peak_mb")),
         _mib((theirs or {}).get("device_peak_mb")), None],
    ]  # fmt: skip
    rows += _train_rows(t, c, sheet, rate, "device_peak_mb" if device_memory else "peak_rss_mb")
    dtypes = f"ours {(ours or {}).get('dtype', '?')}, diffusers {(theirs or {}).get('dtype', '?')}"
    done = "" if result.get("complete", True) else " (incomplete: see the notes)"
    lines = [
        f"{d['device_kind']} ({d['backend']}), model {c['model']}, precision {c['precision']} "
        f"({dtypes}), {c['steps']} DDIM steps, guidance {c['guidance']}, {c['cores']} cores "
        f"of {c['cpu']}, load average {c['load_average']} -> {c['load_average_after']}, "
        f"{result['elapsed_s']:.0f} s in all{done}",
        "",
        *markdown_rows(["figure", "ours (JAX)", "diffusers / PyTorch", "ours / theirs"], rows),
        "",
        "batch sweep (images/s; ours' first call includes compilation):",
        "",
        *markdown_rows(
            ["batch", "ours img/s", "ours 1st call s", "ours compile s", "diffusers img/s"],
            _sweep_rows(ours, theirs),
        ),
        "",
        "compile seconds:",
        "",
        *markdown_rows(["program", "s"], [[k, v] for k, v in result["compile_s"].items()]),
        "",
    ]
    flops = []
    if s["flops_per_image"]:
        flops.append(f"{s['flops_per_image'] / 1e12:.4g} TFLOP per image (denoising loop)")
    if t and t.get("flops_per_step"):
        flops.append(f"{t['flops_per_step'] / 1e12:.4g} TFLOP per train step")
    if flops:
        lines.append(f"FLOPs (XLA's cost analysis, XLA's attention): {', '.join(flops)}")
    images = s["images"]
    if images and "error" in images:
        lines.append(f"images: {images['error']}")
    elif images:
        lines.append(
            f"images from the same initial latents, {images['compared']} compared: max |ours - "
            f"diffusers| {images['max_abs_diff']:.2e}, mean {images['mean_abs_diff']:.2e}"
        )
    if check := (t or {}).get("cross_check"):
        lines.append(
            f"train step cross-check at step 0: losses agree to {check['max_loss_rel_diff']:.1e}"
            f", gradient norms to {check['max_grad_rel_diff']:.1e} "
            f"({'PASSED' if check['passed'] else 'FAILED'})"
        )
    sides = (("ours", ours), ("diffusers", theirs))
    skipped = {k: (p or {}).get("skipped_batch_sizes") for k, p in sides}
    if any(skipped.values()):
        lines.append(f"batch sizes skipped (time budget, or above one that failed): {skipped}")
    for name, part in sides:
        for b, error in (part or {}).get("failed", {}).items():
            lines.append(f"{name}, batch {b}: failed, {_last_line(error)}")
    phases = result.get("phases", {})
    lines += [f"phase {name}: {status}" for name, status in phases.items() if status != "done"]
    if any("did not finish in" in status for status in phases.values()):
        lines.append(
            "a phase ran out of time. Fix: a larger --deadline, fewer batch sizes or steps, "
            "or rerun it alone with --only"
        )
    lines += [f"not measured: {note}" for note in result["not_measured"]]
    return "\n".join(lines)
