"""Butterfly all-reduce: each reducer owns one part of the flat buffer and averages it for the group.

Every contributing peer sends each chunk of part p (encoded with the codec, with error feedback) to p's
reducer in one call. The reducer waits for the chunk's copies from all senders, or until `sender_timeout`
after the first arrived, reduces them in one fused pass (weights renormalized over who arrived), encodes
the mean once, and returns it as the reply to every sender, who decodes it in place. A reducer that dies
costs its part for this round: senders keep their local values there and report the part as failed.

A buffer too small to give every reducer MIN_PART_BYTES is cut into fewer parts, owned by the fastest
reducers (the others own empty parts): such a round is bound by the work per message, not by bytes, so one
reducer of a 4 KB buffer in a group of 8 takes 7 calls where 8 reducers took 56.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from hiveengine.averaging.buffers import BufferCache
from hiveengine.averaging.group import GroupInfo
from hiveengine.averaging.partition import balanced_shares, chunk_spans, part_spans
from hiveengine.codec import Codec
from hiveengine.errors import HiveEngineError, ProtocolError, TransportError
from hiveengine.transport import Peer, PeerID, Request

logger = logging.getLogger(__name__)

CHUNK_METHOD = "hiveengine.allreduce.chunk"
DEFAULT_CHUNK_ELEMENTS = 1 << 20
DEFAULT_WINDOW = 4  # chunks in flight per reducer
DEFAULT_SENDER_TIMEOUT = 5.0
# A part this small costs more in per-message work (a few tens of us a message) than in bytes, so a smaller
# buffer is cut into fewer parts, owned by the fastest reducers; the other reducers own empty parts. Every
# member must agree on it: it is part of the protocol.
MIN_PART_BYTES = 16 * 1024
ROUND_WAIT_TIMEOUT = 10.0  # how long a reducer waits for its own runner to join a round it is called for


class AllReduceError(HiveEngineError):
    """A chunk could not be averaged (the reducer refused it, or reduced it without this sender)."""


@dataclass
class AllReduceResult:
    """What one round did: which reducers' parts failed (kept local values there) and who was averaged."""

    group: GroupInfo
    failed_parts: list[int] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    senders_averaged: int = 0


class _ChunkReduction:
    """Collects one chunk's copies and resolves, once, with the encoded mean and how many were averaged."""

    def __init__(self, expected: int, sender_timeout: float):
        self.expected = expected
        self.sender_timeout = sender_timeout
        self.received: dict[PeerID, tuple[float, list[torch.Tensor]]] = {}
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, sender: PeerID, weight: float, payload: list[torch.Tensor], reduce) -> None:
        if self.done.done():
            raise AllReduceError("this chunk was already averaged without you (you arrived after the sender timeout)")
        if sender in self.received:
            raise ProtocolError("duplicate contribution to one chunk")
        self.received[sender] = (weight, payload)
        if len(self.received) >= self.expected:
            self._finish(reduce)
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.sender_timeout, self._finish, reduce)

    def _finish(self, reduce) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.done.done():
            return
        try:
            # Sum in peer-id order, not arrival order, so every round is reproducible bit for bit.
            ordered = [self.received[sender] for sender in sorted(self.received)]
            self.done.set_result((reduce(ordered), len(ordered)))
        except Exception as e:
            self.done.set_exception(e)


@dataclass
class _ReducerArena:
    """Receive slots (one payload per sender per chunk) and fp32 outputs for one part's chunks."""

    slots: list[list[list[torch.Tensor]]]
    outputs: list[torch.Tensor]

    @classmethod
    def create(cls, codec: Codec, chunks, senders: int, device) -> _ReducerArena:
        slots = [[codec.empty_payload(e - s, device) for _ in range(senders)] for s, e in chunks]
        return cls(slots, [torch.empty(e - s, dtype=torch.float32, device=device) for s, e in chunks])


