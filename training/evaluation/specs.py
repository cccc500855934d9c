"""The evaluated methods and their documented tuning grids.

One :class:`MethodSpec` per reported method: a factory (parameters ->
:class:`~training.evaluation.methods.Method`), whether it is a baseline, and
the :class:`~training.evaluation.tuning.Grid` searched on validation. The
grids are listed in ``docs/evaluation.md``; ``quick`` grids are smaller
subsets for CI-sized runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from training.evaluation.baselines import ItemKnn, Popularity, Repeat, RulesOnly, Sknn, StaticAls
from training.evaluation.methods import Method
from training.evaluation.tuning import Dim, Grid
from training.evaluation.variants import LiftrecAls, LiftrecBlend

__all__ = ["MethodSpec", "method_specs"]


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """A reported method: how to build it and where to search its parameters.

    Attributes
    ----------
    name : str
    baseline : bool
        Counts as a baseline (the goal compares liftrec against the strongest one).
    make : callable
        ``make(params, cache) -> Method``.
    grid : Grid
    uses_fallback : bool
        Fills short lists with the tuned popularity fallback.
    inherit : str, optional
        Start from another method's tuned parameters (per variant), e.g. the blend
        reuses ``liftrec_als``'s ALS.
    """

    name: str
    baseline: bool
    make: Callable[[dict[str, Any], dict[Any, Any]], Method]
    grid: Grid
    uses_fallback: bool = True
    inherit: str | None = None


def _als_dims(quick: bool) -> dict[str, Dim]:
    if quick:
        return {"factors": Dim((16, 32), widen=2.0, lo=4, hi=256, integer=True),
                "regularization": Dim((0.01, 0.1), widen=10.0, lo=1e-5, hi=100.0)}
    return {
        "factors": Dim((32, 64, 128), widen=2.0, lo=4, hi=256, integer=True),
        "regularization": Dim((0.01, 0.1, 1.0), widen=10.0, lo=1e-5, hi=1000.0),
        "alpha": Dim((0.25, 1.0, 4.0), widen=4.0, lo=1e-3, hi=256.0),
    }


def method_specs(*, quick: bool = False, iterations: int = 15) -> list[MethodSpec]:
    """Every method of the evaluation, baselines first, in report order.

    Parameters
    ----------
    quick : bool, optional
        Smaller grids (CI and ``liftrec evaluate --quick``).
    iterations : int, optional
        ALS iterations (fixed, not tuned).
    """
    weighting = Dim(("events", "weighted"))

    def named(cls: type, name: str) -> Callable[[dict[str, Any], dict[Any, Any]], Method]:
        def make(params: dict[str, Any], cache: dict[Any, Any]) -> Method:
            m = cls(**params) if cls is Popularity else cls(cache=cache, **params)
            m.name = name
            return m
        return make

    def pop(window: float | None, name: str) -> MethodSpec:
        def make(params: dict[str, Any], cache: dict[Any, Any]) -> Method:
            return Popularity(window_days=window, name=name, **params)
        return MethodSpec(name, True, make, Grid({"weighting": weighting}), uses_fallback=False)

    def repeat_make(params: dict[str, Any], cache: dict[Any, Any]) -> Method:
        return Repeat(**params)

    als_fixed = {"iterations": 8 if quick else iterations}
    specs = [
        pop(None, "pop_all"),
        pop(7.0, "pop_7d"),
        pop(30.0, "pop_30d"),
        MethodSpec("repeat", True, repeat_make, Grid(
            {"half_life_days": Dim((1.0, 7.0, 30.0, 90.0) if quick else (1.0, 7.0, 30.0, 90.0, 365.0),
                                   widen=4.0, lo=0.01, hi=10_000.0),
             "weighting": weighting})),
        MethodSpec("als_static", True, named(StaticAls, "als_static"),
                   Grid(_als_dims(quick), fixed=als_fixed, mode="coordinate")),
        MethodSpec("item_knn", True, named(ItemKnn, "item_knn"), Grid(
            {"n_last": Dim((1, 3, 10) if quick else (1, 3, 10, 30), widen=3.0, lo=1, hi=500, integer=True),
             "decay": Dim((0.5, 1.0) if quick else (0.5, 0.8, 1.0))})),
        MethodSpec("sknn", True, named(Sknn, "sknn"), Grid(
            {"k": Dim((50, 200) if quick else (50, 100, 200, 500), widen=2.0, lo=5, hi=5000, integer=True),
             "sample": Dim((500, 2000) if quick else (500, 2000, 8000), widen=4.0, lo=50, hi=200_000,
                           integer=True)})),
        MethodSpec("rules", True, named(RulesOnly, "rules"), Grid(
            {"min_support": Dim((0.0005, 0.002, 0.008), widen=4.0, lo=1e-6, hi=0.5),
             "n_last": Dim((0, 5, 20), widen=3.0, lo=0, hi=500, integer=True),
             "agg": Dim(("max", "sum"))}, mode="coordinate")),
        MethodSpec("liftrec_als", False, named(LiftrecAls, "liftrec_als"),
                   Grid({**_als_dims(quick), "half_life_days": Dim((None, 90.0) if not quick else (None,))},
                        fixed=als_fixed, mode="coordinate")),
        MethodSpec("liftrec_blend", False, named(LiftrecBlend, "liftrec_blend"), Grid(
            {"w_covis": Dim((0.0, 0.5, 1.0, 2.0), widen=2.0, lo=0.0, hi=64.0),
             "w_repeat": Dim((0.0, 1.0, 2.0, 4.0), widen=2.0, lo=0.0, hi=256.0),
             "w_rules": Dim((0.0, 0.5), widen=2.0, lo=0.0, hi=64.0),
             "w_trend": Dim((0.0, 0.3), widen=3.0, lo=0.0, hi=30.0),
             "repeat_half_life_days": Dim((3.0, 30.0, 180.0), widen=4.0, lo=0.1, hi=5000.0)},
            mode="coordinate", max_widen=2), inherit="liftrec_als"),
        MethodSpec("liftrec_full", False, _full_make, Grid(
            {"trending_half_life_h": Dim((6.0, 168.0) if quick else (6.0, 48.0, 168.0), widen=4.0, lo=0.25,
                                         hi=24.0 * 365),
             "history_cap": Dim((100,) if quick else (100, 500), widen=2.0, lo=10, hi=10_000, integer=True),
             "diversity": Dim(("none",) if quick else ("none", "cap")),
             "session_knn_k": Dim((100, 400), widen=2.0, lo=10, hi=5000, integer=True)},
            fixed={"n_candidates": 300, "ranker": True, "ranker_days": 60.0, "session_knn_sample": 2000,
                   "ranker_queries": 12000}, mode="coordinate", max_widen=2),
            inherit="liftrec_als"),
    ]
    return specs


def _full_make(params: dict[str, Any], cache: dict[Any, Any]) -> Method:
    from training.evaluation.pipeline_variant import LiftrecFull

    return LiftrecFull(cache=cache, **params)
