"""Embedded stack start-to-ready time vs starting redis-server alone.

``liftrec up`` and every integration-test session start the embedded stack:
the tansu broker and redis-server on free loopback ports, a wait until both
answer (Redis PING, Kafka admin connection) and the creation of the three
topics. This measures ``EmbeddedStack.start()`` from the call to its return
(ready: both servers answer and the topics exist), p50 and max over several
cold starts, each in a fresh state folder, and stops the stack after each.

The baseline, in the same run, is the floor of any such stack: the same
redis-server binary with the same flags, timed from spawn to its first PONG.

    python benchmarks/bench_stack_start.py [--quick] [--starts N]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis
from _common import base_parser, summarize, write_result
from tqdm import tqdm

from features.settings import Settings
from liftrec.stack import EmbeddedStack, free_port, redis_binary

NAME = "stack_start"


def time_stack_start(state_dir: Path, *, partitions: int) -> float:
    """Seconds from ``EmbeddedStack.start()`` to its return; the stack is stopped after."""
    settings = Settings(state_dir=state_dir, kafka_bootstrap=None, redis_url=None,
                        events_partitions=partitions)
    stack = EmbeddedStack(settings)
    t0 = time.perf_counter()
    try:
        stack.start()
        return time.perf_counter() - t0
    finally:
        stack.stop()


def time_redis_start(data_dir: Path, *, timeout_s: float = 20.0) -> float:
    """Seconds from spawning redis-server (the stack's flags) to its first PONG."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            str(redis_binary()), "--port", str(port), "--bind", "127.0.0.1",
            "--protected-mode", "no", "--dir", str(data_dir),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--daemonize", "no", "--logfile", str(data_dir / "redis.log"),
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
    try:
        while True:
            try:
                client.ping()
                return time.perf_counter() - t0
            except (redis.ConnectionError, redis.BusyLoadingError):
                if proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with code {proc.returncode}") from None
                if time.perf_counter() - t0 > timeout_s:
                    raise RuntimeError(f"redis-server did not answer PING within {timeout_s:.0f} s") from None
                time.sleep(0.002)
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=None, help="cold starts of each (default 10; 3 with --quick)")
    parser.add_argument("--partitions", type=int, default=4, help="partitions of the events topic")
    args = parser.parse_args(argv)
    starts = args.starts or (3 if args.quick else 10)
    if starts < 1:
        parser.error("--starts must be >= 1")

    stack_s: list[float] = []
    redis_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-stack-") as tmp, \
            tqdm(total=starts * 2, desc="stack start", unit="start") as bar:
        for i in range(starts):
            # alternate, so that drift in machine load hits both series alike
            redis_s.append(time_redis_start(Path(tmp) / f"redis-{i}"))
            bar.update()
            stack_s.append(time_stack_start(Path(tmp) / f"stack-{i}", partitions=args.partitions))
            bar.update()
            bar.set_postfix(stack=f"{stack_s[-1] * 1000:.0f}ms", redis=f"{redis_s[-1] * 1000:.0f}ms")

    stack = summarize(stack_s)
    base = summarize(redis_s)
    results = {
        "stack_start_s": stack,
        "redis_only_start_s": base,
        "ratio_p50_stack_over_redis": stack["p50"] / base["p50"],
        "stack_overhead_p50_s": stack["p50"] - base["p50"],
        "samples": {"stack_s": stack_s, "redis_only_s": redis_s},
    }
    summary = (f"stack p50 {stack['p50'] * 1000:.0f} ms / max {stack['max'] * 1000:.0f} ms vs redis-server alone "
               f"p50 {base['p50'] * 1000:.0f} ms / max {base['max'] * 1000:.0f} ms")
    path = write_result(
        NAME, results, summary=summary, out_dir=args.out_dir,
        params={"quick": args.quick, "starts": starts, "partitions": args.partitions,
                "ready": "EmbeddedStack.start() returned: PING ok, Kafka admin connected, topics created"},
    )
    print(f"{summary} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
