"""Inbound dispatch: turns the control messages a connection reads into handler calls, stream readers and replies.

A Peer registers its handlers (Handlers); every connection hands its messages to the Peer's Dispatcher, which runs
each call's handler as a task of that connection, answers with a RESPONSE or an ERROR, completes the reply slots of
our own calls (Connection.expect_reply), and feeds the chunks of inbound streams to their readers. Each call and
stream is admitted against the sender's budgets (resources.py) first, so a flood of calls costs no tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import torch

from hiveengine import errors
from hiveengine.errors import ConnectionLostError, HiveEngineError, ProtocolError, RemoteError
from hiveengine.transport.connection import Connection
from hiveengine.transport.identity import PeerID
from hiveengine.transport.limits import TransportLimits
from hiveengine.transport.resources import ResourceManager
from hiveengine.transport.stream import Chunk, StreamReader
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
    frames_nbytes,
    inline_tensors,
    restore_requires_grad,
)

logger = logging.getLogger(__name__)

HandlerResult = dict | tuple[dict, Sequence[torch.Tensor]] | None
Handler = Callable[["Request"], Awaitable[HandlerResult]]
StreamHandler = Callable[["StreamRequest"], Awaitable[dict | None]]
Allocator = Callable[[dict, list[FrameSpec], PeerID], Sequence[torch.Tensor] | None]
Spawn = Callable[..., asyncio.Task]  # Peer.spawn: run a coroutine as a task, cancelled with a connection if given
CONNECTION_ERROR_ID = 0  # an ERROR with this id concerns the whole connection, not one call

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


@dataclass
class Handlers:
    """The methods a peer serves, by name (filled by Peer.register and Peer.register_stream)."""

    calls: dict[str, Handler] = field(default_factory=dict)
    allocators: dict[str, Allocator] = field(default_factory=dict)  # optional receive buffers of a call's tensors
    streams: dict[str, StreamHandler] = field(default_factory=dict)


def _error_reply(request_id: int, error: BaseException) -> dict:
    """The ERROR message that tells a caller why its call `request_id` failed."""
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


class Dispatcher:
    """Processes every connection's inbound messages for one peer (Connection's MessageHandler)."""

    def __init__(self, handlers: Handlers, limits: TransportLimits, resources: ResourceManager, spawn: Spawn):
        self._handlers = handlers
        self.limits = limits
        self.resources = resources
        self._spawn = spawn
        self._streams: dict[tuple[int, int], StreamReader] = {}  # (id of the connection, request id) -> reader

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

    def forget(self, conn: Connection) -> None:
        """`conn` is gone: cancel its handlers (nobody is left to answer, and they hold its budgets) and fail its
        streams' readers."""
        for task in list(conn.tasks):
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
                conn.discard_frames(body, specs)
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
        elif body[KEY_KIND] == Kind.RESPONSE:
            conn.fail_reply(body[KEY_ID], ProtocolError(f"{conn.remote} sent a malformed reply: {error}"))

    def _on_request(self, conn: Connection, body: dict, specs) -> None:
        method, header = body.get(KEY_METHOD), body.get(KEY_HEADER, {})
        handler = self._handlers.calls.get(method) if isinstance(method, str) else None
        if not isinstance(header, dict):
            self._reject(conn, body, ProtocolError("the request header must be a dict"))
            return
        if handler is None:
            conn.discard_frames(body, specs)
            error = errors.UnknownMethodError(
                f"unknown method {method!r:.80}; this peer serves {sorted(self._handlers.calls)}"
            )
            conn.post_quietly(_error_reply(body[KEY_ID], error))
            return
        nbytes = frames_nbytes(specs) if KEY_INLINE not in body else 0
        try:
            self._admit(conn, nbytes)
        except errors.ResourceLimitError as error:
            conn.discard_frames(body, specs)
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
                allocator = self._handlers.allocators.get(body[KEY_METHOD])
                request = body.get(KEY_HEADER, {})
                buffers = allocator(request, specs, conn.remote) if allocator is not None and specs else None
                tensors = await conn.receive_frames(body, specs, buffers) if specs else []
                result = await handler(Request(body[KEY_METHOD], request, tensors, conn.remote))
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
        slot = conn.reply_slot(body[KEY_ID])
        if slot is None:
            conn.discard_frames(body, specs)  # the caller gave up already
            return
        reply, out = slot
        header = body.get(KEY_HEADER, {})
        header = header if isinstance(header, dict) else {}
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

        conn.receiving_reply(body[KEY_ID], self._spawn(receive()))

    def _on_error(self, conn: Connection, body: dict) -> None:
        error = _remote_error(body, conn.remote)
        if body[KEY_ID] == CONNECTION_ERROR_ID:  # the remote is closing this connection
            conn.fail_replies(error)
            conn.lost(error)
            return
        conn.fail_reply(body[KEY_ID], error)
        reader = self._streams.get((id(conn), body[KEY_ID]))
        if reader is not None:
            reader.fail(error)

    def _on_stream_open(self, conn: Connection, body: dict) -> None:
        method, header = body.get(KEY_METHOD), body.get(KEY_HEADER, {})
        handler = self._handlers.streams.get(method) if isinstance(method, str) else None
        key = (id(conn), body[KEY_ID])
        if handler is None or not isinstance(header, dict):
            error = errors.UnknownMethodError(
                f"unknown stream method {method!r:.80}; this peer serves {sorted(self._handlers.streams)}"
            )
            conn.post_quietly(_error_reply(body[KEY_ID], error))  # its chunks find no reader and are dropped
            return
        if key in self._streams:
            conn.protocol_violation(ProtocolError(f"stream {body[KEY_ID]} opened twice"))
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
            await self._forget_stream(reader, conn.rtt)
        finally:
            self._streams.pop(reader.key, None)
            self.resources.release(conn.remote, "streams")
            conn.inbound_calls -= 1

    async def _forget_stream(self, reader: StreamReader, rtt: float) -> None:
        """Keep discarding a finished stream's chunks until its sender ends it, or until the chunks it may have in
        flight (a window of them) could have come over a link with round trip `rtt`."""
        in_flight = self.limits.stream_window * self.limits.stream_chunk_bytes
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.limits.frame_deadline(in_flight, rtt)):
                await reader.ended.wait()
        self._streams.pop(reader.key, None)
