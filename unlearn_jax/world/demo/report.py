"""The demo's findings: equal-forgetting comparisons, metric agreement, report.md, plots, grids.

Everything stated in report.md is computed here from report.json's numbers (never
hard-coded), so the words change when the numbers do.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from unlearn_jax import atomic_files
from unlearn_jax.metrics import pareto

# Forget-rate levels at which the two families are compared.
THRESHOLDS = (0.05, 0.1, 0.25, 0.5)
# A method whose forget rate under the embedding attack exceeds this only hid the
# concept behind its word; at or below it, the attack did not bring it back.
HIDDEN_ABOVE = 0.25
# Retain accuracy "separates" two methods when it differs by at least this much
# (a few images of the held-out set).
ACCURACY_MARGIN = 0.05
PRESERVING = "integrity-preserving"


def _family_points(report: dict[str, Any], family: str) -> list[dict[str, Any]]:
    return [
        {**p, "method": m}
        for m, v in report["methods"].items()
        if v["family"] == family
        for p in v["curve"]
    ]


def _best(points: list[dict[str, Any]], threshold: float) -> dict[str, Any] | None:
    best = pareto.best_integrity_at(points, threshold)
    if best is None:
        return None
    keys = ("method", "lr", "step", "forget_rate", "integrity_lpips", "retain_accuracy", "fid")
    return {k: best[k] for k in keys}


def equal_forgetting(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per forget-rate threshold: each family's lowest-integrity point that forgets that much."""
    preserving = _family_points(report, PRESERVING)
    baseline = _family_points(report, "baseline")
    rows = []
    for threshold in THRESHOLDS:
        p, b = _best(preserving, threshold), _best(baseline, threshold)
        ratio = None
        if p and b and p["integrity_lpips"] > 0:
            ratio = b["integrity_lpips"] / p["integrity_lpips"]
        rows.append(
            {"max_forget_rate": threshold, "integrity_preserving": p, "baseline": b, "ratio": ratio}
        )
    return rows


def _spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    from scipy.stats import spearmanr

    value = spearmanr(a, b).statistic
    return None if not np.isfinite(value) else float(value)


def metric_agreement(report: dict[str, Any]) -> dict[str, Any]:
    """Do FID and retain accuracy separate the methods that integrity separates?

    At the headline points, a pair of methods is separated by integrity when their
    95% intervals are disjoint; FID agrees when it orders the pair the same way;
    retain accuracy separates it when the more damaged method's accuracy is lower
    by >= ACCURACY_MARGIN. Over all curve points: Spearman correlations.
    """
    methods = report["methods"]
    separated, fid_agrees, accuracy_separates = [], 0, 0
    for a, b in itertools.combinations(methods, 2):
        va, vb = methods[a], methods[b]
        if va["integrity_lpips_ci95_high"] < vb["integrity_lpips_ci95_low"]:
            better, worse = va, vb
        elif vb["integrity_lpips_ci95_high"] < va["integrity_lpips_ci95_low"]:
            better, worse = vb, va
        else:
            continue
        separated.append((a, b))
        fid_agrees += worse["fid"] > better["fid"]
        accuracy_separates += (
            worse["retain_accuracy"] <= better["retain_accuracy"] - ACCURACY_MARGIN
        )
    points = [p for v in methods.values() for p in v["curve"]]
    lpips = [p["integrity_lpips"] for p in points]
    return {
        "pairs": len(list(itertools.combinations(methods, 2))),
        "separated_by_integrity": len(separated),
        "fid_same_order": int(fid_agrees),
        "retain_accuracy_separates": int(accuracy_separates),
        "accuracy_margin": ACCURACY_MARGIN,
        "points": len(points),
        "spearman_integrity_fid": _spearman(lpips, [p["fid"] for p in points]),
        "spearman_integrity_accuracy_loss": _spearman(
            lpips, [1.0 - p["retain_accuracy"] for p in points]
        ),
    }


def front_dominance(report: dict[str, Any]) -> dict[str, list[int]]:
    """[beaten, front size] of each family's Pareto front by the other family's points."""
    preserving = _family_points(report, PRESERVING)
    baseline = _family_points(report, "baseline")
    return {
        "baseline_front_beaten_by_preserving": list(pareto.front_dominance(preserving, baseline)),
        "preserving_front_beaten_by_baseline": list(pareto.front_dominance(baseline, preserving)),
    }


def _where(point: dict[str, Any]) -> str:
    return f"{point['method']}, lr {point['lr']:g}, step {point['step']}"


