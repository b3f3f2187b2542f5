"""Relays (relay.py): a public peer splices TCP wires to a peer that cannot be dialled; the session stays end to end.

In-process peers on 127.0.0.1 for what the relay sees and refuses; the NAT rig for two home peers that reach each
other only through a public relay.
"""

import asyncio
import json
import os
import socket
import subprocess
import time

import pytest
import torch

from hiveengine.errors import PeerBusyError, PeerUnreachableError, ProtocolError, RemoteError
from hiveengine.transport import Peer, PeerAddress, TransportLimits
from hiveengine.transport.relay import (
    ACCEPT,
    INCOMING_METHOD,
    PREAMBLE,
    RELAY_MAGIC,
    Relay,
    RelayLimits,
    reserve,
    reserve_any,
)
from hiveengine.transport.upgrade import UPGRADE_METHOD, is_relayed
from tests.procs import PeerProcess
from tools.netns import NatRig, nat_available

pytestmark = pytest.mark.timeout(180)
MARKER = b"plaintext-the-relay-must-not-see!"


class SpyRelay(Relay):
    """A relay that keeps every byte it forwards (what a curious relay operator could read)."""

    def __init__(self, peer, limits=None):
        super().__init__(peer, limits)
        self.seen = bytearray()

    async def _pump(self, source, sink):
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(source, 1 << 16)
            if not data:
                sink.shutdown(socket.SHUT_WR)
                return
            self.seen += data
            await self._bucket.take(len(data))
            await loop.sock_sendall(sink, data)
            self.relayed_bytes += len(data)


async def _echo(request):
    return request.header, request.tensors


@pytest.fixture
def trio():
    """(relay peer, home peer reserved with it and serving echo, another peer)."""
    limits = TransportLimits(local_copy=False, upgrade_relayed=False)  # relayed links stay relayed: we measure them
    relay_peer = Peer(limits=limits)
    home = Peer(limits=TransportLimits(local_copy=False, link="tcp"))
    other = Peer(limits=limits)
    home.register("echo", _echo)
    yield relay_peer, home, other
    for peer in (other, home, relay_peer):
        peer.shutdown()
    relay_peer.runtime.relay = None


def test_a_relayed_call_is_end_to_end_encrypted(trio):
    relay_peer, home, other = trio
    relay = SpyRelay(relay_peer)
    address = home.runtime.run(reserve(home, relay_peer.address), 20)
    assert address.relay == relay_peer.peer_id and str(address).endswith(str(home.peer_id))
    payload = torch.frombuffer(bytearray(MARKER * 3000), dtype=torch.uint8)
    header, (echoed,) = other.call_sync(address, "echo", {"m": MARKER.decode()}, [payload], timeout=20)
    assert header == {"m": MARKER.decode()} and torch.equal(echoed, payload)
    assert relay.relayed_bytes >= 2 * payload.numel() and relay.circuits == 1
    assert MARKER not in relay.seen  # neither the header nor the frames: only ciphertext crossed the relay


def test_the_relay_refuses_unreserved_peers_forged_circuits_and_circuits_past_its_cap(trio):
    relay_peer, home, other = trio
    relay = Relay(relay_peer, RelayLimits(max_circuits=1))
    address = home.runtime.run(reserve(home, relay_peer.address), 20)
    unreserved = address.__class__(address.host, address.port, other.peer_id, address.tcp_port, address.relay)
    with pytest.raises(PeerUnreachableError, match="refused a circuit"):
        home.call_sync(unreserved, "echo", {}, timeout=10)
    forged = socket.create_connection(("127.0.0.1", relay_peer.runtime.tcp_port), timeout=5)
    forged.sendall(PREAMBLE.pack(RELAY_MAGIC, ACCEPT, os.urandom(32)))
    forged.settimeout(5)
    assert forged.recv(1) == b""  # closed: no circuit was waiting for that id
    forged.close()
    other.call_sync(address, "echo", {}, timeout=10)  # the one circuit allowed
    third = Peer(limits=TransportLimits(local_copy=False, upgrade_relayed=False))
    try:
        with pytest.raises(PeerUnreachableError, match="refused a circuit"):
            third.call_sync(address, "echo", {}, timeout=10)
    finally:
        third.shutdown()
    assert relay.circuits == 1


