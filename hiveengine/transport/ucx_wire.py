"""The UCX wire: a connection's tagged messages over one UCX endpoint, progressed by the process's reactor."""

from __future__ import annotations

import asyncio

from hiveengine.transport.reactor import Reactor, close_endpoint


class UcxWire:
    """What a connection needs of a UCX endpoint (the calls go through the reactor, looked up at each call)."""

    kind = "ucx"

    def __init__(self, reactor: Reactor, endpoint):
        self.reactor, self.endpoint = reactor, endpoint
        reactor.hold(self)  # until close(): its endpoint is never left to the garbage collector unclosed

    def __repr__(self) -> str:
        return "UcxWire()"

    @property
    def alive(self) -> bool:
        return self.endpoint is not None and self.endpoint.alive

    def send_now(self, buf, tag: int, more: bool = False) -> asyncio.Future | None:
        """`more` (another message follows at once) only matters to a byte stream: UCX sends each message alone."""
        return self.reactor.send_now(self.endpoint, buf, tag)

    def tag_send(self, buf, tag: int) -> asyncio.Future:
        return self.reactor.tag_send(self.endpoint, buf, tag)

    def tag_recv(self, buf, tag: int) -> asyncio.Future:
        return self.reactor.tag_recv(self.endpoint, buf, tag)

    async def stream_send(self, _endpoint, buf) -> None:
        await self.reactor.stream_send(self.endpoint, buf)

    async def stream_recv(self, _endpoint, buf) -> None:
        await self.reactor.stream_recv(self.endpoint, buf)

    def listen(self, base: int, handler, max_control_bytes: int) -> None:
        self.reactor.listen(base, handler, max_control_bytes)

    def release_base(self, base: int) -> None:
        self.reactor.release_base(base)

    def set_close_callback(self, callback, args: tuple) -> None:
        self.endpoint.set_close_callback(callback, args, None)

    def close(self) -> None:
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is not None:
            self.reactor.release(self)
            close_endpoint(endpoint)
