"""Run every ``benchmarks/bench_*.py`` in sequence and show a summary table.

    python benchmarks/run_all.py [--quick] [--only NAME ...] [--data PATH] [--list] [-v]

Each benchmark runs as its own process (``python bench_x.py --quick ...``, which
calls its ``main(argv)``), so one benchmark's servers, threads, logging setup or
memory cannot skew the next, and a crash is reported instead of ending the run.
Its output goes to a log file (shown on failure; ``-v`` streams it instead) and
its numbers to ``benchmarks/results/<name>.json``; the table shows the one-line
summary each benchmark wrote there. Exits 1 when any benchmark failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from _common import BENCH_DIR, DATA_ENV, RESULTS_DIR
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one benchmark run ended."""

    name: str
    returncode: int
    seconds: float
    summary: str
    log_path: Path | None


def discover(bench_dir: Path = BENCH_DIR, only: Sequence[str] = ()) -> list[Path]:
    """The ``bench_*.py`` scripts, sorted; with ``only``, those whose name contains one of them."""
    scripts = sorted(bench_dir.glob("bench_*.py"))
    if only:
        scripts = [s for s in scripts if any(o in s.stem.removeprefix("bench_") for o in only)]
    return scripts


def _read_summary(out_dir: Path, name: str, since: float) -> str:
    path = out_dir / f"{name}.json"
    try:
        if path.stat().st_mtime < since:
            return "(no new result file)"
        return str(json.loads(path.read_text()).get("summary") or "")
    except (OSError, json.JSONDecodeError):
        return "(no result file)"


def run_one(script: Path, args: Sequence[str], *, env: dict[str, str], out_dir: Path,
            log_dir: Path | None, timeout_s: float) -> Outcome:
    """Run one benchmark script to completion (or timeout)."""
    name = script.stem.removeprefix("bench_")
    cmd = [sys.executable, str(script), *args]
    started = time.time()
    t0 = time.perf_counter()
    log_path = None if log_dir is None else log_dir / f"{name}.log"
    try:
        if log_path is None:
            rc = subprocess.run(cmd, env=env, cwd=script.parent, timeout=timeout_s).returncode
        else:
            with log_path.open("wb") as fh:
                rc = subprocess.run(cmd, env=env, cwd=script.parent, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        return Outcome(name, -1, time.perf_counter() - t0, f"timed out after {timeout_s:.0f} s", log_path)
    seconds = time.perf_counter() - t0
    summary = _read_summary(out_dir, name, started) if rc == 0 else f"exit code {rc}"
    return Outcome(name, rc, seconds, summary, log_path)


def _tail(path: Path | None, lines: int = 25) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_all.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--only", nargs="+", default=(), metavar="NAME",
                        help="run only benchmarks whose name contains one of these")
    parser.add_argument("--data", type=Path, default=None,
                        help=f"event log for benchmarks that replay one (sets ${DATA_ENV})")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="folder of the result JSON files")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per benchmark")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="stream each benchmark's output")
    args = parser.parse_args(argv)

    console = Console(stderr=True)
    scripts = discover(only=args.only)
    if args.list:
        for s in scripts:
            console.print(s.stem.removeprefix("bench_"))
        return 0
    if not scripts:
        console.print(f"[red]no benchmark matches {list(args.only)} in {BENCH_DIR}[/red]")
        return 1
    if args.data is not None and not args.data.exists():
        console.print(f"[red]--data {args.data} does not exist[/red]")
        return 1

    env = dict(os.environ)
    if args.data is not None:
        env[DATA_ENV] = str(args.data.resolve())
    bench_args = ["--out-dir", str(args.out_dir.resolve())] + (["--quick"] if args.quick else [])

    outcomes: list[Outcome] = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="liftrec-bench-") as tmp:
        log_dir = None if args.verbose else Path(tmp)
        progress = Progress(
            SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
            MofNCompleteColumn(), TimeElapsedColumn(), console=console, disable=args.verbose,
        )
        with progress:
            task = progress.add_task("benchmarks", total=len(scripts))
            for script in scripts:
                name = script.stem.removeprefix("bench_")
                progress.update(task, description=f"bench {name}")
                if args.verbose:
                    console.rule(f"bench {name}")
                outcome = run_one(script, bench_args, env=env, out_dir=args.out_dir,
                                  log_dir=log_dir, timeout_s=args.timeout)
                outcomes.append(outcome)
                mark = "[green]ok[/green]" if outcome.returncode == 0 else "[red]FAILED[/red]"
                progress.console.print(f"{mark} {name} ({outcome.seconds:.1f} s) {outcome.summary}")
                if outcome.returncode != 0 and outcome.log_path is not None:
                    progress.console.print(_tail(outcome.log_path), markup=False, highlight=False)
                progress.advance(task)

    table = Table(title=f"liftrec benchmarks{' (quick)' if args.quick else ''}")
    table.add_column("benchmark")
    table.add_column("status")
    table.add_column("wall s", justify="right")
    table.add_column("summary")
    for o in outcomes:
        status = "[green]ok[/green]" if o.returncode == 0 else "[red]failed[/red]"
        table.add_row(o.name, status, f"{o.seconds:.1f}", o.summary)
    Console().print(table)
    failed = sum(o.returncode != 0 for o in outcomes)
    console.print(f"benchmarks: {len(outcomes) - failed} passed, {failed} failed "
                  f"in {time.perf_counter() - t_all:.1f} s; results in {args.out_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
