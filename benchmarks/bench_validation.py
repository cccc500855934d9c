"""Event validation throughput: ``EventValidator.decode`` vs a bare ``orjson.loads``.

Every event a worker consumes is parsed once by ``EventValidator.decode``
(orjson + the pydantic model in strict mode + id, timestamp and value checks).
This measures its throughput in events/s on synthetic clickstream payloads and,
in the same run and on the same bytes, the throughput of ``orjson.loads`` alone:
the floor of any JSON decoder in Python. The ratio says what the validation
costs on top of parsing. Rounds alternate between the two so that a noisy
neighbour hits both alike; the median round counts.

A second pass decodes a mixed stream with a share of invalid payloads (bad
JSON, missing fields, wrong types, unknown types, future timestamps), as the DLQ
path sees them, and checks that exactly those are rejected.

    python benchmarks/bench_validation.py [--quick] [--events N] [--rounds R]
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence

import orjson
from _common import base_parser, summarize, write_result
from tqdm import tqdm

from features.errors import InvalidEvent
from features.events import EventValidator

NAME = "validation"

_TYPES = ("view", "click", "add_to_cart", "remove_from_cart", "purchase", "impression")
_TYPE_WEIGHTS = (50, 20, 8, 2, 4, 16)


def synthetic_events(n: int, *, now: int, seed: int = 7) -> list[bytes]:
    """``n`` valid event payloads shaped like a shop's clickstream."""
    rng = random.Random(seed)
    types = rng.choices(_TYPES, weights=_TYPE_WEIGHTS, k=n)
    out = []
    for i, etype in enumerate(types):
        user = rng.randrange(50_000)
        ev: dict[str, object] = {
            "event_id": f"{rng.getrandbits(64):016x}-{i}",
            "ts": now - rng.randrange(3_600_000),
            "user_id": f"u{user}",
            "item_id": f"sku-{rng.randrange(20_000):05d}",
            "type": etype,
        }
        if rng.random() < 0.8:
            ev["session_id"] = f"s{user}-{rng.randrange(20)}"
        if rng.random() < 0.2:
            ev["rec_id"] = f"r{rng.getrandbits(48):012x}"
        if etype == "purchase":
            ev["price"] = round(rng.uniform(1, 200), 2)
            ev["quantity"] = rng.randint(1, 5)
        out.append(orjson.dumps(ev))
    return out


def _broken(raw: bytes, kind: int, now: int) -> bytes:
    ev = orjson.loads(raw)
    if kind == 0:
        return raw[: len(raw) // 2]                      # bad_json
    if kind == 1:
        del ev["user_id"]                                 # missing_field
    elif kind == 2:
        ev["ts"] = str(ev["ts"])                          # wrong_type
    elif kind == 3:
        ev["type"] = "hover"                              # unknown_type
    else:
        ev["ts"] = now + 10 * 24 * 3_600_000              # future_timestamp
    return orjson.dumps(ev)


def mixed_stream(valid: Sequence[bytes], *, invalid_share: float, now: int, seed: int = 11) -> tuple[list[bytes], int]:
    """A copy of ``valid`` with a share replaced by invalid payloads; returns (stream, n_invalid)."""
    rng = random.Random(seed)
    out, bad = list(valid), 0
    for i in range(len(out)):
        if rng.random() < invalid_share:
            out[i] = _broken(out[i], bad % 5, now)
            bad += 1
    return out, bad


def _time_once(fn: Callable[[bytes], object], payloads: Sequence[bytes]) -> float:
    t0 = time.perf_counter()
    for raw in payloads:
        fn(raw)
    return time.perf_counter() - t0


def _decode_counting(validator: EventValidator, payloads: Sequence[bytes], now: int) -> tuple[float, Counter[str]]:
    reasons: Counter[str] = Counter()
    decode = validator.decode
    t0 = time.perf_counter()
    for raw in payloads:
        try:
            decode(raw, now=now)
        except InvalidEvent as err:
            reasons[err.reason] += 1
    return time.perf_counter() - t0, reasons


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=None, help="payloads per round (default 200000; 20000 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per decoder (default 7; 3 with --quick)")
    parser.add_argument("--invalid-share", type=float, default=0.05, help="share of invalid payloads in the mixed pass")
    args = parser.parse_args(argv)
    n = args.events or (20_000 if args.quick else 200_000)
    rounds = args.rounds or (3 if args.quick else 7)
    if n < 1 or rounds < 1:
        parser.error("--events and --rounds must be >= 1")
    if not 0 <= args.invalid_share < 1:
        parser.error("--invalid-share must be in [0, 1)")

    now = time.time_ns() // 1_000_000
    payloads = synthetic_events(n, now=now)
    validator = EventValidator()
    # A worker takes "now" once per micro-batch; so does this loop.
    def decode(raw: bytes) -> object:
        return validator.decode(raw, now=now)

    # warm-up (first calls build pydantic's validators and fill caches)
    _time_once(decode, payloads[:2000])
    _time_once(orjson.loads, payloads[:2000])

    eps: dict[str, list[float]] = {"validator": [], "orjson": []}
    with tqdm(total=rounds * 2 + 1, desc="validation", unit="round") as bar:
        for _ in range(rounds):
            for label, fn in (("orjson", orjson.loads), ("validator", decode)):
                eps[label].append(n / _time_once(fn, payloads))
                bar.update()
        stream, n_bad = mixed_stream(payloads, invalid_share=args.invalid_share, now=now)
        mixed_s, reasons = _decode_counting(validator, stream, now)
        bar.update()
    rejected = sum(reasons.values())
    if rejected != n_bad:
        print(f"bench_validation: expected {n_bad} rejects in the mixed pass, got {rejected}: {dict(reasons)}",
              file=sys.stderr)
        return 1

    val = statistics.median(eps["validator"])
    base = statistics.median(eps["orjson"])
    results = {
        "validator_events_per_s": summarize(eps["validator"]),
        "orjson_events_per_s": summarize(eps["orjson"]),
        "ratio_validator_over_orjson": val / base,
        "validator_us_per_event": 1e6 / val,
        "orjson_us_per_event": 1e6 / base,
        "validation_overhead_us_per_event": 1e6 / val - 1e6 / base,
        "mean_payload_bytes": sum(map(len, payloads)) / n,
        "mixed": {
            "events_per_s": n / mixed_s,
            "invalid": n_bad,
            "rejected_by_reason": dict(sorted(reasons.items())),
        },
    }
    summary = (f"validator {val:,.0f} ev/s vs orjson {base:,.0f} ev/s "
               f"(ratio {val / base:.3f}, +{1e6 / val - 1e6 / base:.2f} us/ev)")
    path = write_result(
        NAME, results, summary=summary, out_dir=args.out_dir,
        params={"quick": args.quick, "events": n, "rounds": rounds, "invalid_share": args.invalid_share,
                "statistic": "median round"},
    )
    print(f"{summary}; mixed {n / mixed_s:,.0f} ev/s with {n_bad} rejects -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
