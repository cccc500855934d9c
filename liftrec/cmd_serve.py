"""``liftrec serve``: the HTTP API (recommendations, profiles, event collector, health, metrics) under uvicorn."""

from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import multiprocessing.process
import os
import selectors
import signal
import socket
import time

import typer
from fastapi import FastAPI

from liftrec._common import endpoints_or_exit, fail, load_settings, setup_logging
from liftrec._http import MSG_CLOSED, MSG_CONN, MSG_READY, MSG_STOPPING
from liftrec.stack import Endpoints

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
#: Environment through which the parent hands the coalescing options to its worker processes.
_WINDOW_ENV = "LIFTREC_SERVE_BATCH_WINDOW_MS"
_MAX_ENV = "LIFTREC_SERVE_BATCH_MAX"
_HOLD_ENV = "LIFTREC_SERVE_BATCH_HOLD_MS"
#: uvicorn options of every worker: uvloop + httptools (with a response's head and body sent in
#: one write, see :mod:`liftrec._http`), no access log (one INFO line per request cost a few
#: percent of the CPU under load; the Prometheus metrics count requests).
_UVICORN = {"loop": "uvloop", "http": "liftrec._http:CoalescingHttpTools", "access_log": False}


def app_factory() -> FastAPI:
    """Build the app in a uvicorn worker process (``--workers`` > 1).

    The parent resolved the stack and exported ``KAFKA_BOOTSTRAP`` / ``REDIS_URL``
    (and the coalescing options), so every worker talks to the same servers.
    """
    from serving.api import create_app

    settings = load_settings()
    embedded = os.environ.get("LIFTREC_SERVE_EMBEDDED") == "1"
    if not (settings.kafka_bootstrap and settings.redis_url):
        raise RuntimeError("app_factory needs KAFKA_BOOTSTRAP and REDIS_URL; start it with `liftrec serve`")
    return create_app(settings, Endpoints(settings.kafka_bootstrap, settings.redis_url, embedded=embedded),
                      **_batching(os.environ.get(_WINDOW_ENV), os.environ.get(_MAX_ENV),
                                 os.environ.get(_HOLD_ENV)))


log = logging.getLogger(__name__)

#: A worker that exits sooner than this after its start counts as a failed start.
_EARLY_EXIT_S = 5.0
#: Failed starts in a row after which ``serve`` gives up.
_MAX_FAILED_STARTS = 3
#: Backlog of the parent's listening socket (uvicorn's default).
_BACKLOG = 2048


def _listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not listening yet)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _worker(ctrl: socket.socket, level: str) -> None:
    """One API worker process: one uvicorn server fed with connections by the parent over ``ctrl``."""
    import uvicorn

    from liftrec._http import HandedConnectionsServer

    setup_logging(level)
    config = uvicorn.Config("liftrec.cmd_serve:app_factory", factory=True, log_level=level, **_UVICORN)  # type: ignore[arg-type]
    HandedConnectionsServer(config, ctrl).run()


@dataclasses.dataclass(eq=False)
class _Worker:
    """The parent's view of one worker process."""

    proc: multiprocessing.process.BaseProcess
    ctrl: socket.socket          # the parent's end of the worker's control socket (non-blocking)
    started: float
    ready: bool = False          # its app has started and it takes connections
    live: int = 0                # connections handed to it and not reported closed
    turn: int = 0                # hand-out number of its latest connection (ties go to the one served longest ago)


