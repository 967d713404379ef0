"""`unlearn-jax demo`: the whole story on the embedded world, offline, on a laptop CPU.

The shipped tiny SD-architecture model draws "a large red circle on a grey
background" and the rest of its procedural world. The demo makes it forget
one concept ("circle") with several presets — baselines and the
integrity-preserving ones — evaluates the original and each result on the
forget prompts and on held-out retain prompts, and writes:

  report.json   {"original": {...}, "methods": {NAME: {"forget_rate", "integrity_lpips",
                 "fid", "retain_accuracy", ...}}}
  report.md     the table and what it shows, in words
  grid_forget.png, grid_retain.png   original vs each method, same noise
  forget_vs_integrity.png            forgetting against integrity damage

Metrics: forget rate = share of forget-prompt generations the world classifier
calls a circle; integrity = LPIPS-VGG between original and unlearned images
from identical noise on held-out retain prompts; FID between the two models'
retain generations with the world classifier's features (the world's FID
feature extractor); retain accuracy = share of retain generations showing the
prompted shape and colour (the world's text-image agreement score, standing
in for CLIPScore, which needs a CLIP this world does not have).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from unlearn_jax.data import world

log = logging.getLogger(__name__)

METHODS = ("neggrad", "graddiff", "salun", "esd_x", "distill", "distill_project")
INTEGRITY_PRESERVING = ("distill", "distill_project", "esd_distill")
CONCEPT = "circle"
STEPS = 80  # unlearning steps per method
# c_a of the remapping methods: forget prompts are pulled towards θ0's "square".
ANCHOR = "square"
LR = 1e-3  # Adam, constant


def _world_shape_classifier(config, pipe):
    """Forget-rate classifier of the embedded world: the shape head, concept = forget.concept."""
    from unlearn_jax.metrics.world_classifier import world_classifier

    return world_classifier("shape"), world.attribute_index("shape", config.forget.concept)


def register_world_classifier() -> None:
    """Registers `_world_shape_classifier` as eval.classifier='world_shape'.

    Called by `demo_config`, not at import: the CLI imports this module for its
    argument parser, and the trainer's imports would slow every command's start.
    """
    from unlearn_jax.unlearn.evaluation import register_forget_classifier

    register_forget_classifier("world_shape")(_world_shape_classifier)


def base_config_path() -> Path:
    """configs/base.py, shipped inside the package as `unlearn_jax.configs`."""
    from importlib import resources

    return Path(str(resources.files("unlearn_jax.configs").joinpath("base.py")))


def split_prompts(concept: str = CONCEPT) -> dict[str, list[str]]:
    """Forget prompts, training retain prompts and held-out retain prompts (every 4th)."""
    forget, retain = world.forget_retain_prompts(concept)
    held_out = retain[::4]
    train_retain = [p for p in retain if p not in held_out]
    return {"forget": forget, "retain": train_retain, "eval_retain": held_out}


def demo_config(
    method: str,
    model_path: Path,
    prompts: dict[str, list[str]],
    *,
    steps: int,
    lr: float = LR,
    quick: bool = False,
):
    """The run config of one method: base.py's preset, sized for a 2-core CPU."""
    from unlearn_jax.unlearn.config_file import load_config_file

    config = load_config_file(f"{base_config_path()}:method={method}")
    config.model.path = str(model_path)
    config.forget.prompts = prompts["forget"]
    config.forget.anchor = ANCHOR
    config.forget.concept = CONCEPT
    config.retain.prompts = prompts["retain"]
    config.forget.images_per_prompt = 2
    config.retain.images_per_prompt = 1
    config.train.steps = steps
    config.train.batch_size = 8
    config.train.log_every = 10
    config.train.progress = False
    config.train.tensorboard = False  # the report is the demo's output; spares TF's import
    config.optim.lr = lr  # one learning rate and step budget for every method
    config.checkpoint.every = steps
    config.sample.steps = 20
    config.sample.guidance = 4.0
    config.sample.esd_steps = 20
    config.sample.batch_size = 48
    config.eval.prompts = prompts["eval_retain"]
    config.eval.forget_prompts = prompts["forget"]
    config.eval.seeds = 1 if quick else 2
    config.eval.steps = 20
    config.eval.guidance = 4.0
    config.eval.batch_size = 48
    register_world_classifier()
    config.eval.classifier = "world_shape"
    return config


