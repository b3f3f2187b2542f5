"""The TCP wire: one connection's messages over one plain TCP socket, opened by the dialling peer.

Why it exists: behind a NAT a peer can open connections but cannot accept them. UCX's TCP transport opens its
data connection from the listener back to the dialler's own (private) interface address after the connection
request, so no UCX link can cross a NAT in either direction (openucx/ucx#9526; shown in the NAT rig,
tests/test_nat.py), and no UCX setting makes the dialler open every socket. This wire carries the very same
session-sealed control messages and frames (session.py) over a single socket that the dialler opens, so a peer
behind a NAT keeps one outbound link per peer and is called back over it.

It offers a connection what a UCX endpoint does (connection.py's Wire): tagged sends and receives, and the raw
byte stream the handshake runs on. Each message travels as a record: 8-byte tag | 8-byte length | payload
(little-endian). A control record (tag's low 32 bits 0) goes straight to the connection's handler. A frame
record lands in the receive posted for its tag; a receive not yet posted (its handler task has not run) gets a
couple of loop turns, then the frame is held in a bounded buffer (TransportLimits.tcp_unexpected_bytes per
wire, max_tcp_unexpected_bytes for the process); past those bounds the wire stops reading until a receive is
posted. A frame held, or waited for, longer than TransportLimits.frame_timeout without a receive closes the wire
(it was never announced, or its receiver is gone): a hostile peer's stray frames cost bounded memory and time.
A frame longer than its receive is truncated (the 1-byte receives that drop unwanted frames), and the receive
fails, as UCX's would.

Encrypted frames travel sealed in blocks (session.py): a sender seals each block only once the kernel took the
previous one, into one reused buffer, and a receive given the frame's blocks lands each block in one reused buffer
and opens it straight into the receive's memory. Sealing block k + 1 thus overlaps the receiver's reading and
opening of block k, with no thread hops (block buffers come from session.SCRATCH). A frame record whose
length is not its blocks' exact length, or a block that fails to open, fails its receive (the connection closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from hiveengine.errors import ForgedMessageError, HandshakeError, ProtocolError
from hiveengine.transport.limits import TransportLimits
from hiveengine.transport.rails import JOINED, check_join, join_request
from hiveengine.transport.session import BLOCK_BYTES, SCRATCH, TAG_BYTES, FrameBlocks, sealed_bytes

logger = logging.getLogger(__name__)
RECORD = struct.Struct("<QQ")  # tag, payload length
CONTROL_MASK = (1 << 32) - 1
POST_YIELDS = 2  # loop turns a frame waits for its receive before it is buffered
SKIP_BYTES = 1 << 16  # scratch for the part of a frame its receive had no room for


def _nothing() -> None:
    """No activity hook."""


class _Budget:
    """Bytes of frames held for receives not yet posted, by every TCP wire of the process."""

    held = 0


def _host_view(buf) -> tuple[np.ndarray, torch.Tensor | None]:
    """(a flat uint8 host array to move bytes through, the CUDA tensor to copy it to afterwards or None)."""
    if isinstance(buf, torch.Tensor):
        if buf.device.type != "cpu":
            return np.empty(buf.numel() * buf.element_size(), dtype=np.uint8), buf
        buf = buf.numpy()
    if isinstance(buf, bytes | bytearray | memoryview):
        return np.frombuffer(buf, dtype=np.uint8), None
    return buf.reshape(-1).view(np.uint8), None


def new_recv_base() -> int:
    """A TCP wire's tag base: it names the connection only to itself (the socket already does), so any nonzero."""
    return int.from_bytes(os.urandom(4), "little") or 1


