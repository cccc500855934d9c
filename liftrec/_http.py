"""uvicorn's httptools protocol with the writes of one event-loop iteration sent together.

uvicorn writes a response's status line and headers with one
``transport.write`` and its body with another: two ``send`` system calls and
two TCP segments per answer on a keep-alive connection (the client wakes up
for the head, then again for the body). :class:`CoalescingHttpTools` hands
uvicorn a transport that gathers the writes made during one loop iteration and
sends them with one call at its end (``loop.call_soon``), so a JSON answer
leaves as one segment. Everything else is uvicorn's, unchanged; ``liftrec
serve`` passes the class as uvicorn's ``http`` protocol. Measured in
``docs/api-performance.md``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["MSG_CLOSED", "MSG_CONN", "MSG_READY", "MSG_STOPPING", "CoalescingHttpTools", "CoalescingTransport",
           "HandedConnectionsServer"]

log = logging.getLogger(__name__)

#: Messages between ``liftrec serve``'s parent and a worker (one per SOCK_SEQPACKET message).
MSG_READY = b"R"       # worker -> parent: its app has started, send connections
MSG_STOPPING = b"S"    # worker -> parent: shutting down, send no more
MSG_CLOSED = b"C"      # worker -> parent: + 4-byte big-endian count of its connections closed since the last report
MSG_CONN = b"c"        # parent -> worker: one accepted connection, its descriptor attached (SCM_RIGHTS)


class CoalescingTransport:
    """A transport proxy: ``write`` calls of one loop iteration leave as one ``write`` of the real transport."""

    __slots__ = ("_buf", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._buf: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._buf:
            self._loop.call_soon(self._flush)
        self._buf.append(data)

    def writelines(self, chunks: Any) -> None:
        for c in chunks:
            self.write(c)

    def _flush(self) -> None:
        if self._buf:
            data = b"".join(self._buf) if len(self._buf) > 1 else self._buf[0]
            self._buf = []
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()   # what was written goes out before the close
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpTools(HttpToolsProtocol):
    """uvicorn's httptools HTTP/1.1 protocol over a :class:`CoalescingTransport`."""

    #: called once the connection has closed (set per connection by :class:`HandedConnectionsServer`)
    on_lost: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.on_lost is not None:
            self.on_lost()


class HandedConnectionsServer(uvicorn.Server):
    """A uvicorn server that serves the connections its parent hands over on ``ctrl``.

    ``ctrl`` is this worker's end of a Unix ``SOCK_SEQPACKET`` socket pair with the parent
    (``liftrec.cmd_serve``). Messages: the worker sends ``R`` once its app has started (lifespan
    done: bundle and catalog loaded), ``S`` when it shuts down, and ``C`` + a 4-byte count of its
    connections that closed since the last report (one report per loop iteration at most); the
    parent sends ``c`` with one accepted connection's descriptor (``SCM_RIGHTS``). Each received
    connection is adopted with ``loop.connect_accepted_socket`` and the protocol uvicorn's
    ``Server.startup`` would build (``config.http_protocol_class(config=, server_state=,
    app_state=, _loop=)``, pinned by ``tests/unit/test_api_http_protocol.py``), so uvicorn's
    connection bookkeeping, keep-alive and graceful shutdown apply unchanged. When the parent's end
    closes (the parent died), the worker shuts down.
    """

    def __init__(self, config: uvicorn.Config, ctrl: socket.socket) -> None:
        super().__init__(config)
        self.ctrl = ctrl
        self.adopted = 0
        self._closed = 0
        self._report_due = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])   # the lifespan (app start-up); no listening socket
        if not self.started:
            return
        self._loop = loop = asyncio.get_running_loop()
        self.ctrl.setblocking(False)
        loop.add_reader(self.ctrl.fileno(), self._receive)
        self._send(MSG_READY)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._loop is not None and self.ctrl.fileno() >= 0:
            self._loop.remove_reader(self.ctrl.fileno())
            self._send(MSG_STOPPING)
        await super().shutdown(sockets=sockets)

    def _send(self, msg: bytes) -> bool:
        try:
            self.ctrl.send(msg)
        except BlockingIOError:
            return False
        except OSError:   # the parent is gone
            pass
        return True

    def protocol(self) -> asyncio.Protocol:
        """A connection's protocol, as uvicorn's ``Server.startup`` builds it, that reports its close."""
        p = self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state, _loop=self._loop)
        p.on_lost = self._lost
        return p  # type: ignore[no-any-return]

    def _receive(self) -> None:
        assert self._loop is not None
        while True:
            try:
                msg, fds, _, _ = socket.recv_fds(self.ctrl, 16, 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg, fds = b"", []
            if not msg and not fds:    # the parent is gone: stop like on SIGTERM
                self._loop.remove_reader(self.ctrl.fileno())
                self.ctrl.close()
                self.should_exit = True
                return
            for fd in fds:
                self.adopted += 1
                self._loop.create_task(self._adopt(socket.socket(fileno=fd)))

    async def _adopt(self, sock: socket.socket) -> None:
        assert self._loop is not None
        try:
            await self._loop.connect_accepted_socket(self.protocol, sock)
        except OSError as e:   # closed by the client meanwhile
            log.debug("handed connection not adopted: %s", e)
            sock.close()
            self._lost()

    def _lost(self) -> None:
        self._closed += 1
        if not self._report_due and self._loop is not None:
            self._report_due = True
            self._loop.call_soon(self._report)

    def _report(self) -> None:
        assert self._loop is not None
        if self.ctrl.fileno() < 0 or self._send(_closed_message(self._closed)):
            self._closed = 0
            self._report_due = False
        else:   # the parent's queue is full: report later
            self._loop.call_later(0.01, self._report)


def _closed_message(n: int) -> bytes:
    return MSG_CLOSED + min(n, 2**32 - 1).to_bytes(4, "big")
