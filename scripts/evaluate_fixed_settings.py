"""``liftrec evaluate`` with the full pipeline's shop-settings grid cut to the values earlier full tunings chose.

Used for the reports of this round because the shared machine gave each run about a fifth of a core:
the baselines and ``liftrec_als`` are tuned exactly as ``liftrec evaluate`` tunes them; only
``liftrec_full``'s grid (trending half-life, history cap, diversity, session kNN k) is replaced by the
values the previous tuned reports picked (listed below; two values where R and X had picked different
ones, chosen on validation again, never widened). Everything else (ranker training, protocol, report)
is the CLI's code.

    python scripts/evaluate_fixed_settings.py online_retail evaluate --events ... --report ...
    python scripts/evaluate_fixed_settings.py synthetic evaluate --events ... --report ... --quick
"""

from __future__ import annotations

import dataclasses
import sys

from training.evaluation import run
from training.evaluation.tuning import Dim, Grid

#: liftrec_full's shop settings per data set (from docs/reports/*/metrics.json of the previous round)
SETTINGS = {
    "online_retail": {"trending_half_life_h": (168.0,), "history_cap": (2000, 4000), "diversity": ("cap",),
                      "session_knn_k": (400,)},
    "synthetic": {"trending_half_life_h": (1.5, 6.0), "history_cap": (100,), "diversity": ("none",),
                  "session_knn_k": (400,)},
}


def main() -> None:
    which = sys.argv.pop(1)
    dims = {k: Dim(v) for k, v in SETTINGS[which].items()}
    original = run.method_specs

    def specs(**kw):  # type: ignore[no-untyped-def]
        out = []
        for s in original(**kw):
            if s.name == "liftrec_full":
                s = dataclasses.replace(s, grid=Grid(dims, fixed=s.grid.fixed, mode=s.grid.mode, max_widen=0))
            out.append(s)
        return out

    run.method_specs = specs
    from liftrec.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