class _Rail:
    """One socket of a wire: records queued on it leave in order (one sender task), and one reader task reads it."""

    def __init__(self, wire: TcpWire, sock: socket.socket, prefix: bytes = b""):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.wire, self.sock, self.prefix = wire, sock, prefix
        self.loop = wire.loop
        # Records being sent: the pieces still to send, one list per step (a sealed frame's steps are its blocks,
        # sealed as they are reached), the future done once all went out, what must stay alive until then, and how
        # many bytes the record has (`pending` counts those of records queued: which rail a large frame goes on).
        self.sendq: deque[tuple[Iterator[list[memoryview]], asyncio.Future, object, int]] = deque()
        self.pending = 0
        self.sent = 0  # bytes of records handed to this socket
        self.sender: asyncio.Task | None = None
        self.reader: asyncio.Task | None = None
        self.corked = False  # the last record went with MSG_MORE: the kernel holds it for the next one

    def send(self, steps: Iterable[list[memoryview]], keep: object, nbytes: int, flags: int = 0):
        """Send `steps` in order after what is queued: on the spot while the kernel takes everything (with
        sendmsg `flags`), the rest through the sender task; None if all went out at once, else a future done when
        it has."""
        self.corked = bool(flags & socket.MSG_MORE)
        self.sent += nbytes
        steps = iter(steps)
        if not self.sendq:
            for pieces in steps:
                try:
                    sent = self.sock.sendmsg(pieces, (), flags)
                except BlockingIOError:
                    sent = 0
                except OSError as e:
                    self.wire._fail(e)
                    return self.wire._failed()
                pieces = _advance(pieces, sent)
                if pieces:
                    steps = itertools.chain((pieces,), steps)
                    break
            else:
                return None
        future = self.loop.create_future()
        self.sendq.append((steps, future, keep, nbytes))  # keep: the data stays alive until the kernel has it
        self.pending += nbytes
        if self.sender is None:
            self.sender = self.loop.create_task(self._send_queued())
        return future

    async def _send_queued(self) -> None:
        try:
            while self.sendq:
                steps, future, _, nbytes = self.sendq[0]
                for pieces in steps:
                    for piece in pieces:
                        await self.loop.sock_sendall(self.sock, piece)
                self.sendq.popleft()
                self.pending -= nbytes
                if not future.done():
                    future.set_result(None)
        except OSError as e:
            self.wire._fail(e)
        finally:
            self.sender = None

    def push(self) -> None:
        """Send what MSG_MORE left in the kernel now (setting TCP_NODELAY pushes pending segments)."""
        if self.corked:
            self.corked = False
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def recv_exact(self, view: memoryview) -> None:
        if self.prefix:
            n = min(len(self.prefix), view.nbytes)
            view[:n] = self.prefix[:n]
            self.prefix, view = self.prefix[n:], view[n:]
        while view.nbytes:
            n = await self.loop.sock_recv_into(self.sock, view)
            if not n:
                raise ConnectionResetError(f"{self.wire.remote_host} closed the TCP link")
            view = view[n:]

    def close(self, error: Exception) -> None:
        current = asyncio.current_task()
        for task in (self.reader, self.sender):
            if task is not None and task is not current:
                task.cancel()
        self.sock.close()
        for _, future, _, _ in self.sendq:
            if not future.done():
                future.set_exception(error)
        self.sendq.clear()
        self.pending = 0


