"""The demo's findings: equal forgetting, front dominance, metric agreement, conclusions.

Everything stated in report.md is computed here from report.json's numbers (never
hard-coded), so the words change when the numbers do.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

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


def where(point: dict[str, Any]) -> str:
    """A point as the report names it, e.g. 'distill, lr 0.0002, step 40'."""
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
                f"At {level}, the best integrity-preserving point ({where(p)}) has integrity "
                f"LPIPS {p['integrity_lpips']:.3f}; the best baseline point ({where(b)}) "
                f"{b['integrity_lpips']:.3f}: "
                + (
                    f"{row['ratio']:.1f}x the damage for the baseline."
                    if row["ratio"] and row["ratio"] >= 1
                    else "the baseline damages less."
                )
            )
        elif p:
            lines.append(
                f"Only the integrity-preserving family reaches {level} (best: {where(p)}, "
                f"LPIPS {p['integrity_lpips']:.3f}); no baseline point does."
            )
        elif b:
            lines.append(
                f"Only baselines reach {level} (best: {where(b)}, LPIPS "
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
