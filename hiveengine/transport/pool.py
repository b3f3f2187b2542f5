"""The connection pool: a peer's links to other peers, one per remote peer id, opened on demand and evicted when idle.

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
import logging
import time
from collections.abc import Callable
from typing import Protocol

from hiveengine import errors
from hiveengine.errors import ConnectionLostError, PeerUnreachableError
from hiveengine.transport.address import PeerAddress
from hiveengine.transport.connection import Connection, Wire
from hiveengine.transport.dispatch import Dispatcher, Spawn
from hiveengine.transport.handshake import Authenticated, connect_handshake
from hiveengine.transport.identity import Identity, PeerID
from hiveengine.transport.limits import TransportLimits
from hiveengine.transport.relay import connect_through
from hiveengine.transport.runtime import Runtime
from hiveengine.transport.tcp_wire import TcpWire, new_recv_base, open_tcp
from hiveengine.transport.ucx_wire import UcxWire
from hiveengine.transport.upgrade import request_upgrade, wants_upgrade

logger = logging.getLogger(__name__)
# Deadlines that cover a remote's work adapt to long links through each link's measured round trip (link_time):
DIAL_ROUND_TRIPS = 7  # setting up a link and its handshake (a 600 ms satellite link: about 4 s)
REPLY_ROUND_TRIPS = 2  # an honest reply over an open link: one round trip, and one of slack
# The first large transfer over a fresh link waits for UCX to wire up its data lanes after our handshake: over a
# 600 ms round trip, the first 256 KB echo took 5.5 s, a later 2 MB one 2.0 s.
LANE_ROUND_TRIPS = DIAL_ROUND_TRIPS


class Owner(Protocol):
    """The peer a pool dials for, read at each dial (its identity may be swapped, as a forgery test does); upgrades
    (upgrade.py) run on its behalf."""

    identity: Identity
    limits: TransportLimits
    runtime: Runtime


class ConnectionPool:
    """A peer's connections by remote peer id: dials (one at a time per peer), adopts inbound links, evicts idle
    ones past `max_connections`, and forgets the ones that close. All methods run on the transport loop."""

    def __init__(self, owner: Owner, dispatcher: Dispatcher, spawn: Spawn):
        self._owner = owner
        self._dispatcher = dispatcher  # every connection hands it its messages
        self._spawn = spawn
        self.connections: dict[PeerID, Connection] = {}  # the open link to each peer (read it, never write it)
        self._connecting: dict[PeerID, asyncio.Future] = {}  # dials in flight, shared by every caller waiting on one
        self._eviction: asyncio.TimerHandle | None = None  # a later eviction pass, when one is due
        self._on_lost: dict[PeerID, list[Callable[[], None]]] = {}  # one-shot: our link to that peer was lost
        self._upgrades: dict[PeerID, asyncio.Task] = {}  # relayed links we asked to be made direct (upgrade.py)
        self._tcp_only: set[PeerID] = set()  # peers a UCX dial failed to reach (link "auto"): dialled over TCP
        self._last_rtt: float | None = None  # what the last link we took into service measured (round_trip)
        self.closed = False

    @property
    def limits(self) -> TransportLimits:
        return self._owner.limits

    @property
    def runtime(self) -> Runtime:
        return self._owner.runtime

    async def connect(self, address: PeerAddress | PeerID | str) -> Connection:
        """The cached connection to a peer, opening (and authenticating) one if needed."""
        if isinstance(address, PeerID):
            conn = self.connections.get(address)
            if conn is None or conn.closed:
                raise PeerUnreachableError(f"no open connection to {address} and no address to dial")
            return conn
        address = PeerAddress.parse(address)
        conn = self.connections.get(address.peer_id)
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

    def connection_to(self, peer_id: PeerID) -> Connection | None:
        """Our open connection to `peer_id`, if there is one."""
        conn = self.connections.get(peer_id)
        return conn if conn is not None and not conn.closed else None

    def round_trip(self, peer_id: PeerID) -> float | None:
        """Seconds of one round trip to `peer_id`, as its link's handshake measured it; without a link, the median
        over our open links (our own access link, a satellite uplink say, is on every path), or with none open,
        what the last link we opened measured; None before any link opened."""
        conn = self.connection_to(peer_id)
        if conn is not None:
            return conn.rtt
        measured = sorted(c.rtt for c in self.connections.values() if not c.closed)
        return measured[len(measured) // 2] if measured else self._last_rtt

    def link_time(self, peer_id: PeerID, since: float | None = None) -> float:
        """Seconds the link itself adds to a call to `peer_id`, for deadlines that cover only the remote's work:
        REPLY_ROUND_TRIPS of its round trip, plus a dial's DIAL_ROUND_TRIPS when no link to it is open (or, for a
        wait that began at `since`, a time.monotonic(), none was open then); before any link ever measured a round
        trip (joining), the whole connect_timeout. Never more than connect_timeout: a peer that drags out its
        handshake to look far away gains at most that much."""
        rtt = self.round_trip(peer_id)
        connect = self.limits.connect_timeout
        if rtt is None:
            return connect
        dial = DIAL_ROUND_TRIPS * rtt if self._fresh(peer_id, since) else 0.0
        return min(connect, dial + REPLY_ROUND_TRIPS * rtt)

    def _fresh(self, peer_id: PeerID, since: float | None) -> bool:
        """Whether a call to `peer_id` has a link to set up: none is open, or it opened after `since`."""
        conn = self.connection_to(peer_id)
        return conn is None or (since is not None and conn.opened > since)

    def transfer_time(self, peer_id: PeerID, sent: int, received: int = 0, since: float | None = None) -> float:
        """Seconds the link to `peer_id` adds to a call that sends `sent` bytes and receives `received`: link_time
        (`since` as there), each direction's TransportLimits.transfer_time at the link's round trip (each ramps up
        its own window), and, on a link that is not open or opened after `since`, LANE_ROUND_TRIPS (at most
        max_deadline_rtt each)."""
        rtt = self.round_trip(peer_id) or 0.0
        moving = self.limits.transfer_time(sent, rtt) + self.limits.transfer_time(received, rtt)
        if self._fresh(peer_id, since):
            moving += LANE_ROUND_TRIPS * min(rtt, self.limits.max_deadline_rtt)
        return self.link_time(peer_id, since) + moving

    def disconnect(self, peer_id: PeerID) -> None:
        """Close our connection to `peer_id` (calls waiting on it fail); the next call dials anew."""
        conn = self.connections.pop(peer_id, None)
        if conn is not None:
            conn.lost(ConnectionLostError(f"disconnected from {peer_id} on request"))

    def when_lost(self, peer_id: PeerID, callback: Callable[[], None]) -> None:
        """Call `callback()` (once, on the loop) when our current link to `peer_id` is lost (relay.py keeps its
        reservation this way)."""
        self._on_lost.setdefault(peer_id, []).append(callback)

    def _evict_idle(self) -> None:
        """Close least recently used idle connections while there are more than `max_connections`; never one
        with a call in flight (either way) and never one still in its grace period (tried again after it)."""
        self._eviction = None
        excess = len(self.connections) - self.limits.max_connections
        if excess <= 0 or self.closed:
            return
        now, grace = time.monotonic(), self.limits.connection_grace_seconds
        idle = [c for c in self.connections.values() if c.idle and now - c.opened >= grace]
        for conn in sorted(idle, key=lambda c: c.last_used)[:excess]:
            del self.connections[conn.remote]
            conn.lost(ConnectionLostError(f"closed idle connection to {conn.remote} (max_connections reached)"))
        if len(self.connections) > self.limits.max_connections and self._eviction is None:
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
        if self.closed:
            raise ConnectionLostError("this peer is shut down")
        kind = self.link_for(address)
        try:
            conn = await (self.dial_tcp(address) if kind == "tcp" else self._dial_ucx(address))
        except PeerUnreachableError:
            if kind != "ucx" or self.limits.link != "auto" or not address.tcp_port:
                raise
        else:
            if wants_upgrade(self._owner, address):
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
        self._upgrades[address.peer_id] = self._spawn(request_upgrade(self._owner, address))

    async def upgraded(self, peer_id: PeerID) -> bool | None:
        """Whether our relayed link to `peer_id` became direct (upgrade.py), awaited while the upgrade runs; None
        when no upgrade was tried (the link was never relayed, or we cannot be dialled)."""
        task = self._upgrades.get(peer_id)
        return None if task is None else await asyncio.shield(task)

    async def _dial_ucx(self, address: PeerAddress) -> Connection:
        return self.adopt(*await self._open_ucx(address, self._owner.identity), inbound=False)

    async def dial_tcp(self, address: PeerAddress) -> Connection:
        """A fresh TCP wire to `address`, opened by us, authenticated and in service (it replaces any link we hold
        to that peer for new calls)."""
        return self.adopt(*await self._open_tcp(address, self._owner.identity), inbound=False)

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
        except BaseException as e:  # cancelled too: the endpoint is closed here, on the loop thread
            self.runtime.release_recv_base(base)
            if wire is not None:
                wire.close()
            if not isinstance(e, Exception):
                raise
            raise _dial_error(e, address) from None
        return wire, auth, base

    async def _open_tcp(self, address: PeerAddress, identity: Identity) -> tuple:
        """(wire, authentication, receive base) of a fresh TCP wire to `address`, authenticated as `identity`."""
        if not address.tcp_port:
            raise PeerUnreachableError(f"{address} accepts no TCP wires (its address has no tcp=PORT)")
        base, wire = new_recv_base(), None
        deadline = self.limits.connect_timeout
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(deadline):
                sock = await open_tcp(address.host, address.tcp_port, deadline)
                try:
                    if address.relay:
                        await connect_through(sock, address.peer_id)
                except BaseException:
                    sock.close()
                    raise
            relayed = address.relay is not None
            wire = TcpWire(sock, self.limits, relayed=relayed, on_activity=self.runtime.reactor.active)
            remaining = started + deadline - loop.time()
            auth = await connect_handshake(wire, None, identity, address.peer_id, base, remaining, started)
            wire.offer_rails(address.host, address.tcp_port, auth)
        except BaseException as e:  # cancelled too: the socket is closed here, as a UCX dial closes its endpoint
            if wire is not None:
                wire.close()
            if not isinstance(e, Exception):
                raise
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

    def adopt(self, wire: Wire, auth: Authenticated, recv_base: int, *, inbound: bool) -> Connection:
        """Take an authenticated wire into service: cache its connection and start reading its messages."""
        label = f"{self._owner.identity.peer_id!r}{' <- ' if inbound else ' -> '}"
        conn = Connection(self.runtime.reactor, wire, auth, recv_base, self.limits, label, self.runtime.local_copy)
        if self.closed:
            conn.lost(ConnectionLostError("this peer is shut down"))
            return conn
        wire.set_close_callback(self._on_endpoint_closed, (conn,))
        self.connections[conn.remote] = conn
        self._last_rtt = conn.rtt
        self._evict_idle()
        conn.start(self._dispatcher, self._forget_connection)
        logger.debug("connection %r open over %s", conn, wire.kind)
        return conn

    def _on_endpoint_closed(self, conn: Connection) -> None:
        """UCX's close callback. It may run on any thread, and at exit while the interpreter is being torn down
        (objects half cleared: formatting `conn.remote` here raised "'PeerID' object has no attribute 'raw'"),
        so it only hands the loss to the loop, where the message is formatted, and never while shutting down."""
        try:
            runtime = self.runtime
            if runtime.closed:
                return
            runtime.call_soon(self._endpoint_failed, conn)
        except (AttributeError, RuntimeError):
            pass  # the runtime or the interpreter is going away: nobody is left to tell

    def _endpoint_failed(self, conn: Connection) -> None:
        conn.lost(ConnectionLostError(f"endpoint to {conn.remote} closed or failed"))
        self.runtime.reactor.kick()

    def _forget_connection(self, conn: Connection) -> None:
        if self.connections.get(conn.remote) is conn:
            del self.connections[conn.remote]
            for callback in self._on_lost.pop(conn.remote, ()):
                callback()
        self._dispatcher.forget(conn)

    def close(self) -> None:
        """Close every connection and dial no more (the peer is shutting down)."""
        self.closed = True
        if self._eviction is not None:
            self._eviction.cancel()
        for conn in list(self.connections.values()):
            conn.lost(ConnectionLostError("peer shut down"))


def _dial_error(error: Exception, address: PeerAddress) -> Exception:
    """What a failed dial raises: the handshake's own error, or PeerUnreachableError saying why."""
    if isinstance(error, errors.HandshakeError):
        return error
    reason = "no answer" if isinstance(error, TimeoutError) else f"{type(error).__name__}: {error}"
    return PeerUnreachableError(
        f"cannot connect to {address} ({reason}); check the address and that the peer is running"
    )
