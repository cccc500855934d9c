"""Hyper-parameter search on the validation window, with grids that widen at their edges.

Every method comes with a documented :class:`Grid` (``docs/evaluation.md``
lists them). A point is scored by replaying the validation window and taking
``HR@20 + NDCG@20`` of each variant; R and X get their own best point (a shop
sets its repurchase rule per variant, so each is tuned for its task).

Search is either the full product of the grid (``mode="grid"``) or, for
expensive grids, coordinate ascent (``mode="coordinate"``: every dimension in
turn, the others held at the current best, two passes). After the search,
every numeric dimension whose best value sits on an edge of its grid is
widened by its factor (one new value beyond the edge) and searched again,
up to ``max_widen`` times per dimension; the report lists what was widened
and anything still on an edge.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Dim", "Grid", "TuneResult", "tune"]

log = logging.getLogger(__name__)

Point = tuple[tuple[str, Any], ...]
#: ``params -> {variant: (objective, metrics dict)}``
Evaluator = Callable[[dict[str, Any]], Mapping[str, tuple[float, Mapping[str, float]]]]


@dataclass(frozen=True, slots=True)
class Dim:
    """One hyper-parameter's candidate values.

    Attributes
    ----------
    values : tuple
        Candidates, ascending for numeric dimensions.
    widen : float, optional
        Multiplicative step used to add a value beyond an edge (None = never widened).
    lo, hi : float, optional
        Bounds a widened value must respect.
    integer : bool
        Round widened values.
    """

    values: tuple[Any, ...]
    widen: float | None = None
    lo: float | None = None
    hi: float | None = None
    integer: bool = False

    def beyond(self, value: Any, *, upward: bool) -> Any | None:
        """The next value past ``value`` in one direction, or None when not allowed."""
        if self.widen is None or value is None or isinstance(value, str | bool):
            return None
        v = value * self.widen if upward else value / self.widen
        if self.integer:
            v = int(round(v))
            if v == value:
                v = value + (1 if upward else -1)
        if (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            return None
        return v


@dataclass(frozen=True, slots=True)
class Grid:
    """A method's search space: dimensions, fixed parameters and the search mode."""

    dims: Mapping[str, Dim]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    mode: str = "grid"
    max_widen: int = 3

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description for the report."""
        return {"mode": self.mode, "fixed": dict(self.fixed),
                "dims": {k: {"values": list(d.values), "widen": d.widen} for k, d in self.dims.items()}}


@dataclass(frozen=True, slots=True)
class TuneResult:
    """Outcome of a search.

    Attributes
    ----------
    best : dict of variant -> params
    best_metrics : dict of variant -> validation metrics of the best point
    tried : list of (params, {variant: objective})
    widened : dict of dim -> values added
    on_edge : dict of variant -> dims whose best value is still at an edge of the (widened) grid
    """

    best: dict[str, dict[str, Any]]
    best_metrics: dict[str, dict[str, float]]
    tried: list[tuple[dict[str, Any], dict[str, float]]]
    widened: dict[str, list[Any]]
    on_edge: dict[str, list[str]]


def tune(grid: Grid, evaluate: Evaluator, *, variants: Sequence[str]) -> TuneResult:
    """Search ``grid`` with ``evaluate`` and return the best point per variant.

    Parameters
    ----------
    grid : Grid
    evaluate : callable
        ``params -> {variant: (objective, metrics)}``; called once per distinct point.
    variants : sequence of str

    Returns
    -------
    TuneResult
    """
    if grid.mode not in ("grid", "coordinate"):
        raise ValueError(f"grid mode must be 'grid' or 'coordinate', got {grid.mode!r}")
    values = {k: list(d.values) for k, d in grid.dims.items()}
    seen: dict[Point, dict[str, tuple[float, Mapping[str, float]]]] = {}

    def run(params: dict[str, Any]) -> None:
        key: Point = tuple(sorted(params.items()))
        if key not in seen:
            seen[key] = dict(evaluate({**grid.fixed, **params}))
            log.info("tuned point %s -> %s", params,
                     {v: round(o, 5) for v, (o, _) in seen[key].items()})

    def best_for(v: str) -> dict[str, Any]:
        key = max(seen, key=lambda p: (seen[p][v][0], -list(seen).index(p)))
        return dict(key)

    names = list(values)
    if not names:
        run({})
    elif grid.mode == "grid":
        _product(names, values, run)
    else:
        start = {k: vs[len(vs) // 2] for k, vs in values.items()}
        run(start)
        for v in variants:
            for _ in range(2):
                for name in names:
                    cur = best_for(v)
                    for val in values[name]:
                        run({**cur, name: val})

    widened: dict[str, list[Any]] = {k: [] for k in names}
    for _ in range(grid.max_widen):
        grew = False
        for v in variants:
            cur = best_for(v)
            for name in names:
                dim, vals = grid.dims[name], values[name]
                if len(vals) < 2 or cur[name] not in (vals[0], vals[-1]):
                    continue
                new = dim.beyond(cur[name], upward=cur[name] == vals[-1])
                if new is None or new in vals:
                    continue
                if cur[name] == vals[-1]:
                    vals.append(new)
                else:
                    vals.insert(0, new)
                widened[name].append(new)
                run({**cur, name: new})
                grew = True
        if not grew:
            break

    best = {v: best_for(v) for v in variants}
    on_edge = {v: [n for n in names if len(values[n]) > 1 and grid.dims[n].widen is not None
                   and best[v][n] in (values[n][0], values[n][-1])
                   and grid.dims[n].beyond(best[v][n], upward=best[v][n] == values[n][-1]) is not None]
               for v in variants}
    tried = [(dict(p), {v: o for v, (o, _) in r.items()}) for p, r in seen.items()]
    best_metrics = {v: dict(seen[tuple(sorted(best[v].items()))][v][1]) for v in variants}
    return TuneResult(best={v: {**grid.fixed, **best[v]} for v in variants}, best_metrics=best_metrics,
                      tried=tried, widened={k: w for k, w in widened.items() if w}, on_edge=on_edge)


def _product(names: list[str], values: Mapping[str, list[Any]], run: Callable[[dict[str, Any]], None]) -> None:
    def rec(i: int, cur: dict[str, Any]) -> None:
        if i == len(names):
            run(dict(cur))
            return
        for val in values[names[i]]:
            cur[names[i]] = val
            rec(i + 1, cur)

    rec(0, {})
