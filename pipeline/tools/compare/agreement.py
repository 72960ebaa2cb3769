"""How far models agree on a label: the share of rows where they give the same value, chance-
corrected by Cohen's kappa (two jobs) or Fleiss' kappa (three or more). Pure functions over the
values, tested against hand-computed tables (the confusion counts and the numbers' mean absolute
difference are the comparison's own, pipeline.tools.compare.collect).

    field = agreement([["cat", "cat"], ["cat", "dog"], ...])   # one list per row: each job's value
    field = tallied({("cat", "cat"): 1, ("cat", "dog"): 1})     # the same, from counts of value tuples
    field.rate, field.kappa, field.kappa_kind                    # 0.5, 0.0, "Cohen"

Rows where a job has no value (missing, failed, or the label left out) are not counted: every
figure says over how many rows it was taken. A kappa is None when it is undefined: no rows, or
every rating the same one value (chance agreement is then 1).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

__all__ = ["Agreement", "agreement", "tallied", "cohen_kappa", "fleiss_kappa"]


@dataclass(frozen=True)
class Agreement:
    rows: int  # rows where every job gave a value
    rate: float | None  # share of those rows where all values are equal
    kappa: float | None
    kappa_kind: str  # "Cohen" (two jobs) or "Fleiss" (three or more)


def agreement(ratings: Sequence[Sequence[Hashable]]) -> Agreement:
    """`ratings`: per row, every job's value (rows with a missing value already left out)."""
    return tallied(Counter(tuple(row) for row in ratings))


def tallied(tally: Mapping[tuple[Hashable, ...], int]) -> Agreement:
    """The same figures from how many rows gave each tuple of values: what a comparison of a
    million rows holds instead of the rows (a few distinct tuples of category values)."""
    raters = len(next(iter(tally))) if tally else 0
    kind = "Cohen" if raters <= 2 else "Fleiss"
    n = sum(tally.values())
    if not n:
        return Agreement(0, None, None, kind)
    same = sum(c for row, c in tally.items() if len(set(row)) == 1)
    kappa = _cohen(tally) if raters == 2 else _fleiss(tally)
    return Agreement(n, same / n, kappa, kind)


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float | None:
    """(p_o - p_e) / (1 - p_e): observed agreement against the agreement the two marginals give by chance."""
    return _cohen(Counter(zip(a, b)))


def _cohen(pairs: Mapping[tuple[Hashable, ...], int]) -> float | None:
    n = sum(pairs.values())
    if n == 0:
        return None
    observed = sum(c for (x, y), c in pairs.items() if x == y) / n
    ca: Counter[Hashable] = Counter()
    cb: Counter[Hashable] = Counter()
    for (x, y), c in pairs.items():
        ca[x] += c
        cb[y] += c
    chance = sum(ca[k] * cb[k] for k in ca) / (n * n)
    return None if math.isclose(chance, 1.0) else (observed - chance) / (1 - chance)


def fleiss_kappa(ratings: Sequence[Sequence[Hashable]]) -> float | None:
    """Fleiss' kappa for a fixed number of raters per row: (P - P_e) / (1 - P_e), P the mean share of
    agreeing rater pairs per row, P_e the chance of a pair agreeing from the overall value shares."""
    return _fleiss(Counter(tuple(row) for row in ratings))


def _fleiss(tally: Mapping[tuple[Hashable, ...], int]) -> float | None:
    n_rows, raters = sum(tally.values()), len(next(iter(tally))) if tally else 0
    if n_rows == 0 or raters < 2:
        return None
    totals: Counter[Hashable] = Counter()
    pairs = 0.0
    for row, times in tally.items():
        counts = Counter(row)
        for value, c in counts.items():
            totals[value] += c * times
        pairs += times * (sum(c * c for c in counts.values()) - raters) / (raters * (raters - 1))
    observed = pairs / n_rows
    chance = sum((c / (n_rows * raters)) ** 2 for c in totals.values())
    return None if math.isclose(chance, 1.0) else (observed - chance) / (1 - chance)