def _pairs(workdir: Path) -> dict[str, np.ndarray]:
    """The final integrity image pairs a run's evaluation wrote."""
    final = sorted((workdir / "eval").glob("step_*/integrity/pairs.npz"))[-1]
    with np.load(final) as f:
        return {k: f[k] for k in f.files}


def _image_metrics(pairs: dict[str, np.ndarray]) -> dict[str, float]:
    from unlearn_jax.metrics.fid import fid_between_image_sets
    from unlearn_jax.metrics.world_classifier import prompt_accuracy, world_feature_fn

    prompts = [str(p) for p in pairs["prompts"]]
    per_prompt = len(pairs["unlearned"]) // len(prompts)
    image_prompts = [p for p in prompts for _ in range(per_prompt)]
    features = world_feature_fn()
    return {
        "fid": float(
            fid_between_image_sets(pairs["original"], pairs["unlearned"], features, batch_size=64)
        ),
        "retain_accuracy": prompt_accuracy(pairs["unlearned"], image_prompts)["accuracy"],
        "retain_accuracy_original": prompt_accuracy(pairs["original"], image_prompts)["accuracy"],
    }


def run_demo(
    workdir: str | Path,
    *,
    methods=METHODS,
    steps: int = STEPS,
    lr: float = LR,
    quick: bool = False,
) -> dict[str, Any]:
    """Runs every method, evaluates, and writes the report files into `workdir`."""
    from unlearn_jax.embedded import embedded_model_path
    from unlearn_jax.unlearn.train import train_and_evaluate

    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    model_path = embedded_model_path()
    prompts = split_prompts()
    shared_cache = workdir / "cache"
    shared_cache.mkdir(exist_ok=True)
    report: dict[str, Any] = {
        "concept": CONCEPT,
        "model": str(model_path),
        "steps": steps,
        "lr": lr,
        "prompts": {k: len(v) for k, v in prompts.items()},
        "original": {},
        "methods": {},
    }
    for method in methods:
        run_dir = workdir / method
        run_dir.mkdir(exist_ok=True)
        # θ0's generations are the same for every method: one cache, keyed by content hash.
        cache = run_dir / "cache"
        if not cache.exists():
            cache.symlink_to(shared_cache, target_is_directory=True)
        started = time.time()
        result = train_and_evaluate(
            demo_config(method, model_path, prompts, steps=steps, lr=lr, quick=quick), run_dir
        )
        metrics = {
            k: result[k]
            for k in (
                "forget_rate",
                "integrity_lpips",
                "integrity_lpips_ci95_low",
                "integrity_lpips_ci95_high",
                "psnr",
                "ssim",
            )
            if k in result
        }
        image_metrics = _image_metrics(_pairs(run_dir))
        report["original"] = {
            "forget_rate": result["forget_rate_original"],
            "retain_accuracy": image_metrics.pop("retain_accuracy_original"),
            "integrity_lpips": 0.0,
            "fid": 0.0,
        }
        metrics.update(image_metrics)
        metrics["seconds"] = round(time.time() - started, 1)
        report["methods"][method] = metrics
        log.info("%s: %s", method, metrics)
    write_report(report, workdir)
    write_grids(workdir, methods, prompts)
    return report


