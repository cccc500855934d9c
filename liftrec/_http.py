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
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["CoalescingHttpTools", "CoalescingTransport"]


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

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