class _ReducerRound:
    """This peer's part in one group's round: a _ChunkReduction per chunk, created on first contact."""

    def __init__(self, group: GroupInfo, chunks, codec: Codec, sender_timeout: float, arena: _ReducerArena):
        self.group, self.codec, self.chunks, self.arena = group, codec, chunks, arena
        self.senders = {m.peer_id for m in group.senders}
        self.sender_timeout = sender_timeout
        self.reductions: dict[int, _ChunkReduction] = {}
        self._next_slot = [0] * len(chunks)

    def receive_slot(self, index) -> list[torch.Tensor] | None:
        """A free arena slot for one sender's copy of chunk `index` (None when out of range or used up)."""
        if not isinstance(index, int) or not 0 <= index < len(self.chunks):
            return None
        slot = self._next_slot[index]
        if slot >= len(self.arena.slots[index]):
            return None
        self._next_slot[index] += 1
        return self.arena.slots[index][slot]

    def reduction(self, index: int) -> _ChunkReduction:
        if index not in self.reductions:
            self.reductions[index] = _ChunkReduction(len(self.senders), self.sender_timeout)
        return self.reductions[index]

    def reduce_chunk(self, index: int, contributions) -> list[torch.Tensor]:
        weights = [w for w, _ in contributions]
        if sum(weights) <= 0:
            weights = [1.0] * len(weights)
        out = self.arena.outputs[index]
        return self.codec.reduce([p for _, p in contributions], weights, out, requantize=True, name="chunk mean")

    def check_payload(self, index: int, payload: list[torch.Tensor]) -> list[torch.Tensor]:
        if not 0 <= index < len(self.chunks):
            raise ProtocolError(f"chunk {index} is out of range (this part has {len(self.chunks)})")
        expected = self.arena.slots[index][0]  # every slot of a chunk has the codec's payload layout
        if len(payload) != len(expected) or any(
            t.dtype != e.dtype or t.shape != e.shape for t, e in zip(payload, expected, strict=False)
        ):
            raise ProtocolError(f"chunk {index} payload does not match the {self.codec.name} codec's layout")
        return [t.to(self.arena.outputs[index].device) for t in payload]

    async def contribute(self, sender: PeerID, index: int, weight: float, payload) -> tuple[list[torch.Tensor], int]:
        reduction = self.reduction(index)
        reduction.add(sender, weight, payload, lambda c: self.reduce_chunk(index, c))
        return await reduction.done


