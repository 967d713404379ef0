"""The accelerator benchmark's results: ratios and floor shares from the measured figures,
and the Markdown table (`accelerator.py` measures, this module only computes and prints)."""

from __future__ import annotations

import numpy as np

from unlearn_jax.benchmarks.common import markdown_rows


def floor_share(flops: float | None, per_second: float, peak_tflops: float | None) -> float | None:
    """The share of a peak rate that `flops` done `per_second` times a second is."""
    if not flops or not peak_tflops:
        return None
    return flops * per_second / (peak_tflops * 1e12)


def _shares(flops, per_second: float, device: dict) -> dict:
    return {
        "datasheet": floor_share(flops, per_second, device["datasheet_bf16_tflops"]),
        "measured_matmul": floor_share(flops, per_second, device["measured_matmul_tflops"]),
    }


def _not_measured(device: dict, train: dict) -> list[str]:
    notes = []
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
    if "error" in train:
        notes.append(f"train step: it failed, {train['error'].strip().splitlines()[-1]}")
    elif train["ours"].get("flops_per_step") is None:
        notes.append("train-step FLOPs: XLA's cost analysis gave none")
    return notes


def summarize(config: dict, ours: dict, theirs: dict, train: dict, images: dict) -> dict:
    """Every figure plus the ratios, shares and image agreement computed from them."""
    device = ours.pop("device")
    ours_img, theirs_img = images["ours"], images["diffusers"]
    if ours_img.shape != theirs_img.shape:
        raise RuntimeError(
            f"image shapes differ: ours {ours_img.shape}, diffusers {theirs_img.shape}; "
            "the two workers did not do the same work"
        )
    diff = np.abs(ours_img.astype(np.float64) - theirs_img.astype(np.float64))
    flops_image = ours["flops_per_image"]
    best = ours["by_batch"][str(ours["best_batch"])]
    compile_s = {
        "sampler, first call - steady call": best["compile_s"],
        "sampler, JAX trace + lower + compile events": best["jax_compile_s"],
        **{f"sampler program {k}": v for k, v in best["compile_by_program_s"].items()},
        "1 denoising step for the FLOP count": ours["flop_count_compile_s"],
    }
    if "error" not in train:
        flops_step = train["ours"].get("flops_per_step")
        rates = {"ours": train["ours"]["steps_per_s"], "torch": train["torch"]["steps_per_s"]}
        train = {
            **train,
            "flops_per_step": flops_step,
            "floor_share": {k: _shares(flops_step, v, device) for k, v in rates.items()},
        }
        compile_s["train step (lower + compile)"] = train["ours"]["compile_s"]
    return {
        "config": config,
        "device": device,
        "sampling": {
            "ours": ours,
            "diffusers": theirs,
            "speedup_vs_diffusers": ours["images_per_s"] / theirs["images_per_s"],
            "flops_per_image": flops_image,
            "floor_share": {
                "ours": _shares(flops_image, ours["images_per_s"], device),
                "diffusers": _shares(flops_image, theirs["images_per_s"], device),
            },
            "images": {
                "compared": int(ours_img.shape[0]),
                "max_abs_diff": float(diff.max()),
                "mean_abs_diff": float(diff.mean()),
            },
        },
        "train_step": train,
        "compile_s": compile_s,
        "not_measured": _not_measured(device, train),
    }


def _pct(share: float | None) -> str | None:
    return None if share is None else f"{100 * share:.1f}%"


def _mib(value: float | None) -> str | None:
    return None if value is None else f"{value:.0f}"


def _train_rows(t: dict, c: dict, sheet: str, rate: str, memory_key: str) -> list[list]:
    """The train step's rows of the headline table (one "failed" row if it failed)."""
    name = f"train step ({c['train_method']}, batch {c['train_batch_per_term']} per term)"
    if "error" in t:
        return [[f"{name}, steps/s", "failed (see not measured)", None, None]]
    ours, torch, shares = t["ours"], t["torch"], t["floor_share"]
    memory = "device memory" if memory_key == "device_peak_mb" else "RSS"
    return [
        [f"{name}, steps/s", f"{ours['steps_per_s']:.3g}", f"{torch['steps_per_s']:.3g}",
         f"{ours['steps_per_s'] / torch['steps_per_s']:.2f}x"],
        [f"train step, share of the bf16 floor ({sheet})", _pct(shares["ours"]["datasheet"]),
         _pct(shares["torch"]["datasheet"]), None],
        [f"train step, share of the {rate}", _pct(shares["ours"]["measured_matmul"]),
         _pct(shares["torch"]["measured_matmul"]), None],
        [f"train step, peak {memory} MiB", _mib(ours[memory_key]), _mib(torch[memory_key]), None],
        ["compile s: train step", f"{ours['compile_s']:.1f}", None, None],
    ]  # fmt: skip


