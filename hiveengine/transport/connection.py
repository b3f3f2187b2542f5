"""One authenticated link to a remote peer: sends messages (control + frames) and reads control messages in order.

The link's bytes travel over a wire: a UCX endpoint (ucx_wire.py) or, where a peer cannot be dialled, a TCP socket
it opened itself (tcp_wire.py); both offer the same tagged sends and receives. Tags are worker-wide in UCX, so
each connection receives on its own 32-bit tag base:
tag = base << 32 | 0 for control messages, base << 32 | seq for tensor frames (seq ≥ 1, one per frame).
The reactor receives control messages for all connections and hands each to its connection, which
decodes them in arrival order and passes them to its handler (the Peer's Dispatcher, dispatch.py).

Between processes on one host, large host frames skip UCX: once the receiver proved, through the OS, that
the sender is the other end of this session and a process it may read (local_copy.py), a message announces
their addresses (KEY_ADDRESSES) instead, the receiver copies exactly the announced frames and acknowledges with
FRAMES_READ, which completes the sender's send.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from hiveengine.errors import ConnectionLostError, ForgedMessageError, ProtocolError, ResourceLimitError
from hiveengine.transport import local_copy, session
from hiveengine.transport.handshake import Authenticated
from hiveengine.transport.limits import TransportLimits
from hiveengine.transport.reactor import retrieve_outcome
from hiveengine.transport.resources import ResourceManager
from hiveengine.transport.session import SCRATCH, TAG_BYTES
from hiveengine.transport.wire import (
    KEY_ADDRESSES,
    KEY_COUNTER,
    KEY_FRAMES,
    KEY_ID,
    KEY_INLINE,
    KEY_KIND,
    KEY_SEALED,
    KEY_SEQ,
    KEY_TAGS,
    SEALED_BLOCKS,
    SEALED_FRAMES,
    FrameSpec,
    Kind,
    allocate,
    as_frame,
    check_buffers,
    decode_message,
    encode_control,
    frame_specs,
    frames_nbytes,
    inline_tensors,
    restore_requires_grad,
    wire_buffer,
)

logger = logging.getLogger(__name__)

CONTROL_SEQ = 0
PROTOCOL_ERROR_LINGER = 0.5  # seconds a connection stays open for our error reply after a violation
FRAME_SEQS = (1 << 32) - 1


class MessageHandler(Protocol):
    """Who a connection hands its messages to (the Dispatcher of the Peer that owns it)."""

    def on_message(self, conn: Connection, body: dict) -> None: ...

    def on_bad_message(self, conn: Connection, error: ProtocolError) -> None: ...


def _tag(base: int, seq: int) -> int:
    return (base << 32) | seq


def _frame_seq(first: int, index: int) -> int:
    """Frame sequence numbers run over 1 .. 2**32 - 1 (0 is the control channel)."""
    return (first + index) % FRAME_SEQS + 1


def _host_bytes(frame: torch.Tensor) -> np.ndarray:
    """The bytes of a flat uint8 frame as a numpy array (a CUDA frame is copied to the host)."""
    return (frame if frame.device.type == "cpu" else frame.cpu()).numpy()


def _open_into(sess: session.Session, counter: int, index: int, sealed: np.ndarray, frame: torch.Tensor) -> None:
    """Decrypt a received sealed frame into `frame` (on the host, then copied where it lives)."""
    if frame.device.type == "cpu":
        sess.open_frame(counter, index, sealed, frame.numpy())
    else:
        staging = np.empty(frame.numel(), dtype=np.uint8)
        sess.open_frame(counter, index, sealed, staging)
        frame.copy_(torch.from_numpy(staging))


class Wire(Protocol):
    """What a connection sends and receives through (ucx_wire.UcxWire, tcp_wire.TcpWire)."""

    kind: str

    def send_now(self, buf, tag: int, more: bool = False) -> asyncio.Future | None: ...

    def send_sealed(self, buf, tag: int, blocks: session.FrameBlocks) -> asyncio.Future | None: ...  # TCP only

    def tag_send(self, buf, tag: int) -> asyncio.Future: ...

    def tag_recv(self, buf, tag: int, blocks: session.FrameBlocks | None = None) -> asyncio.Future: ...  # blocks: TCP

    def listen(self, base: int, handler, max_control_bytes: int) -> None: ...

    def release_base(self, base: int) -> None: ...

    def set_close_callback(self, callback, args: tuple) -> None: ...

    def close(self) -> None: ...


class Connection:
    """A message channel to one authenticated remote peer."""

    def __init__(
        self,
        reactor,
        wire: Wire,
        auth: Authenticated,
        recv_base: int,
        limits: TransportLimits,
        label: str,
        local_service: local_copy.Service | None = None,
        resources: ResourceManager | None = None,
    ):
        self.reactor = reactor
        self.wire = wire
        self.remote = auth.peer_id
        self.public_key = auth.public_key  # the remote's Ed25519 key (checks what it signs)
        self.roles = auth.roles  # what the remote's membership certificate grants (membership.ROLE_*)
        self.rtt = auth.rtt  # seconds of one round trip, measured in the handshake (deadlines adapt to it)
        self.local = auth.local
        self.send_base = auth.remote_recv_base
        self.recv_base = recv_base
        self.limits = limits
        self.label = label
        self._seq = itertools.count()
        self._request_ids = itertools.count(1)
        self._inbox: deque[tuple[asyncio.Future, np.ndarray, int]] = deque()
        self._handler: MessageHandler | None = None
        self._on_lost: Callable[[Connection], None] | None = None
        # Reply slots of our calls, by request id (only the methods below touch them): the future its RESPONSE or
        # ERROR completes, the caller's buffers for its tensors, the task receiving its frames.
        self._replies: dict[int, asyncio.Future] = {}
        self._reply_buffers: dict[int, Sequence[torch.Tensor]] = {}
        self._reply_tasks: dict[int, asyncio.Task] = {}
        self.closed = False
        self.reading = True  # False once the peer broke the protocol: nothing more of it is processed
        self.last_used = self.opened = time.monotonic()
        self.error: Exception | None = None
        self.read_binding, self.serve_binding = auth.read_binding, auth.serve_binding
        self.link = local_copy.Link(self, local_service, limits.local_copy)
        self.session = session.Session(auth.send_key, auth.recv_key)
        self.resources = resources or ResourceManager(limits)
        self.inbound_calls = 0  # calls and streams of the remote's that we are receiving or handling
        self.tasks: set[asyncio.Task] = set()  # handlers of the remote's calls, cancelled when the connection goes
        self._receives: set[asyncio.Future] = set()  # posted frame receives, each holding one "receives" unit
        self._local_sends: dict[int, asyncio.Future] = {}  # frame seq -> done when the remote read them

    def __repr__(self) -> str:
        return f"Connection({self.label}{self.remote!r})"

    @property
    def endpoint(self):
        """The UCX endpoint under this connection (None over TCP, or once closed)."""
        return getattr(self.wire, "endpoint", None)

    @property
    def kind(self) -> str:
        """Which wire carries it: "ucx" or "tcp"."""
        return self.wire.kind

    @property
    def local_pid(self) -> int | None:
        """The remote's process, once we proved we may read its memory directly (local_copy.py)."""
        return self.link.pid

    @property
    def remote_reads_us(self) -> bool:
        """Whether the remote proved it may read ours: large host frames then go by address."""
        return self.link.remote_reads_us

    def new_request_id(self) -> int:
        return next(self._request_ids)

    def expect_reply(self, request_id: int, out: Sequence[torch.Tensor] | None = None) -> asyncio.Future:
        """A reply slot for our call `request_id`: the future its RESPONSE (header, tensors) or ERROR completes;
        with `out`, the buffers the reply's tensors are received into. Free it with `forget_reply`."""
        reply = self._replies[request_id] = asyncio.get_running_loop().create_future()
        if out is not None:
            self._reply_buffers[request_id] = out
        return reply

    def reply_slot(self, request_id: int) -> tuple[asyncio.Future, Sequence[torch.Tensor] | None] | None:
        """For an arriving RESPONSE to `request_id`: the future to complete and the buffers its tensors go into
        (None: fresh tensors), or None if nobody waits for it any more (unknown id, or answered already)."""
        reply = self._replies.get(request_id)
        if reply is None or reply.done():
            return None
        return reply, self._reply_buffers.get(request_id)

    def receiving_reply(self, request_id: int, task: asyncio.Task) -> None:
        """`task` receives the frames of the reply to `request_id`; `forget_reply` and `lost` cancel it."""
        self._reply_tasks[request_id] = task
        task.add_done_callback(lambda _: self._reply_tasks.pop(request_id, None))

    def fail_reply(self, request_id: int, error: Exception) -> None:
        """Fail our call `request_id` with `error`, if it still waits for its reply."""
        reply = self._replies.get(request_id)
        if reply is not None and not reply.done():
            reply.set_exception(error)

    def fail_replies(self, error: Exception) -> None:
        """Fail every call still waiting for its reply on this connection with `error`."""
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(error)
                reply.add_done_callback(retrieve_outcome)  # its caller may have stopped waiting already

    async def replies_settled(self) -> None:
        """Wait until every reply expected now has come or failed (each call's deadline bounds the wait)."""
        await asyncio.gather(*self._replies.values(), return_exceptions=True)

    def forget_reply(self, request_id: int) -> None:
        """Drop a call's reply slot; an error that arrived after the caller stopped waiting is not an error. A reply
        still arriving is abandoned (which closes the connection: its frames must not land in buffers given back)."""
        task = self._reply_tasks.pop(request_id, None)
        if task is not None and not task.done():
            task.cancel()
        self._reply_buffers.pop(request_id, None)
        reply = self._replies.pop(request_id, None)
        if reply is not None and reply.done() and not reply.cancelled():
            reply.exception()

    def _reserve_seqs(self, n: int) -> int:
        first = next(self._seq)
        for _ in range(n - 1):
            next(self._seq)
        return first % FRAME_SEQS

    def _check_open(self) -> None:
        if self.closed:
            raise ConnectionLostError(f"connection to {self.remote} is closed: {self.error}")

    @property
    def idle(self) -> bool:
        """No call is in flight on this connection, ours or the remote's (only idle ones are ever evicted)."""
        return not self._replies and not self.inbound_calls and not self._receives

    async def send(self, body: dict, tensors: Sequence[torch.Tensor] = ()) -> None:
        """Send one control message and its tensor frames; returns when UCX has sent them all."""
        futures = self.post(body, tensors)
        if futures:
            await self.wait(futures)

    def post(self, body: dict, tensors: Sequence[torch.Tensor] = ()) -> list[asyncio.Future]:
        """Hand one control message and its tensor frames to UCX; return the futures of the sends still in
        flight (`wait` for them). Small host tensors travel inside the control message: a small call is one
        UCX message, usually sent on the spot (no future at all)."""
        self._check_open()
        self.last_used = time.monotonic()
        frames: list[torch.Tensor] = []
        tail: list[np.ndarray] = []
        by_address = False
        if tensors:
            body[KEY_FRAMES] = [FrameSpec.wire_of(t) for t in tensors]
            frames = [as_frame(t) for t in tensors]
            if self._inlinable(frames):
                body[KEY_INLINE] = True
                tail, frames = [frame.numpy() for frame in frames], []
            else:
                body[KEY_SEQ] = self._reserve_seqs(len(frames))
                by_address = self._by_address(frames)
                if by_address:
                    body[KEY_ADDRESSES] = [frame.data_ptr() for frame in frames]
        encrypt = self.limits.encrypt and not self.same_host
        wire_frames = [] if by_address else self._protect_frames(body, frames, encrypt)
        message = encode_control(body, self.limits, tail)
        read = self._await_read(body[KEY_SEQ], frames) if by_address else None
        _, sealed = self.session.seal_control(message, encrypt)
        more = any(frame is not None for frame in wire_frames)  # its frames follow at once
        pending = self.wire.send_now(sealed, _tag(self.send_base, CONTROL_SEQ), more)
        futures = [] if pending is None else [pending]
        if read is not None:
            return [*futures, read]
        for i, frame in enumerate(wire_frames):
            if frame is None:
                continue
            tag = _tag(self.send_base, _frame_seq(body[KEY_SEQ], i))
            if isinstance(frame, asyncio.Future):  # being sealed on a crypto thread: send it once sealed
                futures.append(asyncio.ensure_future(self._send_sealed(frame, tag)))
                continue
            if isinstance(frame, tuple):  # (data, its blocks): the TCP wire seals each block as it sends it
                data, blocks = frame
                pending = self.wire.send_sealed(data, tag, blocks)
                if pending is not None:
                    futures.append(pending)
                continue
            future = self.wire.tag_send(frame, tag)
            if body.get(KEY_SEALED) == SEALED_FRAMES:
                future.add_done_callback(lambda f, buf=frame: f.cancelled() or f.exception() or SCRATCH.give(buf))
            futures.append(future)
        return futures

    async def _send_sealed(self, sealing: asyncio.Future, tag: int) -> None:
        buf = await sealing
        self._check_open()
        await self.wire.tag_send(buf, tag)
        SCRATCH.give(buf)

    @property
    def same_host(self) -> bool:
        """Whether the remote is proven (by the OS, local_copy.py) to run on this host: what we send it never
        leaves the OS, so it is authenticated but not encrypted."""
        return self.link.pid is not None or self.link.remote_reads_us

    def _protect_frames(self, body: dict, frames: Sequence[torch.Tensor], encrypt: bool) -> list:
        """What the wire sends for `frames` of the message about to be sealed (None: nothing to send): over UCX,
        encrypted whole (KEY_SEALED 1) or readable with their tags in the header (KEY_TAGS); over TCP, encrypted
        frames are (data, its blocks) pairs, sealed in blocks by the wire as it sends them (KEY_SEALED 2); see
        session.py."""
        if not frames:
            return []
        counter = self.session.sent  # the counter seal_control gives this message next
        if encrypt and self.wire.kind == "tcp":
            body[KEY_SEALED] = SEALED_BLOCKS
            blocks = self.session.frame_blocks(counter, [f.numel() for f in frames])
            return [(_host_bytes(f), b) if f.numel() else None for f, b in zip(frames, blocks, strict=True)]
        if encrypt:
            body[KEY_SEALED] = SEALED_FRAMES
            return [self._seal(counter, i, f) if f.numel() else None for i, f in enumerate(frames)]
        body[KEY_TAGS] = [self._frame_tag(counter, i, f) for i, f in enumerate(frames)]
        return [wire_buffer(f) if f.numel() else None for f in frames]

    def _frame_tag(self, counter: int, index: int, frame: torch.Tensor) -> bytes | None:
        """The GMAC tag of a frame that travels readable; none for a device frame to a process proven to run on this
        host: the tag would copy it to the host and back, and its bytes never leave the OS (session.py). Only once
        the remote said it proved us (LOCAL_READY): from then on it takes untagged frames from us."""
        if frame.device.type != "cpu" and self.remote_reads_us:
            return None
        return self.session.frame_tag(counter, index, _host_bytes(frame))

    def _seal(self, counter: int, index: int, frame: torch.Tensor):
        """Frame `index` of message `counter`, encrypted: the sealed buffer, or for a large frame a future of it
        (sealed on a crypto thread)."""
        out = SCRATCH.take(frame.numel() + TAG_BYTES)
        data = _host_bytes(frame)
        if frame.numel() < session.OFFLOAD_BYTES:
            return self.session.seal_frame(counter, index, data, out)
        work = session.crypto_pool().submit(self.session.seal_frame, counter, index, data, out)
        return asyncio.wrap_future(work)

    async def send_message(self, message: bytes) -> None:
        """Seal one fully encoded control message (no frames) and send it: for tests and tools that speak the
        protocol by hand (malformed messages inside a valid session)."""
        _, sealed = self.session.seal_control(message, self.limits.encrypt and not self.same_host)
        await self.wire.tag_send(np.frombuffer(sealed, dtype=np.uint8), _tag(self.send_base, 0))

    def _by_address(self, frames: Sequence[torch.Tensor]) -> bool:
        """Whether the remote reads these frames from our memory instead of receiving them through UCX."""
        return (
            self.remote_reads_us
            and all(f.device.type == "cpu" for f in frames)
            and sum(f.numel() for f in frames) >= self.limits.local_copy_min_bytes
        )

    def _await_read(self, seq: int, frames: Sequence[torch.Tensor]) -> asyncio.Future:
        """A future the remote's FRAMES_READ for message `seq` completes; `frames` stay alive until then."""
        future = asyncio.get_running_loop().create_future()
        self._local_sends[seq] = future
        future.add_done_callback(lambda _: (frames, self._local_sends.pop(seq, None)))
        return future

    def _inlinable(self, frames: Sequence[torch.Tensor]) -> bool:
        total = sum(f.numel() for f in frames)
        return total <= self.limits.inline_tensor_bytes and all(f.device.type == "cpu" for f in frames)

    async def wait(self, futures: Sequence[asyncio.Future]) -> None:
        """Wait for sends or receives of this connection; a failure marks the connection lost."""
        try:
            if len(futures) == 1:
                await futures[0]
            else:
                await asyncio.gather(*futures)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise self.lost(e) from e

    def frame_tag(self, body: dict, index: int) -> int:
        return _tag(self.recv_base, _frame_seq(body.get(KEY_SEQ, 0), index))

    async def receive_frames(
        self, body: dict, specs: Sequence[FrameSpec], out: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Receive the frames announced by `body` into `out` (checked against them) or fresh tensors."""
        if out is not None:
            try:
                check_buffers(out, specs)
            except ProtocolError:
                self.discard_frames(body, specs)
                raise
        if not specs:  # nothing announced, nothing on the wire (such a message carries no frame tags)
            return [] if out is None else list(out)
        if KEY_INLINE in body:
            tensors = inline_tensors(body[KEY_INLINE], specs)
            if out is None:
                return restore_requires_grad(tensors, specs)
            for dst, src in zip(out, tensors, strict=True):
                dst.view(-1).copy_(src.view(-1))
            return list(out)
        if out is not None:
            await self.receive_into(body, out)
            return list(out)
        tensors = [allocate(spec) for spec in specs]
        await self.receive_into(body, tensors)
        return restore_requires_grad(tensors, specs)

    async def receive_into(self, body: dict, tensors: Sequence[torch.Tensor], first_index: int = 0) -> None:
        """Receive announced frames straight into the given contiguous tensors (sizes already checked). Frames
        that do not arrive in time (TransportLimits.frame_deadline), or a receive abandoned before its frames came
        (a timed-out call), close the connection: UCX cannot cancel one receive, only all of an endpoint's."""
        if KEY_ADDRESSES in body:
            await self._read_local(body, tensors, first_index)
            return
        frames = [as_frame(t) for t in tensors]
        mode = body.get(KEY_SEALED)
        sealed = mode == SEALED_FRAMES
        tags = None if mode else body.get(KEY_TAGS)
        if mode not in (None, SEALED_FRAMES, SEALED_BLOCKS) or (
            not mode and not (isinstance(tags, list) and len(tags) == len(body.get(KEY_FRAMES, ())))
        ):
            raise self.lost(ForgedMessageError(f"{self.remote} sent frames without a known seal or their tags"))
        posting = [(i, f) for i, f in enumerate(frames) if f.numel()]
        buffers = []
        if mode == SEALED_BLOCKS:  # opened by the TCP wire as the blocks land: nothing left to do once they have
            futures = self._post_receives(self._block_receives(body, posting, first_index))
        else:
            if sealed:  # encrypted whole: land in scratch buffers, then decrypt into the frames
                buffers = [SCRATCH.take(f.numel() + TAG_BYTES) for _, f in posting]
            else:
                buffers = [wire_buffer(f) for _, f in posting]
            futures = self._post_receives(
                [(buf, self.frame_tag(body, first_index + i)) for buf, (i, _) in zip(buffers, posting, strict=True)]
            )
        nbytes = sum(f.numel() for _, f in posting)
        deadline = self.limits.frame_deadline(nbytes, self.rtt)
        try:
            async with asyncio.timeout(deadline):
                await self.wait(futures)
            counter = body[KEY_COUNTER]
            if sealed:
                for buf, (i, frame) in zip(buffers, posting, strict=True):
                    if frame.numel() < session.OFFLOAD_BYTES:
                        _open_into(self.session, counter, first_index + i, buf, frame)
                    else:  # off the loop, which keeps progressing other transfers meanwhile
                        loop = asyncio.get_running_loop()
                        pool = session.crypto_pool()
                        await loop.run_in_executor(pool, _open_into, self.session, counter, first_index + i, buf, frame)
                    SCRATCH.give(buf)
            elif not mode:
                for i, frame in enumerate(frames):
                    tag = tags[first_index + i]
                    if tag is None and self.same_host:  # an untagged frame is taken only from this host
                        continue
                    self.session.check_frame(counter, first_index + i, _host_bytes(frame), tag)
        except ForgedMessageError as e:
            raise self.lost(e) from None
        except TimeoutError:
            raise self.lost(
                ProtocolError(
                    f"{self.remote} announced {len(futures)} frames of {nbytes} bytes that did not arrive within "
                    f"{deadline:.1f} s (TransportLimits.frame_deadline: frame_timeout, min_frame_bytes_per_second, "
                    "and the link's round trip)"
                )
            ) from None
        except asyncio.CancelledError:
            if not all(f.done() for f in futures):
                self.lost(ConnectionLostError(f"a receive from {self.remote} was abandoned before its frames came"))
            raise

    def _block_receives(self, body: dict, posting: Sequence[tuple[int, torch.Tensor]], first_index: int) -> list:
        """(buffer, tag, the frame's blocks) for each frame to receive of a message whose frames are sealed in
        blocks (session.py): only a TCP wire carries those."""
        if self.wire.kind != "tcp":
            raise self.lost(ProtocolError(f"{self.remote} sent frames sealed in blocks over a {self.kind} link"))
        sizes = [spec.nbytes for spec in frame_specs(body, self.limits)]
        try:
            blocks = self.session.frame_blocks(body[KEY_COUNTER], sizes)
        except ProtocolError as e:
            raise self.lost(e) from None
        return [(wire_buffer(f), self.frame_tag(body, first_index + i), blocks[first_index + i]) for i, f in posting]

    def _post_receives(self, posts: Sequence[tuple]) -> list[asyncio.Future]:
        """Post one UCX receive per (buffer, tag) or, on a TCP wire, (buffer, tag, its sealed blocks), each holding
        a "receives" unit until it completes; past the limit the connection is closed (its frames could never be
        drained)."""
        try:
            self.resources.acquire(self.remote, "receives", len(posts))
        except ResourceLimitError as e:
            raise self.lost(ProtocolError(f"closing the connection: {e}")) from None
        futures = []
        for post in posts:
            future = self.wire.tag_recv(*post)
            self._receives.add(future)
            future.add_done_callback(self._received)
            futures.append(future)
        return futures

    def _received(self, future: asyncio.Future) -> None:
        if future in self._receives:
            self._receives.discard(future)
            self.resources.release(self.remote, "receives")

    async def _read_local(self, body: dict, tensors: Sequence[torch.Tensor], first_index: int) -> None:
        """Copy frames announced by address straight from the sender's memory, then release the sender."""
        try:
            await self.link.read(body, [as_frame(t) for t in tensors], first_index)
        except ConnectionLostError as e:
            raise self.lost(e) from None
        finally:
            self._frames_read(body)

    def _frames_read(self, body: dict) -> None:
        self.post_quietly({KEY_KIND: Kind.FRAMES_READ, KEY_ID: 0, KEY_SEQ: body.get(KEY_SEQ)})

    def discard_frames(self, body: dict, frames: Sequence[FrameSpec] | int) -> None:
        """Drop the frames we will not read (their specs, or only their count when they could not be parsed): a
        1-byte receive truncates each and frees the sender; they must come by TransportLimits.frame_deadline for
        their bytes at the link's round trip. Inline tensors came inside the control message: nothing is left on
        the wire for them; frames announced by address are only acknowledged."""
        if KEY_INLINE in body:
            return
        if KEY_ADDRESSES in body:
            self._frames_read(body)
            return
        count, nbytes = (frames, 0) if isinstance(frames, int) else (len(frames), frames_nbytes(frames))
        if self.closed or not count:
            return
        try:
            scratch = [(np.empty(1, dtype=np.uint8), self.frame_tag(body, i)) for i in range(count)]
            futures = self._post_receives(scratch)
        except ConnectionLostError:
            return
        for future in futures:
            retrieve_outcome(future)
        deadline = self.limits.frame_deadline(nbytes, self.rtt)
        asyncio.get_running_loop().call_later(deadline, self._check_discarded, futures, deadline)

    def _check_discarded(self, futures: list[asyncio.Future], deadline: float) -> None:
        if not self.closed and not all(f.done() for f in futures):
            self.lost(
                ProtocolError(
                    f"{self.remote} announced frames that did not arrive within {deadline:.1f} s "
                    "(TransportLimits.frame_deadline)"
                )
            )

    def start(self, handler: MessageHandler, on_lost: Callable[[Connection], None]) -> None:
        """Begin handing control messages to `handler`; `on_lost(self)` runs once when the connection dies."""
        self._handler, self._on_lost = handler, on_lost
        self.wire.listen(self.recv_base, self._arrived, self.limits.max_header_bytes + session.OVERHEAD)
        self.link.start()

    def _arrived(self, future: asyncio.Future | None, buf: np.ndarray, length: int) -> None:
        if future is None and not self._inbox:  # received already, nothing queued before it: the usual case
            self._process(None, buf, length)
            return
        self._inbox.append((future, buf, length))
        if future is None or future.done():
            self._drain()
        else:
            future.add_done_callback(self._drain_later)

    def _drain_later(self, _future: asyncio.Future) -> None:
        self._drain()

    def _drain(self) -> None:
        """Process received control messages in arrival order (a message still arriving holds back later ones)."""
        while self._inbox and (self._inbox[0][0] is None or self._inbox[0][0].done()):
            future, buf, length = self._inbox.popleft()
            if future is not None and future.cancelled():
                continue
            self._process(None if future is None else future.exception(), buf, length)

    def _process(self, error: BaseException | None, buf: np.ndarray, length: int) -> None:
        """Decode one received control message and hand it to the handler."""
        if self.closed or not self.reading:
            return
        if length > buf.nbytes:
            self._handler.on_bad_message(
                self,
                ProtocolError(
                    f"control message of {length} bytes exceeds the limit of {self.limits.max_header_bytes} bytes"
                ),
            )
            return
        if error is not None:
            self.lost(error)
            return
        self.last_used = time.monotonic()
        try:
            counter, message = self.session.open_control(buf)
            body = decode_message(message, self.limits)
        except ProtocolError as e:
            self._handler.on_bad_message(self, e)
            return
        body[KEY_COUNTER] = counter  # which nonces its frames were sealed with (never taken from the wire)
        if body[KEY_KIND] == Kind.FRAMES_READ:
            seq = body.get(KEY_SEQ)
            future = self._local_sends.pop(seq, None) if isinstance(seq, int) else None
            if future is not None and not future.done():
                future.set_result(None)
        elif body[KEY_KIND] >= Kind.LOCAL_OFFER:
            self.link.on_message(body)
        else:
            self._handler.on_message(self, body)

    def post_quietly(self, body: dict) -> None:
        """Send a connection-level message nobody waits for; a connection that is gone drops it."""
        try:
            futures = self.post(body)
        except (ConnectionLostError, ProtocolError) as e:
            logger.debug("%r: could not send %s: %s", self, Kind(body[KEY_KIND]).name, e)
            return
        for future in futures:
            retrieve_outcome(future)

    def lost(self, cause: Exception) -> ConnectionLostError:
        """Mark the connection dead (once) and fail every call still waiting on it."""
        if isinstance(cause, ConnectionLostError):
            error = cause
        else:
            error = ConnectionLostError(f"connection to {self.remote} lost: {type(cause).__name__}: {cause}")
        if not self.closed:
            self.closed, self.error = True, error
            logger.info("%r closed: %s", self, error)
            self.fail_replies(error)
            self._replies.clear()
            for future in list(self._local_sends.values()):
                if not future.done():
                    future.set_exception(error)
                    future.add_done_callback(retrieve_outcome)
            self._local_sends.clear()
            receives, self._receives = self._receives, set()
            self.resources.release(self.remote, "receives", len(receives))  # the endpoint's close cancels them
            for task in self._reply_tasks.values():
                task.cancel()
            for future, _, _ in self._inbox:
                retrieve_outcome(future)
            self._inbox.clear()
            self.wire.release_base(self.recv_base)
            self.link.close()
            self.wire.close()
            if self._on_lost is not None:
                self._on_lost(self)
        return error

    def protocol_violation(self, error: ProtocolError) -> None:
        """Stop reading at once; close a moment later, so the error reply we send gets there first."""
        logger.warning("%r: closing after protocol violation: %s", self, error)
        self.reading = False
        asyncio.get_running_loop().call_later(PROTOCOL_ERROR_LINGER, self.lost, error)
