"""`unlearn-jax demo`: protocol, the report's analysis follows its numbers, end to end (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unlearn_jax.metrics import pareto
from unlearn_jax.world import demo
from unlearn_jax.world.demo import findings
from unlearn_jax.world.demo import report as report_lib


def _method(family: str, curve: list[tuple], head: int = 0, ci: float = 0.01) -> dict:
    """A method entry; curve: (forget_rate, integrity_lpips, fid, retain_accuracy) per point."""
    points = [
        {
            "lr": 1e-3,
            "step": 10 * (i + 1),
            "seed": 0,
            "forget_rate": f,
            "integrity_lpips": i_,
            "fid": fid,
            "retain_accuracy": acc,
        }
        for i, (f, i_, fid, acc) in enumerate(curve)
    ]
    h = points[head]
    seeds = [
        {"seed": s, "forget_rate": h["forget_rate"], "integrity_lpips": h["integrity_lpips"]}
        for s in (0, 1)
    ]
    return {
        "family": family,
        **{k: h[k] for k in ("lr", "step", "forget_rate", "integrity_lpips", "fid")},
        "retain_accuracy": h["retain_accuracy"],
        "integrity_lpips_ci95_low": h["integrity_lpips"] - ci,
        "integrity_lpips_ci95_high": h["integrity_lpips"] + ci,
        "seeds": seeds,
        "seed_spread": {
            "forget_rate": [h["forget_rate"], h["forget_rate"] + 0.05],
            "integrity_lpips": [h["integrity_lpips"], h["integrity_lpips"] + 0.01],
        },
        "curve": points,
    }


def _report(**methods) -> dict:
    report = {
        "concept": "circle",
        "original": {"forget_rate": 1.0, "retain_accuracy": 1.0},
        "methods": methods,
    }
    report["analysis"] = {
        "equal_forgetting": findings.equal_forgetting(report),
        "front_dominance": findings.front_dominance(report),
        "metric_agreement": findings.metric_agreement(report),
    }
    return report


PRESERVING, BASELINE = "integrity-preserving", "baseline"


def test_equal_forgetting_compares_each_familys_best_point_per_level():
    report = _report(
        distill=_method(PRESERVING, [(0.5, 0.02, 5, 1.0), (0.04, 0.05, 9, 1.0)], head=1),
        salun=_method(BASELINE, [(0.2, 0.20, 50, 0.9), (0.08, 0.30, 80, 0.8)], head=1),
        neggrad=_method(BASELINE, [(0.0, 0.70, 600, 0.1)]),
    )
    rows = {r["max_forget_rate"]: r for r in report["analysis"]["equal_forgetting"]}
    assert rows[0.05]["integrity_preserving"]["integrity_lpips"] == 0.05
    assert rows[0.05]["baseline"]["method"] == "neggrad"  # the only baseline that low
    assert rows[0.1]["baseline"]["method"] == "salun"  # 0.30 beats neggrad's 0.70
    assert rows[0.1]["ratio"] == pytest.approx(0.30 / 0.05)
    assert rows[0.5]["integrity_preserving"]["integrity_lpips"] == 0.02
    lines = findings.conclusions(report)
    assert any("6.0x the damage for the baseline" in line for line in lines)
    verdict = next(line for line in lines if "at equal forgetting" in line)
    assert verdict.startswith("Integrity-preserving methods dominate the baselines")
    assert "(4 of 4 levels won)" in verdict
    # distill's two points dominate salun's front point (0.2, 0.20) and (0.08, 0.30).
    assert report["analysis"]["front_dominance"]["baseline_front_beaten_by_preserving"] == [2, 3]


def test_conclusions_say_so_when_the_baselines_win():
    report = _report(
        distill=_method(PRESERVING, [(0.05, 0.40, 90, 0.9)]),
        esd_x=_method(BASELINE, [(0.05, 0.10, 10, 1.0)]),
    )
    lines = findings.conclusions(report)
    assert any("the baseline damages less" in line for line in lines)
    verdict = next(line for line in lines if "at equal forgetting" in line)
    assert "do NOT dominate" in verdict and "(0 of 4 levels won)" in verdict


def test_only_one_family_forgets_and_nobody_forgets():
    one = _report(
        distill=_method(PRESERVING, [(0.0, 0.05, 5, 1.0)]),
        esd_x=_method(BASELINE, [(0.8, 0.10, 10, 1.0)]),
    )
    assert any(
        "Only the integrity-preserving family reaches forget rate <= 0.1" in line
        for line in findings.conclusions(one)
    )
    none = _report(distill=_method(PRESERVING, [(0.9, 0.05, 5, 1.0)]))
    assert "No method reaches forget rate <= 0.1 in this protocol." in findings.conclusions(none)


def test_metric_agreement_counts_pairs_integrity_separates():
    report = _report(
        a=_method(PRESERVING, [(0.0, 0.05, 10, 1.00)]),
        b=_method(BASELINE, [(0.0, 0.30, 50, 0.99)]),  # separated from a; FID agrees
        c=_method(BASELINE, [(0.0, 0.055, 5, 0.80)]),  # CI overlaps a's
    )
    agree = report["analysis"]["metric_agreement"]
    assert agree["pairs"] == 3
    # a-b and b-c are separated (disjoint intervals), a-c is not.
    assert agree["separated_by_integrity"] == 2
    assert agree["fid_same_order"] == 2  # b has the highest FID
    # Only b-c: c is the less damaged one by integrity yet has the lower accuracy.
    assert agree["retain_accuracy_separates"] == 0
    line = next(line for line in findings.conclusions(report) if "separates 2 of 3" in line)
    assert "retain accuracy separates 0 of them" in line and "misses most" in line


def test_protocols_and_command_line_overrides():
    for protocol in (demo.DEFAULT, demo.FULL):
        assert set(protocol.methods) <= set(protocol.lrs)  # --methods may name others
        assert all(len(protocol.lrs[m]) >= 2 for m in protocol.methods)
        assert protocol.steps // protocol.eval_every >= 3  # every run: a curve of >= 3 points
        assert set(demo.INTEGRITY_PRESERVING) & set(protocol.methods)
    assert len(demo.FULL.seeds) >= 3  # the complete protocol re-trains every headline point
    small = demo.DEFAULT.with_overrides(methods=("neggrad",), lrs=(1e-3,), steps=2, seeds=1)
    assert small.lrs == {"neggrad": (1e-3,)} and small.eval_every == 2 and small.seeds == (0,)
    with pytest.raises(ValueError, match="unknown unlearning method 'nope'"):
        demo.DEFAULT.with_overrides(methods=("nope",))
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        demo.DEFAULT.with_overrides(steps=0)


def test_demo_config_pairs_each_forget_prompt_with_its_anchor():
    prompts = demo.split_prompts("circle")
    config = demo.demo_config("distill", Path("/models/tiny"), prompts, steps=4, lr=1e-3)
    assert config.forget.concept == "circle" and config.forget.anchor_concept == "square"
    assert config.forget.anchor == ""  # no shared anchor
    assert config.eval.classifier == "world_shape" and config.eval.retain_metrics == "world"
    assert config.model.path == "/models/tiny" and config.optim.lr == 1e-3


def test_demo_runs_are_the_config_file_a_user_can_run():
    """`unlearn-jax unlearn --config configs/demo.py:...` is exactly a run of the demo."""
    from unlearn_jax.trainer.config_file import load_config
    from unlearn_jax.world.embedded import embedded_model_path

    path = demo.protocol.demo_config_path()
    assert path.resolve() == (Path(__file__).resolve().parents[1] / "configs" / "demo.py")
    from_file = load_config(f"{path}:method=esd_x,lr=3e-3,steps=80,seed=1,eval_every=40")
    from_demo = demo.demo_config(
        "esd_x",
        embedded_model_path(),
        demo.split_prompts("circle"),
        steps=80,
        lr=3e-3,
        seed=1,
        eval_every=40,
    )
    assert from_file.to_dict() == from_demo.to_dict()
    assert from_file.unlearn.method == "esd_x" and from_file.checkpoint.every == 40


def test_demo_prompt_split_holds_out_retain_prompts():
    prompts = demo.split_prompts("circle")
    assert all("circle" in p for p in prompts["forget"])
    assert not set(prompts["eval_retain"]) & set(prompts["retain"])
    assert not any("circle" in p for p in prompts["retain"] + prompts["eval_retain"])
    assert len(prompts["forget"]) + len(prompts["retain"]) + len(prompts["eval_retain"]) == 96


@pytest.mark.slow
def test_demo_command_writes_the_report(tmp_path, capsys):
    from unlearn_jax import cli

    workdir = tmp_path / "demo"
    argv = ["demo", "--workdir", str(workdir), "--steps", "2", "--methods", "neggrad,distill"]
    argv += ["--lr", "1e-4,1e-3", "--seeds", "2"]
    cli.main(argv)
    out = capsys.readouterr().out
    assert "[1/2] neggrad" in out and "[2/2] distill done" in out  # a progress line per method
    report = json.loads((workdir / "report.json").read_text())
    assert report["original"]["forget_rate"] >= 0.5  # the shipped model draws circles
    assert set(report["methods"]) == {"neggrad", "distill"}
    for metrics in report["methods"].values():
        assert {"forget_rate", "integrity_lpips", "fid", "retain_accuracy"} <= set(metrics)
        assert metrics["integrity_lpips"] > 0  # two steps changed the model
        assert {(p["lr"], p["step"]) for p in metrics["curve"]} == {(1e-4, 2), (1e-3, 2)}
        assert [s["seed"] for s in metrics["seeds"]] == [0, 1]
        assert metrics["seeds"][0]["integrity_lpips"] == metrics["integrity_lpips"]
        head = pareto.headline_point(metrics["curve"])
        assert (metrics["lr"], metrics["step"]) == (head["lr"], head["step"])
    assert report["methods"]["distill"]["family"] == "integrity-preserving"
    for name in (
        "report.md",
        "grid_forget.png",
        "grid_retain.png",
        "forget_vs_integrity.png",
        "forget_vs_fid_accuracy.png",
    ):
        assert (workdir / name).is_file(), name
    assert "| neggrad | baseline |" in out  # the table is printed
    # A rerun reuses the finished runs and writes the same numbers.
    cli.main(argv)
    again = json.loads((workdir / "report.json").read_text())
    for entry in (*report["methods"].values(), *again["methods"].values()):
        entry.pop("seconds")  # wall time is the only thing a rerun may change
    assert again["methods"] == report["methods"]


def test_report_says_which_methods_forgot_and_which_hid():
    report = _report(
        distill=_method(PRESERVING, [(0.0, 0.05, 5, 1.0)]),
        esd_x=_method(BASELINE, [(0.1, 0.20, 10, 1.0)]),
    )
    report["protocol"] = {"attack": {"steps": 30, "tokens": 1}}
    report["original"].update(forget_rate_attacked=1.0, template_rate=1.0)
    for entry in report["methods"].values():
        entry["seconds"] = 1.0
    report["methods"]["distill"].update(forget_rate_attacked=0.1, template_rate=0.0)
    report["methods"]["esd_x"].update(forget_rate_attacked=0.8, template_rate=0.9)
    lines = findings.forgotten_or_hidden(report)
    assert "the original draws a circle for 100% of forget prompts" in lines[0]
    assert lines[1].startswith("distill forgot the circle: forget rate 0.00 -> 0.10")
    assert lines[2].startswith("esd_x hid the circle: forget rate 0.10 -> 0.80 under attack (+0.70")
    assert "recovers 80% of what it recovers from the original" in lines[2]
    report["protocol"] = {
        "name": "x",
        "lrs": {},
        "steps": 1,
        "eval_every": 1,
        "seeds": [0],
        "eval_seeds": 1,
        "attack": {"steps": 30, "tokens": 1, "lr": 0.02, "batch_size": 8},
    }
    assert "under attack ↓" in report_lib.markdown(
        {
            **report,
            "conclusions": lines,
            "prompts": {"forget": 1, "retain": 1, "eval_retain": 1},
            "anchor_concept": "square",
            "headline_rule": "r",
        }
    )
