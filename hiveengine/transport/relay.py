"""Relays: a public peer forwards the bytes of TCP wires to peers that cannot be dialled (issue 18).

Who does what:
- A peer that cannot be dialled reserves a slot with a relay (`reserve`): one call over the link it already keeps
  to the relay. From then on it announces the relayed address `ucx://RELAY:PORT/tcp=PORT/relay=<relay>/<peer>`.
- A dialler of that address opens a TCP connection to the relay's TCP port and asks for the peer (a CONNECT
  preamble). The relay tells the peer over its reservation link (an INCOMING call naming a fresh 128-bit circuit
  id); the peer opens a second TCP connection to the relay and presents the id (ACCEPT); the relay answers the
  dialler OK and splices the two sockets. The dialler and the peer then run the ordinary handshake (handshake.py)
  and session (session.py) through the splice: end-to-end authenticated by both identities and encrypted, so the
  relay forwards ciphertext it cannot read, alter or replay unnoticed.
- The relay bounds what it gives away: RelayLimits.max_reservations, max_circuits (circuits open at once), and
  bytes_per_second over all circuits (a token bucket); a circuit the peer does not accept within setup_timeout is
  dropped. A peer only accepts INCOMING calls from the relay it reserved with, and only ever dials that relay.
- A reservation is kept (`Reservation`): when the peer's link to its relay is lost it reserves again, with backoff,
  so a relay that restarts at the same address, or drops the link, costs the peer only the time until it is back.
- Every later Peer of a process whose peer reserved (an averager's, an expert server's) reserves with the same
  relay as it starts (Peer.__init__), so all of the process's services are reachable, not only its DHT node.

Offer relaying with HIVEENGINE_RELAY=1 (HIVEENGINE_RELAY_MBPS, HIVEENGINE_RELAY_CIRCUITS set the caps) or `Relay(peer)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass, field

from hiveengine.errors import (
    ConfigurationError,
    HiveEngineError,
    PeerUnreachableError,
    ProtocolError,
    ResourceLimitError,
)
from hiveengine.transport.address import PeerAddress
from hiveengine.transport.identity import PeerID
from hiveengine.transport.tcp_wire import TcpWire, new_recv_base, open_tcp

logger = logging.getLogger(__name__)
RELAY_MAGIC = b"HREL"
CONNECT, ACCEPT = 1, 2
PREAMBLE = struct.Struct("<4sB32s")  # magic, op, target peer id (CONNECT) or circuit id padded to 32 (ACCEPT)
CIRCUIT_BYTES = 16
OK, REFUSED = b"\x01", b"\x00"
RESERVE_METHOD = "hiveengine.relay.reserve"
INCOMING_METHOD = "hiveengine.relay.incoming"
RELAY_ENV, RELAY_MBPS_ENV, RELAY_CIRCUITS_ENV = "HIVEENGINE_RELAY", "HIVEENGINE_RELAY_MBPS", "HIVEENGINE_RELAY_CIRCUITS"
PUMP_BYTES = 1 << 16
DEFAULT_RELAY_CIRCUITS, DEFAULT_RELAY_MBPS = 64, 100.0
RENEW_FIRST, RENEW_MAX = 1.0, 30.0  # seconds between attempts to reserve again after our link to the relay was lost


def _positive_env(name: str, default: float, kind: type) -> float:
    """A positive number from environment variable `name` (default when unset); a clear error otherwise."""
    raw = os.environ.get(name)
    if raw is None:
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        value = 0
    if not value > 0:
        raise ConfigurationError(f"{name}={raw!r}: expected a positive {kind.__name__}")
    return value


@dataclass(frozen=True)
class RelayLimits:
    """What a relay gives away."""

    max_reservations: int = 128
    max_circuits: int = field(default_factory=lambda: _positive_env(RELAY_CIRCUITS_ENV, DEFAULT_RELAY_CIRCUITS, int))
    # All circuits together (bytes each way count); 100 Mbit/s by default.
    bytes_per_second: float = field(
        default_factory=lambda: _positive_env(RELAY_MBPS_ENV, DEFAULT_RELAY_MBPS, float) * 125_000
    )
    setup_timeout: float = 5.0

    def __post_init__(self):
        if not (self.max_circuits > 0 and self.bytes_per_second > 0 and self.max_reservations > 0):
            raise ConfigurationError(f"relay limits must be positive: {self}")


BURST_SECONDS = 0.05  # the bucket's depth: how far ahead of the rate a burst may run


class _Bucket:
    """A token bucket: `take(n)` waits until n bytes may pass at `rate` bytes/s (BURST_SECONDS of burst)."""

    def __init__(self, rate: float):
        self.rate, self.depth = rate, max(rate * BURST_SECONDS, PUMP_BYTES)
        self.tokens, self.stamp = self.depth, time.monotonic()

    async def take(self, nbytes: int) -> None:
        now = time.monotonic()
        self.tokens = min(self.depth, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= nbytes
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)  # pacing, not synchronization


class Relay:
    """Relaying offered by `peer` (and the process's TCP listener): see the module docstring."""

    def __init__(self, peer, limits: RelayLimits | None = None):
        self.peer, self.limits = peer, limits or RelayLimits()
        self.reservations: set[PeerID] = set()
        self.circuits = 0
        self.relayed_bytes = 0
        self._pending: dict[bytes, asyncio.Future] = {}
        self._bucket = _Bucket(self.limits.bytes_per_second)
        peer.register(RESERVE_METHOD, self._reserve)
        peer.runtime.relay = self

    async def _reserve(self, request) -> dict:
        if request.sender not in self.reservations and len(self.reservations) >= self.limits.max_reservations:
            raise ResourceLimitError(
                f"this relay holds {len(self.reservations)} reservations (RelayLimits.max_reservations); try another",
                limit="max_reservations",
            )
        self.reservations.add(request.sender)
        logger.info("relay: reserved a slot for %s", request.sender)
        return {}

    async def handle(self, sock: socket.socket, op: int, ident: bytes) -> None:
        """A connection to our TCP port that began with a relay preamble."""
        if op == ACCEPT:
            waiting = self._pending.pop(ident[:CIRCUIT_BYTES], None)
            if waiting is None or waiting.done():
                sock.close()
            else:
                waiting.set_result(sock)
            return
        try:
            target = PeerID(ident)
            other = await self._open_circuit(target)
        except Exception as e:
            logger.info("relay: refused a circuit: %s", e)
            await _send_quietly(sock, REFUSED)
            sock.close()
            return
        self.circuits += 1
        try:
            await asyncio.get_running_loop().sock_sendall(sock, OK)
            await asyncio.gather(self._pump(sock, other), self._pump(other, sock))
        except OSError as e:
            logger.debug("relay: a circuit ended: %s", e)
        finally:
            self.circuits -= 1
            sock.close()
            other.close()

    async def _open_circuit(self, target: PeerID) -> socket.socket:
        if target not in self.reservations or self.peer.connection_to(target) is None:
            raise PeerUnreachableError(f"{target} holds no reservation here")
        if self.circuits >= self.limits.max_circuits:
            raise ResourceLimitError("RelayLimits.max_circuits reached", limit="max_circuits")
        circuit = os.urandom(CIRCUIT_BYTES)
        arrival = self._pending[circuit] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(self.limits.setup_timeout):
                await self.peer.call(target, INCOMING_METHOD, {"circuit": circuit}, timeout=self.limits.setup_timeout)
                return await arrival
        finally:
            self._pending.pop(circuit, None)

    async def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        buf = memoryview(bytearray(PUMP_BYTES))
        while True:
            n = await loop.sock_recv_into(source, buf)
            if not n:
                sink.shutdown(socket.SHUT_WR)
                return
            await self._bucket.take(n)
            await loop.sock_sendall(sink, buf[:n])
            self.relayed_bytes += n


async def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        await asyncio.get_running_loop().sock_sendall(sock, data)


async def reserve(peer, relay: PeerAddress | str) -> PeerAddress:
    """Reserve a slot for `peer` with `relay` and make the relayed address its announced one; return it."""
    relay = PeerAddress.parse(relay)
    if not relay.tcp_port:
        raise PeerUnreachableError(f"{relay} accepts no TCP wires, so it cannot relay")
    await peer.call(relay, RESERVE_METHOD, {}, timeout=peer.limits.connect_timeout * 2)

    async def incoming(request) -> dict:
        circuit = request.header.get("circuit")
        if request.sender != relay.peer_id or not (isinstance(circuit, bytes) and len(circuit) == CIRCUIT_BYTES):
            raise ProtocolError("only our relay may announce circuits, with a 16-byte circuit id")
        sock = await open_tcp(relay.host, relay.tcp_port, peer.limits.connect_timeout)
        await asyncio.get_running_loop().sock_sendall(sock, PREAMBLE.pack(RELAY_MAGIC, ACCEPT, circuit))
        wire = TcpWire(sock, peer.limits, relayed=True, on_activity=peer.runtime.reactor.active)
        asyncio.get_running_loop().create_task(peer.runtime.admit(wire, new_recv_base()))
        return {}

    peer.register(INCOMING_METHOD, incoming)
    peer.relayed = PeerAddress(relay.host, relay.port, peer.peer_id, relay.tcp_port, relay.peer_id)
    peer.runtime.reserved_relay = relay
    if peer.reservation is None:
        peer.reservation = Reservation(peer, relay)
    logger.info("reachable through relay %s as %s", relay.peer_id, peer.relayed)
    return peer.relayed


class Reservation:
    """Our slot with a relay, kept: when our link to the relay is lost (the relay restarted, dropped us, or our
    uplink went down long enough to break it), we reserve again, with that relay or else with one of `alternatives`
    (each try goes to the next; our relayed address changes with the relay, and services that announce
    `peer.address` again, like expert declarations, follow), waiting from RENEW_FIRST to RENEW_MAX seconds after
    each full turn that failed, for as long as the peer runs. `renewed` counts the renewals."""

    def __init__(self, peer, relay: PeerAddress):
        self.peer, self.relay, self.renewed = peer, relay, 0
        self.alternatives: list[PeerAddress] = []
        self._changed = asyncio.Condition()
        peer.pool.when_lost(relay.peer_id, self._lost)

    def _lost(self) -> None:
        if not self.peer.closed:
            logger.info("lost our link to relay %s: reserving again", self.relay.peer_id)
            self.peer.spawn(self._renew())

    async def _renew(self) -> None:
        delay, candidates = RENEW_FIRST, [self.relay, *self.alternatives]
        for attempt in itertools.count():
            if self.peer.closed:
                return
            relay = candidates[attempt % len(candidates)]
            try:
                if relay == self.relay:
                    await self.peer.call(relay, RESERVE_METHOD, {}, timeout=self.peer.limits.connect_timeout * 2)
                else:
                    await reserve(self.peer, relay)
            except (HiveEngineError, OSError) as e:
                logger.info("relay %s: no slot (%s)", relay.peer_id, e)
                if attempt % len(candidates) == len(candidates) - 1:
                    await asyncio.sleep(delay)  # backoff pacing, not synchronization
                    delay = min(delay * 2, RENEW_MAX)
                continue
            self.relay = relay
            self.peer.pool.when_lost(relay.peer_id, self._lost)
            async with self._changed:
                self.renewed += 1
                self._changed.notify_all()
            logger.info("reserved again with relay %s: we are %s", relay.peer_id, self.peer.address)
            return

    async def wait_renewed(self, count: int) -> None:
        """Return once the slot has been renewed `count` times."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.renewed >= count)


async def reserve_any(peer, candidates) -> PeerAddress | None:
    """Reserve with the first of `candidates` that relays for us (the others become its alternatives, should it be
    lost); None (logged) if none does."""
    candidates = [PeerAddress.parse(c) for c in candidates]
    for i, candidate in enumerate(candidates):
        try:
            address = await reserve(peer, candidate)
            peer.reservation.alternatives = [c for c in candidates[i + 1 :] + candidates[:i] if c.tcp_port]
            return address
        except (HiveEngineError, OSError) as e:
            logger.info("no relay slot at %s: %s", candidate, e)
    logger.warning(
        "no initial peer relays for us (start one with HIVEENGINE_RELAY=1): peers we did not dial cannot reach us"
    )
    return None


async def connect_through(sock: socket.socket, target: PeerID) -> None:
    """Ask the relay at the other end of `sock` for a circuit to `target`; PeerUnreachableError if refused."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, PREAMBLE.pack(RELAY_MAGIC, CONNECT, target.raw))
    verdict = await loop.sock_recv(sock, 1)
    if verdict != OK:
        raise PeerUnreachableError(f"the relay refused a circuit to {target} (no reservation, or it is full)")


def offer_from_environment(peer) -> Relay | None:
    """Offer relaying with `peer` when HIVEENGINE_RELAY=1."""
    return Relay(peer) if os.environ.get(RELAY_ENV, "0") == "1" else None
