"""`unlearn-jax demo`: every method on its learning-rate grid, curves, headline points, seeds.

For each method of the protocol:

  1. one run per learning rate (training seed `protocol.seeds[0]`), evaluated every
     `eval_every` steps: the method's curve of (lr, step, forget rate, integrity
     LPIPS, retain accuracy, FID) points;
  2. the headline point by `pareto.headline_point` (the lowest integrity among the
     points with forget rate <= 0.1, or else the lowest forget rate), evaluated on
     the full prompt sets (intermediate points may have used a subset);
  3. the headline (lr, step) re-trained with each further training seed, for the
     spread the report shows.

Every run is an ordinary `train_and_evaluate` workdir under <workdir>/<method>/, so
`unlearn-jax export --workdir <workdir>/<method>/<run>` works on any of them, and a
rerun of the demo reuses finished runs. θ0's generations are shared through one cache.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unlearn_jax.metrics import pareto
from unlearn_jax.trainer.evaluation import read_curve
from unlearn_jax.world.demo.protocol import (
    ANCHOR_CONCEPT,
    CONCEPT,
    DEFAULT,
    INTEGRITY_PRESERVING,
    Protocol,
    attack_config,
    demo_config,
    split_prompts,
)

log = logging.getLogger(__name__)

# What a curve point keeps of an evaluation's metrics.
POINT_KEYS = ("forget_rate", "integrity_lpips", "retain_accuracy", "fid")
HEADLINE_KEYS = (
    *POINT_KEYS,
    "integrity_lpips_ci95_low",
    "integrity_lpips_ci95_high",
    "psnr",
    "ssim",
)
HEADLINE_DIR = "headline"  # <run>/headline/step_<N>/: the full evaluation of a headline point


def _run_name(lr: float, seed: int, steps: int) -> str:
    return f"lr{lr:g}_seed{seed}_steps{steps}"


def _train(config, run_dir: Path, shared_cache: Path) -> dict[str, Any]:
    """`train_and_evaluate` in `run_dir`, with θ0's generations shared across runs."""
    from unlearn_jax.trainer.train import train_and_evaluate

    run_dir.mkdir(parents=True, exist_ok=True)
    cache = run_dir / "cache"
    if not cache.exists():
        cache.symlink_to(shared_cache, target_is_directory=True)
    return train_and_evaluate(config, run_dir)


def _point(record: dict[str, Any], lr: float, seed: int) -> dict[str, Any]:
    point = {"lr": lr, "step": int(record["step"]), "seed": seed}
    point.update({k: float(record[k]) for k in POINT_KEYS})
    point["prompts"] = record.get("prompts", {})
    return point


def _is_full(record: dict[str, Any], prompts: dict[str, list[str]]) -> bool:
    seen = record.get("prompts", {})
    return seen.get("retain") == len(prompts["eval_retain"]) and seen.get("forget") == len(
        prompts["forget"]
    )


def _headline_evaluation(config, run_dir: Path, step: int, prompts) -> dict[str, Any]:
    """The full-prompt-set metrics of `run_dir` at `step` (an evaluation there, or a new one)."""
    for record in read_curve(run_dir):
        if record["step"] == step and _is_full(record, prompts):
            return record
    out = run_dir / HEADLINE_DIR / f"step_{step:06d}"
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    from unlearn_jax.trainer.restore import evaluate

    evaluate(config, run_dir, step=step, out_dir=out)
    return json.loads((out / "metrics.json").read_text())


def _headline_attack(
    config, protocol: Protocol, run_dir: Path | None, step: int | None, out: Path, cache: Path
) -> dict[str, Any]:
    """The embedding attack's attack.json for checkpoint `step` of `run_dir` (None: θ0).

    A rerun with the same attack settings reuses the written report.
    """
    done = out / "attack" / "attack.json"
    if done.is_file():
        summary = json.loads(done.read_text())
        settings = summary.get("settings", {})
        if all(settings.get(k) == v for k, v in protocol.attack_json().items() if k != "method"):
            return summary
    from unlearn_jax.attacks.configured import attack_checkpoint

    return attack_checkpoint(attack_config(config, protocol), run_dir, step, out, cache_dir=cache)


