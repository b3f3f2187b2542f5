"""Link upgrades: a link that runs through a relay is replaced by a direct one where the relayed peer can open it
(issue 18: "where a direct path becomes possible, upgrade to it").

A peer behind a NAT cannot be dialled, but it can dial out. So when a peer that others can dial (it holds no relay
slot itself and has not learned it is unreachable) reaches someone through a relay, it asks for an upgrade over that
relayed link (UPGRADE_METHOD, naming its own address). The relayed peer dials that address itself, over a TCP wire
(outbound through its NAT, as it opens every link), and runs the ordinary handshake: the new link is authenticated
by both identities and replaces the relayed one on both sides, since links are keyed by peer id. The asker closes
the relayed link once its own calls on it have ended (unless the remote still uses it), which gives the relay its
circuit and bandwidth back. Two peers that are both behind NATs stay relayed (no hole punching).

Guards on the relayed side: the address must be the asker's own (its peer id), so the handshake fails against anyone
else; we upgrade only a link that runs through a relay; at most UPGRADES_IN_FLIGHT dials at once, and an asker whose
upgrade failed waits UPGRADE_COOLDOWN seconds before we dial for it again (so nobody can aim a stream of our dials at
a third party's host); each dial costs at most TransportLimits.connect_timeout.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from hiveengine.errors import ConnectionLostError, HiveEngineError, PeerBusyError, ProtocolError
from hiveengine.transport.address import PeerAddress
from hiveengine.transport.identity import PeerID

logger = logging.getLogger(__name__)
UPGRADE_METHOD = "hiveengine.link.upgrade"
UPGRADES_IN_FLIGHT = 4
UPGRADE_COOLDOWN = 60.0  # seconds
REMEMBERED_FAILURES = 1024  # askers whose failed upgrade we remember (oldest forgotten first)


def is_relayed(conn) -> bool:
    """Whether the connection `conn` runs through a relay's circuit."""
    return bool(getattr(conn.wire, "relayed", False))


def upgrade_handler(peer):
    """The handler of UPGRADE_METHOD for `peer`: dial the asker directly and adopt that link in place of the relayed
    one; {"upgraded": True} once the direct link is up."""
    busy: set[PeerID] = set()
    failed: OrderedDict[PeerID, float] = OrderedDict()  # asker -> when its last upgrade failed

    async def upgrade(request) -> dict:
        try:
            address = PeerAddress.parse(request.header.get("address", ""))
        except (ValueError, TypeError, AttributeError):
            raise ProtocolError("an upgrade needs 'address': the asker's own ucx://HOST:PORT/tcp=PORT/ID") from None
        if address.peer_id != request.sender or address.relay is not None or not address.tcp_port:
            raise ProtocolError("an upgrade names the asker's own direct address, with tcp=PORT")
        current = peer.connection_to(request.sender)
        if current is None or not is_relayed(current):
            return {"upgraded": False, "reason": "our link to you does not run through a relay"}
        now = time.monotonic()
        if now - failed.get(request.sender, -UPGRADE_COOLDOWN) < UPGRADE_COOLDOWN:
            raise PeerBusyError(f"your last upgrade failed: ask again after {UPGRADE_COOLDOWN:.0f} s")
        if request.sender in busy or len(busy) >= UPGRADES_IN_FLIGHT:
            raise PeerBusyError("upgrades are running here already (UPGRADES_IN_FLIGHT); ask later")
        busy.add(request.sender)
        try:
            await peer.pool.dial_tcp(address)
        except HiveEngineError:
            failed[request.sender] = now
            failed.move_to_end(request.sender)
            while len(failed) > REMEMBERED_FAILURES:
                failed.popitem(last=False)
            raise
        finally:
            busy.discard(request.sender)
        logger.info("the link to %s no longer runs through a relay: we dialled it at %s", request.sender, address.host)
        return {"upgraded": True}

    return upgrade


async def request_upgrade(peer, relayed_address: PeerAddress) -> bool:
    """Ask the peer at `relayed_address` (reached through a relay) to dial us directly; close the relayed link once
    a direct one replaced it. Whether the link is direct now (failures are logged, never raised)."""
    relayed = peer.connection_to(relayed_address.peer_id)
    try:
        header, _ = await peer.call(relayed_address, UPGRADE_METHOD, {"address": str(peer.address)})
    except HiveEngineError as e:
        logger.info("no direct link to %s (it stays relayed): %s", relayed_address.peer_id, e)
        return False
    current = peer.connection_to(relayed_address.peer_id)
    if not header.get("upgraded") or current is None or is_relayed(current):
        return False
    if relayed is not None and relayed is not current:
        await relayed.replies_settled()  # our calls on it end (deadlines)
    if relayed is not None and relayed is not current and relayed.idle:
        relayed.lost(ConnectionLostError(f"the relayed link to {relayed.remote} was replaced by a direct one"))
    logger.info("the link to %s is direct now (it dialled us)", relayed_address.peer_id)
    return True


def wants_upgrade(peer, address: PeerAddress) -> bool:
    """Whether a link to `address` should be upgraded: it is relayed, others can dial us, and upgrades are on."""
    relayed = address.relay is not None and peer.limits.upgrade_relayed
    return relayed and peer.relayed is None and peer.runtime.reachable is not False
