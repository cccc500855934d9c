"""Validation grids: full product, coordinate ascent, widening at the edges."""

from __future__ import annotations

from typing import Any

import pytest

from training.evaluation.tuning import Dim, Grid, tune


def peaked(best: dict[str, float]) -> Any:
    calls: list[dict[str, Any]] = []

    def evaluate(params: dict[str, Any]) -> dict[str, tuple[float, dict[str, float]]]:
        calls.append(params)
        score = -sum((params[k] - v) ** 2 for k, v in best.items())
        return {"R": (score, {"hr@20": score}), "X": (-score, {"hr@20": -score})}

    return evaluate, calls


def test_grid_search_finds_the_interior_optimum() -> None:
    ev, calls = peaked({"a": 2.0, "b": 10.0})
    r = tune(Grid({"a": Dim((1.0, 2.0, 4.0), widen=2.0), "b": Dim((5.0, 10.0, 20.0), widen=2.0)}), ev,
             variants=("R",))
    assert r.best["R"] == {"a": 2.0, "b": 10.0}
    assert len(calls) == 9 and not r.widened and r.on_edge["R"] == []


def test_edge_best_widens_the_grid_until_interior() -> None:
    ev, _ = peaked({"a": 16.0})
    r = tune(Grid({"a": Dim((1.0, 2.0, 4.0), widen=2.0, hi=1000.0)}), ev, variants=("R",))
    assert r.best["R"]["a"] == 16.0
    assert r.widened["a"] == [8.0, 16.0, 32.0]
    assert r.on_edge["R"] == []


def test_widening_stops_at_bounds_and_reports_edges() -> None:
    ev, _ = peaked({"a": 1000.0})
    r = tune(Grid({"a": Dim((1.0, 2.0), widen=2.0, hi=5.0)}), ev, variants=("R",))
    assert r.best["R"]["a"] == 4.0  # 8 would break the bound
    assert r.on_edge["R"] == []  # no further value is allowed, so it is not "still on an edge"
    ev2, _ = peaked({"a": 1000.0})
    r2 = tune(Grid({"a": Dim((1.0, 2.0), widen=2.0)}, max_widen=1), ev2, variants=("R",))
    assert r2.best["R"]["a"] == 4.0 and r2.on_edge["R"] == ["a"]


def test_variants_get_their_own_best_and_fixed_params_pass_through() -> None:
    seen: list[dict[str, Any]] = []

    def ev(params: dict[str, Any]) -> dict[str, tuple[float, dict[str, float]]]:
        seen.append(params)
        return {"R": (params["a"], {}), "X": (-params["a"], {})}

    r = tune(Grid({"a": Dim((1, 2, 3))}, fixed={"k": "v"}), ev, variants=("R", "X"))
    assert r.best["R"] == {"k": "v", "a": 3} and r.best["X"] == {"k": "v", "a": 1}
    assert all(p["k"] == "v" for p in seen)


def test_coordinate_mode_evaluates_fewer_points() -> None:
    ev, calls = peaked({"a": 2.0, "b": 3.0, "c": 4.0})
    dims = {n: Dim((1.0, 2.0, 3.0, 4.0, 5.0)) for n in "abc"}
    r = tune(Grid(dims, mode="coordinate"), ev, variants=("R",))
    assert r.best["R"] == {"a": 2.0, "b": 3.0, "c": 4.0}
    assert len(calls) < 5 ** 3
    with pytest.raises(ValueError, match="mode"):
        tune(Grid(dims, mode="random"), ev, variants=("R",))