def _prune_checkpoints(run_dir: Path, keep: set[int]) -> None:
    """Deletes the run's checkpoints except `keep` (the final one and a headline point)."""
    from unlearn_jax.trainer.checkpoints import Checkpoints

    checkpoints = Checkpoints(run_dir, keep=0)
    try:
        for step in checkpoints.manager.all_steps():
            if step not in keep:
                checkpoints.manager.delete(step)
    finally:
        checkpoints.close()


def _summary(values: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(mean, [min, max]) of each metric over the seeds' evaluations."""
    mean = {k: sum(v[k] for v in values) / len(values) for k in POINT_KEYS}
    spread = {k: [min(v[k] for v in values), max(v[k] for v in values)] for k in POINT_KEYS}
    return mean, spread


def run_method(
    method: str,
    protocol: Protocol,
    workdir: Path,
    model_path: Path,
    prompts: dict[str, list[str]],
    progress: Callable[[str], None],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the report entry of one method, the original's metrics seen by its evaluations)."""
    started = time.time()
    shared_cache = workdir / "cache"
    first_seed = protocol.seeds[0]
    common = dict(eval_seeds=protocol.eval_seeds)
    curve: list[dict[str, Any]] = []
    runs: dict[float, tuple[Any, Path]] = {}
    for lr in protocol.lrs[method]:
        config = demo_config(
            method,
            model_path,
            prompts,
            steps=protocol.steps,
            lr=lr,
            seed=first_seed,
            eval_every=protocol.eval_every,
            periodic_prompt_stride=protocol.periodic_prompt_stride,
            **common,
        )
        run_dir = workdir / method / _run_name(lr, first_seed, protocol.steps)
        run_started = time.time()
        _train(config, run_dir, shared_cache)
        points = [_point(r, lr, first_seed) for r in read_curve(run_dir)]
        curve.extend(points)
        runs[lr] = (config, run_dir)
        best = pareto.headline_point(points)
        progress(
            f"  {method} lr {lr:g}: {len(points)} points in {time.time() - run_started:.0f} s; "
            f"best forget rate {best['forget_rate']:.2f} at integrity LPIPS "
            f"{best['integrity_lpips']:.3f} (step {best['step']})"
        )
    head = pareto.headline_point(curve)
    config, run_dir = runs[head["lr"]]
    record = _headline_evaluation(config, run_dir, head["step"], prompts)
    for lr, (_, path) in runs.items():  # the final checkpoints, and the headline point's
        _prune_checkpoints(path, {protocol.steps} | ({head["step"]} if lr == head["lr"] else set()))
    original = {
        "forget_rate": float(record["forget_rate_original"]),
        "retain_accuracy": float(record["retain_accuracy_original"]),
    }
    seeds = [{"seed": first_seed, **{k: float(record[k]) for k in POINT_KEYS}}]
    for seed in protocol.seeds[1:]:
        seed_config = demo_config(
            method, model_path, prompts, steps=head["step"], lr=head["lr"], seed=seed, **common
        )
        result = _train(
            seed_config, workdir / method / _run_name(head["lr"], seed, head["step"]), shared_cache
        )
        seeds.append({"seed": seed, **{k: float(result[k]) for k in POINT_KEYS}})
    mean, spread = _summary(seeds)
    attack = {}
    if protocol.attack_steps:
        out = run_dir / HEADLINE_DIR / f"step_{head['step']:06d}"
        summary = _headline_attack(config, protocol, run_dir, head["step"], out, shared_cache)
        # The attack's unattacked images are this evaluation's (same prompts and noise).
        attack = {
            "forget_rate_attacked": summary["forget_rate_attacked"],
            "template_rate": summary["template_rate"],
            "attack_seconds": summary["attack_seconds"] + summary["eval_seconds"],
        }
        progress(
            f"  {method} headline under the embedding attack ({summary['attack_steps']} steps, "
            f"{attack['attack_seconds']:.0f} s): forget rate {summary['forget_rate']:.2f} -> "
            f"{summary['forget_rate_attacked']:.2f}; 'a <v*>' alone {summary['template_rate']:.2f}"
        )
    entry: dict[str, Any] = {
        "family": "integrity-preserving" if method in INTEGRITY_PRESERVING else "baseline",
        **{k: float(record[k]) for k in HEADLINE_KEYS},
        **attack,
        "lr": head["lr"],
        "step": head["step"],
        "run": str(run_dir.relative_to(workdir)),
        "seeds": seeds,
        "seed_mean": mean,
        "seed_spread": spread,
        "curve": curve,
        "seconds": round(time.time() - started, 1),
    }
    return entry, original


def run_demo(
    workdir: str | Path,
    protocol: Protocol = DEFAULT,
    *,
    grids: bool = True,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs the protocol and writes report.json, report.md, plots and grids into `workdir`."""
    from unlearn_jax.world.demo import report as report_lib
    from unlearn_jax.world.embedded import embedded_model_path

    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "cache").mkdir(exist_ok=True)
    model_path = embedded_model_path()
    prompts = split_prompts()
    report: dict[str, Any] = {
        "concept": CONCEPT,
        "anchor_concept": ANCHOR_CONCEPT,
        "model": str(model_path),
        "protocol": protocol.to_json(),
        "headline_rule": (
            f"the lowest integrity LPIPS among a method's points with forget rate <= "
            f"{pareto.FORGOTTEN:g}, or else its lowest forget rate; evaluated on all "
            "prompts, training seed " + str(protocol.seeds[0])
        ),
        "prompts": {k: len(v) for k, v in prompts.items()},
        "original": {},
        "methods": {},
    }
    started = time.time()
    for k, method in enumerate(protocol.methods):
        progress(
            f"[{k + 1}/{len(protocol.methods)}] {method}: learning rates "
            f"{', '.join(f'{lr:g}' for lr in protocol.lrs[method])}, {protocol.steps} steps, "
            f"{len(protocol.seeds)} seed(s)"
        )
        entry, original = run_method(method, protocol, workdir, model_path, prompts, progress)
        report["original"] = {**original, "integrity_lpips": 0.0, "fid": 0.0}
        report["methods"][method] = entry
        seeds = entry["seed_spread"]
        progress(
            f"[{k + 1}/{len(protocol.methods)}] {method} done in {entry['seconds']:.0f} s "
            f"(total {time.time() - started:.0f} s): headline lr {entry['lr']:g} step "
            f"{entry['step']}: forget rate {entry['forget_rate']:.2f}, integrity LPIPS "
            f"{entry['integrity_lpips']:.3f}, retain accuracy {entry['retain_accuracy']:.2f}; "
            f"over seeds forget {seeds['forget_rate'][0]:.2f}-{seeds['forget_rate'][1]:.2f}, "
            f"LPIPS {seeds['integrity_lpips'][0]:.3f}-{seeds['integrity_lpips'][1]:.3f}"
        )
    if protocol.attack_steps:
        # θ0 under the same attack: how much of the concept the attack recovers at most.
        config = demo_config(
            protocol.methods[0],
            model_path,
            prompts,
            steps=protocol.steps,
            lr=1e-4,
            eval_seeds=protocol.eval_seeds,
        )
        summary = _headline_attack(
            config, protocol, None, None, workdir / "original", workdir / "cache"
        )
        report["original"]["forget_rate_attacked"] = summary["forget_rate_attacked"]
        report["original"]["template_rate"] = summary["template_rate"]
        report["original"]["attack_seconds"] = summary["attack_seconds"] + summary["eval_seconds"]
        progress(
            f"original under the embedding attack: forget rate {summary['forget_rate']:.2f} -> "
            f"{summary['forget_rate_attacked']:.2f}; 'a <v*>' alone {summary['template_rate']:.2f}"
        )
    report["seconds"] = round(time.time() - started, 1)
    report_lib.write_report(report, workdir)
    if grids:
        report_lib.write_grids(report, workdir, prompts)
    return report
