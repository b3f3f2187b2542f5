"""Peer: an identity on the process's transport runtime that serves RPC handlers and calls other peers.

A Peer is the handle the rest of the engine holds: it registers handlers (served by its Dispatcher, dispatch.py),
calls and streams to other peers over the links of its ConnectionPool (pool.py: which wire a link runs over, dials,
eviction), and owns the tasks both run, so closing it ends them all.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import AsyncIterable, Iterable, Sequence

import torch

from hiveengine.errors import HiveEngineError, RPCTimeoutError
from hiveengine.transport.address import PeerAddress
from hiveengine.transport.connection import Connection
from hiveengine.transport.dispatch import Allocator, Dispatcher, Handler, Handlers, StreamHandler
from hiveengine.transport.identity import Identity, PeerID
from hiveengine.transport.limits import DEFAULT_LIMITS, TransportLimits
from hiveengine.transport.pool import ConnectionPool
from hiveengine.transport.reachability import DIALBACK_METHOD, dialback_handler
from hiveengine.transport.reactor import retrieve_outcome
from hiveengine.transport.relay import offer_from_environment, reserve
from hiveengine.transport.resources import ResourceManager
from hiveengine.transport.runtime import Runtime
from hiveengine.transport.stream import iterate_chunks
from hiveengine.transport.upgrade import UPGRADE_METHOD, upgrade_handler
from hiveengine.transport.wire import (
    KEY_DEADLINE,
    KEY_HEADER,
    KEY_ID,
    KEY_KIND,
    KEY_LAST,
    KEY_METHOD,
    Kind,
)

logger = logging.getLogger(__name__)

ANNOUNCE_HOST_ENV = "HIVEENGINE_ANNOUNCE_HOST"
DEFAULT_ANNOUNCE_HOST = "127.0.0.1"
_NOTHING = object()  # no chunk held yet


class Peer:
    """Serves registered handlers and calls other peers; all methods run on the transport loop."""

    def __init__(
        self,
        identity: Identity | None = None,
        *,
        port: int | None = None,
        announce_host: str | None = None,
        limits: TransportLimits = DEFAULT_LIMITS,
        runtime: Runtime | None = None,
    ):
        self.identity = identity or Identity.generate()
        self.limits = limits
        self.runtime = runtime or Runtime.get()
        self.announce_host = announce_host or os.environ.get(ANNOUNCE_HOST_ENV, DEFAULT_ANNOUNCE_HOST)
        self._handlers = Handlers()
        self._tasks: set[asyncio.Task] = set()
        self.resources = ResourceManager(limits)
        self.dispatcher = Dispatcher(self._handlers, limits, self.resources, self.spawn)
        self.pool = ConnectionPool(self, self.dispatcher, self.spawn)
        self.relayed: PeerAddress | None = None  # our address through a relay (relay.reserve), announced if set
        self.reservation = None  # our kept slot with that relay (relay.Reservation)
        self._closed = False
        self.port = self.runtime.run(self.runtime.ensure_listener(port), timeout=30)
        self.runtime.register_peer(self)
        self.register(DIALBACK_METHOD, dialback_handler(self))
        self.register(UPGRADE_METHOD, upgrade_handler(self))
        if self.runtime.relay is None:
            offer_from_environment(self)
        if self.runtime.reachable is False and self.runtime.reserved_relay is not None:
            self._reserve_like_the_others()

    def _reserve_like_the_others(self) -> None:
        """Reserve with the relay another peer of this process reserved with (logged if it refuses: we are then
        reachable only over links we open ourselves)."""
        try:
            self.runtime.run(reserve(self, self.runtime.reserved_relay), timeout=self.limits.connect_timeout * 3)
        except (HiveEngineError, OSError, TimeoutError) as e:
            logger.warning("no relay slot for %s at %s: %s", self.peer_id, self.runtime.reserved_relay, e)

    @property
    def peer_id(self) -> PeerID:
        return self.identity.peer_id

    @property
    def address(self) -> PeerAddress:
        """Where others reach us: through our relay once we reserved a slot, else directly."""
        if self.relayed is not None:
            return self.relayed
        return PeerAddress(self.announce_host, self.port, self.peer_id, self.runtime.tcp_port)

    @property
    def closed(self) -> bool:
        """Whether `aclose` ran: the peer serves and calls no more."""
        return self._closed

    def __repr__(self) -> str:
        return f"Peer({self.address})"

    # ---- handlers

    def register(self, method: str, handler: Handler, allocate: Allocator | None = None) -> None:
        """Serve `method` with `async handler(Request) -> dict | (dict, tensors) | None`. With `allocate`,
        `allocate(header, specs, sender)` may return buffers for the incoming tensors (None: fresh ones); it is called
        when the request arrives, before its tensors."""
        self._handlers.calls[method] = handler
        if allocate is None:
            self._handlers.allocators.pop(method, None)
        else:
            self._handlers.allocators[method] = allocate

    def register_stream(self, method: str, handler: StreamHandler) -> None:
        """Serve the stream `method` with `async handler(StreamRequest) -> dict | None`."""
        self._handlers.streams[method] = handler

    # ---- calling

    async def call(
        self,
        address: PeerAddress | PeerID | str,
        method: str,
        header: dict | None = None,
        tensors: Sequence[torch.Tensor] = (),
        timeout: float | None = None,
        out: Sequence[torch.Tensor] | None = None,
    ) -> tuple[dict, list[torch.Tensor]]:
        """Call `method` on the peer at `address`; return its (header, tensors) or raise a TransportError.
        With `out`, the reply's tensors are received straight into those (contiguous, matching) buffers."""
        timeout = timeout or self.limits.default_call_timeout
        coro = self._call(address, method, header or {}, list(tensors), timeout, out)
        return await self._with_deadline(coro, timeout, "call", method, address)

    def call_sync(self, *args, **kwargs) -> tuple[dict, list[torch.Tensor]]:
        """Blocking twin of `call` for synchronous code (not for use on the transport loop)."""
        return self.runtime.run(self.call(*args, **kwargs), timeout=None)

    async def _call(self, address, method, header, tensors, timeout, out) -> tuple[dict, list[torch.Tensor]]:
        conn = await self.connect(address)
        request_id = conn.new_request_id()
        reply = conn.expect_reply(request_id, out)
        try:
            await conn.send(
                {
                    KEY_KIND: Kind.REQUEST,
                    KEY_ID: request_id,
                    KEY_METHOD: method,
                    KEY_HEADER: header,
                    KEY_DEADLINE: timeout,
                },
                tensors,
            )
            return await reply
        finally:
            conn.forget_reply(request_id)

    async def stream(
        self,
        address: PeerAddress | PeerID | str,
        method: str,
        chunks: Iterable[tuple[dict, torch.Tensor]] | AsyncIterable[tuple[dict, torch.Tensor]],
        header: dict | None = None,
        timeout: float | None = None,
    ) -> dict:
        """Send (chunk header, tensor) pairs as one stream; at most `stream_window` chunks are in flight."""
        timeout = timeout or self.limits.default_call_timeout
        coro = self._stream(address, method, chunks, header or {}, timeout)
        return await self._with_deadline(coro, timeout, "stream", method, address)

    async def send_tensor(
        self, address, method: str, tensor: torch.Tensor, header: dict | None = None, timeout: float | None = None
    ) -> dict:
        """Stream one (possibly huge) tensor in `stream_chunk_bytes` pieces; the receiver sees offsets."""
        return await self.stream(
            address, method, iterate_chunks(tensor, self.limits.stream_chunk_bytes), header, timeout
        )

    async def _stream(self, address, method, chunks, header, timeout) -> dict:
        conn = await self.connect(address)
        request_id = conn.new_request_id()
        reply = conn.expect_reply(request_id)
        in_flight: deque[list[asyncio.Future]] = deque()  # the sends of each chunk not yet complete
        try:
            await conn.send(
                {
                    KEY_KIND: Kind.STREAM_OPEN,
                    KEY_ID: request_id,
                    KEY_METHOD: method,
                    KEY_HEADER: header,
                    KEY_DEADLINE: timeout,
                }
            )
            ended = False
            async for chunk, last in _marked(chunks):
                if reply.done():
                    break  # the receiver answered early (an error, or it needs no more)
                await self._post_chunk(conn, request_id, chunk, in_flight, last)
                ended = last
            else:
                if not ended and not reply.done():
                    await conn.send({KEY_KIND: Kind.STREAM_END, KEY_ID: request_id})
            while in_flight:
                await conn.wait(in_flight.popleft())
            result, _ = await reply
            return result
        finally:
            for futures in in_flight:
                for future in futures:
                    retrieve_outcome(future)
            conn.forget_reply(request_id)

    async def _post_chunk(self, conn: Connection, request_id: int, chunk, in_flight: deque, last: bool) -> None:
        """Send one stream chunk (marked as the last, or not); wait while `stream_window` chunks are in flight."""
        chunk_header, tensor = chunk
        message = {KEY_KIND: Kind.STREAM_CHUNK, KEY_ID: request_id, KEY_HEADER: chunk_header}
        if last:
            message[KEY_LAST] = True
        in_flight.append(conn.post(message, [tensor]))
        if len(in_flight) >= self.limits.stream_window:
            await conn.wait(in_flight.popleft())

    async def _with_deadline(self, coro, timeout: float, kind: str, method: str, address):
        """Await `coro` at most `timeout` seconds (the error message is formatted only if it times out)."""
        try:
            async with asyncio.timeout(timeout):
                return await coro
        except TimeoutError:
            raise RPCTimeoutError(f"{kind} {method!r} to {address} did not complete within {timeout} s") from None

    # ---- connections (the pool's; see pool.py)

    async def connect(self, address: PeerAddress | PeerID | str) -> Connection:
        """The cached connection to a peer, opening (and authenticating) one if needed."""
        return await self.pool.connect(address)

    def connection_to(self, peer_id: PeerID) -> Connection | None:
        """Our open connection to `peer_id`, if there is one."""
        return self.pool.connection_to(peer_id)

    def round_trip(self, peer_id: PeerID) -> float | None:
        """Seconds of one round trip to `peer_id` (measured when its link opened; without a link, what our other
        links measure), so that deadlines can adapt to long links; None before we ever had a link."""
        return self.pool.round_trip(peer_id)

    def link_time(self, peer_id: PeerID, since: float | None = None) -> float:
        """Seconds the link to `peer_id` adds to a call whose deadline covers only the remote's work (a dial's
        round trips when no link is open, or none was at `since`; a reply's), at most connect_timeout
        (ConnectionPool.link_time)."""
        return self.pool.link_time(peer_id, since)

    def transfer_time(self, peer_id: PeerID, sent: int, received: int = 0, since: float | None = None) -> float:
        """Seconds the link to `peer_id` adds to a call that moves `sent` bytes there and `received` back, for
        deadlines that cover the remote's work; with `since` (time.monotonic()), a dial counts if the link is
        younger than that (ConnectionPool.transfer_time)."""
        return self.pool.transfer_time(peer_id, sent, received, since)

    async def adisconnect(self, peer_id: PeerID) -> None:
        """Close our connection to `peer_id` (calls waiting on it fail); the next call dials anew."""
        self.pool.disconnect(peer_id)

    def disconnect(self, peer_id: PeerID) -> None:
        """Blocking twin of `adisconnect`."""
        self.runtime.run(self.adisconnect(peer_id), timeout=10)

    def spawn(self, coro, conn: Connection | None = None) -> asyncio.Task:
        """Run `coro` as a task of this peer; with `conn`, it is cancelled when that connection goes."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if conn is not None:
            conn.tasks.add(task)
            task.add_done_callback(conn.tasks.discard)
        return task

    # ---- lifecycle

    async def aclose(self) -> None:
        """Close every connection and stop serving; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.runtime.unregister_peer(self)
        self.pool.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def shutdown(self) -> None:
        """Blocking twin of `aclose`."""
        if not self._closed and not self.runtime.closed:
            self.runtime.run(self.aclose(), timeout=30)


async def _marked(items):
    """(chunk, is it the last) pairs. A synchronous iterable is read one chunk ahead, so its last chunk can
    carry the end of the stream (one message less); an asynchronous one is never waited on ahead of need
    (its chunks may depend on the receiver), so its end goes as a separate message."""
    if hasattr(items, "__aiter__"):
        async for item in items:
            yield item, False
        return
    iterator = iter(items)
    held = next(iterator, _NOTHING)
    for item in iterator:
        yield held, False
        held = item
    if held is not _NOTHING:
        yield held, True