def test_a_reservation_is_renewed_when_the_link_to_the_relay_is_lost(trio):
    relay_peer, home, other = trio
    Relay(relay_peer)
    address = home.runtime.run(reserve(home, relay_peer.address), 20)
    other.call_sync(address, "echo", {}, timeout=10)
    relay_peer.disconnect(home.peer_id)  # the relay drops our link (as a restart would)
    home.runtime.run(home.reservation.wait_renewed(1), 20)
    newcomer = Peer(limits=TransportLimits(local_copy=False, upgrade_relayed=False))
    try:  # a new circuit: the relay announces it over the renewed link
        assert newcomer.call_sync(address, "echo", {"again": 1}, timeout=10)[0] == {"again": 1}
    finally:
        newcomer.shutdown()


def test_a_peer_whose_relay_dies_reserves_with_another():
    relays = [PeerProcess("nat_peer.py", "serve", env={"HIVEENGINE_RELAY": "1"}) for _ in range(2)]
    home = Peer(limits=TransportLimits(local_copy=False, link="tcp"))
    other = Peer(limits=TransportLimits(local_copy=False, upgrade_relayed=False))
    try:
        addresses = [PeerAddress.parse(relay.expect("ADDRESS")) for relay in relays]
        home.register("echo", _echo)
        first = home.runtime.run(reserve_any(home, addresses), 30)
        assert first.relay == addresses[0].peer_id
        assert other.call_sync(first, "echo", {"n": 1}, timeout=20)[0] == {"n": 1}
        relays[0].kill()
        home.runtime.run(home.reservation.wait_renewed(1), 30)
        assert home.address.relay == addresses[1].peer_id  # our announced address follows the new relay
        assert other.call_sync(home.address, "echo", {"n": 2}, timeout=20)[0] == {"n": 2}
    finally:
        other.shutdown()
        home.shutdown()
        for relay in relays:
            relay.close()


def test_only_the_reserved_relay_may_announce_circuits(trio):
    relay_peer, home, other = trio
    Relay(relay_peer)
    home.runtime.run(reserve(home, relay_peer.address), 20)
    with pytest.raises(ProtocolError, match="only our relay"):
        other.call_sync(home.relayed, INCOMING_METHOD, {"circuit": os.urandom(16)}, timeout=10)


def test_the_relay_caps_its_bandwidth(trio):
    relay_peer, home, other = trio
    rate = 8e6  # bytes per second, both directions together
    relay = Relay(relay_peer, RelayLimits(bytes_per_second=rate))
    address = home.runtime.run(reserve(home, relay_peer.address), 20)
    other.call_sync(address, "echo", {}, timeout=10)  # the circuit is up: measure the transfer alone
    x = torch.zeros(8_000_000, dtype=torch.uint8)
    before, start = relay.relayed_bytes, time.monotonic()
    other.call_sync(address, "echo", {}, [x], timeout=60)
    achieved = (relay.relayed_bytes - before) / (time.monotonic() - start)
    assert achieved <= rate * 1.1
    assert achieved >= rate * 0.5, f"only {achieved / rate:.0%} of the cap"  # issue 18's goal is 70%: see the bench


def test_a_relayed_link_becomes_direct_when_the_relayed_peer_can_dial_the_caller(trio):
    relay_peer, home, _ = trio
    relay = Relay(relay_peer)
    caller = Peer(limits=TransportLimits(local_copy=False))  # upgrades relayed links (the default)
    try:
        address = home.runtime.run(reserve(home, relay_peer.address), 20)
        x = torch.arange(1000.0)
        assert torch.equal(caller.call_sync(address, "echo", {}, [x], timeout=20)[1][0], x)
        assert caller.runtime.run(caller.pool.upgraded(home.peer_id), 20) is True
        assert not is_relayed(caller.connection_to(home.peer_id))
        assert not is_relayed(home.connection_to(caller.peer_id))
        relayed_before = relay.relayed_bytes
        assert torch.equal(caller.call_sync(address, "echo", {}, [x], timeout=20)[1][0], x)
        assert relay.relayed_bytes == relayed_before  # the call went straight to the home peer
        # A hostile asker cannot make the relayed peer dial a third party, nor upgrade a link that is direct.
        with pytest.raises(ProtocolError, match="needs 'address'"):
            caller.call_sync(address, UPGRADE_METHOD, {"address": 5}, timeout=10)
        with pytest.raises(ProtocolError, match="asker's own"):
            caller.call_sync(address, UPGRADE_METHOD, {"address": str(relay_peer.address)}, timeout=10)
        header, _ = caller.call_sync(address, UPGRADE_METHOD, {"address": str(caller.address)}, timeout=10)
        assert header["upgraded"] is False
    finally:
        caller.shutdown()


