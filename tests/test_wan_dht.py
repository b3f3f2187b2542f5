"""A node on a long link joins the DHT and reaches the nodes its lookups hand it: over a 600 ms round trip (a
satellite link, emulated by tools/wanlink.py), setting up a UCX link and the handshake take about 4 s. They used
to count against each RPC's 3 s deadline, so such a node could not join, and later could not reach any node it had
no link to yet. The DHT's deadlines now add what the link takes, from the round trip measured when each link opened
(Peer.link_time). A node behind a 1.5 s round trip joins too: its first ping waits for the link to open."""

import pytest

from tests.procs import PeerProcess
from tools.netns import WanNetwork, available

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not available(), reason="needs root, ip and tc"),
]
SWARM = 4  # nodes in one process on the far side of the long link


def _node(net: WanNetwork, i: int, *args: str) -> PeerProcess:
    env = {"UCX_TLS": "tcp,self", "HIVEENGINE_LOCAL_COPY": "0", "HIVEENGINE_ANNOUNCE_HOST": net.host(i)}
    return PeerProcess("dht_nodes.py", *args, env=env, wrap=net.command(i, []))


def test_a_node_behind_a_600ms_link_joins_the_dht_and_reaches_every_node():
    with WanNetwork(2, "100mbit-600ms", prefix="hwdht") as net:
        swarm = _node(net, 0, "--nodes", str(SWARM))
        procs = [swarm]
        try:
            addresses = [swarm.expect("ADDRESS") for _ in range(SWARM)]
            swarm.expect("READY")
            joiner = _node(net, 1, "--initial-peers", addresses[0])
            procs.append(joiner)
            # A failed join exits with BootstrapError instead; the join's lookup asks the nodes the first one names,
            # each over a fresh link, and a node it could not reach in time would be missing from its table.
            assert joiner.expect("PEERS", timeout=60) == str(SWARM)
        finally:
            for proc in procs:
                proc.close()


def test_a_node_behind_a_1_5s_link_joins_through_a_dial_that_falls_back_to_tcp():
    # A UCX dial over this link gives up at connect_timeout and the dialler takes the TCP wire (about 11 s in all);
    # the first ping's deadline (rpc_timeout + connect_timeout, 8 s) ran out first: "BootstrapError: none of the 1
    # initial peers answered in time". The link is now opened before the ping, under the dial's own deadlines.
    with WanNetwork(2, "100mbit-1500ms", prefix="hwdhl") as net:
        swarm = _node(net, 0, "--nodes", "1")
        procs = [swarm]
        try:
            address = swarm.expect("ADDRESS")
            swarm.expect("READY")
            joiner = _node(net, 1, "--initial-peers", address)
            procs.append(joiner)
            assert joiner.expect("PEERS", timeout=90) == "1"
        finally:
            for proc in procs:
                proc.close()
