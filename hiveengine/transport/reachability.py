"""Reachability: can other peers dial this process? Other peers find out for it by dialling it back (AutoNAT-style).

A peer asks one or more peers it already reaches (its initial peers) to dial it back at its announced address. A
helper opens a fresh UCX link to that address under a throwaway identity (so neither side's links are touched),
completes the handshake, closes it, and answers {"reachable": bool, "reason": str, "observed": host or None}, where
"observed" is the address the asker's own link came from, when the helper can see it (TCP wires). The asker is
reachable if any helper reached it, unreachable if helpers answered and none did, and unknown if none answered.
Unreachable, it dials over TCP wires and serves only over the links it opened (pool.py); its Engine runs in client
mode.

A helper is not a free port scanner: it dials only the asker's own peer id (the handshake proves that very peer
listens there), runs at most DIALBACKS_IN_FLIGHT dial-backs at once in the process (more are refused as busy),
and each one is bounded by the helper's connect timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from hiveengine.errors import HiveEngineError, PeerBusyError, ProtocolError, TransportError
from hiveengine.transport.address import PeerAddress

logger = logging.getLogger(__name__)
DIALBACK_METHOD = "hiveengine.dialback"
DIALBACKS_IN_FLIGHT = 4  # dial-backs one process runs at once for others
MAX_HELPERS = 3  # peers one check asks


@dataclass(frozen=True)
class Reachability:
    """What a check found: reachable (None: nobody could tell), why, and where our links appear to come from."""

    reachable: bool | None
    reason: str
    observed_host: str | None = None


def dialback_handler(peer):
    """The handler of DIALBACK_METHOD for `peer` (a transport Peer): dial the asker back and say whether it worked."""
    slots = asyncio.Semaphore(DIALBACKS_IN_FLIGHT)

    async def dialback(request) -> dict:
        try:
            address = PeerAddress.parse(request.header.get("address", ""))
        except (ValueError, TypeError, AttributeError):
            raise ProtocolError("dial-back needs 'address': the asker's own ucx://HOST:PORT/PEER_ID") from None
        if address.peer_id != request.sender:
            raise ProtocolError("a peer may only ask to be dialled back at its own address (its peer id)")
        if slots.locked():
            raise PeerBusyError(f"{DIALBACKS_IN_FLIGHT} dial-backs are running here already; ask another peer")
        conn = peer.connection_to(request.sender)
        observed = getattr(conn.wire, "remote_host", None) if conn is not None else None
        async with slots:
            try:
                await peer.pool.probe(address)
            except TransportError as e:
                return {"reachable": False, "reason": str(e), "observed": observed}
        return {"reachable": True, "reason": f"dialled back at {address.host}:{address.port}", "observed": observed}

    return dialback


async def check_reachability(peer, helpers: Sequence[str | PeerAddress], timeout: float = 15.0) -> Reachability:
    """Ask up to MAX_HELPERS of `helpers` to dial `peer` back; record the verdict in its runtime and log why."""
    helpers = [PeerAddress.parse(h) for h in helpers if PeerAddress.parse(h).peer_id != peer.peer_id][:MAX_HELPERS]
    if not helpers:
        return Reachability(None, "no other peer to ask (start with initial peers)")
    header = {"address": str(peer.address)}
    asks = [peer.call(h, DIALBACK_METHOD, header, timeout=timeout) for h in helpers]
    answers = await asyncio.gather(*asks, return_exceptions=True)
    verdicts = [(h, a[0]) for h, a in zip(helpers, answers, strict=True) if isinstance(a, tuple)]
    observed = next((v.get("observed") for _, v in verdicts if isinstance(v.get("observed"), str)), None)
    if any(v.get("reachable") is True for _, v in verdicts):
        helper = next(h for h, v in verdicts if v.get("reachable") is True)
        result = Reachability(True, f"{helper.peer_id} dialled us back at {peer.address.host}:{peer.port}", observed)
    elif verdicts:
        reasons = "; ".join(f"{h.peer_id}: {str(v.get('reason'))[:200]}" for h, v in verdicts)
        result = Reachability(False, f"no peer could dial us back at {peer.address} ({reasons})", observed)
    else:
        errors = "; ".join(f"{type(a).__name__}: {a}" for a in answers if isinstance(a, BaseException))
        return Reachability(None, f"no peer answered the dial-back request ({errors})")
    peer.runtime.reachable = result.reachable
    if result.reachable:
        logger.info("reachable: %s", result.reason)
    else:
        hint = f"; our links come from {observed}" if observed and observed != peer.address.host else ""
        logger.warning(
            "this peer cannot be dialled (%s%s): it acts as a client: it opens every link itself (over TCP) and "
            "is called back over those; to serve others, open or forward port %d (UCX) and %s (TCP) to this host "
            "and announce the public address with HIVEENGINE_ANNOUNCE_HOST",
            result.reason,
            hint,
            peer.port,
            peer.runtime.tcp_port,
        )
    return result


def check_reachability_sync(peer, helpers: Sequence[str | PeerAddress], timeout: float = 15.0) -> Reachability:
    """Blocking twin of `check_reachability`."""
    try:
        return peer.runtime.run(check_reachability(peer, helpers, timeout), timeout=timeout + 10)
    except HiveEngineError as e:
        return Reachability(None, f"the check failed: {e}")
