"""The process's transport runtime: one background asyncio thread, one UCX worker, two listeners.

Every Peer in a process shares it. The UCX listener and the TCP listener (for TCP wires, which peers behind a NAT
open: tcp_wire.py) route each incoming connection to the local peer whose id the connector asked for, after the
same handshake. Synchronous code reaches the loop through `run()`.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import gc
import logging
import os
import socket
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar

from hiveengine.errors import ConfigurationError, HandshakeError, RPCTimeoutError
from hiveengine.transport import local_copy, session, tcp_wire
from hiveengine.transport.handshake import MAGIC, accept_handshake, confirm_handshake
from hiveengine.transport.limits import DEFAULT_LIMITS
from hiveengine.transport.rails import JOIN_BYTES, RAIL_MAGIC, parse_join
from hiveengine.transport.reactor import Reactor, close_endpoint, keep_until_exit, keep_worker_holders_until_exit
from hiveengine.transport.relay import PREAMBLE, RELAY_MAGIC
from hiveengine.transport.tcp_wire import TcpWire
from hiveengine.transport.ucx_wire import UcxWire

logger = logging.getLogger(__name__)
T = TypeVar("T")
PORT_ENV = "HIVEENGINE_PORT"
TCP_PORT_ENV = "HIVEENGINE_TCP_PORT"  # where TCP wires are accepted (default: any free port)
TCP_BACKLOG = 128
SHUTDOWN_TIMEOUT = 10.0  # seconds the shutdown may take on the loop thread before it is stopped regardless
ENDPOINT_CLOSE_TIMEOUT = 1.0  # seconds UCX gets at shutdown to finish closing endpoints before the worker goes
DRAIN_IDLE_PASSES = 3  # progress passes in a row that did nothing: UCX has finished what shutdown started


def _bind_cuda_context() -> None:
    """Make the current CUDA device's context current on the loop thread: UCX progresses CUDA
    transfers from this thread and needs a context there to recognise device memory."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(torch.cuda.current_device())
        torch.empty(1, device="cuda")