def write_grids(workdir: Path, methods, prompts: dict[str, list[str]], count: int = 6) -> None:
    """Original vs each method from the same noise: forget prompts and held-out retain prompts."""
    from flax import nnx

    from unlearn_jax.diffusion.text_to_image import generate
    from unlearn_jax.embedded import embedded_model_path
    from unlearn_jax.metrics.visualize import save_grid
    from unlearn_jax.models.pipeline import load_pipeline
    from unlearn_jax.unlearn.train import export

    pipes = {}
    for method in methods:
        out = workdir / method / "model"
        if not (out / "model_index.json").is_file():
            export(workdir / method, out)
        pipes[method] = load_pipeline(out)
    original = load_pipeline(embedded_model_path())
    for name, chosen in (
        ("forget", prompts["forget"][::4][:count]),
        ("retain", prompts["eval_retain"][::3][:count]),
    ):
        kwargs = dict(steps=20, guidance=4.0, seed=123, batch_size=count, progress=False)
        columns = [generate(original, chosen, **kwargs)]
        for method in methods:
            columns.append(
                generate(original, chosen, unet_params=nnx.state(pipes[method].unet), **kwargs)
            )
        rows = [[column[i] for column in columns] for i in range(len(chosen))]
        save_grid(
            rows,
            workdir / f"grid_{name}.png",
            row_labels=chosen,
            col_labels=["original", *methods],
            min_cell=64,
        )


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def conclusions(report: dict[str, Any]) -> list[str]:
    """What the numbers say, computed from them (never hard-coded)."""
    original_rate = report["original"]["forget_rate"]
    methods = report["methods"]
    lines = [
        f"The original model draws a {report['concept']} for {original_rate:.0%} of forget prompts."
    ]
    forgot = {m: v for m, v in methods.items() if v["forget_rate"] <= original_rate / 2}
    if not forgot:
        lines.append("No method halved the forget rate at these settings; raise `--steps`.")
        return lines
    lines.append(
        "Methods that at least halved it: "
        + ", ".join(f"{m} ({v['forget_rate']:.0%})" for m, v in forgot.items())
        + "."
    )
    preserving = {m: v for m, v in forgot.items() if m in INTEGRITY_PRESERVING}
    baselines = {m: v for m, v in forgot.items() if m not in INTEGRITY_PRESERVING}
    if preserving and baselines:
        best_p = min(preserving, key=lambda m: preserving[m]["integrity_lpips"])
        best_b = min(baselines, key=lambda m: baselines[m]["integrity_lpips"])
        ip, ib = preserving[best_p]["integrity_lpips"], baselines[best_b]["integrity_lpips"]
        verdict = "keeps integrity better" if ip < ib else "does NOT keep integrity better"
        lines.append(
            f"Among them, the best integrity-preserving method ({best_p}: forget rate "
            f"{preserving[best_p]['forget_rate']:.0%}, LPIPS {ip:.3f}) {verdict} than the best "
            f"baseline ({best_b}: forget rate {baselines[best_b]['forget_rate']:.0%}, LPIPS "
            f"{ib:.3f})."
        )
    else:
        lines.append(
            "Only one family halved the forget rate, so there is no comparison at equal forgetting."
        )
    intact = {m: v for m, v in methods.items() if v["retain_accuracy"] >= 0.9}
    if intact:
        low = min(v["integrity_lpips"] for v in intact.values())
        high = max(v["integrity_lpips"] for v in intact.values())
        lines.append(
            f"The text-image score (retain accuracy ≥ 90%) calls {', '.join(intact)} intact; "
            f"integrity still measures LPIPS {low:.3f}–{high:.3f} on the same retain prompts, "
            "i.e. changed images that a prompt-agreement score cannot see."
        )
    by_integrity = sorted(methods, key=lambda m: methods[m]["integrity_lpips"])
    by_fid = sorted(methods, key=lambda m: methods[m]["fid"])
    by_acc = sorted(methods, key=lambda m: -methods[m]["retain_accuracy"])
    worst = by_integrity[-1]
    lines.append(
        f"Integrity ranks {worst} as the most damaging (LPIPS "
        f"{methods[worst]['integrity_lpips']:.3f}); FID ranks {by_fid[-1]} worst and retain "
        f"accuracy ranks {by_acc[-1]} worst. Retain accuracy stays within "
        f"{min(v['retain_accuracy'] for v in methods.values()):.0%}–"
        f"{max(v['retain_accuracy'] for v in methods.values()):.0%} (original "
        f"{report['original']['retain_accuracy']:.0%}): "
        + (
            "it barely notices what integrity measures."
            if max(v["retain_accuracy"] for v in methods.values())
            - min(v["retain_accuracy"] for v in methods.values())
            < 0.1
            else "it does see part of the damage."
        )
    )
    return lines


