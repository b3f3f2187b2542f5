"""A peer that is rung or rings (averaging.matchmaking.Bell) across a link, for tests/test_wan_round_trip.py.

`serve KEY`: open a gathering's listener under KEY, print `ADDRESS <address>`, then `RUNG <peer ids>` once a ring
brought a registration. `ring ADDRESS KEY`: ring ADDRESS (a peer this one has no link to yet) with our registration
under KEY, as a registrant does, and print `RING ok` or `RING <error type>`. Both exit when stdin closes.
"""

import asyncio
import sys

from hiveengine.averaging.matchmaking import Bell, GroupMember, Registration, _Listener
from hiveengine.dht import get_dht_time
from hiveengine.transport import Peer, PeerAddress

WAIT = 120.0


def serve(key: str) -> None:
    peer = Peer()
    listener = Bell.of(peer).listeners.setdefault(key, _Listener())
    print("ADDRESS", peer.address, flush=True)
    peer.runtime.run(listener.event.wait(), WAIT)
    print("RUNG", *sorted(str(p) for p in listener.records), flush=True)
    sys.stdin.read()
    peer.shutdown()


def ring(address: str, key: str) -> None:
    peer = Peer()
    bell = Bell.of(peer)
    now = get_dht_time()
    mine = Registration(GroupMember(peer.peer_id, str(peer.address)), now, now + 60)
    them = GroupMember(PeerAddress.parse(address).peer_id, address)

    async def rung() -> BaseException | None:
        bell.ring(them, key, mine, now + 90)
        (outcome,) = await asyncio.gather(*bell._background, return_exceptions=True)
        return outcome if isinstance(outcome, BaseException) else None

    error = peer.runtime.run(rung(), WAIT)
    print("RING", "ok" if error is None else type(error).__name__, peer.peer_id, flush=True)
    sys.stdin.read()
    peer.shutdown()


if __name__ == "__main__":
    {"serve": serve, "ring": ring}[sys.argv[1]](*sys.argv[2:])