class Runtime:
    """The process-wide event loop thread and UCX worker; get it with `Runtime.get()`."""

    _instance: Runtime | None = None
    _instance_lock = threading.Lock()

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="hiveengine-transport", daemon=True)
        self._thread.start()
        # Not through run(): run() waits through the reactor (_waited), which this makes.
        self.reactor: Reactor = self.submit(self._make_reactor()).result(timeout=60)
        self.listener = None
        self.tcp_listener: socket.socket | None = None
        self.tcp_port: int | None = None
        # Whether other peers can dial this process (None: not known; reachability.py finds out). Unreachable, its
        # peers open every link themselves over TCP wires and are called back over those.
        self.reachable: bool | None = None
        self.relay = None  # the relay.Relay this process offers, if any
        self.reserved_relay = None  # the relay (a PeerAddress) this process's peers reserve with, once one did
        self._tcp_accepting: asyncio.Task | None = None
        self.local_copy = local_copy.Service()  # answers same-host direct copy proofs (started with the listener)
        self.peers: dict[bytes, object] = {}
        self._default_peer: bytes | None = None
        self.unauthenticated = 0  # accepted connections still in their handshake
        self.refused_unauthenticated = 0  # connections closed at once because of max_unauthenticated
        # Accepted TCP wires by link id, for the rails their diallers join (rails.py); gone with the wire.
        self.rail_wires: weakref.WeakValueDictionary[bytes, TcpWire] = weakref.WeakValueDictionary()
        self._closed = False

    @classmethod
    def get(cls) -> Runtime:
        with cls._instance_lock:
            if cls._instance is None or cls._instance._closed:
                cls._instance = Runtime()
                atexit.register(cls._instance.shutdown)
            return cls._instance

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def _make_reactor(self) -> Reactor:
        _bind_cuda_context()
        return Reactor(asyncio.get_running_loop())

    @property
    def closed(self) -> bool:
        """Whether `shutdown` began: the runtime runs nothing more (Runtime.get makes a new one)."""
        return self._closed

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Awaitable[T], timeout: float | None) -> T:
        """Run `coro` on the transport loop from another thread and wait for it, at most `timeout` seconds."""
        if self.in_loop_thread():
            raise RuntimeError("blocking call made from the transport loop itself; await the async twin instead")
        if self.loop.is_closed():
            if asyncio.iscoroutine(coro):
                coro.close()  # never run: without this Python warns that it was never awaited
            raise RuntimeError("the transport runtime has shut down (Runtime.shutdown, or the process is exiting)")
        future = self.submit(self._waited(coro))
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RPCTimeoutError(f"operation did not complete within {timeout} s") from None

    async def _waited(self, coro: Awaitable[T]) -> T:
        """Await `coro` for a thread that blocks on its result: the reactor polls longer meanwhile, and stops once the
        result is ready (a polling loop would hold the GIL that the waiting thread needs to take it)."""
        self.reactor.begin_wait()
        try:
            return await coro
        finally:
            self.reactor.end_wait()

    def call_soon(self, fn: Callable, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def new_recv_base(self) -> int:
        """A receive tag base for a connection being set up (see Reactor.reserve_base)."""
        limit = max((p.limits.max_header_bytes for p in self.peers.values()), default=DEFAULT_LIMITS.max_header_bytes)
        return self.reactor.reserve_base(limit + session.OVERHEAD)

    def release_recv_base(self, base: int) -> None:
        self.reactor.release_base(base)

    async def ensure_listener(self, port: int | None) -> int:
        """Start the process's listener on `port` (0: any) once; return the port it listens on."""
        if port is None:
            port = int(os.environ.get(PORT_ENV, 0))
        if self.listener is not None:
            if port not in (0, self.listener.port):
                raise ConfigurationError(
                    f"this process already listens on port {self.listener.port}; "
                    f"one process has one listener, so port {port} cannot be used as well"
                )
            return self.listener.port
        lib = self.reactor.lib
        try:
            self.listener = lib.UCXListener.create(self.reactor.worker, port, self._on_connection_request, (), None)
        except Exception as e:
            raise ConfigurationError(f"cannot listen on port {port}: {e} (choose another port, or 0 for any)") from e
        logger.info("listening on port %d", self.listener.port)
        self._listen_tcp(int(os.environ.get(TCP_PORT_ENV, 0)))
        await self.local_copy.start()
        return self.listener.port

    def _listen_tcp(self, port: int) -> None:
        """Accept TCP wires on `port` (0: any), on every interface."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))
            sock.listen(TCP_BACKLOG)
        except OSError as e:
            sock.close()
            raise ConfigurationError(
                f"cannot accept TCP wires on port {port}: {e} (set {TCP_PORT_ENV} to another)"
            ) from e
        sock.setblocking(False)
        self.tcp_listener, self.tcp_port = sock, sock.getsockname()[1]
        self._tcp_accepting = self.loop.create_task(self._accept_tcp_forever(sock))
        logger.info("accepting TCP wires on port %d", self.tcp_port)

    async def _accept_tcp_forever(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = await self.loop.sock_accept(listener)
            except OSError as e:  # out of descriptors, say: the next accept may work
                logger.warning("could not accept a TCP wire: %s", e)
                await asyncio.sleep(0.1)
                continue
            self.loop.create_task(self._accept_tcp(sock))

    async def _accept_tcp(self, sock: socket.socket) -> None:
        """Tell a handshake (a TCP wire) from a relay request by the first 4 bytes, and hand the socket on."""
        limits = self._strictest_limits()
        max_unauthenticated, handshake_timeout = self._accept_limits()
        if self.unauthenticated >= max_unauthenticated:
            self.refused_unauthenticated += 1
            sock.close()
            return
        self.unauthenticated += 1
        sock.setblocking(False)
        try:
            async with asyncio.timeout(handshake_timeout):
                first = await self.loop.sock_recv(sock, len(MAGIC))
                while len(first) < len(MAGIC) and first:
                    more = await self.loop.sock_recv(sock, len(MAGIC) - len(first))
                    first = first + more if more else b""
                preamble = first
                wanted = {RELAY_MAGIC: PREAMBLE.size if self.relay is not None else 0, RAIL_MAGIC: JOIN_BYTES}
                while len(preamble) < wanted.get(first, 0):
                    more = await self.loop.sock_recv(sock, wanted[first] - len(preamble))
                    if not more:
                        raise ConnectionResetError("the relay request or rail join was cut short")
                    preamble += more
        except (OSError, TimeoutError) as e:
            logger.debug("an incoming TCP connection said nothing useful: %s", e)
            sock.close()
            return
        finally:
            self.unauthenticated -= 1
        if first == RELAY_MAGIC and self.relay is not None:
            _, op, ident = PREAMBLE.unpack(preamble)
            await self.relay.handle(sock, op, ident)
        elif first == MAGIC:
            wire = TcpWire(sock, limits, prefix=first, on_activity=self.reactor.active)
            await self.admit(wire, tcp_wire.new_recv_base())
        elif first == RAIL_MAGIC:
            await self._join_rail(sock, preamble)
        else:
            sock.close()

    async def _join_rail(self, sock: socket.socket, join: bytes) -> None:
        """Join `sock` to the TCP wire its JOIN names, if the JOIN proves that wire's session (rails.py)."""
        try:
            link_id, index, tag = parse_join(join)
            wire = self.rail_wires.get(link_id)
            if wire is None:
                raise HandshakeError("a rail join for no open link")
            await wire.attach_rail(sock, link_id, index, tag)
        except (HandshakeError, OSError) as e:
            logger.info("refused a rail: %s", e)
            sock.close()

    def _strictest_limits(self):
        """The limits a TCP wire lives under until its handshake names the peer it is for (then `admit` gives it
        that peer's): the first peer's, or the defaults."""
        return next((p.limits for p in self.peers.values()), DEFAULT_LIMITS)

    def register_peer(self, peer) -> None:
        self.peers[peer.peer_id.raw] = peer
        if self._default_peer is None:
            self._default_peer = peer.peer_id.raw

    def unregister_peer(self, peer) -> None:
        self.peers.pop(peer.peer_id.raw, None)
        if self._default_peer == peer.peer_id.raw:
            self._default_peer = next(iter(self.peers), None)

    def _on_connection_request(self, conn_request) -> None:
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._accept(conn_request)))

    def _find_identity(self, target: bytes | None):
        """(the identity that answers a dialer asking for `target`, whether it is the one asked for): a wrong id
        is answered by the process's default peer, so the dialer learns who does live here."""
        peer = self.peers.get(target if target is not None else self._default_peer)
        if peer is not None:
            return peer.identity, True
        default = self.peers.get(self._default_peer) if self._default_peer is not None else None
        if default is None:
            raise HandshakeError("no peer lives at this address")
        return default.identity, False

    def _accept_limits(self) -> tuple[int, float]:
        """(max_unauthenticated, handshake_timeout) for the process's listener: the strictest of its peers'."""
        limits = [p.limits for p in self.peers.values()] or [DEFAULT_LIMITS]
        return min(x.max_unauthenticated for x in limits), min(x.handshake_timeout for x in limits)

    async def _accept(self, conn_request) -> None:
        if self.listener is None:
            return
        try:
            endpoint = self.listener.create_endpoint_from_conn_request(conn_request, True)
        except Exception as e:
            logger.warning("could not accept a connection: %s", e)
            return
        if self._closed:  # shutting down: closed at once, so the dialer learns now and UCX holds no request
            close_endpoint(endpoint)
            return
        await self.admit(UcxWire(self.reactor, endpoint), None)

    async def admit(self, wire, base: int | None) -> None:
        """Authenticate an accepted wire and hand it to the peer it asked for (`base`: its receive tag base, None
        for one reserved with the reactor)."""
        max_unauthenticated, handshake_timeout = self._accept_limits()
        if self.unauthenticated >= max_unauthenticated:
            self.refused_unauthenticated += 1  # counted, not logged one by one: a flood must not flood the log
            logger.debug(
                "refused an incoming connection: %d still in their handshake (TransportLimits.max_unauthenticated)",
                self.unauthenticated,
            )
            wire.close()
            return
        self.unauthenticated += 1
        base = self.new_recv_base() if base is None else base
        try:
            auth = await accept_handshake(wire, None, self._find_identity, base, handshake_timeout)
        except BaseException as e:  # cancelled too (at shutdown): the wire is closed here, on the loop thread
            wire.release_base(base)
            wire.close()
            if not isinstance(e, Exception):
                raise
            logger.info("rejected an incoming connection: %s: %s", type(e).__name__, e or "handshake timed out")
            return
        finally:
            self.unauthenticated -= 1
        peer = self.peers.get(auth.local.peer_id.raw)
        try:
            if peer is None:
                raise HandshakeError("the peer asked for has shut down")
            # Confirmed before the connection sends anything: on a TCP wire its messages follow on the same bytes
            # (a UCX wire holds the dialer's first messages for the reserved base meanwhile).
            if wire.kind == "tcp":
                wire.limits = peer.limits  # accepted under the strictest peer's; from now on its own peer's
                if not wire.relayed:
                    wire.accept_rails(auth)
                    self.rail_wires[auth.link_id] = wire
            await confirm_handshake(wire, None)
        except BaseException as e:
            wire.release_base(base)
            wire.close()
            if not isinstance(e, Exception):
                raise
            logger.debug("an incoming connection ended before its confirmation: %s", e)
            return
        peer.pool.adopt(wire, auth, base, inbound=True)

    def shutdown(self) -> None:
        """Stop the transport, in order and silently; idempotent (runs at exit too).

        On the loop thread: close every peer (its connections close their endpoints), cancel and await every
        task still on the loop (e.g. a DHT node's maintenance that its owner never shut down), refuse new
        connections, let UCX finish the endpoint closes, stop progressing, then drop the worker with its listener
        and only then the context. Then stop and close the loop. Left to the interpreter's exit instead, these
        objects were destroyed in no particular order while UCX's threads still ran (a rare segfault in libucp),
        and pending tasks were reported as destroyed."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._thread.is_alive():
                asyncio.run_coroutine_threadsafe(self._close_all(), self.loop).result(SHUTDOWN_TIMEOUT)
        except BaseException as e:  # a timeout, or Ctrl-C at exit: still stop the thread below
            logger.debug("transport shutdown: %s: %s", type(e).__name__, e)
        finally:
            if self._thread.is_alive():
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(SHUTDOWN_TIMEOUT)
            if not self._thread.is_alive() and not self.loop.is_closed():
                self.loop.close()

    async def _close_all(self) -> None:
        # No automatic collection until _release_ucx has kept the worker's holders: it could destroy one at any moment.
        collecting = gc.isenabled()
        gc.disable()
        try:
            await self._close_all_in_order()
        finally:
            if collecting:
                gc.enable()

    async def _close_all_in_order(self) -> None:
        await _cancel_other_tasks()  # first, so that no background work fails for want of its peer
        for peer in list(self.peers.values()):
            try:
                await peer.aclose()
            except Exception as e:
                logger.debug("closing %r: %s: %s", peer, type(e).__name__, e)
        await _cancel_other_tasks()  # whatever closing the peers started
        if self.tcp_listener is not None:
            self._tcp_accepting.cancel()
            self.tcp_listener.close()
            self.tcp_listener = None
        self.local_copy.close()
        unclosed = self.reactor.close_all_held()
        if unclosed:
            logger.debug("closed %d UCX endpoint(s) that no connection had closed", unclosed)
        await self._drain(ENDPOINT_CLOSE_TIMEOUT)
        self.reactor.close()  # no more progress; pending requests are cancelled and dropped
        await self.loop.shutdown_asyncgens()
        self._release_ucx()

    async def _drain(self, timeout: float) -> None:
        """Progress the worker until UCX has nothing left to do (the endpoint closes just requested), at most
        `timeout` seconds, yielding to the loop between passes so completions reach their callbacks."""
        worker = self.reactor.worker
        deadline = time.monotonic() + timeout
        idle_passes = 0
        while idle_passes < DRAIN_IDLE_PASSES and time.monotonic() < deadline:
            made_progress = False
            while worker.progress_once():
                made_progress = True
            idle_passes = 0 if made_progress else idle_passes + 1
            await asyncio.sleep(0)

    def _release_ucx(self) -> None:
        """Drop the last references to the UCX listener and worker, then to its context, here on the loop thread
        while the interpreter is whole.

        The listener must live as long as the worker: UCX hands a connection it accepted a raw pointer to its
        listener, and when the dialer's request completes after the listener was destroyed, UCX's own thread
        calls into freed memory (SIGSEGV; CI saw it when a peer dialed one that was shutting down). So the
        worker is dropped first and the listener last: the listener holds the worker, and releasing it destroys
        both in one native call. Anything else that holds the worker (an endpoint, request or address; kept, see
        keep_worker_holders_until_exit) keeps it to the process's exit, and then the listener is kept too: its
        port accepts until then, but nothing answers."""
        reactor = self.reactor
        worker, context, listener = reactor.worker, reactor.context, self.listener
        reactor.worker = reactor.context = self.listener = None
        kept = keep_worker_holders_until_exit(reactor.lib)
        # Any other holder kept alive by a reference cycle is collected now (~0.2 s with torch loaded), not during
        # the interpreter's exit with its close callbacks into Python.
        gc.collect()
        others = sys.getrefcount(worker) - 2  # beyond `worker` and getrefcount's own argument
        if listener is not None and (kept or others):
            keep_until_exit(listener)
            logger.debug("UCX worker and listener kept to the exit: held by %s, %d reference(s)", dict(kept), others)
        del worker
        del listener
        del context


async def _cancel_other_tasks() -> None:
    """Cancel every task on the running loop but the caller, and wait for them (at most SHUTDOWN_TIMEOUT / 2):
    a task left pending is reported as destroyed when the interpreter exits."""
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=SHUTDOWN_TIMEOUT / 2)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            logger.debug("task %r ended at shutdown with %r", task.get_name(), task.exception())
    if pending:
        logger.debug("%d task(s) ignored cancellation at shutdown", len(pending))