class _Dispatcher:
    """The parent of ``liftrec serve --workers N``: accepts on the one listening socket and hands each
    connection to the ready worker with the fewest live connections (ties: the one served longest ago).

    A worker gets the accepted socket's file descriptor over a Unix ``SOCK_SEQPACKET`` socket pair
    (``SCM_RIGHTS``) and adopts it into its uvicorn event loop; it reports when its app has started
    and, in batches, how many of its connections have closed. A keep-alive connection is handed over
    once: the requests on it never pass through the parent. The parent listens only once every worker
    of the first start is ready; a worker that dies is restarted (three failed starts in a row stop
    ``serve``) and takes new connections as soon as its app has started, the connections it held are
    lost with it.
    """

    def __init__(self, host: str, port: int, workers: int, level: str) -> None:
        self.listener = _listener(host, port)
        self.listener.setblocking(False)
        self.port = int(self.listener.getsockname()[1])
        self.level = level
        self.sel = selectors.DefaultSelector()
        self.ctx = multiprocessing.get_context("spawn")
        self.pool = [self._start() for _ in range(workers)]
        self.listening = False
        self.accepting = False
        self.pending: collections.deque[socket.socket] = collections.deque()   # accepted, no ready worker yet
        self.handed = 0
        self.failed = 0
        self.stopping = False

    def _start(self) -> _Worker:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        p = self.ctx.Process(target=_worker, args=(theirs, self.level), name="liftrec-api-worker")
        p.start()          # spawn passes `theirs` to the child by descriptor
        theirs.close()
        mine.setblocking(False)
        w = _Worker(p, mine, time.monotonic())
        self.sel.register(mine, selectors.EVENT_READ, w)
        return w

    def _drop(self, w: _Worker) -> None:
        """Stop handing connections to ``w`` and close the parent's end of its control socket."""
        w.ready = False
        if w.ctrl.fileno() >= 0:
            self.sel.unregister(w.ctrl)
            w.ctrl.close()

    def _accept(self, want: bool) -> None:
        if want != self.accepting and self.listening:
            if want:
                self.sel.register(self.listener, selectors.EVENT_READ, None)
            else:
                self.sel.unregister(self.listener)
            self.accepting = want

    def run(self) -> None:
        while not self.stopping:
            # the workers' messages first: connections reported closed count before new ones go out
            for key, _ in sorted(self.sel.select(0.2), key=lambda e: e[0].data is None):
                if key.data is None:
                    self._on_accept()
                else:
                    self._on_message(key.data)
            if not self.listening and all(w.ready for w in self.pool):
                self.listener.listen(_BACKLOG)
                self.listening = True
            self._supervise()
            self._accept(any(w.ready for w in self.pool))

    def _on_accept(self) -> None:
        for _ in range(64):
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:   # e.g. out of descriptors: try again on the next wake-up
                log.warning("accept failed: %s", e)
                return
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._hand_out(conn)

    def _hand_out(self, conn: socket.socket) -> bool:
        for w in sorted((w for w in self.pool if w.ready), key=lambda w: (w.live, w.turn)):
            try:
                socket.send_fds(w.ctrl, [MSG_CONN], [conn.fileno()])
            except BlockingIOError:      # its queue is full: try the next one
                continue
            except OSError:              # it died: its end is closed
                self._drop(w)
                continue
            self.handed += 1
            w.live += 1
            w.turn = self.handed
            conn.close()                 # the worker holds the connection now
            return True
        self.pending.append(conn)
        return False

    def _on_message(self, w: _Worker) -> None:
        while w.ctrl.fileno() >= 0:
            try:
                msg = w.ctrl.recv(16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg = b""
            if not msg or msg == MSG_STOPPING:   # gone, or going: no more connections for it
                self._drop(w)
                return
            if msg == MSG_READY:
                w.ready = True
                while self.pending and self._hand_out(self.pending.popleft()):
                    pass
            elif msg[:1] == MSG_CLOSED:
                w.live = max(0, w.live - int.from_bytes(msg[1:5], "big"))

    def _supervise(self) -> None:
        for n, w in enumerate(self.pool):
            if w.proc.is_alive() or self.stopping:
                continue
            self._drop(w)
            early = time.monotonic() - w.started < _EARLY_EXIT_S
            self.failed = self.failed + 1 if early else 0
            if self.failed >= _MAX_FAILED_STARTS:
                fail(f"API worker exited {self.failed} times right after its start (last exit code "
                     f"{w.proc.exitcode}); see the log above")
            log.warning("api worker pid=%s exited with %s; restarting", w.proc.pid, w.proc.exitcode)
            self.pool[n] = self._start()

    def close(self) -> None:
        """Stop accepting, then stop every worker gracefully (SIGTERM; killed after 30 s)."""
        self._accept(False)
        self.listener.close()
        for conn in self.pending:
            conn.close()
        for w in self.pool:
            if w.proc.is_alive() and w.proc.pid is not None:
                os.kill(w.proc.pid, signal.SIGTERM)
        for w in self.pool:
            w.proc.join(30)
            if w.proc.is_alive():
                w.proc.kill()
            self._drop(w)
        self.sel.close()


def _run_workers(host: str, port: int, workers: int, level: str) -> None:
    """Run ``workers`` API processes fed with connections by this one (:class:`_Dispatcher`).

    Why not a socket per worker: uvicorn's own ``--workers`` shares ONE listening socket, and
    whichever worker's loop wakes first accepts every pending connection (measured with 50 keep-alive
    connections: 37-50 on one of two workers); one ``SO_REUSEPORT`` socket per worker (session 7) lets
    the kernel hash connections onto workers, which left the busier worker with 54-62 % of the API's
    CPU in 5 of 6 trials. Handing connections out by count gives each worker its share.
    SIGINT/SIGTERM stop accepting, then stop every worker gracefully.
    """
    d = _Dispatcher(host, port, workers, level)

    def stop(signum: int, frame: object) -> None:
        d.stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        d.run()
    finally:
        d.close()


def _batching(window_ms: float | str | None, batch_max: int | str | None,
              hold_ms: float | str | None = None) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    if window_ms is not None:
        out["batch_window_s"] = float(window_ms) / 1000.0
    if hold_ms is not None:
        out["batch_hold_s"] = float(hold_ms) / 1000.0
    if batch_max is not None:
        out["batch_max"] = int(batch_max)
    return out


def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
    workers: int = typer.Option(1, min=1, max=64, help="uvicorn worker processes."),
    state_dir: str = typer.Option(None, help="State folder of the embedded stack."),
    log_level: str = typer.Option("info", help=f"One of {', '.join(LOG_LEVELS)}."),
    batch_window_ms: float = typer.Option(
        None, min=0.0, max=100.0,
        help="Longest wait of a user list request for others to share its Redis read and recommender "
        "call (default 1 ms; 0: only requests arriving together)."),
    batch_max: int = typer.Option(None, min=1, max=256,
                                  help="Most user lists per coalesced call (default 16; 1: no coalescing)."),
    batch_hold_ms: float = typer.Option(
        None, min=0.0, max=100.0,
        help="Longest wait of a lone list to compute for a second one to share its recommender call, used "
        "only while such requests arrive at least that often (default 0: no wait)."),
) -> None:
    """Serve the HTTP API: recommendations, similar, bought-together, profiles, POST /v1/events, /health, /metrics; docs at /docs."""
    import uvicorn

    from serving.api import create_app

    level = log_level.lower()
    if level not in LOG_LEVELS:
        fail(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    settings = load_settings(state_dir=state_dir)
    ep = endpoints_or_exit(settings)
    setup_logging(level)
    typer.echo(
        f"liftrec API on http://{host}:{port} (docs /docs) workers={workers} "
        f"kafka={ep.kafka_bootstrap} redis={ep.redis_url}",
        err=True,
    )
    if workers == 1:
        uvicorn.run(create_app(settings, ep, **_batching(batch_window_ms, batch_max, batch_hold_ms)), host=host, port=port,
                    log_level=level, **_UVICORN)  # type: ignore[arg-type]
        return
    os.environ["KAFKA_BOOTSTRAP"] = ep.kafka_bootstrap
    os.environ["REDIS_URL"] = ep.redis_url
    os.environ["LIFTREC_SERVE_EMBEDDED"] = "1" if ep.embedded else "0"
    if batch_window_ms is not None:
        os.environ[_WINDOW_ENV] = str(batch_window_ms)
    if batch_max is not None:
        os.environ[_MAX_ENV] = str(batch_max)
    if batch_hold_ms is not None:
        os.environ[_HOLD_ENV] = str(batch_hold_ms)
    _run_workers(host, port, workers, level)


def register(app: typer.Typer) -> None:
    app.command()(serve)
