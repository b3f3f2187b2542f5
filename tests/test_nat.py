"""The NAT rig (tools/netns.NatRig) with real peer processes: what a home router does to the transport.

Two public hosts and two home hosts behind MASQUERADE routers that drop unsolicited inbound packets. Findings
these tests pin down (issue 18): public hosts cannot dial home hosts at all; UCX's TCP transport cannot carry a
link from a home peer to a public one (after the connection request, the listener dials a data connection back
to the dialler's private address); and no dial may freeze the dialling peer (UCX_TCP_CONN_NB=y, connect timeouts).
"""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.procs import PeerProcess
from tools.netns import NatRig, nat_available

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not nat_available(), reason="needs root, ip, tc and iptables"),
]

PREFIX = f"hn{os.getpid() % 100000}"
SERVER = """
import socket
s = socket.create_server(("0.0.0.0", 0)); print(s.getsockname()[1], flush=True)
while True:
    c, (host, _) = s.accept(); c.sendall(host.encode()); c.close()
"""
CLIENT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print(c.recv(100).decode())
except OSError as e:
    print(type(e).__name__)
"""
CONNECT_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def rig():
    with NatRig(2, 2, prefix=PREFIX) as rig:
        yield rig
    assert PREFIX not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _env(rig: NatRig, name: str, **extra: str) -> dict:
    """Peers in the rig talk TCP only (namespaces share the host's memory: UCX would pick shared memory)."""
    return {"UCX_TLS": "tcp", "HIVEENGINE_LOCAL_COPY": "0", "HIVEENGINE_ANNOUNCE_HOST": rig.host(name), **extra}


def _peer(rig: NatRig, name: str, *args: str, **env: str) -> PeerProcess:
    return PeerProcess("nat_peer.py", *args, env=_env(rig, name, **env), wrap=rig.command(name, []))


def _connect(rig: NatRig, name: str, host: str, port: str, timeout: float = CONNECT_TIMEOUT) -> str:
    argv = [sys.executable, "-c", CLIENT, host, port, str(timeout)]
    return subprocess.run(rig.command(name, argv), capture_output=True, text=True, timeout=30).stdout.strip()


def test_home_hosts_dial_out_but_nobody_dials_in(rig):
    servers = {
        n: subprocess.Popen(rig.command(n, [sys.executable, "-c", SERVER]), stdout=subprocess.PIPE, text=True)
        for n in ("pub0", "home0")
    }
    try:
        port = {n: s.stdout.readline().strip() for n, s in servers.items()}
        # a home host reaches a public one, which sees the router's address
        assert _connect(rig, "home0", rig.host("pub0"), port["pub0"]) == rig.router(0)
        assert _connect(rig, "pub1", rig.host("pub0"), port["pub0"]) == rig.host("pub1")
        # nobody reaches a home host: its router drops the packets silently (a timeout, not a refusal)
        assert _connect(rig, "pub0", rig.router(0), port["home0"]) == "TimeoutError"
        assert _connect(rig, "home1", rig.router(0), port["home0"]) == "TimeoutError"
    finally:
        for s in servers.values():
            s.kill()
            s.wait(10)


def _result(proc: PeerProcess, timeout: float = 60) -> dict:
    return json.loads(proc.expect("RESULT", timeout))


def test_a_ucx_link_from_home_to_public_fails_within_the_connect_timeout(rig):
    """UCX opens the link's data connection from the listener to the dialler's (private) address: a home peer
    cannot reach a public one over UCX, however its network is numbered. The failure is bounded."""
    server = _peer(rig, "pub0", "serve")
    try:
        address = server.expect("ADDRESS")
        home = _peer(rig, "home0", "call", address, "20", HIVEENGINE_LINK="ucx")
        result = _result(home)
        assert result["error"] == "PeerUnreachableError", result
        assert result["seconds"] < 5.0 + 1.0  # TransportLimits.connect_timeout
        home.close()
    finally:
        server.close()


@pytest.mark.parametrize("target", ["blackhole", "home"])
def test_a_dial_that_cannot_succeed_costs_nobody_else_anything(rig, target):
    """pub0 is asked to dial an address whose packets vanish (a home router's), or a home peer dials pub0 over UCX
    (UCX then dials back to the private address); meanwhile pub1's calls to pub0 keep being answered promptly."""
    server = _peer(rig, "pub0", "serve")
    procs = [server]
    try:
        address = server.expect("ADDRESS")
        pinger = _peer(rig, "pub1", "ping", address, "8")
        procs.append(pinger)
        pinger.expect("PINGING")
        if target == "blackhole":
            unreachable = address.replace(rig.host("pub0"), rig.router(0))
            asker = _peer(rig, "pub1", "ask-dial", address, unreachable, str(CONNECT_TIMEOUT))
            procs.append(asker)
            dialled = _result(asker)
            assert dialled["error"] in ("PeerUnreachableError", "RPCTimeoutError"), dialled
            assert dialled["seconds"] < CONNECT_TIMEOUT + 1.0
        else:
            home = _peer(rig, "home0", "call", address, "10", HIVEENGINE_LINK="ucx")
            procs.append(home)
            assert _result(home)["error"] == "PeerUnreachableError"
        pings = _result(pinger)
        assert not pings["failures"] and all(pings["recovered"]), pings
        assert pings["max"] < 1.0, pings
    finally:
        for proc in procs:
            proc.close()


def test_a_home_peer_links_over_its_own_tcp_socket_and_is_called_back_over_it(rig):
    """The home peer's UCX dial fails (see above), so it opens a TCP wire itself; pub0 then reaches the home peer
    at its (undialable) address over that link: reverse connections."""
    server = _peer(rig, "pub0", "serve")
    procs = [server]
    try:
        address = server.expect("ADDRESS")
        home = _peer(rig, "home0", "join", address)
        procs.append(home)
        joined = _result(home)
        assert joined["ok"] and joined["seconds"] < 5.0, joined
        home_address = home.expect("ADDRESS")
        asker = _peer(rig, "pub1", "ask-dial", address, home_address, str(CONNECT_TIMEOUT))
        procs.append(asker)
        assert _result(asker)["error"] is None
    finally:
        for proc in procs:
            proc.close()


def test_a_home_peer_opens_rails_for_large_frames_through_its_nat(rig):
    """The home peer's TCP wire to pub0 gets its extra connections (rails.py) through the NAT, as the wire did: the
    home peer opens them all, and large frames cross on every one."""
    server = _peer(rig, "pub0", "serve")
    try:
        address = server.expect("ADDRESS")
        home = _peer(rig, "home0", "bulk", address)
        try:
            result = _result(home, timeout=90)
        finally:
            home.close()
        assert result["kind"] == "tcp"
        assert len(result["rails"]) == 4 and min(result["rails"]) >= 4 << 20, result
    finally:
        server.close()


def test_a_home_peer_whose_uplink_is_cut_for_10_s_is_served_again_after(rig):
    server = _peer(rig, "pub0", "serve")
    procs = [server]
    try:
        address = server.expect("ADDRESS")
        home = _peer(rig, "home1", "ping", address, "30")
        procs.append(home)
        home.expect("PINGING")
        rig.cut(1)
        try:
            time.sleep(10)  # the outage itself: what is tested is what happens after it
        finally:
            rig.cut(1, down=False)
        pings = _result(home, 90)
        assert pings["failures"], "the cut was not felt"
        assert pings["recovered"] == [True, True, True], pings
    finally:
        for proc in procs:
            proc.close()