def markdown_table(result: dict) -> str:
    """The figures as Markdown: headline table, batch sweep, compile times, notes."""
    c, d, s, t = result["config"], result["device"], result["sampling"], result["train_step"]
    ours, theirs = s["ours"], s["diffusers"]
    shares = s["floor_share"]
    device_memory = d["backend"] != "cpu"
    sheet = f"datasheet {d['datasheet_bf16_tflops']:.0f} TFLOP/s" if d["chip"] else "datasheet"
    rate = f"measured {d['matmul_dtype']} matmul {d['measured_matmul_tflops']:.3g} TFLOP/s"
    ratio = lambda a, b: f"{a / b:.2f}x"
    rows = [
        ["sampling, images/s at the best batch", f"{ours['images_per_s']:.3g} (batch "
         f"{ours['best_batch']})", f"{theirs['images_per_s']:.3g} (batch {theirs['best_batch']})",
         ratio(ours["images_per_s"], theirs["images_per_s"])],
        [f"sampling, share of the bf16 floor ({sheet})", _pct(shares["ours"]["datasheet"]),
         _pct(shares["diffusers"]["datasheet"]), None],
        [f"sampling, share of the {rate}", _pct(shares["ours"]["measured_matmul"]),
         _pct(shares["diffusers"]["measured_matmul"]), None],
        ["sampling, peak device memory MiB", _mib(ours["device_peak_mb"]),
         _mib(theirs["device_peak_mb"]), None],
    ]  # fmt: skip
    rows += _train_rows(t, c, sheet, rate, "device_peak_mb" if device_memory else "peak_rss_mb")
    sweep = sorted({int(b) for b in ours["by_batch"]} | {int(b) for b in theirs["by_batch"]})
    get = lambda part, b, k: part["by_batch"].get(str(b), {}).get(k)
    sweep_rows = [
        [b, get(ours, b, "images_per_s"), get(ours, b, "first_call_s"), get(ours, b, "compile_s"),
         get(theirs, b, "images_per_s")]
        for b in sweep
    ]  # fmt: skip
    lines = [
        f"{d['device_kind']} ({d['backend']}), model {c['model']}, precision {c['precision']} "
        f"(ours {ours['dtype']}, diffusers {theirs['dtype']}), {c['steps']} DDIM steps, "
        f"guidance {c['guidance']}, {c['cores']} cores of {c['cpu']}, load average "
        f"{c['load_average']} -> {c['load_average_after']}, {result['elapsed_s']:.0f} s in all",
        "",
        *markdown_rows(["figure", "ours (JAX)", "diffusers / PyTorch", "ours / theirs"], rows),
        "",
        "batch sweep (images/s; ours' first call includes compilation):",
        "",
        *markdown_rows(
            ["batch", "ours img/s", "ours 1st call s", "ours compile s", "diffusers img/s"],
            sweep_rows,
        ),
        "",
        "compile seconds:",
        "",
        *markdown_rows(["program", "s"], [[k, v] for k, v in result["compile_s"].items()]),
        "",
        f"FLOPs (XLA's cost analysis, XLA's attention): {s['flops_per_image'] / 1e12:.4g} "
        "TFLOP per image (denoising loop)"
        + (
            f", {t['flops_per_step'] / 1e12:.4g} TFLOP per train step"
            if t.get("flops_per_step")
            else ""
        ),  # fmt: skip
        f"images from the same initial latents, {s['images']['compared']} compared: max |ours - "
        f"diffusers| {s['images']['max_abs_diff']:.2e}, mean {s['images']['mean_abs_diff']:.2e}",
    ]
    if check := t.get("cross_check"):
        lines.append(
            f"train step cross-check at step 0: losses agree to {check['max_loss_rel_diff']:.1e}"
            f", gradient norms to {check['max_grad_rel_diff']:.1e} "
            f"({'PASSED' if check['passed'] else 'FAILED'})"
        )
    skipped = {k: p["skipped_batch_sizes"] for k, p in (("ours", ours), ("diffusers", theirs))}
    if any(skipped.values()):
        lines.append(f"batch sizes skipped for the time budget: {skipped}")
    lines += [f"not measured: {note}" for note in result["not_measured"]]
    return "\n".join(lines)
