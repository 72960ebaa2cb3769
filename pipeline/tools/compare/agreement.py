"""How far models agree on a label: the share of rows where they give the same value, chance-
corrected by Cohen's kappa (two jobs) or Fleiss' kappa (three or more), confusion counts per pair
of jobs, and for numbers the mean absolute difference. Pure functions over the values, tested
against hand-computed tables.

    field = agreement([["cat", "cat"], ["cat", "dog"], ...])   # one list per row: each job's value
    field.rate, field.kappa, field.kappa_kind                    # 0.5, 0.0, "Cohen"
    confusion(["cat", "cat"], ["cat", "dog"])                   # {("cat", "cat"): 1, ("cat", "dog"): 1}

Rows where a job has no value (missing, failed, or the label left out) are not counted: every
figure says over how many rows it was taken. A kappa is None when it is undefined: no rows, or
every rating the same one value (chance agreement is then 1).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Hashable, Sequence

__all__ = ["Agreement", "agreement", "cohen_kappa", "fleiss_kappa", "confusion", "mean_abs_difference"]


@dataclass(frozen=True)
class Agreement:
    rows: int  # rows where every job gave a value
    rate: float | None  # share of those rows where all values are equal
    kappa: float | None
    kappa_kind: str  # "Cohen" (two jobs) or "Fleiss" (three or more)


def agreement(ratings: Sequence[Sequence[Hashable]]) -> Agreement:
    """`ratings`: per row, every job's value (rows with a missing value already left out)."""
    raters = len(ratings[0]) if ratings else 0
    kind = "Cohen" if raters <= 2 else "Fleiss"
    if not ratings:
        return Agreement(0, None, None, kind)
    same = sum(1 for row in ratings if len(set(row)) == 1)
    kappa = cohen_kappa([r[0] for r in ratings], [r[1] for r in ratings]) if raters == 2 else fleiss_kappa(ratings)
    return Agreement(len(ratings), same / len(ratings), kappa, kind)


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float | None:
    """(p_o - p_e) / (1 - p_e): observed agreement against the agreement the two marginals give by chance."""
    n = len(a)
    if n == 0:
        return None
    observed = sum(1 for x, y in zip(a, b) if x == y) / n
    ca, cb = Counter(a), Counter(b)
    chance = sum(ca[k] * cb[k] for k in ca) / (n * n)
    return None if math.isclose(chance, 1.0) else (observed - chance) / (1 - chance)


def fleiss_kappa(ratings: Sequence[Sequence[Hashable]]) -> float | None:
    """Fleiss' kappa for a fixed number of raters per row: (P - P_e) / (1 - P_e), P the mean share of
    agreeing rater pairs per row, P_e the chance of a pair agreeing from the overall value shares."""
    n_rows, raters = len(ratings), len(ratings[0]) if ratings else 0
    if n_rows == 0 or raters < 2:
        return None
    totals: Counter[Hashable] = Counter()
    pairs = 0.0
    for row in ratings:
        counts = Counter(row)
        totals.update(counts)
        pairs += (sum(c * c for c in counts.values()) - raters) / (raters * (raters - 1))
    observed = pairs / n_rows
    chance = sum((c / (n_rows * raters)) ** 2 for c in totals.values())
    return None if math.isclose(chance, 1.0) else (observed - chance) / (1 - chance)


def confusion(a: Sequence[Any], b: Sequence[Any]) -> dict[tuple[Any, Any], int]:
    """How often job A's value (first) met job B's (second), over rows where both have one."""
    return dict(Counter(zip(a, b)))


def mean_abs_difference(ratings: Sequence[Sequence[float]]) -> float | None:
    """For numbers: the mean, over rows and pairs of jobs, of |a - b|."""
    diffs = [abs(x - y) for row in ratings for x, y in combinations(row, 2)]
    return sum(diffs) / len(diffs) if diffs else None
