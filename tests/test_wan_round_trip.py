"""Each side of a link measures its round trip in the handshake (Connection.rtt, Peer.round_trip), which the DHT's
deadlines adapt to: over an emulated 200 ms link (tools/wanlink.py), in network namespaces, both the dialler and
the listener measure about 200 ms, over UCX and over the TCP wire. A TCP wire with a 1.5 s round trip opens too:
the dial's deadline stretches once the listener answers; and 4 MiB tensors cross it, as their frames' deadline
adds the round trips a fresh TCP window needs to grow to their size. A matchmaking ring reaches a registrant over a
600 ms link that it has to dial first: its deadline adds what the link takes (Peer.link_time). Two peers average
4 MB over such a link without losing a part: the all-reduce's waits add what moving a part takes over it
(Peer.transfer_time)."""

import json

import pytest
import torch

from tests.procs import PeerProcess
from tests.test_allreduce import average_in_processes, exact_mean
from tools.netns import WanNetwork, available

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not available(), reason="needs root, ip and tc"),
]
RTT = 0.2  # the profile's round trip, seconds
LONG_RTT = 1.5  # a link whose setup and handshake take longer than connect_timeout (5 s) together
SLACK = 0.15  # what the userspace link emulator and the handshake's own checks may add


def start(net: WanNetwork, i: int, env: dict, script: str, *args: str) -> PeerProcess:
    """`script` (tests/peers) with `args` in namespace `i`, announcing that namespace's host."""
    return PeerProcess(script, *args, env={**env, "HIVEENGINE_ANNOUNCE_HOST": net.host(i)}, wrap=net.command(i, []))


def run_client(net: WanNetwork, env: dict, mode: str, *args: str, wait: float = 90) -> dict:
    """Start a transport_peer server in namespace 0 and a client in `mode` (with `args`) in namespace 1; the client's
    JSON line, within `wait` seconds."""
    procs = [start(net, 0, env, "transport_peer.py", "serve")]
    try:
        address = procs[0].expect("ADDRESS")
        procs.append(start(net, 1, env, "transport_peer.py", mode, address, *args))
        return json.loads("{" + procs[1].expect("{", timeout=wait))
    finally:
        for proc in procs:
            proc.close()


ENV = {"UCX_TLS": "tcp,self", "HIVEENGINE_LOCAL_COPY": "0"}


@pytest.mark.parametrize("link", ["ucx", "tcp"])
def test_both_sides_measure_the_round_trip_of_a_long_link(link):
    with WanNetwork(2, "100mbit-200ms", prefix="hwrtt") as net:
        result = run_client(net, {**ENV, "HIVEENGINE_LINK": link}, "client")
    assert result["link"] == link and result["echo_equal"] and result["sum_ok"]
    for side in ("rtt", "their_rtt"):
        assert RTT <= result[side] < RTT + SLACK, result


@pytest.mark.parametrize("link", ["tcp", "auto"])
def test_a_tcp_wire_with_a_round_trip_of_1_5_s_opens(link):
    # Its TCP connect and the listener's HELLO take about 2 round trips, the rest of the handshake 1 more: over the
    # 5 s connect_timeout in all. Without the stretched deadline the dial failed ("no answer"). A UCX dial over
    # this link does not finish within connect_timeout: by default ("auto") the dialler then takes the TCP wire.
    with WanNetwork(2, "100mbit-1500ms", prefix="hwlong") as net:
        result = run_client(net, {**ENV, "HIVEENGINE_LINK": link}, "ping")
    assert result["link"] == "tcp"
    for side in ("rtt", "their_rtt"):
        assert LONG_RTT <= result[side] < LONG_RTT + SLACK, result


@pytest.mark.timeout(240)
def test_4_mib_tensors_cross_a_tcp_wire_with_a_round_trip_of_1_5_s():
    # Each direction's window starts at 10 segments and doubles per round trip: about 13 s before 4 MiB are through,
    # at any bandwidth. The frames' deadline was 10.4 s (frame_timeout + size / min_frame_bytes_per_second), so the
    # echo failed ("announced 1 frames of 4194304 bytes that did not arrive within 10.4 s").
    with WanNetwork(2, "100mbit-1500ms", prefix="hwbig") as net:
        result = run_client(net, {**ENV, "HIVEENGINE_LINK": "tcp"}, "client", "90", wait=210)
    assert result["link"] == "tcp" and result["echo_equal"] and result["sum_ok"], result


@pytest.mark.timeout(240)
def test_frames_dropped_over_a_tcp_wire_with_a_round_trip_of_1_5_s_may_take_their_time():
    # The server drops the frames of a call to a method it does not serve. It gave them a flat frame_timeout (10 s)
    # to arrive, though 1 MiB took 14-18 s over this link (the emulator's 64 KB segments: about one per round trip
    # at first), then closed the connection, with the echo queued behind them. Now they have their frame_deadline
    # (22 s), as frames the server reads do.
    with WanNetwork(2, "100mbit-1500ms", prefix="hwdrop") as net:
        result = run_client(net, {**ENV, "HIVEENGINE_LINK": "tcp"}, "refused", wait=210)
    assert result == {"refusal": "UnknownMethodError", "echo_equal": True, "link": "tcp"}, result


def test_a_ring_reaches_a_registrant_behind_a_600ms_link_that_needs_a_dial_first():
    # The UCX dial and handshake take about 4 s over this link; a ring's deadline was a flat RING_TIMEOUT (1 s), so
    # it failed with RPCTimeoutError and the registrant had to find us by polling the DHT.
    key = "wan.matchmaking.rung"
    with WanNetwork(2, "100mbit-600ms", prefix="hwring") as net:
        server = start(net, 0, ENV, "ring_peer.py", "serve", key)
        procs = [server]
        try:
            ringer = start(net, 1, ENV, "ring_peer.py", "ring", server.expect("ADDRESS"), key)
            procs.append(ringer)
            outcome, ringer_id = ringer.expect("RING", timeout=60).split()
            assert outcome == "ok"
            assert server.expect("RUNG", timeout=30) == ringer_id
        finally:
            for proc in procs:
                proc.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("max_link_allowance", [None, 0.0])
def test_two_peers_average_4_mb_over_a_600ms_link_they_first_dial(tmp_path, max_link_allowance):
    # Each peer's own part is reduced at once, and the remote part had only late_grace (2 s) more; the reducer gave a
    # remote copy sender_timeout (5 s) after its own. The dial alone takes about 4 s over this link, the first copy
    # over a fresh UCX link 8-10 s more: every round failed the remote part, on both peers. Now both waits add what
    # the link takes (Peer.transfer_time), read again when they run out, up to max_link_allowance: at 0 (what a peer
    # that fakes a long link gains at most) the round loses the remote part as before. One round: these peers have
    # no matchmaking to start a second one together, and one that starts it seconds late is rightly left out.
    numel = 1 << 20
    options = {} if max_link_allowance is None else {"max_link_allowance": max_link_allowance}
    with WanNetwork(2, "100mbit-600ms", prefix="hwavg") as net:
        members, results = average_in_processes(
            tmp_path,
            [{}, {}],
            "none",
            numel=numel,
            chunk_elements=numel,
            spawn=lambda i: start(net, i, ENV, "allreduce_peer.py"),
            timeout=90,
            **options,
        )
    expected = exact_mean(members, [0, 1], [1.0, 1.0], numel)
    for result in results.values():
        if max_link_allowance is None:
            assert result["failed_parts"] == [], result["rounds"]
            assert torch.equal(result["tensor"], expected)
        else:
            assert len(result["failed_parts"]) == 1, result["rounds"]