def test_an_asker_cannot_aim_a_stream_of_upgrade_dials_at_another_host(trio):
    relay_peer, home, other = trio  # other keeps its relayed link (upgrade_relayed=False)
    Relay(relay_peer)
    address = home.runtime.run(reserve(home, relay_peer.address), 20)
    other.call_sync(address, "echo", {}, timeout=10)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    victim = other.address.__class__("127.0.0.1", 9, other.peer_id, closed.getsockname()[1])  # nobody listens
    closed.close()
    with pytest.raises(RemoteError, match="cannot connect"):
        other.call_sync(address, UPGRADE_METHOD, {"address": str(victim)}, timeout=20)
    for _ in range(3):  # asked again at once: refused without a dial
        with pytest.raises(PeerBusyError, match="ask again after"):
            other.call_sync(address, UPGRADE_METHOD, {"address": str(victim)}, timeout=10)
    assert is_relayed(other.connection_to(home.peer_id))  # and the relayed link still serves
    assert other.call_sync(address, "echo", {"still": 1}, timeout=10)[0] == {"still": 1}


@pytest.mark.skipif(not nat_available(), reason="needs root, ip, tc and iptables")
def test_two_home_peers_reach_each_other_only_through_a_public_relay_and_a_public_caller_gets_a_direct_link():
    prefix = f"hy{os.getpid() % 100000}"
    with NatRig(2, 2, prefix=prefix) as rig:
        env = {"UCX_TLS": "tcp", "HIVEENGINE_LOCAL_COPY": "0"}

        def peer(name, *args, **extra):
            return PeerProcess(
                "nat_peer.py",
                *args,
                env={**env, "HIVEENGINE_ANNOUNCE_HOST": rig.host(name), **extra},
                wrap=rig.command(name, []),
            )

        relay = peer("pub0", "serve", HIVEENGINE_RELAY="1")
        procs = [relay]
        try:
            relay_address = relay.expect("ADDRESS")
            home0 = peer("home0", "relayed", relay_address)
            procs.append(home0)
            relayed = home0.expect("ADDRESS")
            assert "/relay=" in relayed
            home1 = peer("home1", "call", relayed, "20")
            procs.append(home1)
            result = json.loads(home1.expect("RESULT", 60))
            assert result["ok"], result
            # A public caller gets a direct link: home0 dials it back; the relay can then die without hurting it.
            public = peer("pub1", "upgrade", relayed)
            procs.append(public)
            assert json.loads(public.expect("RESULT", 60))["ok"]
            assert json.loads(public.expect("UPGRADED", 60)) is True
            relay.kill()
            public.proc.stdin.write("again\n")
            public.proc.stdin.flush()
            result = json.loads(public.expect("RESULT", 60))
            assert result["ok"], result
        finally:
            for proc in procs:
                proc.close()
    assert prefix not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_hiveengine_dht_relay_offers_relaying():
    node = PeerProcess("hiveengine.cli", "dht", "--relay", "--relay-circuits", "2", "--status-interval", "0")
    home = Peer(limits=TransportLimits(local_copy=False, link="tcp"))
    other = Peer(limits=TransportLimits(local_copy=False))
    try:
        address = node.expect("hiveengine dht node at")
        home.register("echo", _echo)
        relayed = home.runtime.run(reserve(home, address), 20)
        assert other.call_sync(relayed, "echo", {"via": "dht"}, timeout=20)[0] == {"via": "dht"}
    finally:
        other.shutdown()
        home.shutdown()
        node.close()