class AllReduceService:
    """Serves the reducer side of all-reduce rounds on a peer; one per peer."""

    def __init__(self, peer: Peer):
        self.peer = peer
        self.buffers = BufferCache()
        self._rounds: dict[bytes, _ReducerRound] = {}
        self._waiters: dict[bytes, asyncio.Future] = {}
        peer.register(CHUNK_METHOD, self._on_chunk, allocate=self._receive_buffers)

    def _receive_buffers(self, header: dict, specs) -> list[torch.Tensor] | None:
        """Land a chunk in its round's arena when the round is open here already (else: fresh memory)."""
        reducer_round = self._rounds.get(header.get("g")) if isinstance(header.get("g"), bytes) else None
        return None if reducer_round is None else reducer_round.receive_slot(header.get("c"))

    def open_round(self, group_id: bytes, reducer_round: _ReducerRound) -> None:
        self._rounds[group_id] = reducer_round
        waiter = self._waiters.pop(group_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(reducer_round)

    def close_round(self, group_id: bytes) -> None:
        self._rounds.pop(group_id, None)

    async def _round(self, group_id: bytes) -> _ReducerRound:
        if group_id in self._rounds:
            return self._rounds[group_id]
        waiter = self._waiters.setdefault(group_id, asyncio.get_running_loop().create_future())
        try:
            async with asyncio.timeout(ROUND_WAIT_TIMEOUT):
                return await asyncio.shield(waiter)
        except TimeoutError:
            self._waiters.pop(group_id, None)
            raise AllReduceError("this peer is not in that averaging group (or never started its round)") from None

    async def _on_chunk(self, request: Request):
        header = request.header
        group_id, index, weight = header.get("g"), header.get("c"), header.get("w")
        if not isinstance(group_id, bytes) or not isinstance(index, int) or not isinstance(weight, int | float):
            raise ProtocolError("an all-reduce chunk needs bytes 'g', int 'c' and numeric 'w'")
        if not math.isfinite(weight) or weight < 0:
            raise ProtocolError(f"weight {weight} must be finite and non-negative")
        reducer_round = await self._round(group_id)
        if request.sender not in reducer_round.senders:
            raise ProtocolError("the caller is not a contributing member of this group")
        payload = reducer_round.check_payload(index, request.tensors)
        mean, count = await reducer_round.contribute(request.sender, index, float(weight), payload)
        return {"n": count}, mean


async def run_allreduce(
    service: AllReduceService,
    group: GroupInfo,
    flat: torch.Tensor,
    codec: Codec,
    *,
    weight: float = 1.0,
    residual: torch.Tensor | None = None,
    timeout: float = 60.0,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    window: int = DEFAULT_WINDOW,
    sender_timeout: float = DEFAULT_SENDER_TIMEOUT,
) -> AllReduceResult:
    """Average `flat` (1-D, contiguous, float) with `group` in place; parts whose reducer failed stay local."""
    me = group.member(service.peer.peer_id)
    if me is None:
        raise ValueError("this peer is not a member of the group it was asked to average with")
    reducers = group.reducers
    align = getattr(codec, "block", 1)
    chunk_elements = max(align, chunk_elements // align * align)
    if not reducers:
        raise AllReduceError("no member of this group can reduce (all are client-mode or have no bandwidth)")
    owners = tuple((r.bandwidth, r.contributes) for r in reducers)
    min_part = -(-MIN_PART_BYTES // flat.element_size())
    spans = list(_part_spans(owners, len(group.senders), flat.numel(), align, min_part))
    result = AllReduceResult(group, spans=spans, senders_averaged=len(group.senders))
    my_part = next((i for i, r in enumerate(reducers) if r.peer_id == me.peer_id), None)
    local_round = None
    if my_part is not None:
        chunks = chunk_spans(*spans[my_part], chunk_elements)
        senders = len(group.senders)
        layout = ("reduce", codec.name, tuple(chunks), senders, flat.device)
        arena = service.buffers.get(layout, lambda: _ReducerArena.create(codec, chunks, senders, flat.device))
        local_round = _ReducerRound(group, chunks, codec, sender_timeout, arena)
        service.open_round(group.group_id, local_round)
    deadline = time.monotonic() + timeout
    parts = [p for p, (start, end) in enumerate(spans) if end > start] if me.contributes else []
    exchanges: dict[int, asyncio.Task] = {}
    outcomes: dict[int, int | BaseException] = {}  # per part: the fewest senders averaged, or what failed it

    def exchange(part: int):
        return _exchange_part(
            service,
            group,
            reducers[part],
            part,
            spans[part],
            flat,
            codec,
            weight,
            residual,
            chunk_elements,
            window,
            deadline,
            local_round if part == my_part else None,
        )

    try:
        async with asyncio.timeout(timeout):
            if len(parts) == 1:  # a small buffer: one part to send, right now (a task would wait a loop turn)
                try:
                    outcomes[parts[0]] = await exchange(parts[0])
                except Exception as e:
                    outcomes[parts[0]] = e
            elif parts:
                exchanges = {part: asyncio.ensure_future(exchange(part)) for part in parts}
                await asyncio.wait(exchanges.values())
            if local_round is not None:
                await _serve_until_reduced(local_round)
    except TimeoutError:
        logger.warning("all-reduce round %s hit its %.1f s deadline", group.group_id.hex()[:8], timeout)
    finally:
        service.close_round(group.group_id)
        for task in exchanges.values():
            task.cancel()
    for part, task in exchanges.items():
        if task.done() and not task.cancelled():
            outcomes[part] = task.exception() or task.result()
    for part in parts:
        outcome = outcomes.get(part, TimeoutError("round deadline"))
        if isinstance(outcome, BaseException):
            result.failed_parts.append(part)
            logger.warning("part %d (reducer %s) failed: %s", part, reducers[part].peer_id, outcome)
        else:
            result.senders_averaged = min(result.senders_averaged, outcome)
    return result


@functools.lru_cache(maxsize=64)
def _part_spans(reducers: tuple[tuple[float, bool], ...], senders: int, numel: int, align: int, min_part: int) -> list:
    """Each reducer's part of the buffer (the same on every member): balanced over the reducers, or over the
    fastest of them (ties: in group order) when the buffer has fewer than `min_part` elements per reducer.
    Cached, as the balancing takes ~0.3-0.7 ms, and a group and buffer size repeat round after round."""
    parts = max(1, min(len(reducers), numel // max(1, min_part)))
    owners = sorted(range(len(reducers)), key=lambda i: -reducers[i][0])[:parts]
    owned = balanced_shares([reducers[i][0] for i in owners], [reducers[i][1] for i in owners], senders)
    shares = [0.0] * len(reducers)
    for i, share in zip(owners, owned, strict=True):
        shares[i] = share
    return part_spans(numel, shares, align)


async def _serve_until_reduced(local_round: _ReducerRound) -> None:
    """Stay in the round until every chunk of our part has been averaged (or failed) for its senders."""
    for index in range(len(local_round.chunks)):
        reduction = local_round.reduction(index)
        if not local_round.senders:
            return
        await asyncio.gather(reduction.done, return_exceptions=True)


async def _exchange_part(
    service, group, reducer, part, span, flat, codec, weight, residual, chunk_elements, window, deadline, local_round
) -> int:
    """Send every chunk of one part to its reducer and decode the means in place; return the fewest
    senders any chunk was averaged over."""
    semaphore = asyncio.Semaphore(window)
    fewest = len(group.senders)
    chunks = chunk_spans(*span, chunk_elements)
    lossless = codec.name == "none"  # the chunk goes as it is and the mean lands straight in `flat`
    if not lossless:
        sends, means = service.buffers.get(
            ("send", codec.name, tuple(chunks), flat.device),
            lambda: tuple([codec.empty_payload(e - s, flat.device) for s, e in chunks] for _ in range(2)),
        )

    async def one_chunk(index: int, start: int, end: int) -> None:
        nonlocal fewest
        async with semaphore:
            piece = flat[start:end]
            encode_into = None if lossless else sends[index]
            payload = codec.encode(
                piece, None if residual is None else residual[start:end], out=encode_into, name=f"part {part}"
            )
            if local_round is not None:
                mean, count = await local_round.contribute(service.peer.peer_id, index, weight, payload)
                codec.decode([t.to(flat.device) for t in mean], piece, name=f"mean of part {part}")
            else:
                header = {"g": group.group_id, "c": index, "w": weight}
                remaining = max(0.1, deadline - time.monotonic())
                out = [piece] if lossless else means[index]
                reply, mean = await service.peer.call(
                    reducer.address, CHUNK_METHOD, header, payload, timeout=remaining, out=out
                )
                if not lossless:
                    codec.decode(mean, piece, name=f"mean of part {part}")
                count = int(reply.get("n", 0))
            fewest = min(fewest, count)

    if len(chunks) == 1:  # most rounds of small buffers: no task per chunk
        outcomes = [await _outcome(one_chunk(0, *chunks[0]))]
    else:
        sending = (one_chunk(i, s, e) for i, (s, e) in enumerate(chunks))
        outcomes = await asyncio.gather(*sending, return_exceptions=True)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    if errors:
        if not all(isinstance(e, TransportError | AllReduceError | TimeoutError) for e in errors):
            raise errors[0]
        raise AllReduceError(f"{len(errors)} of {len(chunks)} chunks of part {part} failed: {errors[0]}")
    return fewest


async def _outcome(coro) -> BaseException | None:
    """Await `coro`; its exception, if it raised one (as gather(return_exceptions=True) reports it)."""
    try:
        await coro
    except Exception as e:
        return e
    return None
