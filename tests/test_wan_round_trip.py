"""Each side of a link measures its round trip in the handshake (Connection.rtt, Peer.round_trip), which the DHT's
deadlines adapt to: over an emulated 200 ms link (tools/wanlink.py), in network namespaces, both the dialler and
the listener measure about 200 ms, over UCX and over the TCP wire."""

import json

import pytest

from tests.procs import PeerProcess
from tools.netns import WanNetwork, available

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not available(), reason="needs root, ip and tc"),
]
RTT = 0.2  # the profile's round trip, seconds
SLACK = 0.15  # what the userspace link emulator and the handshake's own checks may add


@pytest.mark.parametrize("link", ["ucx", "tcp"])
def test_both_sides_measure_the_round_trip_of_a_long_link(link):
    with WanNetwork(2, "100mbit-200ms", prefix="hwrtt") as net:
        env = {"UCX_TLS": "tcp,self", "HIVEENGINE_LOCAL_COPY": "0", "HIVEENGINE_LINK": link}
        server = PeerProcess(
            "transport_peer.py", "serve", env={**env, "HIVEENGINE_ANNOUNCE_HOST": net.host(0)}, wrap=net.command(0, [])
        )
        procs = [server]
        try:
            address = server.expect("ADDRESS")
            client = PeerProcess(
                "transport_peer.py",
                "client",
                address,
                env={**env, "HIVEENGINE_ANNOUNCE_HOST": net.host(1)},
                wrap=net.command(1, []),
            )
            procs.append(client)
            result = json.loads("{" + client.expect("{", timeout=60))
            assert result["link"] == link and result["echo_equal"] and result["sum_ok"]
            for side in ("rtt", "their_rtt"):
                assert RTT <= result[side] < RTT + SLACK, result
        finally:
            for proc in procs:
                proc.close()
