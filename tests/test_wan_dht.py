"""A peer on a long link joins the DHT: over a 600 ms round trip (a satellite link, emulated by tools/wanlink.py),
setting up a UCX link and the handshake take several round trips. They used to count against the first RPC's
3 s deadline, so no such peer could join; the ping to an initial peer now also gets the connect timeout
(DHTNode._hello)."""

import pytest

from tests.procs import PeerProcess
from tools.netns import WanNetwork, available

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not available(), reason="needs root, ip and tc"),
]


def _node(net: WanNetwork, i: int, *args: str) -> PeerProcess:
    env = {"UCX_TLS": "tcp,self", "HIVEENGINE_LOCAL_COPY": "0", "HIVEENGINE_ANNOUNCE_HOST": net.host(i)}
    return PeerProcess("dht_nodes.py", *args, env=env, wrap=net.command(i, []))


def test_a_node_behind_a_600ms_link_joins_the_dht():
    with WanNetwork(2, "100mbit-600ms", prefix="hwdht") as net:
        first = _node(net, 0)
        procs = [first]
        try:
            address = first.expect("ADDRESS")
            joiner = _node(net, 1, "--initial-peers", address)
            procs.append(joiner)
            joiner.expect("READY", timeout=60)  # a failed join exits with BootstrapError instead
        finally:
            for proc in procs:
                proc.close()
