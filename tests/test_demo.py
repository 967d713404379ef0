"""`unlearn-jax demo`: the report's conclusions follow its numbers; the command runs end to end."""

from __future__ import annotations

import json

import pytest

from unlearn_jax import demo


def _report(**methods) -> dict:
    """A report with the given methods: name -> (forget_rate, integrity, fid, retain_accuracy)."""
    return {
        "concept": "circle",
        "steps": 60,
        "prompts": {"forget": 24, "retain": 54, "eval_retain": 18},
        "original": {
            "forget_rate": 1.0,
            "retain_accuracy": 1.0,
            "integrity_lpips": 0.0,
            "fid": 0.0,
        },
        "methods": {
            name: {
                "forget_rate": rate,
                "integrity_lpips": lpips,
                "fid": fid,
                "retain_accuracy": accuracy,
                "seconds": 1.0,
            }
            for name, (rate, lpips, fid, accuracy) in methods.items()
        },
    }


def test_conclusions_compare_families_at_equal_forgetting():
    better = demo.conclusions(_report(neggrad=(0.2, 0.6, 40.0, 0.5), distill=(0.3, 0.1, 2.0, 0.95)))
    assert "neggrad (20%), distill (30%)" in better[1]
    assert (
        "(distill: forget rate 30%, LPIPS 0.100) keeps integrity better than the best "
        "baseline (neggrad: forget rate 20%, LPIPS 0.600)" in better[2]
    )
    # Only distill keeps retain accuracy >= 90%, yet integrity sees its change.
    assert better[3].startswith("The text-image score (retain accuracy ≥ 90%) calls distill intact")
    assert "LPIPS 0.100–0.100" in better[3]
    assert "it does see part of the damage" in better[-1]  # accuracy spread 45 points

    worse = demo.conclusions(_report(neggrad=(0.2, 0.1, 40.0, 0.9), distill=(0.3, 0.6, 2.0, 0.95)))
    assert "does NOT keep integrity better" in worse[2]
    assert "calls neggrad, distill intact; integrity still measures LPIPS 0.100–0.600" in worse[3]
    assert "it barely notices what integrity measures" in worse[-1]


def test_conclusions_when_nothing_forgets_or_one_family_does():
    none = demo.conclusions(_report(distill=(0.9, 0.1, 1.0, 1.0)))
    assert none[-1].startswith("No method halved the forget rate")
    one_family = demo.conclusions(
        _report(neggrad=(0.2, 0.6, 40.0, 0.5), distill=(0.9, 0.1, 2.0, 0.95))
    )
    assert "no comparison at equal forgetting" in one_family[2]


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
    cli.main(["demo", "--workdir", str(workdir), "--steps", "2", "--methods", "neggrad,distill"])
    report = json.loads((workdir / "report.json").read_text())
    assert report["original"]["forget_rate"] >= 0.5  # the shipped model draws circles
    assert set(report["methods"]) == {"neggrad", "distill"}
    for metrics in report["methods"].values():
        assert {"forget_rate", "integrity_lpips", "fid", "retain_accuracy"} <= set(metrics)
        assert metrics["integrity_lpips"] > 0  # two steps changed the model
    for name in ("report.md", "grid_forget.png", "grid_retain.png", "forget_vs_integrity.png"):
        assert (workdir / name).is_file(), name
    assert "| neggrad |" in capsys.readouterr().out  # the table is printed
    # A rerun reuses the finished runs and writes the same numbers.
    cli.main(["demo", "--workdir", str(workdir), "--steps", "2", "--methods", "neggrad,distill"])
    again = json.loads((workdir / "report.json").read_text())
    assert (
        again["methods"]["distill"]["integrity_lpips"]
        == (report["methods"]["distill"]["integrity_lpips"])
    )
