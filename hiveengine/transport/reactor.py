"""Event-driven UCX progress: the worker is progressed when its epoll fd fires, never polled.

ucxx's own progress modes keep a core busy while a receive is posted (they poll each request from
the event loop). Here a posted receive costs nothing: the worker is armed, asyncio waits on its
file descriptor, and request completion is checked only after the worker made progress.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from hiveengine.transport.ucx_env import import_ucxx

logger = logging.getLogger(__name__)
ACTIVE_POLL_INTERVAL = 0.0002  # seconds between progress passes while transfers are in flight


def close_endpoint(endpoint) -> None:
    """Close an endpoint we are done with. One that UCX already failed is only released: closing it
    again crashes ucxx 0.52."""
    try:
        if endpoint.alive:
            endpoint.close()
    except Exception as e:
        logger.debug("closing endpoint: %s", e)


class Reactor:
    """One UCX worker driven by one asyncio loop; turns UCX requests into awaitables."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        _, lib = import_ucxx()
        from ucxx._lib.arr import Array
        from ucxx.types import Tag, TagMaskFull

        self._lib, self._array, self._tag, self._tag_mask = lib, Array, Tag, TagMaskFull
        self.loop = loop
        self.context = lib.UCXContext({})
        self.worker = lib.UCXWorker(self.context, enable_delayed_submission=False, enable_python_future=False)
        self.worker.init_blocking_progress_mode()
        self._fd = self.worker.epoll_file_descriptor
        self._pending: dict[Any, tuple[asyncio.Future, Any]] = {}
        self._standing = 0  # pending receives that wait for messages which may never come (control channels)
        self._poll_handle: asyncio.TimerHandle | None = None
        self._scheduled = False
        self._closed = False
        loop.add_reader(self._fd, self._progress)
        self.kick()

    @property
    def lib(self):
        return self._lib

    def kick(self) -> None:
        """Schedule one progress pass on the loop (coalesced)."""
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self.loop.call_soon(self._progress)

    def _progress(self) -> None:
        """Progress until UCX has nothing more to do, resolve finished requests, then re-arm the fd."""
        self._scheduled = False
        if self._closed:
            return
        while True:
            while self.worker.progress_once():
                pass
            self._collect_completed()
            if self.worker.arm():
                break
        # UCX does not always raise an fd event when a large transfer can make progress again (e.g. a TCP
        # socket turning writable), so while data is in flight we also progress on a short timer. Standing
        # receives alone (an idle connection) never start the timer: idle stays at ~0% CPU.
        if len(self._pending) > self._standing and self._poll_handle is None:
            self._poll_handle = self.loop.call_later(ACTIVE_POLL_INTERVAL, self._poll)

    def _poll(self) -> None:
        self._poll_handle = None
        self._progress()

    def _collect_completed(self) -> None:
        done = [req for req in self._pending if req.completed]
        for req in done:
            future, _keepalive, standing = self._pending.pop(req)
            self._standing -= standing
            self._resolve(req, future)

    @staticmethod
    def _resolve(req, future: asyncio.Future) -> None:
        if future.done():
            return
        try:
            req.check_error()
        except Exception as e:
            future.set_exception(e)
        else:
            future.set_result(None)

    def track(self, req, keepalive: Any = None, standing: bool = False) -> asyncio.Future:
        """Future that completes with `req`; `keepalive` (the buffer) stays referenced until then.
        A `standing` request is a receive that may wait indefinitely for a message (no polling for it)."""
        future = self.loop.create_future()
        if req.completed:
            self._resolve(req, future)
        else:
            self._pending[req] = (future, keepalive, int(standing))
            self._standing += int(standing)
            self.kick()
        return future

    def tag_send(self, endpoint, buf, tag: int) -> asyncio.Future:
        return self.track(endpoint.tag_send(self._array(buf), self._tag(tag)), buf)

    def tag_recv(self, endpoint, buf, tag: int, standing: bool = False) -> asyncio.Future:
        return self.track(endpoint.tag_recv(self._array(buf), self._tag(tag), self._tag_mask), buf, standing)

    def stream_send(self, endpoint, buf) -> asyncio.Future:
        return self.track(endpoint.stream_send(self._array(buf)), buf)

    def stream_recv(self, endpoint, buf) -> asyncio.Future:
        return self.track(endpoint.stream_recv(self._array(buf)), buf)

    def close(self) -> None:
        """Stop progressing; fail what is still pending."""
        if self._closed:
            return
        self._closed = True
        self.loop.remove_reader(self._fd)
        if self._poll_handle is not None:
            self._poll_handle.cancel()
        for future, _, _ in self._pending.values():
            if not future.done():
                future.cancel()
        self._pending.clear()
