"""The demo's report: report.md, report.json, plots and image grids.

`write_report` adds the analysis and conclusions of `findings` to the report and
renders them; the words in report.md are the findings', computed from the numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unlearn_jax import atomic_files
from unlearn_jax.metrics import pareto
from unlearn_jax.world.demo.findings import (
    PRESERVING,
    conclusions,
    equal_forgetting,
    front_dominance,
    metric_agreement,
    where,
)


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _range(values: list[float], digits: int) -> str:
    return f"{values[0]:.{digits}f}–{values[1]:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """report.md: protocol, headline table, equal-forgetting table, conclusions, figures."""
    protocol, o = report["protocol"], report["original"]
    header = (
        "| method | family | lr | step | forget rate ↓ | under attack ↓ | integrity LPIPS ↓ "
        "(95% CI) | FID ↓ | retain accuracy ↑ | PSNR | SSIM | seeds: forget rate | seeds: LPIPS "
        "| points | time (s) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = [
        f"| original | | | | {_fmt(o['forget_rate'], 2)} | "
        f"{_fmt(o.get('forget_rate_attacked'), 2)} | 0 | 0 | "
        f"{_fmt(o['retain_accuracy'], 2)} | ∞ | 1 | | | | |"
    ]
    for m, v in report["methods"].items():
        ci = f"({_fmt(v['integrity_lpips_ci95_low'])}–{_fmt(v['integrity_lpips_ci95_high'])})"
        s = v["seed_spread"]
        rows.append(
            f"| {m} | {v['family']} | {v['lr']:g} | {v['step']} | {_fmt(v['forget_rate'], 2)} | "
            f"{_fmt(v.get('forget_rate_attacked'), 2)} | {_fmt(v['integrity_lpips'])} {ci} | "
            f"{_fmt(v['fid'], 2)} | "
            f"{_fmt(v['retain_accuracy'], 2)} | {_fmt(v.get('psnr'), 1)} | "
            f"{_fmt(v.get('ssim'))} | {_range(s['forget_rate'], 2)} | "
            f"{_range(s['integrity_lpips'], 3)} | {len(v['curve'])} | {v['seconds']} |"
        )
    eq = ["| forget rate ≤ | best integrity-preserving | LPIPS | best baseline | LPIPS | ratio |"]
    eq.append("|---|---|---|---|---|---|")
    for r in report["analysis"]["equal_forgetting"]:
        p, b = r["integrity_preserving"], r["baseline"]
        eq.append(
            f"| {r['max_forget_rate']:g} | {where(p) if p else 'none'} | "
            f"{_fmt(p['integrity_lpips']) if p else '—'} | {where(b) if b else 'none'} | "
            f"{_fmt(b['integrity_lpips']) if b else '—'} | "
            f"{_fmt(r['ratio'], 1) + 'x' if r['ratio'] else '—'} |"
        )
    lrs = "; ".join(f"{m}: {', '.join(f'{lr:g}' for lr in v)}" for m, v in protocol["lrs"].items())
    md = [
        f'# unlearn-jax demo: forgetting "{report["concept"]}"',
        "",
        f"Protocol `{protocol['name']}`: every method on its learning-rate grid ({lrs}), "
        f"Adam, {protocol['steps']} steps per run, evaluated every {protocol['eval_every']} "
        f"steps; training seeds {', '.join(map(str, protocol['seeds']))}; "
        f"{protocol['eval_seeds']} image(s) per evaluation prompt. The remapping methods map "
        f'each forget prompt onto the same prompt with "{report["concept"]}" replaced by '
        f'"{report["anchor_concept"]}". {report["prompts"]["forget"]} forget prompts, '
        f"{report['prompts']['retain']} training retain prompts, "
        f"{report['prompts']['eval_retain']} held-out retain prompts for integrity, FID and "
        f"retain accuracy"
        + (
            f" (intermediate points on every {protocol['periodic_prompt_stride']}-th of them, "
            "final and headline points on all)"
            if protocol.get("periodic_prompt_stride", 1) > 1
            else ""
        )
        + f". Wall time {report.get('seconds', 0):.0f} s.",
        "",
        f"Headline point of each method: {report['headline_rule']}. The seed columns give "
        "the range of that (lr, step) over the training seeds." + _attack_text(report),
        "",
        header + "\n".join(rows),
        "",
        "Best integrity at equal forgetting (over every evaluated point of each family):",
        "",
        "\n".join(eq),
        "",
        *[f"- {line}" for line in report["conclusions"]],
        "",
        "![forget vs integrity](forget_vs_integrity.png)",
        "",
        "The same points against FID and retain accuracy: ![](forget_vs_fid_accuracy.png)",
        "",
        "Forget prompts, original vs each method's headline point (same noise): "
        "![](grid_forget.png)",
        "",
        "Held-out retain prompts: ![](grid_retain.png)",
        "",
    ]
    return "\n".join(md)


def _attack_text(report: dict[str, Any]) -> str:
    attack = report["protocol"].get("attack", {})
    if not attack.get("steps"):
        return ""
    return (
        f" 'under attack': the forget rate of the same prompts and noise after textual "
        f"inversion on that point (one token v* in place of '{report['concept']}', starting at "
        f"its embedding; {attack['steps']} Adam steps at lr {attack['lr']:g}, batch "
        f"{attack['batch_size']} of the original's forget images; judged by the same world "
        "classifier). A bigger budget (`--full`, `--attack-steps`) can only recover more."
    )


def _scatter_fronts(ax, report: dict[str, Any], x_of, xlabel: str) -> None:
    colours = dict(zip(report["methods"], _colours()))
    for m, v in report["methods"].items():
        points = [{**p, "x": x_of(p)} for p in v["curve"]]
        colour = colours[m]
        style = "-" if v["family"] == PRESERVING else "--"
        ax.scatter(
            [p["x"] for p in points],
            [p["forget_rate"] for p in points],
            s=12,
            color=colour,
            alpha=0.35,
        )
        front = pareto.pareto_front(points, x="x")
        ax.step(
            [p["x"] for p in front],
            [p["forget_rate"] for p in front],
            where="post",
            color=colour,
            linestyle=style,
            label=m,
        )
        head = {**v, "x": x_of(v)}
        ax.scatter(head["x"], head["forget_rate"], s=70, color=colour, edgecolor="black", zorder=3)
        if "forget_rate_attacked" in v:  # the same point under the embedding attack
            ax.plot(
                [head["x"]] * 2,
                [head["forget_rate"], v["forget_rate_attacked"]],
                color=colour,
                linestyle=":",
                zorder=2,
            )
            ax.scatter(
                head["x"],
                v["forget_rate_attacked"],
                s=60,
                marker="^",
                facecolors="none",
                edgecolors=colour,
                zorder=3,
            )
    o = report["original"]
    ax.scatter(0, o["forget_rate"], color="black", marker="*", s=90, zorder=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"forget rate: share of '{report['concept']}' drawn")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)


def _colours() -> list:
    import matplotlib

    return list(matplotlib.colormaps["tab10"].colors)


def write_plots(report: dict[str, Any], workdir: Path) -> None:
    """forget_vs_integrity.png (the fronts) and forget_vs_fid_accuracy.png (other metrics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    _scatter_fronts(
        ax,
        report,
        lambda p: p["integrity_lpips"],
        "integrity LPIPS on held-out retain prompts (lower = less damage)",
    )
    ax.set_title(
        "Pareto fronts (solid: integrity-preserving, dashed: baselines)\n"
        "big markers: headline points (triangles: under attack); star: original",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    with atomic_files.atomic_path(workdir / "forget_vs_integrity.png") as path:
        fig.savefig(path, dpi=120, format="png")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    _scatter_fronts(axes[0], report, lambda p: p["fid"], "FID to the original's retain images")
    _scatter_fronts(
        axes[1],
        report,
        lambda p: 1.0 - p["retain_accuracy"],
        "1 - retain accuracy (prompted shape and colour missed)",
    )
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle("the same points, judged by FID and by prompt agreement", fontsize=10)
    fig.tight_layout()
    with atomic_files.atomic_path(workdir / "forget_vs_fid_accuracy.png") as path:
        fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def write_report(report: dict[str, Any], workdir: Path) -> None:
    """Adds the analysis and conclusions to `report`; writes report.json, report.md, plots."""
    report["analysis"] = {
        "equal_forgetting": equal_forgetting(report),
        "front_dominance": front_dominance(report),
        "metric_agreement": metric_agreement(report),
    }
    report["conclusions"] = conclusions(report)
    atomic_files.write_json(workdir / "report.json", report, indent=2)
    atomic_files.write_text(workdir / "report.md", markdown(report))
    write_plots(report, workdir)


def write_grids(report: dict[str, Any], workdir: Path, prompts, count: int = 6) -> None:
    """Original vs each method's headline point from the same noise: forget and retain prompts."""
    import ml_collections
    from flax import nnx

    from unlearn_jax.diffusion.text_to_image import generate
    from unlearn_jax.metrics.visualize import save_grid
    from unlearn_jax.models.pipeline import load_pipeline
    from unlearn_jax.trainer import experiment
    from unlearn_jax.trainer.checkpoints import read_run_record
    from unlearn_jax.trainer.restore import restore_latest
    from unlearn_jax.unlearn.params import ParamSplit
    from unlearn_jax.unlearn.registry import get_preset

    original = load_pipeline(report["model"])
    theta0 = nnx.state(original.unet).to_pure_dict()
    unets = {}
    for method, entry in report["methods"].items():
        run_dir = workdir / entry["run"]
        config = ml_collections.ConfigDict(read_run_record(run_dir)["config"])
        preset = get_preset(config.unlearn.method)
        split = ParamSplit.from_params(theta0, config.unlearn.get("params") or preset.params)
        model = experiment.Model(original, theta0, None, split)
        _, trainable = restore_latest(model, run_dir, entry["step"])
        unets[method] = split.merge(trainable, theta0)
    for name, every, stride in (
        ("forget", prompts["forget"], 4),
        ("retain", prompts["eval_retain"], 3),
    ):
        # The evaluations' sampler settings and chunk (every prompt, 10 steps, batch 24),
        # so their compiled sampler and decoder serve here too instead of new programs
        # for a 6-prompt chunk; the grid shows every stride-th prompt.
        kwargs = dict(steps=10, guidance=4.0, seed=123, batch_size=24, progress=False)
        shown = slice(None, stride * count, stride)
        chosen = every[shown]
        columns = [generate(original, every, **kwargs)[shown]]
        columns += [
            generate(original, every, unet_params=u, **kwargs)[shown] for u in unets.values()
        ]
        rows = [[column[i] for column in columns] for i in range(len(chosen))]
        save_grid(
            rows,
            workdir / f"grid_{name}.png",
            row_labels=chosen,
            col_labels=["original", *unets],
            min_cell=64,
        )
