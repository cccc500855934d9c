"""liftrec._http: the writes of one loop iteration leave as one write; close sends what was written first;
a worker serves the connections handed to it."""

from __future__ import annotations

import asyncio
import socket

import uvicorn

from liftrec._http import CoalescingTransport, HandedConnectionsServer


class RecordingTransport(asyncio.Transport):
    """Stands in for the event loop's socket transport."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, bytes]] = []
        self.closing = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.calls.append(("write", bytes(data)))

    def close(self) -> None:
        self.calls.append(("close", b""))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


async def test_writes_of_one_iteration_are_one_write_and_close_flushes_first() -> None:
    real = RecordingTransport()
    t = CoalescingTransport(real, asyncio.get_running_loop())
    t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    t.write(b"{}")
    assert real.calls == []                       # nothing sent inside the iteration
    await asyncio.sleep(0)
    assert real.calls == [("write", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")]
    t.write(b"a")
    t.write(b"b")
    t.close()                                     # written bytes go out before the close
    assert real.calls[1:] == [("write", b"ab"), ("close", b"")]
    await asyncio.sleep(0)
    assert len(real.calls) == 3                   # the scheduled flush finds nothing left
    t.write(b"late")
    await asyncio.sleep(0)
    assert len(real.calls) == 3                   # nothing is written to a closing transport
    assert t.get_extra_info("peername") == ("127.0.0.1", 1) and t.is_closing()


async def _tiny_app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
    """An ASGI app for the server under test: lifespan accepted, every request answered ``ok``."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()  # type: ignore[operator]
            await send({"type": msg["type"] + ".complete"})  # type: ignore[operator]
            if msg["type"] == "lifespan.shutdown":
                return
    await send({"type": "http.response.start", "status": 200,  # type: ignore[operator]
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]


async def _recv(sock: socket.socket, loop: asyncio.AbstractEventLoop) -> bytes:
    return await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)


async def test_a_handed_connection_is_served_with_uvicorns_protocol_and_its_close_reported() -> None:
    """Pins the uvicorn internals the workers of ``liftrec serve --workers N`` rely on:
    ``Server.startup(sockets=[])`` runs the lifespan and listens on nothing, and
    ``config.http_protocol_class(config=, server_state=, app_state=, _loop=)`` builds a connection's
    protocol that keeps uvicorn's connection bookkeeping (``server_state.connections``)."""
    loop = asyncio.get_running_loop()
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent.setblocking(False)
    config = uvicorn.Config(_tiny_app, http="liftrec._http:CoalescingHttpTools", log_level="warning", lifespan="on")
    server = HandedConnectionsServer(config, child)
    serving = asyncio.create_task(server.serve())
    assert await _recv(parent, loop) == b"R"                   # ready once the lifespan has run
    assert server.servers == []                                # no listening socket of its own

    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    socket.send_fds(parent, [b"c"], [accepted.fileno()])
    accepted.close()                                           # the worker holds the connection now
    client.setblocking(False)
    for _ in range(2):                                         # keep-alive: two requests, one connection
        await loop.sock_sendall(client, b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        answer = await _recv(client, loop)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok"), answer
    assert server.adopted == 1 and len(server.server_state.connections) == 1
    assert server.server_state.total_requests == 2

    client.close()
    assert await _recv(parent, loop) == b"C" + (1).to_bytes(4, "big")   # its close is reported
    assert not server.server_state.connections

    parent.close()                                             # the parent is gone: the worker stops
    await asyncio.wait_for(serving, 10)
    listener.close()
