"""Event-driven UCX progress: the worker is progressed when its epoll fd fires, and briefly after activity.

ucxx's own progress modes keep a core busy while a receive is posted (they poll each request from
the event loop). Here a posted receive costs nothing: the worker is armed, asyncio waits on its
file descriptor, and request completion is checked only after the worker made progress.

Right after UCX did something (a message came or went, a request completed), the reply or the next
step of a transfer usually follows within microseconds. Sleeping on the fd in between costs a re-arm,
an epoll round and a wake-up on each side (about 100 us per side per round trip on the VMs measured), so
for a short bounded window after activity (HIVEENGINE_SPIN_US) the worker is progressed on every loop
iteration instead (adaptive polling). An idle worker never spins.

Control messages are not received through one standing receive per connection (checking all of them
after every progress pass costs O(connections)). Their tag carries the receiving connection's 32-bit
base in its upper half and 0 in its lower half, so after each pass the worker is probed for such
messages, and each one found is received and handed to the connection its base names: O(messages).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from hiveengine.errors import ConfigurationError
from hiveengine.transport.ucx_env import import_ucxx

logger = logging.getLogger(__name__)
ACTIVE_POLL_INTERVAL = 0.0002  # seconds between progress passes while transfers are in flight
# After UCX activity, progress on every loop iteration this long before sleeping on the fd. Measured on a quiet
# 2-core host: 4 KiB round trip 342 -> 184 us, 1 MiB streams 2.0 -> 2.3 GB/s, idle CPU still 0%; a 4-peer
# all-reduce on those 2 cores 3-7% slower (the spinning peers take CPU the others could use). 0 turns it off,
# which suits hosts where more peers than cores share the CPU.
SPIN_ENV = "HIVEENGINE_SPIN_US"
DEFAULT_SPIN_US = 200.0
MAX_SPIN_US = 100_000.0
# While a thread blocks on this loop (a blocking call such as DecentralizedAverager.step), the window is this many times
# longer: each wake-up from the fd costs ~0.1-0.3 ms on these VMs, a round of small tensors waits through several, and
# the blocked thread needs no CPU. A 2-peer round of 4 KB on a quiet 2-core host: 2.2-2.5 -> 1.8-1.9 ms.
WAITED_SPIN_FACTOR = 5


def spin_seconds(environ: Mapping[str, str] = os.environ) -> float:
    """The adaptive polling window from HIVEENGINE_SPIN_US (microseconds), in seconds."""
    raw = environ.get(SPIN_ENV)
    if raw is None:
        return DEFAULT_SPIN_US / 1e6
    try:
        us = float(raw)
    except ValueError:
        us = -1.0
    if not 0 <= us <= MAX_SPIN_US:
        raise ConfigurationError(f"{SPIN_ENV}={raw!r}: expected microseconds between 0 and {MAX_SPIN_US:g}")
    return us / 1e6


BASE_SHIFT = 32  # a tag is base << BASE_SHIFT | seq; control messages have seq 0
CONTROL_MASK = (1 << BASE_SHIFT) - 1  # matches every tag whose seq is 0, whatever its base
# Control messages held for a base whose connection is still being set up (not yet authenticated): at most this
# many, of at most this many bytes in all; later ones are dropped (a legitimate dialer sends one or two).
MAX_EARLY_MESSAGES = 8
MAX_EARLY_BYTES = 64 << 10

# Takes (receive future, or None when the message is already received, buffer, the message's length):
# a buffer shorter than the message truncates it.
ControlHandler = Callable[[asyncio.Future | None, np.ndarray, int], None]


def close_endpoint(endpoint) -> None:
    """Close an endpoint we are done with. Its close callback is taken back first: ucxx hands the C++ endpoint a
    raw pointer to the callback's data, which the Python object frees when it is collected. One that UCX already
    failed is only released: closing it again crashes ucxx 0.52."""
    try:
        endpoint.remove_close_callback()
        if endpoint.alive:
            endpoint.close()
    except Exception as e:
        logger.debug("closing endpoint: %s", e)


def keep_until_exit(obj) -> None:
    """Give `obj` one reference more that nothing releases: it outlives the process (the OS reclaims it)."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


def keep_worker_holders_until_exit(lib) -> Counter[str]:
    """Make every ucxx object still in memory that holds the UCX worker (an endpoint, request or address: their
    C++ side keeps the worker) outlive the process. At shutdown, endpoints that failed and are held only by an
    error's traceback were destroyed by the garbage collection, and destroying them crashed libucxx now and then
    (SIGSEGV at exit). `lib`: ucxx's module (Reactor.lib). How many of each kind, by name."""
    kinds = {lib.UCXEndpoint, lib.UCXRequest, lib.UCXBufferRequest, lib.UCXBufferRequests, lib.UCXAddress}
    holders = [o for o in gc.get_objects() if type(o) in kinds]
    for holder in holders:
        keep_until_exit(holder)
    return Counter(type(holder).__name__ for holder in holders)


