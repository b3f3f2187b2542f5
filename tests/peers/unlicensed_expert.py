"""A peer for tests/test_private_swarm.py that answers expert calls whatever its certificate says (a server that
skips Server's own role check): `unlicensed_expert.py SWARM_FILE` prints "ADDRESS <address>" and echoes each
forward call's inputs until stdin closes."""

import sys

from hiveengine.moe.protocol import FORWARD
from hiveengine.transport import Peer, membership


async def forward(request):
    return {}, request.tensors


def main() -> None:
    membership.use(membership.load(sys.argv[1]))
    peer = Peer()
    peer.register(FORWARD, forward)
    print("ADDRESS", peer.address, flush=True)
    sys.stdin.read()
    peer.shutdown()


if __name__ == "__main__":
    main()
