"""A Faust worker whose agent does nothing with the events (the Faust floor).

Run by bench_stream_throughput.py: consumes ``--topic`` in micro-batches with
the same app settings as liftrec's worker (fast fetch, no tables) and adds the
batch sizes to a Redis counter, so the benchmark can time it from outside.
"""

from __future__ import annotations

import argparse
import sys

import faust
import redis.asyncio as aioredis

from features.settings import Settings
from stream.app import TablelessManager, _transport_class, use_uvloop


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--redis", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--counter", required=True)
    ap.add_argument("--loop", choices=("aio", "uvloop"), default="aio",
                    help="event loop: aio (Faust's default) or uvloop (what liftrec's worker runs on)")
    ap.add_argument("--direct-delivery", action="store_true",
                    help="deliver records as liftrec's worker does (stream.app._transport_class)")
    args = ap.parse_args()
    if args.loop == "uvloop":
        use_uvloop()
    s = Settings()
    app = faust.App(args.group, broker=f"kafka://{args.bootstrap}", store="memory://", web_enabled=False,
                    broker_session_timeout=3.0, broker_heartbeat_interval=0.5, topic_disable_leader=True,
                    topic_allow_declare=False, consumer_auto_offset_reset="earliest", autodiscover=False,
                    TableManager=TablelessManager, datadir=f"/tmp/{args.group}-data")
    app.transport = _transport_class(s.fetch_max_wait_ms, direct_delivery=args.direct_delivery)(app.conf.broker_consumer, app)
    topic = app.topic(args.topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    client: dict[str, aioredis.Redis] = {}

    @app.agent(topic)
    async def noop(stream: faust.StreamT[bytes]) -> None:
        async for batch in stream.take_events(s.batch_size, within=s.batch_window_s):
            r = client.setdefault("r", aioredis.Redis.from_url(args.redis))
            await r.incrby(args.counter, len(batch))

    sys.argv = [sys.argv[0], "worker", "-l", "warn", "--without-web"]
    app.main()


if __name__ == "__main__":
    main()
