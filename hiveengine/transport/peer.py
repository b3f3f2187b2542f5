"""Peer: an identity on the process's transport runtime that serves RPC handlers and calls other peers.

Links (a design choice, issue 18). A link to another peer runs over one of two wires, chosen per peer:
- UCX (ucx_wire.py) where both sides can be dialled: shared memory on one host, RDMA where built in, several TCP
  rails otherwise. UCX is what makes the transport fast, so it stays the default.
- TCP (tcp_wire.py) from a peer that cannot be dialled (behind a NAT or a firewall). UCX's TCP transport cannot
  cross a NAT: after the connection request the listener opens the data connection back to the dialler's private
  interface address, which the router drops (openucx/ucx#9526; no UCX setting makes the dialler open every socket,
  and the NAT rig in tools/netns.py shows it). A TCP wire is one socket the unreachable peer opens itself; it carries
  the very same authenticated, encrypted session messages (session.py), and calls in the other direction use it:
  a link is keyed by the remote's peer id, whoever opened it (reverse connections).
Which wire a dial uses: TransportLimits.link ("ucx", "tcp", or "auto": TCP to a peer that accepts it once this peer
learned it is unreachable (`runtime.reachable` False, set by reachability.py) or once a UCX dial to that peer
failed). Every peer answers dial-back requests (reachability.py), so others can learn whether they are reachable.
A peer nobody can dial may also reserve a slot with a relay (relay.py) and announce the relayed address; links to
it then run as TCP wires spliced by the relay, still authenticated and encrypted end to end. A dialler that others can
dial asks it to dial back directly, and that link replaces the relayed one (upgrade.py).
No dial blocks the event loop or outlasts TransportLimits.connect_timeout (UCX_TCP_CONN_NB=y, ucx_env.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from hiveengine import errors
from hiveengine.errors import (
    ConnectionLostError,
    HiveEngineError,
    PeerUnreachableError,
    ProtocolError,
    RemoteError,
    RPCTimeoutError,
)
from hiveengine.transport.address import PeerAddress
from hiveengine.transport.connection import Connection
from hiveengine.transport.handshake import connect_handshake
from hiveengine.transport.identity import Identity, PeerID
from hiveengine.transport.limits import DEFAULT_LIMITS, TransportLimits
from hiveengine.transport.reachability import DIALBACK_METHOD, dialback_handler
from hiveengine.transport.reactor import retrieve_outcome
from hiveengine.transport.relay import connect_through, offer_from_environment, reserve
from hiveengine.transport.resources import ResourceManager
from hiveengine.transport.runtime import Runtime
from hiveengine.transport.stream import Chunk, StreamReader, iterate_chunks
from hiveengine.transport.tcp_wire import TcpWire, new_recv_base, open_tcp
from hiveengine.transport.ucx_wire import UcxWire
from hiveengine.transport.upgrade import UPGRADE_METHOD, request_upgrade, upgrade_handler, wants_upgrade
from hiveengine.transport.wire import (
    KEY_DEADLINE,
    KEY_ERROR,
    KEY_FRAMES,
    KEY_HEADER,
    KEY_ID,
    KEY_INLINE,
    KEY_KIND,
    KEY_LAST,
    KEY_METHOD,
    KEY_SEQ,
    FrameSpec,
    Kind,
    frame_specs,
    inline_tensors,
    restore_requires_grad,
)

logger = logging.getLogger(__name__)

HandlerResult = dict | tuple[dict, Sequence[torch.Tensor]] | None
Handler = Callable[["Request"], Awaitable[HandlerResult]]
StreamHandler = Callable[["StreamRequest"], Awaitable[dict | None]]
Allocator = Callable[[dict, list[FrameSpec]], Sequence[torch.Tensor] | None]
ANNOUNCE_HOST_ENV = "HIVEENGINE_ANNOUNCE_HOST"
DEFAULT_ANNOUNCE_HOST = "127.0.0.1"
CONNECTION_ERROR_ID = 0  # an ERROR with this id concerns the whole connection, not one call
_NOTHING = object()  # no chunk held yet

# Errors a remote peer may name in a reply, mapped to the class the caller raises.
REMOTE_ERROR_TYPES: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (
        errors.UnknownMethodError,
        errors.RemoteHandlerError,
        errors.PeerBusyError,
        errors.ResourceLimitError,
        errors.ProtocolError,
        errors.RPCTimeoutError,
        errors.RemoteError,
    )
}


@dataclass
class Request:
    """An incoming call as a handler sees it."""

    method: str
    header: dict
    tensors: list[torch.Tensor]
    sender: PeerID

    def tensor(self, index: int, dtype: torch.dtype | None = None, shape: Sequence[int] | None = None) -> torch.Tensor:
        """The `index`-th tensor, checked against the expected dtype and shape (ProtocolError otherwise)."""
        if index >= len(self.tensors):
            raise ProtocolError(f"{self.method!r} expects at least {index + 1} tensors, got {len(self.tensors)}")
        t = self.tensors[index]
        if dtype is not None and t.dtype != dtype:
            raise ProtocolError(f"{self.method!r}: tensor {index} must be {dtype}, got {t.dtype}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ProtocolError(f"{self.method!r}: tensor {index} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        return t


@dataclass
class StreamRequest:
    """An incoming stream: iterate `chunks` and read each (optionally straight into your own buffer)."""

    method: str
    header: dict
    sender: PeerID
    chunks: StreamReader = field(repr=False)
    _reserve: Callable[[int], None] | None = field(default=None, repr=False)

    def reserve(self, nbytes: int) -> None:
        """Count `nbytes` of memory this stream makes us hold against the sender's and the whole peer's inbound
        budgets until the handler returns; ResourceLimitError (naming the limit) if it does not fit."""
        if self._reserve is not None:
            self._reserve(nbytes)


def _error_reply(request_id: int, error: BaseException) -> dict:
    if isinstance(error, HiveEngineError) and type(error).__name__ in REMOTE_ERROR_TYPES:
        kind, message = type(error).__name__, str(error)
    elif isinstance(error, TimeoutError):
        kind, message = "RPCTimeoutError", "the handler did not finish before the call's deadline"
    else:
        kind, message = "RemoteHandlerError", f"{type(error).__name__}: {error}"
    return {KEY_KIND: Kind.ERROR, KEY_ID: request_id, KEY_ERROR: [kind, message]}


def _remote_error(body: dict, remote: PeerID) -> Exception:
    kind, message = "RemoteError", "malformed error reply"
    info = body.get(KEY_ERROR)
    if isinstance(info, list) and len(info) == 2 and all(isinstance(x, str) for x in info):
        kind, message = info
    cls = REMOTE_ERROR_TYPES.get(kind, RemoteError)
    text = f"{remote}: {message}"
    if cls is errors.ResourceLimitError:
        named = re.search(r"TransportLimits\.(\w+)=", message)
        return cls(text, kind, named.group(1) if named else None)
    return cls(text, kind) if issubclass(cls, RemoteError) else cls(text)


def _normalize_result(result: HandlerResult) -> tuple[dict, Sequence[torch.Tensor]]:
    if result is None:
        return {}, ()
    if isinstance(result, dict):
        return result, ()
    header, tensors = result
    return header or {}, tensors


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
        self._handlers: dict[str, Handler] = {}
        self._allocators: dict[str, Allocator] = {}
        self._stream_handlers: dict[str, StreamHandler] = {}
        self._connections: dict[PeerID, Connection] = {}
        self._connecting: dict[PeerID, asyncio.Future] = {}
        self._streams: dict[tuple[int, int], StreamReader] = {}
        self._tasks: set[asyncio.Task] = set()
        self.resources = ResourceManager(limits)
        self._eviction: asyncio.TimerHandle | None = None  # a later eviction pass, when one is due
        self.relayed: PeerAddress | None = None  # our address through a relay (relay.reserve), announced if set
        self.reservation = None  # our kept slot with that relay (relay.Reservation)
        self._on_lost: dict[PeerID, list[Callable[[], None]]] = {}  # one-shot: our link to that peer was lost
        self._upgrades: dict[PeerID, asyncio.Task] = {}  # relayed links we asked to be made direct (upgrade.py)
        self._tcp_only: set[PeerID] = set()  # peers a UCX dial failed to reach (link "auto"): dialled over TCP
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

    def __repr__(self) -> str:
        return f"Peer({self.address})"

    # ---- handlers

    def register(self, method: str, handler: Handler, allocate: Allocator | None = None) -> None:
        """Serve `method` with `async handler(Request) -> dict | (dict, tensors) | None`. With `allocate`,
        `allocate(header, specs)` may return buffers for the incoming tensors (None: fresh ones)."""
        self._handlers[method] = handler
        if allocate is None:
            self._allocators.pop(method, None)
        else:
            self._allocators[method] = allocate

    def register_stream(self, method: str, handler: StreamHandler) -> None:
        """Serve the stream `method` with `async handler(StreamRequest) -> dict | None`."""
        self._stream_handlers[method] = handler

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
        reply = conn.pending[request_id] = asyncio.get_running_loop().create_future()
        if out is not None:
            conn.reply_buffers[request_id] = out
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
            _forget_reply(conn, request_id)

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
        reply = conn.pending[request_id] = asyncio.get_running_loop().create_future()
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
            _forget_reply(conn, request_id)

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

    # ---- connections

    async def connect(self, address: PeerAddress | PeerID | str) -> Connection:
        """The cached connection to a peer, opening (and authenticating) one if needed."""
        if isinstance(address, PeerID):
            conn = self._connections.get(address)
            if conn is None or conn.closed:
                raise PeerUnreachableError(f"no open connection to {address} and no address to dial")
            return conn
        address = PeerAddress.parse(address)
        conn = self._connections.get(address.peer_id)
        if conn is not None and not conn.closed:
            return conn
        pending = self._connecting.get(address.peer_id)
        if pending is None:
            pending = self._connecting[address.peer_id] = asyncio.ensure_future(self._dial(address))
            pending.add_done_callback(lambda f: self._dialed(address.peer_id, f))
        return await asyncio.shield(pending)

    def _dialed(self, peer_id: PeerID, attempt: asyncio.Future) -> None:
        self._connecting.pop(peer_id, None)
        if not attempt.cancelled():
            attempt.exception()  # retrieved: every caller may have given up waiting already

    async def adisconnect(self, peer_id: PeerID) -> None:
        """Close our connection to `peer_id` (calls waiting on it fail); the next call dials anew."""
        conn = self._connections.pop(peer_id, None)
        if conn is not None:
            conn.lost(ConnectionLostError(f"disconnected from {peer_id} on request"))

    def disconnect(self, peer_id: PeerID) -> None:
        """Blocking twin of `adisconnect`."""
        self.runtime.run(self.adisconnect(peer_id), timeout=10)

    def _evict_idle(self) -> None:
        """Close least recently used idle connections while there are more than `max_connections`; never one
        with a call in flight (either way) and never one still in its grace period (tried again after it)."""
        self._eviction = None
        excess = len(self._connections) - self.limits.max_connections
        if excess <= 0 or self._closed:
            return
        now, grace = time.monotonic(), self.limits.connection_grace_seconds
        idle = [c for c in self._connections.values() if c.idle and now - c.opened >= grace]
        for conn in sorted(idle, key=lambda c: c.last_used)[:excess]:
            del self._connections[conn.remote]
            conn.lost(ConnectionLostError(f"closed idle connection to {conn.remote} (max_connections reached)"))
        if len(self._connections) > self.limits.max_connections and self._eviction is None:
            self._eviction = asyncio.get_running_loop().call_later(grace, self._evict_idle)

    def link_for(self, address: PeerAddress) -> str:
        """Which wire a dial to `address` uses now: "ucx" or "tcp" (see the module docstring)."""
        choice = self.limits.link
        if address.relay:
            return "tcp"  # a relay splices TCP wires only
        if choice != "auto":
            return choice
        if address.tcp_port and (self.runtime.reachable is False or address.peer_id in self._tcp_only):
            return "tcp"
        return "ucx"

    async def _dial(self, address: PeerAddress) -> Connection:
        if self._closed:
            raise ConnectionLostError("this peer is shut down")
        kind = self.link_for(address)
        try:
            conn = await (self.dial_tcp(address) if kind == "tcp" else self._dial_ucx(address))
        except PeerUnreachableError:
            if kind != "ucx" or self.limits.link != "auto" or not address.tcp_port:
                raise
        else:
            if wants_upgrade(self, address):
                self._start_upgrade(address)
            return conn
        conn = await self.dial_tcp(address)  # UCX could not reach it (a NAT on our side, say): our own socket can
        self._tcp_only.add(address.peer_id)
        logger.info("%s is reached over TCP: a UCX link to it failed", address.peer_id)
        return conn

    def _start_upgrade(self, address: PeerAddress) -> None:
        """Ask the peer we reached through a relay to dial us directly (upgrade.py), in the background."""
        if len(self._upgrades) >= self.limits.max_connections:
            self._upgrades = {k: t for k, t in self._upgrades.items() if not t.done()}
        self._upgrades[address.peer_id] = self._spawn(request_upgrade(self, address))

    async def upgraded(self, peer_id: PeerID) -> bool | None:
        """Whether our relayed link to `peer_id` became direct (upgrade.py), awaited while the upgrade runs; None
        when no upgrade was tried (the link was never relayed, or we cannot be dialled)."""
        task = self._upgrades.get(peer_id)
        return None if task is None else await asyncio.shield(task)

    async def _dial_ucx(self, address: PeerAddress) -> Connection:
        return self.adopt(*await self._open_ucx(address, self.identity), inbound=False)

    async def dial_tcp(self, address: PeerAddress) -> Connection:
        """A fresh TCP wire to `address`, opened by us, authenticated and in service (it replaces any link we hold
        to that peer for new calls)."""
        return self.adopt(*await self._open_tcp(address, self.identity), inbound=False)

    async def _open_ucx(self, address: PeerAddress, identity: Identity) -> tuple:
        """(wire, authentication, receive base) of a fresh UCX link to `address`, authenticated as `identity`."""
        lib = self.runtime.reactor.lib
        base = self.runtime.new_recv_base()
        wire = None
        try:
            endpoint = lib.UCXEndpoint.create(self.runtime.reactor.worker, address.host, address.port, True)
            wire = UcxWire(self.runtime.reactor, endpoint)
            timeout = self.limits.connect_timeout
            auth = await connect_handshake(wire, None, identity, address.peer_id, base, timeout)
        except Exception as e:
            self.runtime.release_recv_base(base)
            if wire is not None:
                wire.close()
            raise _dial_error(e, address) from None
        return wire, auth, base

    async def _open_tcp(self, address: PeerAddress, identity: Identity) -> tuple:
        """(wire, authentication, receive base) of a fresh TCP wire to `address`, authenticated as `identity`."""
        if not address.tcp_port:
            raise PeerUnreachableError(f"{address} accepts no TCP wires (its address has no tcp=PORT)")
        base, wire = new_recv_base(), None
        deadline = self.limits.connect_timeout
        try:
            async with asyncio.timeout(deadline):
                sock = await open_tcp(address.host, address.tcp_port, deadline)
                try:
                    if address.relay:
                        await connect_through(sock, address.peer_id)
                except BaseException:
                    sock.close()
                    raise
                wire = TcpWire(sock, self.limits, relayed=address.relay is not None)
                auth = await connect_handshake(wire, None, identity, address.peer_id, base, deadline)
        except Exception as e:
            if wire is not None:
                wire.close()
            raise _dial_error(e, address) from None
        return wire, auth, base

    async def probe(self, address: PeerAddress) -> None:
        """Open a fresh UCX link to `address` under a throwaway identity and close it again: whether others can
        dial that peer (reachability.py); PeerUnreachableError or HandshakeError if not. A private swarm's peer
        refuses the throwaway identity, but only after proving it is the peer at that address: reachable."""
        try:
            wire, _, base = await self._open_ucx(address, Identity.generate())
        except errors.MembershipError:
            return
        self.runtime.release_recv_base(base)
        wire.close()

    def when_lost(self, peer_id: PeerID, callback: Callable[[], None]) -> None:
        """Call `callback()` (once, on the loop) when our current link to `peer_id` is lost (relay.py keeps its
        reservation this way)."""
        self._on_lost.setdefault(peer_id, []).append(callback)

    def connection_to(self, peer_id: PeerID) -> Connection | None:
        """Our open connection to `peer_id`, if there is one."""
        conn = self._connections.get(peer_id)
        return conn if conn is not None and not conn.closed else None

    def adopt(self, wire, auth, recv_base: int, *, inbound: bool) -> Connection:
        """Take an authenticated wire into service: cache its connection and start reading its messages."""
        label = f"{self.peer_id!r}{' <- ' if inbound else ' -> '}"
        conn = Connection(self.runtime.reactor, wire, auth, recv_base, self.limits, label, self.runtime.local_copy)
        if self._closed:
            conn.lost(ConnectionLostError("this peer is shut down"))
            return conn
        wire.set_close_callback(self._on_endpoint_closed, (conn,))
        self._connections[conn.remote] = conn
        self._evict_idle()
        conn.start(self, self._forget_connection)
        logger.debug("connection %r open over %s", conn, wire.kind)
        return conn

    def _on_endpoint_closed(self, conn: Connection) -> None:
        """UCX's close callback. It may run on any thread, and at exit while the interpreter is being torn down
        (objects half cleared: formatting `conn.remote` here raised "'PeerID' object has no attribute 'raw'"),
        so it only hands the loss to the loop, where the message is formatted, and never while shutting down."""
        try:
            runtime = self.runtime
            if runtime._closed:
                return
            runtime.call_soon(self._endpoint_failed, conn)
        except (AttributeError, RuntimeError):
            pass  # the runtime or the interpreter is going away: nobody is left to tell

    def _endpoint_failed(self, conn: Connection) -> None:
        conn.lost(ConnectionLostError(f"endpoint to {conn.remote} closed or failed"))
        self.runtime.reactor.kick()

    def _spawn(self, coro, conn: Connection | None = None) -> asyncio.Task:
        """Run `coro` as a task of this peer; with `conn`, it is cancelled when that connection goes."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if conn is not None:
            conn.tasks.add(task)
            task.add_done_callback(conn.tasks.discard)
        return task

    # ---- receiving

    def on_message(self, conn: Connection, body: dict) -> None:
        """A decoded control message from `conn` (called by the connection, in arrival order)."""
        try:
            self._dispatch(conn, body)
        except Exception as e:
            logger.exception("%r: could not process a message", conn)
            conn.protocol_violation(ProtocolError(f"unprocessable message: {type(e).__name__}: {e}"))

    def on_bad_message(self, conn: Connection, error: ProtocolError) -> None:
        """`conn` sent something undecodable: tell it why, then close the connection."""
        self._spawn(self._reply(conn, _error_reply(CONNECTION_ERROR_ID, error)))
        conn.protocol_violation(error)

    def _forget_connection(self, conn: Connection) -> None:
        if self._connections.get(conn.remote) is conn:
            del self._connections[conn.remote]
            for callback in self._on_lost.pop(conn.remote, ()):
                callback()
        for task in list(conn.tasks):  # its handlers: nobody is left to answer, and they hold its budgets
            task.cancel()
        for key in [k for k in self._streams if k[0] == id(conn)]:
            self._streams.pop(key).fail(conn.error or ConnectionLostError("connection closed"))

    def _dispatch(self, conn: Connection, body: dict) -> None:
        kind, request_id = body[KEY_KIND], body[KEY_ID]
        try:
            specs = frame_specs(body, self.limits)
        except ProtocolError as e:
            self._reject(conn, body, e)
            return
        if kind == Kind.REQUEST:
            self._on_request(conn, body, specs)
        elif kind == Kind.RESPONSE:
            self._on_response(conn, body, specs)
        elif kind == Kind.ERROR:
            self._on_error(conn, body)
        elif kind == Kind.STREAM_OPEN:
            self._on_stream_open(conn, body)
        elif kind == Kind.STREAM_CHUNK:
            reader = self._streams.get((id(conn), request_id))
            if reader is None or len(specs) != 1:
                conn.discard_frames(body, len(specs))
            else:
                reader.push(Chunk(conn, body, specs[0]))
                if body.get(KEY_LAST) is True:  # the last chunk carries the end of the stream
                    reader.end()
        elif kind == Kind.STREAM_END:
            reader = self._streams.get((id(conn), request_id))
            if reader is not None:
                reader.end()

    def _reject(self, conn: Connection, body: dict, error: ProtocolError) -> None:
        """Answer a message we will not process and drop its frames; close if we cannot tell how many."""
        frames, first = body.get(KEY_FRAMES), body.get(KEY_SEQ, 0)
        countable = isinstance(frames, list) and len(frames) <= self.limits.max_frames
        if not countable or not (isinstance(first, int) and 0 <= first < 1 << 32):
            self._spawn(self._reply(conn, _error_reply(CONNECTION_ERROR_ID, error)))
            conn.protocol_violation(error)
            return
        conn.discard_frames(body, len(frames))
        if body[KEY_KIND] in (Kind.REQUEST, Kind.STREAM_OPEN, Kind.STREAM_CHUNK):
            self._spawn(self._reply(conn, _error_reply(body[KEY_ID], error)))
        elif body[KEY_KIND] == Kind.RESPONSE and body[KEY_ID] in conn.pending:
            conn.pending[body[KEY_ID]].set_exception(ProtocolError(f"{conn.remote} sent a malformed reply: {error}"))

    def _on_request(self, conn: Connection, body: dict, specs) -> None:
        method, header = body.get(KEY_METHOD), body.get(KEY_HEADER, {})
        handler = self._handlers.get(method) if isinstance(method, str) else None
        if not isinstance(header, dict):
            self._reject(conn, body, ProtocolError("the request header must be a dict"))
            return
        if handler is None:
            conn.discard_frames(body, len(specs))
            error = errors.UnknownMethodError(
                f"unknown method {method!r:.80}; this peer serves {sorted(self._handlers)}"
            )
            conn.post_quietly(_error_reply(body[KEY_ID], error))
            return
        nbytes = sum(spec.nbytes for spec in specs) if KEY_INLINE not in body else 0
        try:
            self._admit(conn, nbytes)
        except errors.ResourceLimitError as error:
            conn.discard_frames(body, len(specs))
            conn.post_quietly(_error_reply(body[KEY_ID], error))  # no task: a flood of refusals costs no tasks
            return
        self._spawn(self._handle_request(conn, body, specs, handler, nbytes), conn)

    def _admit(self, conn: Connection, nbytes: int) -> None:
        """Take one call in flight and `nbytes` of inbound memory for `conn`'s peer (ResourceLimitError if not)."""
        self.resources.acquire(conn.remote, "calls")
        try:
            self.resources.acquire(conn.remote, "inbound_bytes", nbytes)
        except errors.ResourceLimitError:
            self.resources.release(conn.remote, "calls")
            raise
        conn.inbound_calls += 1

    def _discharge(self, conn: Connection, nbytes: int) -> None:
        self.resources.release(conn.remote, "calls")
        self.resources.release(conn.remote, "inbound_bytes", nbytes)
        conn.inbound_calls -= 1

    async def _handle_request(self, conn: Connection, body: dict, specs, handler: Handler, nbytes: int) -> None:
        try:
            async with asyncio.timeout(self._handler_deadline(body)):
                allocator = self._allocators.get(body[KEY_METHOD])
                buffers = allocator(body.get(KEY_HEADER, {}), specs) if allocator is not None and specs else None
                tensors = await conn.receive_frames(body, specs, buffers) if specs else []
                result = await handler(Request(body[KEY_METHOD], body.get(KEY_HEADER, {}), tensors, conn.remote))
            header, out = _normalize_result(result)
            reply = {KEY_KIND: Kind.RESPONSE, KEY_ID: body[KEY_ID], KEY_HEADER: header}
            await conn.send(reply, out)
        except ConnectionLostError:
            return
        except Exception as e:
            if not isinstance(e, HiveEngineError):
                logger.exception("handler of %r failed", body[KEY_METHOD])
            await self._reply(conn, _error_reply(body[KEY_ID], e))
        finally:
            self._discharge(conn, nbytes)

    def _handler_deadline(self, body: dict) -> float:
        deadline = body.get(KEY_DEADLINE)
        if isinstance(deadline, int | float) and deadline > 0:
            return min(float(deadline), self.limits.max_handler_seconds)
        return self.limits.max_handler_seconds

    async def _reply(self, conn: Connection, body: dict) -> None:
        try:
            await conn.send(body)
        except (ConnectionLostError, ProtocolError) as e:
            logger.debug("could not reply to %s: %s", conn.remote, e)

    def _on_response(self, conn: Connection, body: dict, specs) -> None:
        reply = conn.pending.get(body[KEY_ID])
        if reply is None or reply.done():
            conn.discard_frames(body, len(specs))  # the caller gave up already
            return
        header = body.get(KEY_HEADER, {})
        header = header if isinstance(header, dict) else {}
        out = conn.reply_buffers.get(body[KEY_ID])
        if out is None and (not specs or KEY_INLINE in body):  # nothing left on the wire: answer without a task hop
            try:
                reply.set_result(
                    (header, restore_requires_grad(inline_tensors(body[KEY_INLINE], specs), specs) if specs else [])
                )
            except ProtocolError as e:
                reply.set_exception(e)
            return

        async def receive() -> None:
            try:
                tensors = await conn.receive_frames(body, specs, out)
            except Exception as e:
                if not reply.done():
                    reply.set_exception(e)
                return
            if not reply.done():
                reply.set_result((header, tensors))

        task = conn.reply_tasks[body[KEY_ID]] = self._spawn(receive())
        task.add_done_callback(lambda _: conn.reply_tasks.pop(body[KEY_ID], None))

    def _on_error(self, conn: Connection, body: dict) -> None:
        error = _remote_error(body, conn.remote)
        if body[KEY_ID] == CONNECTION_ERROR_ID:  # the remote is closing this connection
            for reply in conn.pending.values():
                if not reply.done():
                    reply.set_exception(error)
            conn.lost(error)
            return
        reply = conn.pending.get(body[KEY_ID])
        if reply is not None and not reply.done():
            reply.set_exception(error)
        reader = self._streams.get((id(conn), body[KEY_ID]))
        if reader is not None:
            reader.fail(error)

    # ---- streams (receiving side)

    def _on_stream_open(self, conn: Connection, body: dict) -> None:
        method, header = body.get(KEY_METHOD), body.get(KEY_HEADER, {})
        handler = self._stream_handlers.get(method) if isinstance(method, str) else None
        key = (id(conn), body[KEY_ID])
        if handler is None or not isinstance(header, dict):
            error = errors.UnknownMethodError(
                f"unknown stream method {method!r:.80}; this peer serves {sorted(self._stream_handlers)}"
            )
            conn.post_quietly(_error_reply(body[KEY_ID], error))  # its chunks find no reader and are dropped
            return
        if key in self._streams:
            conn.protocol_violation(ProtocolError(f"stream {body['i']} opened twice"))
            return
        try:
            self.resources.acquire(conn.remote, "streams")
        except errors.ResourceLimitError as error:
            conn.post_quietly(_error_reply(body[KEY_ID], error))
            return
        conn.inbound_calls += 1
        reader = StreamReader(key, self.limits.stream_window * 64)
        self._streams[key] = reader
        reserved = [0]

        def reserve(nbytes: int) -> None:
            self.resources.acquire(conn.remote, "inbound_bytes", nbytes)
            reserved[0] += nbytes

        request = StreamRequest(method, header, conn.remote, reader, reserve)
        self._spawn(self._handle_stream(conn, body, handler, request, reserved), conn)

    async def _handle_stream(self, conn: Connection, body: dict, handler: StreamHandler, request, reserved) -> None:
        reader = request.chunks
        try:
            try:
                async with asyncio.timeout(self._handler_deadline(body)):
                    result = await handler(request)
                reader.reject()
                await conn.send({KEY_KIND: Kind.RESPONSE, KEY_ID: body[KEY_ID], KEY_HEADER: result or {}})
            except ConnectionLostError:
                return
            except Exception as e:
                reader.reject()
                if not isinstance(e, HiveEngineError):
                    logger.exception("stream handler of %r failed", body[KEY_METHOD])
                await self._reply(conn, _error_reply(body[KEY_ID], e))
            finally:
                self.resources.release(conn.remote, "inbound_bytes", reserved[0])
                reserved[0] = 0
            await self._forget_stream(reader)
        finally:
            self._streams.pop(reader.key, None)
            self.resources.release(conn.remote, "streams")
            conn.inbound_calls -= 1

    async def _forget_stream(self, reader: StreamReader) -> None:
        """Keep discarding a finished stream's chunks until its sender ends it (or a deadline passes)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.limits.frame_timeout):
                await reader.ended.wait()
        self._streams.pop(reader.key, None)

    # ---- lifecycle

    async def aclose(self) -> None:
        """Close every connection and stop serving; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._eviction is not None:
            self._eviction.cancel()
        self.runtime.unregister_peer(self)
        for conn in list(self._connections.values()):
            conn.lost(ConnectionLostError("peer shut down"))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def shutdown(self) -> None:
        """Blocking twin of `aclose`."""
        if not self._closed and not self.runtime._closed:
            self.runtime.run(self.aclose(), timeout=30)


def _dial_error(error: Exception, address: PeerAddress) -> Exception:
    """What a failed dial raises: the handshake's own error, or PeerUnreachableError saying why."""
    if isinstance(error, errors.HandshakeError):
        return error
    reason = "no answer" if isinstance(error, TimeoutError) else f"{type(error).__name__}: {error}"
    return PeerUnreachableError(
        f"cannot connect to {address} ({reason}); check the address and that the peer is running"
    )


def _forget_reply(conn: Connection, request_id: int) -> None:
    """Drop a call's reply slot; an error that arrived after the caller stopped waiting is not an error. A reply
    still arriving is abandoned (which closes the connection: its frames must not land in buffers given back)."""
    task = conn.reply_tasks.pop(request_id, None)
    if task is not None and not task.done():
        task.cancel()
    conn.reply_buffers.pop(request_id, None)
    reply = conn.pending.pop(request_id, None)
    if reply is not None and reply.done() and not reply.cancelled():
        reply.exception()


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
