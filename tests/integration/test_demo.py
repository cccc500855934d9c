"""`liftrec demo` end to end on a tiny shop: its own embedded stack, training, worker, API and live clicks.

`make demo` is one of the project's two commands; this keeps it working. The
demo raises if a step does not happen (the worker never applies the history, a
watched shopper's list never changes after a click, the API never answers), so
finishing at all is most of the check; the summary must also add up.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from liftrec.demo import run_demo

pytestmark = pytest.mark.integration


def test_demo_runs_the_whole_loop_on_a_tiny_shop(tmp_path: Path) -> None:
    out = io.StringIO()
    result = run_demo(state_dir=tmp_path / "demo", users=100, items=60, days=3, live_events=3,
                      console=Console(file=out, width=120))
    text = out.getvalue()

    assert result["live_events"] == 3
    assert result["history_events"] > 500
    # every produced event applied exactly once, none dead-lettered (the invalid one is refused at the API)
    assert result["events_applied"] == result["history_events"] + result["live_events"]
    assert result["dead_lettered"] == 0
    assert result["live_click_to_list_ms_max"] is not None
    assert "every shopper's list written" in text
    assert "an invalid event gets 422" in text
    assert "everything stopped cleanly" in text
