"""Forgetting against integrity: Pareto fronts, the headline rule, equal-forgetting comparisons.

A run of an unlearning method is a trajectory of evaluated points
{'lr', 'step', 'forget_rate', 'integrity_lpips', ...}; a method on a grid of
learning rates (and seeds) is the union of its runs' points. Both axes are
"lower is better": forget rate (share of forget-prompt generations that still
show the concept) and integrity LPIPS (how far the retain generations moved).

  pareto_front(points)           the points no other point beats on both axes
  headline_point(points, 0.1)    the lowest integrity among points with forget rate
                                 <= 0.1, or else the lowest forget rate (then the
                                 lowest integrity among those)
  best_integrity_at(points, r)   the lowest integrity among points with forget rate <= r

These are plain Python over dicts, so every report, test and plot uses the same rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Point = dict[str, Any]
FORGET, INTEGRITY = "forget_rate", "integrity_lpips"
# The headline rule's forgetting target: a method "forgets" when at most this
# share of forget-prompt generations still shows the concept.
FORGOTTEN = 0.1


def dominates(a: Point, b: Point, x: str = INTEGRITY, y: str = FORGET) -> bool:
    """Whether `a` is at least as good as `b` on both axes and strictly better on one."""
    return a[x] <= b[x] and a[y] <= b[y] and (a[x] < b[x] or a[y] < b[y])


def pareto_front(points: Sequence[Point], x: str = INTEGRITY, y: str = FORGET) -> list[Point]:
    """The non-dominated points (lower is better on `x` and `y`), sorted by `x` ascending.

    Of several points with identical (x, y) the first one is kept.
    """
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (p[x], p[y])):
        if front and front[-1][y] <= p[y]:
            continue  # an earlier point is no worse on x and no worse on y
        front.append(p)
    return front


def headline_point(points: Sequence[Point], max_forget_rate: float = FORGOTTEN) -> Point:
    """The point a method is summarised by.

    The lowest integrity LPIPS among the points that forget (forget rate <=
    `max_forget_rate`); when none does, the lowest forget rate (ties broken by
    integrity). Raises ValueError on an empty list.
    """
    if not points:
        raise ValueError("headline_point needs at least one evaluated point")
    forgetting = [p for p in points if p[FORGET] <= max_forget_rate]
    if forgetting:
        return min(forgetting, key=lambda p: (p[INTEGRITY], p[FORGET]))
    return min(points, key=lambda p: (p[FORGET], p[INTEGRITY]))


def best_integrity_at(points: Sequence[Point], max_forget_rate: float) -> Point | None:
    """The lowest-integrity point with forget rate <= `max_forget_rate`, or None if none has."""
    eligible = [p for p in points if p[FORGET] <= max_forget_rate]
    return min(eligible, key=lambda p: (p[INTEGRITY], p[FORGET])) if eligible else None


def front_dominance(candidates: Sequence[Point], others: Sequence[Point]) -> tuple[int, int]:
    """(how many of `others`' front points some candidate point dominates, front size).

    Counts over the Pareto front of `others` (its other points are dominated by
    their own front already).
    """
    front = pareto_front(others)
    beaten = sum(any(dominates(c, o) for c in candidates) for o in front)
    return beaten, len(front)