class Reactor:
    """One UCX worker driven by one asyncio loop; turns UCX requests into awaitables."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        _, lib = import_ucxx()
        from ucxx._lib.arr import Array
        from ucxx.types import Tag, TagMask, TagMaskFull

        self._lib, self._array, self._tag, self._tag_mask = lib, Array, Tag, TagMaskFull
        self._tag_mask_type = TagMask
        self.loop = loop
        self.context = lib.UCXContext({})
        self.worker = lib.UCXWorker(self.context, enable_delayed_submission=False, enable_python_future=False)
        self.worker.init_blocking_progress_mode()
        self._fd = self.worker.epoll_file_descriptor
        self._pending: dict[Any, tuple[asyncio.Future, Any]] = {}
        self._in_flight_at_close: list[Any] = []
        self._control_tag, self._control_mask = Tag(0), self._tag_mask_type(CONTROL_MASK)
        # base -> (handler or None while its connection is being set up, largest control message it takes)
        self._bases: dict[int, tuple[ControlHandler | None, int]] = {}
        self._early: dict[int, list[tuple[asyncio.Future, np.ndarray, int]]] = {}
        self._poll_handle: asyncio.TimerHandle | None = None
        self._scheduled = False
        self._spin_until = 0.0
        self._spin_seconds = spin_seconds()
        self._waiting = 0  # threads blocked on a result of this loop (begin_wait)
        # Every wire whose endpoint is in use, by id, until it closes that endpoint here on the loop thread.
        self._wires: dict[int, Any] = {}
        self._closed = False
        loop.add_reader(self._fd, self._on_fd)
        self.kick()

    @property
    def lib(self):
        return self._lib

    def hold(self, wire) -> None:
        """Keep `wire` (a UcxWire) referenced until it closes its endpoint (`release`). ucxx closes an endpoint that
        nobody closed when it is destroyed (a blocking close that progresses the worker) on whichever thread drops
        it last: the garbage collector's, on a thread of the user's, while this loop progresses the same worker; a
        dial or handshake cancelled mid-way used to leave its endpoint to that."""
        self._wires[id(wire)] = wire

    def release(self, wire) -> None:
        """`wire` closed its endpoint (on the loop thread)."""
        self._wires.pop(id(wire), None)

    def close_all_held(self) -> int:
        """Close every wire still held (at shutdown, while the worker still progresses); how many. Each lets go of
        its endpoint, so none is left for the shutdown to keep (a closed endpoint is destroyed at no cost)."""
        wires = list(self._wires.values())
        for wire in wires:
            wire.close()
        return len(wires)

    @property
    def held(self) -> int:
        """How many endpoints are open (held and not yet closed)."""
        return len(self._wires)

    def kick(self) -> None:
        """Schedule one progress pass on the loop (coalesced)."""
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self.loop.call_soon(self._progress)

    def _on_fd(self) -> None:
        if not self._scheduled:
            self._progress()

    def _progress(self) -> None:
        """Progress until UCX has nothing more to do and resolve finished requests; then keep polling
        while activity is recent, or arm the worker and sleep on its fd."""
        self._scheduled = False
        if self._closed:
            return
        if self._pass():
            self._spin_until = time.monotonic() + self._spin_window()
        if time.monotonic() >= self._spin_until and self.worker.arm():
            # UCX does not always raise an fd event when a large transfer can make progress again (e.g.
            # a TCP socket turning writable), so while data is in flight we also progress on a short
            # timer. An idle connection has nothing pending, so it never starts it: idle stays at ~0% CPU.
            if self._pending and self._poll_handle is None:
                self._poll_handle = self.loop.call_later(ACTIVE_POLL_INTERVAL, self._poll)
            return
        # Still spinning, or UCX will not arm (it has events left): pass again on the loop's next turn, never in a
        # loop of our own. A link whose peer died mid-transfer can keep the worker from arming for a minute; looping
        # here then froze every deadline, call and timer of this process with it.
        self.kick()

    def _pass(self) -> bool:
        """One round of progress, completions and control messages; whether a request completed or a
        control message came (bytes merely moving do not count: a long transfer is left to the fd)."""
        while self.worker.progress_once():
            pass
        completed = self._collect_completed() if self._pending else False
        return self._take_control_messages() or completed

    def _poll(self) -> None:
        self._poll_handle = None
        self._progress()

    def _collect_completed(self) -> bool:
        done = [req for req in self._pending if req.completed]
        for req in done:
            self._resolve(req, self._pending.pop(req)[0])
        return bool(done)

    def _take_control_messages(self) -> bool:
        """Receive every control message UCX holds and hand each to the connection its tag's base names;
        whether there was any."""
        taken = False
        while True:
            probe = self.worker.tag_probe(self._control_tag, self._control_mask, True)
            if not probe.matched:
                return taken
            taken = True
            base = probe.sender_tag.value >> BASE_SHIFT
            handler, limit = self._bases.get(base, (None, -1))
            early = self._early.get(base)
            fits = probe.length <= limit and (handler is not None or _early_room(early, probe.length))
            buf = np.empty(probe.length if fits else 1, dtype=np.uint8)  # 1 byte: truncated and dropped
            req = self.worker.tag_recv_with_handle(self._array(buf), probe)
            future = None if req.completed and _succeeded(req) else self.track(req, buf)
            if handler is not None:
                handler(future, buf, probe.length)
            elif fits:
                early.append((future, buf, probe.length))
            else:
                retrieve_outcome(future)
                logger.debug("dropped a control message of %d bytes for base %x", probe.length, base)

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

    def track(self, req, keepalive: Any = None) -> asyncio.Future:
        """Future that completes with `req`; `keepalive` (the buffer) stays referenced until then."""
        future = self.loop.create_future()
        if req.completed:
            self._resolve(req, future)
        else:
            self._pending[req] = (future, keepalive)
            self.kick()
        self.active()
        return future

    def active(self) -> None:
        """Something was just sent or received (a UCX request posted, or a TCP wire's record): its answer (or its
        next step) is likely close, so poll for a while: the loop then never sleeps in epoll, and a socket that
        turns readable is served on the next turn (with spinning off, a request UCX already completed needs no
        progress pass)."""
        if self._spin_seconds:
            self._spin_until = time.monotonic() + self._spin_window()
            self.kick()

    def begin_wait(self) -> None:
        """A thread now blocks on a result of this loop (Runtime.run): until `end_wait`, poll WAITED_SPIN_FACTOR times
        longer after activity. That thread holds no GIL that polling could keep from it, and each wake-up from the fd
        that polling saves is time it waits."""
        self._waiting += 1

    def end_wait(self) -> None:
        """The result is ready: unless another thread still waits, stop polling now (until the next activity), so
        the loop sleeps on its fd and lets go of the GIL, which the waiting thread needs to take its result."""
        self._waiting -= 1
        if not self._waiting:
            self._spin_until = 0.0

    def _spin_window(self) -> float:
        return self._spin_seconds * (WAITED_SPIN_FACTOR if self._waiting else 1)

    def reserve_base(self, max_control_bytes: int) -> int:
        """A fresh receive tag base for a connection being set up; its control messages (up to
        `max_control_bytes` each) are held until `listen` names who takes them."""
        while True:
            base = random.getrandbits(BASE_SHIFT)
            if base and base not in self._bases:
                self._bases[base] = (None, max_control_bytes)
                self._early[base] = []
                return base

    def listen(self, base: int, handler: ControlHandler, max_control_bytes: int) -> None:
        """Hand `base`'s control messages to `handler`, in arrival order."""
        self._bases[base] = (handler, max_control_bytes)
        for future, buf, length in self._early.pop(base, ()):
            handler(future, buf, length)

    def release_base(self, base: int) -> None:
        """Stop taking `base`'s control messages; later ones are dropped."""
        self._bases.pop(base, None)
        for future, _, _ in self._early.pop(base, ()):
            retrieve_outcome(future)

    def tag_send(self, endpoint, buf, tag: int) -> asyncio.Future:
        return self.track(endpoint.tag_send(self._array(buf), self._tag(tag)), buf)

    def send_now(self, endpoint, buf, tag: int) -> asyncio.Future | None:
        """Post a send; None if UCX completed it on the spot (small messages), else its future."""
        req = endpoint.tag_send(self._array(buf), self._tag(tag))
        if req.completed and _succeeded(req):
            self.active()
            return None
        return self.track(req, buf)

    def tag_recv(self, endpoint, buf, tag: int) -> asyncio.Future:
        return self.track(endpoint.tag_recv(self._array(buf), self._tag(tag), self._tag_mask), buf)

    def stream_send(self, endpoint, buf) -> asyncio.Future:
        return self.track(endpoint.stream_send(self._array(buf)), buf)

    def stream_recv(self, endpoint, buf) -> asyncio.Future:
        return self.track(endpoint.stream_recv(self._array(buf)), buf)

    def close(self) -> None:
        """Stop progressing; fail what is still pending. Its buffers stay referenced as long as the reactor: UCX
        may still write into a receive in flight until the worker is destroyed (Runtime._release_ucx)."""
        if self._closed:
            return
        self._closed = True
        self.loop.remove_reader(self._fd)
        if self._poll_handle is not None:
            self._poll_handle.cancel()
        for future, _ in self._pending.values():
            if not future.done():
                future.cancel()
        self._in_flight_at_close = [buf for _, buf in self._pending.values()]
        self._pending.clear()
        self._bases.clear()
        self._early.clear()


def _early_room(early: list, length: int) -> bool:
    """Whether a control message of `length` bytes may still be held for a connection being set up."""
    return len(early) < MAX_EARLY_MESSAGES and sum(buf.nbytes for _, buf, _ in early) + length <= MAX_EARLY_BYTES


def _succeeded(req) -> bool:
    """Whether a completed request finished without error."""
    try:
        req.check_error()
    except Exception:
        return False
    return True


def retrieve_outcome(future: asyncio.Future | None) -> None:
    """Mark a future's outcome as seen, now or when it completes, where nobody may await it (a dropped
    receive, an abandoned call). None stands for a receive that already succeeded."""
    if future is None:
        return
    if not future.done():
        future.add_done_callback(retrieve_outcome)
    elif not future.cancelled():
        future.exception()
