"""liftrec._http: the writes of one loop iteration leave as one write; close sends what was written first."""

from __future__ import annotations

import asyncio

from liftrec._http import CoalescingTransport


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