def conclusions(report: dict[str, Any]) -> list[str]:
    """What the numbers say, in sentences computed from them."""
    original = report["original"]["forget_rate"]
    lines = [
        f"The original model draws a {report['concept']} for {original:.0%} of forget prompts."
    ]
    rows = report["analysis"]["equal_forgetting"]
    both = [r for r in rows if r["integrity_preserving"] and r["baseline"]]
    for row in rows:
        if row["max_forget_rate"] != pareto.FORGOTTEN:
            continue
        p, b = row["integrity_preserving"], row["baseline"]
        level = f"forget rate <= {row['max_forget_rate']:g}"
        if p and b:
            lines.append(
                f"At {level}, the best integrity-preserving point ({_where(p)}) has integrity "
                f"LPIPS {p['integrity_lpips']:.3f}; the best baseline point ({_where(b)}) "
                f"{b['integrity_lpips']:.3f}: "
                + (
                    f"{row['ratio']:.1f}x the damage for the baseline."
                    if row["ratio"] and row["ratio"] >= 1
                    else "the baseline damages less."
                )
            )
        elif p:
            lines.append(
                f"Only the integrity-preserving family reaches {level} (best: {_where(p)}, "
                f"LPIPS {p['integrity_lpips']:.3f}); no baseline point does."
            )
        elif b:
            lines.append(
                f"Only baselines reach {level} (best: {_where(b)}, LPIPS "
                f"{b['integrity_lpips']:.3f}); no integrity-preserving point does."
            )
        else:
            lines.append(f"No method reaches {level} in this protocol.")
    if both:
        wins = [r for r in both if r["ratio"] is not None and r["ratio"] > 1]
        levels = ", ".join(f"<= {r['max_forget_rate']:g}" for r in both)
        ratios = ", ".join(f"{r['ratio']:.1f}x" if r["ratio"] else "n/a" for r in both)
        verdict = "dominate" if len(wins) == len(both) else "do NOT dominate"
        lines.append(
            f"Integrity-preserving methods {verdict} the baselines at equal forgetting: at the "
            f"forget-rate levels both families reach ({levels}) the best baseline LPIPS is "
            f"{ratios} the best integrity-preserving one ({len(wins)} of {len(both)} levels won)."
        )
    fronts = report["analysis"]["front_dominance"]
    beaten, size = fronts["baseline_front_beaten_by_preserving"]
    back, back_size = fronts["preserving_front_beaten_by_baseline"]
    lines.append(
        f"Integrity-preserving points dominate {beaten} of the {size} points on the baselines' "
        f"Pareto front; baseline points dominate {back} of the {back_size} on theirs."
    )
    agree = report["analysis"]["metric_agreement"]
    n = agree["separated_by_integrity"]
    if n:
        rho_fid, rho_acc = (
            agree["spearman_integrity_fid"],
            agree["spearman_integrity_accuracy_loss"],
        )
        fmt = lambda r: "n/a" if r is None else f"{r:.2f}"
        acc = agree["retain_accuracy_separates"]
        lines.append(
            f"At the headline points integrity separates {n} of {agree['pairs']} method pairs "
            f"(disjoint 95% intervals). FID orders {agree['fid_same_order']} of them the same "
            f"way; retain accuracy separates {acc} of them (by >= "
            f"{agree['accuracy_margin']:.0%}): "
            + (
                "the prompt-agreement score misses most of what integrity measures."
                if acc < n / 2
                else "the prompt-agreement score sees most of it."
            )
            + f" Over all {agree['points']} curve points, Spearman correlation of integrity "
            f"with FID {fmt(rho_fid)}, with retain-accuracy loss {fmt(rho_acc)}."
        )
    else:
        lines.append("At the headline points integrity separates no pair of methods.")
    lines.extend(forgotten_or_hidden(report))
    spreads = [v["seed_spread"] for v in report["methods"].values() if len(v["seeds"]) > 1]
    if spreads:
        df = max(s["forget_rate"][1] - s["forget_rate"][0] for s in spreads)
        di = max(s["integrity_lpips"][1] - s["integrity_lpips"][0] for s in spreads)
        seeds = len(next(iter(report["methods"].values()))["seeds"])
        lines.append(
            f"Over {seeds} training seeds, the headline points' forget rates differ by at most "
            f"{df:.2f} and their integrity LPIPS by at most {di:.3f}."
        )
    return lines


def forgotten_or_hidden(report: dict[str, Any]) -> list[str]:
    """Per method: forgot or hid the concept, by the forget rate under the embedding attack."""
    original = report["original"]
    if "forget_rate_attacked" not in original:
        return []
    attack = report["protocol"].get("attack", {})
    lines = [
        f"Under the embedding attack ({attack.get('steps')} steps of textual inversion, "
        f"{attack.get('tokens')} token starting at the word '{report['concept']}'), the "
        f"original draws a {report['concept']} for {original['forget_rate_attacked']:.0%} of "
        f'forget prompts ("a <v*>" alone: {original["template_rate"]:.0%}).'
    ]
    for m, v in report["methods"].items():
        if "forget_rate_attacked" not in v:
            continue
        before, after = v["forget_rate"], v["forget_rate_attacked"]
        verdict = "hid" if after > HIDDEN_ABOVE else "forgot"
        lines.append(
            f"{m} {verdict} the {report['concept']}: forget rate {before:.2f} -> {after:.2f} "
            f'under attack ({after - before:+.2f}; "a <v*>" alone {v["template_rate"]:.2f})'
            + (
                f", the attack recovers {after / original['forget_rate_attacked']:.0%} of "
                "what it recovers from the original."
                if verdict == "hid" and original["forget_rate_attacked"] > 0
                else f", at most {HIDDEN_ABOVE:.0%} under this attack budget."
            )
        )
    return lines


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
            f"| {r['max_forget_rate']:g} | {_where(p) if p else 'none'} | "
            f"{_fmt(p['integrity_lpips']) if p else '—'} | {_where(b) if b else 'none'} | "
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
