"""Streams: one logical transfer as a sequence of chunks, read lazily so memory stays bounded.

The receiver posts a chunk's receive only when the handler reads it, so a sender never gets more than
its window ahead, and a 1 GB tensor can land chunk by chunk in its final buffer with no second copy.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator

import torch

from hiveengine.errors import ProtocolError
from hiveengine.transport.wire import KEY_HEADER, KEY_INLINE, FrameSpec, allocate, inline_tensors


class Chunk:
    """One received chunk: its sender's header and a frame not yet read."""

    def __init__(self, conn, body: dict, spec: FrameSpec):
        self._conn, self._body, self.spec = conn, body, spec
        header = body.get(KEY_HEADER, {})
        self.header: dict = header if isinstance(header, dict) else {}
        self.consumed = False

    async def read(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Receive the chunk into `out` (contiguous, same dtype and element count) or a new tensor."""
        if self.consumed:
            raise RuntimeError("this chunk was already read")
        if out is None:
            out = allocate(self.spec)
        elif not out.is_contiguous() or out.dtype != self.spec.dtype or out.numel() != self.spec.numel:
            self.discard()
            raise ProtocolError(
                f"chunk of {self.spec.numel} {self.spec.dtype} elements cannot be read into a "
                f"{'non-contiguous ' if not out.is_contiguous() else ''}{out.dtype} tensor of {out.numel()}"
            )
        self.consumed = True
        if KEY_INLINE in self._body:  # a small chunk travelled inside its control message
            (inline,) = inline_tensors(self._body[KEY_INLINE], [self.spec])
            out.view(-1).copy_(inline.view(-1))
            return out
        await self._conn.receive_into(self._body, [out])
        return out

    def discard(self) -> None:
        if not self.consumed:
            self.consumed = True
            self._conn.discard_frames(self._body, [self.spec])


_END = object()


class StreamReader:
    """The async iterator of chunks a stream handler consumes."""

    def __init__(self, key, max_backlog: int):
        self.key = key
        self.max_backlog = max_backlog
        self.ended = asyncio.Event()
        self._items: collections.deque = collections.deque()
        self._wakeup = asyncio.Event()
        self._error: Exception | None = None
        self._rejecting = False
        self._last: Chunk | None = None

    def push(self, chunk: Chunk) -> None:
        if self._rejecting or self._error is not None:
            chunk.discard()
        elif len(self._items) >= self.max_backlog:
            chunk.discard()
            self.fail(ProtocolError(f"stream sender ran more than {self.max_backlog} chunks ahead"))
        else:
            self._items.append(chunk)
            self._wakeup.set()

    def end(self) -> None:
        self.ended.set()
        self._items.append(_END)
        self._wakeup.set()

    def fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self.ended.set()
        self._wakeup.set()

    def reject(self) -> None:
        """Discard everything unread, now and from here on (the handler is done)."""
        self._rejecting = True
        if self._last is not None:
            self._last.discard()
        while self._items:
            item = self._items.popleft()
            if item is not _END:
                item.discard()

    def __aiter__(self) -> StreamReader:
        return self

    async def __anext__(self) -> Chunk:
        if self._last is not None:
            self._last.discard()  # the handler skipped it
            self._last = None
        while not self._items and self._error is None:
            self._wakeup.clear()
            await self._wakeup.wait()
        if self._error is not None:
            raise self._error
        item = self._items.popleft()
        if item is _END:
            self._items.appendleft(_END)
            raise StopAsyncIteration
        self._last = item
        return item


def iterate_chunks(tensor: torch.Tensor, chunk_bytes: int) -> Iterator[tuple[dict, torch.Tensor]]:
    """Split `tensor` into flat contiguous slices of at most `chunk_bytes`, each with its offset."""
    flat = tensor.contiguous().reshape(-1)
    step = max(1, chunk_bytes // max(1, flat.element_size()))
    total = flat.numel()
    meta = {"total": total, "shape": list(tensor.shape)}
    for start in range(0, total, step):
        yield {"offset": start, **meta}, flat[start : start + step]