class TcpWire:
    """Tagged messages over one connected TCP socket, and the rails its dialler adds (rails.py); all methods run on
    the transport loop."""

    kind = "tcp"

    def __init__(
        self,
        sock: socket.socket,
        limits: TransportLimits,
        prefix: bytes = b"",
        relayed: bool = False,
        on_activity: Callable[[], None] | None = None,
    ):
        """`prefix`: bytes already read off the socket (the listener reads 4 to tell a handshake from a relay
        request), read again first; `relayed`: the socket is a relay's circuit (relay.py), not a direct link;
        `on_activity`: called when a record is sent or a control message arrives (the reactor's adaptive polling,
        reactor.Reactor.active: the reply usually follows within microseconds, and the loop then catches it
        without sleeping in epoll)."""
        self.relayed = relayed
        self._on_activity = on_activity or _nothing
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        try:
            self.remote_host = sock.getpeername()[0]
        except OSError:
            self.remote_host = "?"
        self._main = _Rail(self, sock, prefix)
        self._rails: list[_Rail] = []  # the extra ones, joined (rails.py)
        self._turn = 0  # where the search for the least busy rail starts (ties go round)
        self._rail_plan: tuple[str, int, bytes, bytes] | None = None  # dialler: (host, TCP port, key, link id)
        self._rail_task: asyncio.Task | None = None
        self._rail_key: bytes | None = None  # listener: what a join must prove
        self._joined: set[int] = set()
        self._posted: dict[int, tuple[np.ndarray, torch.Tensor | None, asyncio.Future, FrameBlocks | None]] = {}
        self._posted_event = asyncio.Event()
        self._unexpected: dict[int, np.ndarray] = {}
        self._unexpected_bytes = 0
        self._handler = None
        self._base = 0
        self._max_control = 0
        self._on_close: tuple | None = None
        self.closed = False

    def __repr__(self) -> str:
        return f"TcpWire({self.remote_host})"

    @property
    def alive(self) -> bool:
        return not self.closed

    @property
    def rails(self) -> list[int]:
        """Bytes sent on each extra socket that carries this wire's large frames (one entry per rail joined)."""
        return [rail.sent for rail in self._rails]

    # ---- rails (rails.py)

    def offer_rails(self, host: str, port: int, auth) -> None:
        """As the dialler: open rails to `host`:`port` (the listener's TCP port) once a large frame crosses."""
        if self.limits.tcp_rails and not self.relayed:
            self._rail_plan = (host, port, auth.rail_key, auth.link_id)

    def accept_rails(self, auth) -> None:
        """As the listener: take rails whose joins prove this session's rail key (`attach_rail`)."""
        self._rail_key = auth.rail_key

    def _want_rails(self) -> None:
        if self._rail_plan is not None and self._rail_task is None and not self.closed:
            self._rail_task = self.loop.create_task(self._open_rails(*self._rail_plan))

    async def _open_rails(self, host: str, port: int, key: bytes, link_id: bytes) -> None:
        count = self.limits.tcp_rails
        outcomes = await asyncio.gather(
            *(self._open_rail(host, port, join_request(key, link_id, i)) for i in range(1, count + 1)),
            return_exceptions=True,
        )
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            logger.info(
                "%r: %d of %d rails did not open (%s: %s); large frames go on the %d that did",
                self,
                len(failed),
                count,
                type(failed[0]).__name__,
                failed[0],
                len(self._rails),
            )
        else:
            logger.debug("%r: %d rails open", self, len(self._rails))

    async def _open_rail(self, host: str, port: int, join: bytes) -> None:
        sock = await open_tcp(host, port, self.limits.connect_timeout)
        try:
            async with asyncio.timeout(self.limits.handshake_timeout):
                await self.loop.sock_sendall(sock, join)
                answer = await self.loop.sock_recv(sock, len(JOINED))
            if answer != JOINED:
                raise HandshakeError(f"{self.remote_host} refused a rail")
        except BaseException:
            sock.close()
            raise
        self._add_rail(sock)

    async def attach_rail(self, sock: socket.socket, link_id: bytes, index: int, tag: bytes) -> None:
        """As the listener: join `sock` as rail `index` if its JOIN's tag proves this session; HandshakeError (the
        caller closes the socket) if not, or if the index is past TransportLimits.tcp_rails or already joined."""
        if self._rail_key is None or self.closed:
            raise HandshakeError("a rail for a link that takes none")
        check_join(self._rail_key, link_id, index, tag)
        if not 1 <= index <= self.limits.tcp_rails:
            raise HandshakeError(f"rail {index} is past TransportLimits.tcp_rails={self.limits.tcp_rails}")
        if index in self._joined:
            raise HandshakeError(f"rail {index} joined twice")
        self._joined.add(index)
        sock.setblocking(False)
        await self.loop.sock_sendall(sock, JOINED)
        self._add_rail(sock)

    def _add_rail(self, sock: socket.socket) -> None:
        if self.closed:
            sock.close()
            return
        rail = _Rail(self, sock)
        self._rails.append(rail)
        rail.reader = self.loop.create_task(self._read(rail))

    def _rail_for(self, nbytes: int) -> _Rail:
        """The socket a record of `nbytes` goes on: the first one for control messages and small frames, the rail
        with the least left to send for a large frame."""
        if nbytes < self.limits.tcp_rail_min_bytes:
            return self._main
        self._want_rails()
        if not self._rails:
            return self._main
        self._turn = (self._turn + 1) % len(self._rails)
        turn = self._rails[self._turn :] + self._rails[: self._turn]
        self._main.push()  # a control record corked for this frame would wait for the next record on its socket
        return min(turn, key=lambda rail: rail.pending)

    # ---- sending

    def send_now(self, buf, tag: int, more: bool = False) -> asyncio.Future | None:
        """Send one record; None if the kernel took it all at once, else a future done when it has. `more`: another
        record follows at once (MSG_MORE: they leave in the same segments, and wake the receiver once)."""
        data, _ = _host_view(buf.cpu() if isinstance(buf, torch.Tensor) else buf)
        self._on_activity()
        pieces = [memoryview(RECORD.pack(tag, data.nbytes)), memoryview(data).cast("B")]
        rail = self._rail_for(data.nbytes) if tag & CONTROL_MASK else self._main
        return self._send(rail, (pieces,), data, data.nbytes, socket.MSG_MORE if more else 0)

    def send_sealed(self, buf, tag: int, blocks: FrameBlocks) -> asyncio.Future | None:
        """Send one frame sealed in `blocks` (session.py), each block sealed as the kernel takes the one before;
        None if the kernel took it all at once, else a future done when it has. `buf` must not change until then."""
        data, _ = _host_view(buf.cpu() if isinstance(buf, torch.Tensor) else buf)
        rail = self._rail_for(data.nbytes)
        return self._send(rail, self._sealed_steps(data, tag, blocks), data, sealed_bytes(data.nbytes))

    @staticmethod
    def _sealed_steps(data: np.ndarray, tag: int, blocks: FrameBlocks) -> Iterator[list[memoryview]]:
        """The record of a frame sealed in blocks, a block at a time, each sealed into the same buffer (the next
        step is taken only once the kernel has all of this one)."""
        head = memoryview(RECORD.pack(tag, sealed_bytes(data.nbytes)))
        if not data.nbytes:
            yield [head]
            return
        buf = SCRATCH.take(min(data.nbytes, BLOCK_BYTES) + TAG_BYTES)
        for j, start in enumerate(range(0, data.nbytes, BLOCK_BYTES)):
            block = data[start : start + BLOCK_BYTES]
            sealed = buf[: block.nbytes + TAG_BYTES]
            blocks.seal(j, block, sealed)
            yield [head, memoryview(sealed)] if j == 0 else [memoryview(sealed)]
        SCRATCH.give(buf)

    def _send(self, rail: _Rail, steps, keep: object, nbytes: int, flags: int = 0) -> asyncio.Future | None:
        if self.closed:
            return self._failed()
        return rail.send(steps, keep, nbytes, flags)

    def tag_send(self, buf, tag: int) -> asyncio.Future:
        future = self.send_now(buf, tag)
        if future is None:
            future = self.loop.create_future()
            future.set_result(None)
        return future

    def _failed(self) -> asyncio.Future:
        future = self.loop.create_future()
        future.set_exception(ConnectionResetError(f"the TCP link to {self.remote_host} is closed"))
        return future

    # ---- the handshake's byte stream (before `listen`)

    async def stream_send(self, _endpoint, buf) -> None:
        await self.loop.sock_sendall(self._main.sock, memoryview(_host_view(buf)[0]).cast("B"))

    async def stream_recv(self, _endpoint, buf) -> None:
        await self._main.recv_exact(memoryview(_host_view(buf)[0]).cast("B"))

    # ---- receiving

    def tag_recv(self, buf, tag: int, blocks: FrameBlocks | None = None) -> asyncio.Future:
        """A future done when the frame with `tag` has landed in `buf` (failed if it did not fit exactly); with
        `blocks`, the frame travels sealed in those blocks and is opened into `buf` as it lands."""
        future = self.loop.create_future()
        if self.closed:
            return self._failed()
        host, device = _host_view(buf)
        held = self._unexpected.pop(tag, None)
        if held is not None:
            self._release(held.nbytes)
            self._deliver(held, (host, device, future, blocks))
            return future
        self._posted[tag] = (host, device, future, blocks)
        self._posted_event.set()
        return future

    def listen(self, base: int, handler, max_control_bytes: int) -> None:
        """Start reading records: control messages of `base` (up to `max_control_bytes`) go to `handler`."""
        self._handler, self._base, self._max_control = handler, base, max_control_bytes
        self._main.reader = self.loop.create_task(self._read(self._main))

    def release_base(self, base: int) -> None:
        """Nothing to release: the base names nothing outside this wire."""

    async def _read(self, rail: _Rail) -> None:
        header = bytearray(RECORD.size)
        try:
            while True:
                await rail.recv_exact(memoryview(header))
                tag, length = RECORD.unpack(header)
                if tag & CONTROL_MASK:
                    await self._read_frame(rail, tag, length)
                    continue
                if rail is not self._main:
                    raise ProtocolError(f"{self.remote_host} sent a control message on a rail")
                if tag >> 32 != self._base:
                    raise ProtocolError(f"{self.remote_host} sent a control message for another connection")
                if length > self._max_control:
                    self._handler(None, np.empty(1, dtype=np.uint8), length)  # the connection closes over it
                    return
                buf = np.empty(length, dtype=np.uint8)
                await rail.recv_exact(memoryview(buf))
                self._on_activity()
                self._handler(None, buf, length)
        except asyncio.CancelledError:
            raise
        except (OSError, ProtocolError, TimeoutError) as e:
            self._fail(e)

    async def _read_frame(self, rail: _Rail, tag: int, length: int) -> None:
        if length >= self.limits.tcp_rail_min_bytes:
            self._want_rails()  # large frames come our way: carry them on more sockets
        for _ in range(POST_YIELDS):
            if tag in self._posted:
                break
            await asyncio.sleep(0)  # the handler task that posts it is usually next in the loop's queue
        if tag not in self._posted and self._fits(length) and tag not in self._unexpected:
            held = np.empty(length, dtype=np.uint8)
            self._unexpected_bytes += length
            _Budget.held += length
            try:
                await rail.recv_exact(memoryview(held))
            except BaseException:
                self._release(length)
                raise
            posted = self._posted.pop(tag, None)  # posted while the frame was arriving
            if posted is None:
                self._unexpected[tag] = held
                self.loop.call_later(self.limits.frame_timeout, self._expire, tag, held)
                return
            self._release(length)
            self._deliver(held, posted)
            return
        if tag not in self._posted:
            deadline = self.limits.frame_timeout
            try:
                async with asyncio.timeout(deadline):
                    while tag not in self._posted:
                        self._posted_event.clear()
                        await self._posted_event.wait()
            except TimeoutError:
                raise ProtocolError(
                    f"{self.remote_host} sent a frame of {length} bytes nobody received within {deadline:.1f} s "
                    "(TransportLimits.tcp_unexpected_bytes, frame_timeout)"
                ) from None
        host, device, future, blocks = self._posted.pop(tag)
        if blocks is not None:
            await self._recv_sealed(rail, length, host, device, future, blocks)
            return
        n = min(length, host.nbytes)
        await rail.recv_exact(memoryview(host)[:n])
        await _skip(rail, length - n)
        self._complete(future, host, device, length)

    async def _recv_sealed(self, rail: _Rail, length: int, host: np.ndarray, device, future, blocks) -> None:
        """Receive a frame sealed in `blocks`, opening each block into `host` as it lands."""
        if length != sealed_bytes(host.nbytes):  # fail at once: a peer's length may be huge, or trickle in
            _fail_receive(future, _sealed_length_error(length, host.nbytes))
            await _skip(rail, length)
            return
        buf = SCRATCH.take(min(host.nbytes, BLOCK_BYTES) + TAG_BYTES)
        for j, start in enumerate(range(0, host.nbytes, BLOCK_BYTES)):
            out = host[start : start + BLOCK_BYTES]
            sealed = buf[: out.nbytes + TAG_BYTES]
            await rail.recv_exact(memoryview(sealed))
            try:
                blocks.open(j, sealed, out)
            except ForgedMessageError as e:
                _fail_receive(future, e)
                await _skip(rail, sealed_bytes(host.nbytes - start - out.nbytes))  # the record's other blocks
                break
        else:
            self._complete(future, host, device, host.nbytes)
        SCRATCH.give(buf)

    def _deliver(self, held: np.ndarray, posted: tuple) -> None:
        """Complete a posted receive from a frame that arrived before it (held whole)."""
        host, device, future, blocks = posted
        if blocks is None:
            n = min(held.nbytes, host.nbytes)
            host[:n] = held[:n]
            self._complete(future, host, device, held.nbytes)
            return
        if held.nbytes != sealed_bytes(host.nbytes):
            _fail_receive(future, _sealed_length_error(held.nbytes, host.nbytes))
            return
        offset = 0
        for j, start in enumerate(range(0, host.nbytes, BLOCK_BYTES)):
            out = host[start : start + BLOCK_BYTES]
            try:
                blocks.open(j, held[offset : offset + out.nbytes + TAG_BYTES], out)
            except ForgedMessageError as e:
                _fail_receive(future, e)
                return
            offset += out.nbytes + TAG_BYTES
        self._complete(future, host, device, host.nbytes)

    def _expire(self, tag: int, held: np.ndarray) -> None:
        """A held frame nobody received within frame_timeout was never announced, or its receiver is gone."""
        if self._unexpected.get(tag) is held:
            self._fail(
                ProtocolError(f"{self.remote_host} sent a frame nobody received (TransportLimits.frame_timeout)")
            )

    def _fits(self, length: int) -> bool:
        limits = self.limits
        return (
            self._unexpected_bytes + length <= limits.tcp_unexpected_bytes
            and _Budget.held + length <= limits.max_tcp_unexpected_bytes
        )

    def _release(self, nbytes: int) -> None:
        self._unexpected_bytes -= nbytes
        _Budget.held -= nbytes

    @staticmethod
    def _complete(future: asyncio.Future, host: np.ndarray, device: torch.Tensor | None, length: int) -> None:
        if future.done():
            return
        if length != host.nbytes:
            future.set_exception(ProtocolError(f"a frame of {length} bytes arrived for a receive of {host.nbytes}"))
            return
        if device is not None:
            device.view(-1).view(torch.uint8).copy_(torch.from_numpy(host))
        future.set_result(None)

    # ---- closing

    def set_close_callback(self, callback, args: tuple) -> None:
        """Call `callback(*args)` once if a socket fails or the remote closes it (not on our own close)."""
        self._on_close = (callback, args)

    def _fail(self, error: BaseException) -> None:
        if self.closed:
            return
        logger.debug("%r failed: %s: %s", self, type(error).__name__, error)
        on_close, self._on_close = self._on_close, None
        self.close()
        if on_close is not None:
            on_close[0](*on_close[1])

    def close(self) -> None:
        """Close every socket; every send and receive still pending fails."""
        if self.closed:
            return
        self.closed = True
        if self._rail_task is not None and self._rail_task is not asyncio.current_task():
            self._rail_task.cancel()
        error = ConnectionResetError(f"the TCP link to {self.remote_host} closed")
        for rail in (self._main, *self._rails):
            rail.close(error)
        for _, _, future, _ in self._posted.values():
            if not future.done():
                future.set_exception(error)
        self._posted.clear()
        for held in self._unexpected.values():
            self._release(held.nbytes)
        self._unexpected.clear()


async def _skip(rail: _Rail, nbytes: int) -> None:
    scratch = memoryview(bytearray(min(nbytes, SKIP_BYTES)))
    while nbytes:
        chunk = scratch[: min(nbytes, len(scratch))]
        await rail.recv_exact(chunk)
        nbytes -= len(chunk)


def _fail_receive(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


def _sealed_length_error(length: int, nbytes: int) -> ProtocolError:
    return ProtocolError(f"a sealed frame of {length} bytes arrived for a receive of {nbytes} ({sealed_bytes(nbytes)})")


def _advance(pieces: list[memoryview], sent: int) -> list[memoryview]:
    """What remains of `pieces` after the first `sent` bytes went out."""
    while pieces and sent >= pieces[0].nbytes:
        sent -= pieces[0].nbytes
        pieces = pieces[1:]
    if pieces and sent:
        pieces = [pieces[0][sent:], *pieces[1:]]
    return pieces


async def open_tcp(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP socket connected to host:port, or OSError / TimeoutError within `timeout` seconds (never blocks)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock
