"""Pareto fronts and the headline rule against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest

from unlearn_jax.metrics import pareto


def _points(rng: np.random.Generator, n: int) -> list[dict]:
    values = rng.uniform(0, 1, (n, 2))
    return [{"forget_rate": f, "integrity_lpips": i, "id": k} for k, (f, i) in enumerate(values)]


@pytest.mark.parametrize("seed", range(5))
def test_front_equals_brute_force_non_dominated_set(seed):
    points = _points(np.random.default_rng(seed), 40)
    brute = {
        p["id"]
        for p in points
        if not any(
            q["forget_rate"] <= p["forget_rate"]
            and q["integrity_lpips"] <= p["integrity_lpips"]
            and q is not p
            for q in points
        )
    }
    front = pareto.pareto_front(points)
    assert {p["id"] for p in front} == brute
    xs = [p["integrity_lpips"] for p in front]
    ys = [p["forget_rate"] for p in front]
    assert xs == sorted(xs) and ys == sorted(ys, reverse=True)  # a staircase


def test_front_keeps_one_of_identical_points_and_drops_weakly_dominated():
    a = {"forget_rate": 0.0, "integrity_lpips": 0.1, "id": "a"}
    b = {"forget_rate": 0.0, "integrity_lpips": 0.1, "id": "b"}
    c = {"forget_rate": 0.0, "integrity_lpips": 0.2, "id": "c"}  # same forgetting, worse
    d = {"forget_rate": 0.5, "integrity_lpips": 0.1, "id": "d"}  # same integrity, worse
    assert [p["id"] for p in pareto.pareto_front([c, d, a, b])] == ["a"]


def test_headline_rule_prefers_integrity_among_forgetting_points():
    points = [
        {"forget_rate": 0.0, "integrity_lpips": 0.30},
        {"forget_rate": 0.08, "integrity_lpips": 0.05},
        {"forget_rate": 0.10, "integrity_lpips": 0.04},  # at the threshold: eligible
        {"forget_rate": 0.11, "integrity_lpips": 0.01},  # just above: not eligible
    ]
    assert pareto.headline_point(points) is points[2]
    assert pareto.headline_point(points, max_forget_rate=0.05) is points[0]


def test_headline_rule_without_forgetting_takes_the_lowest_forget_rate():
    points = [
        {"forget_rate": 0.5, "integrity_lpips": 0.01},
        {"forget_rate": 0.3, "integrity_lpips": 0.40},
        {"forget_rate": 0.3, "integrity_lpips": 0.20},
    ]
    assert pareto.headline_point(points) is points[2]
    with pytest.raises(ValueError, match="at least one"):
        pareto.headline_point([])


def test_best_integrity_at_and_front_dominance():
    good = [
        {"forget_rate": 0.0, "integrity_lpips": 0.05},
        {"forget_rate": 0.5, "integrity_lpips": 0.01},
    ]
    bad = [
        {"forget_rate": 0.0, "integrity_lpips": 0.3},
        {"forget_rate": 0.6, "integrity_lpips": 0.001},
    ]
    assert pareto.best_integrity_at(good + bad, 0.1) is good[0]
    assert pareto.best_integrity_at(bad, -0.1) is None
    # good[0] dominates bad[0]; nothing in `good` dominates bad[1] (lower integrity).
    assert pareto.front_dominance(good, bad) == (1, 2)
    assert pareto.front_dominance(bad, good) == (0, 2)