def write_report(report: dict[str, Any], workdir: Path) -> None:
    """report.json, report.md and the forget-vs-integrity plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report["conclusions"] = conclusions(report)
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    header = (
        "| method | forget rate ↓ | integrity LPIPS ↓ (95% CI) | FID ↓ | retain accuracy ↑ "
        "| PSNR | SSIM | time (s) |\n|---|---|---|---|---|---|---|---|\n"
    )
    o = report["original"]
    rows = [
        f"| original | {_fmt(o['forget_rate'], 2)} | 0 | 0 | "
        f"{_fmt(o['retain_accuracy'], 2)} | ∞ | 1 | |"
    ]
    for m, v in report["methods"].items():
        low, high = v.get("integrity_lpips_ci95_low"), v.get("integrity_lpips_ci95_high")
        ci = f"({_fmt(low)}–{_fmt(high)})"
        rows.append(
            f"| {m} | {_fmt(v['forget_rate'], 2)} | {_fmt(v['integrity_lpips'])} {ci} | "
            f"{_fmt(v['fid'], 2)} | {_fmt(v['retain_accuracy'], 2)} | "
            f"{_fmt(v.get('psnr'), 1)} | {_fmt(v.get('ssim'))} | {v['seconds']} |"
        )
    md = [
        f'# unlearn-jax demo: forgetting "{report["concept"]}"',
        "",
        f"{report['steps']} steps per method on the embedded world model; "
        f"{report['prompts']['forget']} forget prompts, {report['prompts']['retain']} "
        f"training retain prompts, {report['prompts']['eval_retain']} held-out retain "
        "prompts for integrity/FID/accuracy.",
        "",
        header + "\n".join(rows),
        "",
        *[f"- {line}" for line in report["conclusions"]],
        "",
        "![forget vs integrity](forget_vs_integrity.png)",
        "",
        "Forget prompts, original vs each method (same noise): ![](grid_forget.png)",
        "",
        "Held-out retain prompts: ![](grid_retain.png)",
        "",
    ]
    (workdir / "report.md").write_text("\n".join(md))

    fig, ax = plt.subplots(figsize=(5.5, 4))
    placed: list[tuple[float, float]] = []
    for m, v in report["methods"].items():
        colour = "tab:green" if m in INTEGRITY_PRESERVING else "tab:red"
        point = (v["integrity_lpips"], v["forget_rate"])
        ax.scatter(*point, color=colour)
        # Labels of (nearly) coinciding points are stacked instead of overprinted.
        near = sum(abs(point[0] - x) < 0.03 and abs(point[1] - y) < 0.05 for x, y in placed)
        placed.append(point)
        ax.annotate(m, point, fontsize=8, xytext=(4, 3 - 10 * near), textcoords="offset points")
    ax.scatter(0, o["forget_rate"], color="black", marker="*", s=80)
    ax.annotate(
        "original", (0, o["forget_rate"]), fontsize=8, xytext=(3, -10), textcoords="offset points"
    )
    ax.set_xlabel("integrity LPIPS on held-out retain prompts (lower = less damage)")
    ax.set_ylabel(f"forget rate: share of '{report['concept']}' drawn")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title("forgetting vs integrity (green: integrity-preserving)")
    fig.tight_layout()
    fig.savefig(workdir / "forget_vs_integrity.png", dpi=120)
    plt.close(fig)


def add_demo_command(sub) -> None:
    """Registers `unlearn-jax demo [--workdir DIR] [--steps N] [--methods a,b]`."""
    p = sub.add_parser("demo", help="the embedded-default experiment: forget 'circle', offline")
    p.add_argument("--workdir", type=Path, default=Path("unlearn_jax_demo"))
    p.add_argument("--steps", type=int, default=STEPS, help="unlearning steps per method")
    p.add_argument("--lr", type=float, default=LR, help="learning rate of every method")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated presets")

    def run(args) -> None:
        methods = tuple(m for m in args.methods.split(",") if m)
        run_demo(args.workdir, methods=methods, steps=args.steps, lr=args.lr)
        print((args.workdir / "report.md").read_text())

    p.set_defaults(func=run)
