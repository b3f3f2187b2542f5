"""Reachability in the NAT rig: peers ask others to dial them back; a home peer learns it cannot be dialled and
switches to opening its links itself (TCP wires), while a public peer learns it is reachable."""

import json
import os
import subprocess
import sys

import pytest

from tests.procs import PeerProcess
from tools.netns import NatRig, nat_available

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not nat_available(), reason="needs root, ip, tc and iptables"),
]

PREFIX = f"hr{os.getpid() % 100000}"


@pytest.fixture(scope="module")
def rig():
    with NatRig(2, 1, prefix=PREFIX) as rig:
        yield rig
    assert PREFIX not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _peer(rig: NatRig, name: str, *args: str) -> PeerProcess:
    env = {"UCX_TLS": "tcp", "HIVEENGINE_LOCAL_COPY": "0", "HIVEENGINE_ANNOUNCE_HOST": rig.host(name)}
    return PeerProcess("nat_peer.py", *args, env=env, wrap=rig.command(name, []))


def test_a_public_peer_is_reachable_and_a_home_peer_learns_it_is_not(rig):
    helper = _peer(rig, "pub0", "serve")
    procs = [helper]
    try:
        address = helper.expect("ADDRESS")
        public = _peer(rig, "pub1", "check", address)
        home = _peer(rig, "home0", "check", address)
        procs += [public, home]
        found = json.loads(public.expect("RESULT", 60))
        assert found["reachable"] is True and found["link"] == "ucx", found
        found = json.loads(home.expect("RESULT", 60))
        assert found["reachable"] is False and found["link"] == "tcp", found
        assert "cannot connect" in found["reason"]
        assert found["observed"] == rig.router(0)  # the helper saw our link come from the router
    finally:
        for proc in procs:
            proc.close()


def test_a_helper_dials_back_only_the_asker_itself():
    """In-process: asking a helper to dial another peer's address is refused (no free port scanning)."""
    from hiveengine.errors import ProtocolError
    from hiveengine.transport import Peer
    from hiveengine.transport.reachability import DIALBACK_METHOD

    helper, asker, victim = Peer(), Peer(), Peer()
    try:
        with pytest.raises(ProtocolError, match="its own address"):
            asker.call_sync(helper.address, DIALBACK_METHOD, {"address": str(victim.address)}, timeout=10)
        with pytest.raises(ProtocolError, match="needs 'address'"):
            asker.call_sync(helper.address, DIALBACK_METHOD, {"address": 5}, timeout=10)
        header, _ = asker.call_sync(helper.address, DIALBACK_METHOD, {"address": str(asker.address)}, timeout=10)
        assert header["reachable"] is True
    finally:
        for peer in (helper, asker, victim):
            peer.shutdown()


def _doctor(rig: NatRig, name: str, address: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "UCX_TLS": "tcp", "HIVEENGINE_ANNOUNCE_HOST": rig.host(name)}
    argv = [sys.executable, "-m", "hiveengine.cli", "doctor", "--initial-peers", address, "--timeout", "20"]
    return subprocess.run(rig.command(name, argv), capture_output=True, text=True, timeout=90, env=env)


def test_doctor_says_whether_others_can_dial_us_and_what_to_do(rig):
    helper = _peer(rig, "pub0", "serve")
    try:
        address = helper.expect("ADDRESS")
        public = _doctor(rig, "pub1", address)
        assert public.returncode == 0, public.stdout + public.stderr
        assert "reachability" in public.stdout and "reachable: " in public.stdout
        assert "encryption         on" in public.stdout and "tcp/he0" in public.stdout
        home = _doctor(rig, "home0", address)
        assert home.returncode == 1, home.stdout + home.stderr
        assert "unreachable: " in home.stdout and f"our links come from {rig.router(0)}" in home.stdout
        assert "forward ports" in home.stdout and "HIVEENGINE_ANNOUNCE_HOST" in home.stdout
    finally:
        helper.close()


def test_an_engine_at_home_switches_to_client_mode_by_itself_reserves_a_relay_and_its_dht_works(rig):
    env = {"UCX_TLS": "tcp", "HIVEENGINE_LOCAL_COPY": "0"}
    bootstrap = PeerProcess(
        "nat_engine.py",
        "bootstrap",
        env={**env, "HIVEENGINE_ANNOUNCE_HOST": rig.host("pub0"), "HIVEENGINE_RELAY": "1"},
        wrap=rig.command("pub0", []),
    )
    procs = [bootstrap]
    try:
        address = bootstrap.expect("ADDRESS")
        for name, client_mode in (("pub1", False), ("home0", True)):
            joiner = PeerProcess(
                "nat_engine.py",
                "join",
                address,
                env={**env, "HIVEENGINE_ANNOUNCE_HOST": rig.host(name)},
                wrap=rig.command(name, []),
            )
            procs.append(joiner)
            expected = {"client_mode": client_mode, "value": "from-home", "relayed": client_mode}
            assert json.loads(joiner.expect("RESULT", 90)) == expected
    finally:
        for proc in procs:
            proc.close()
