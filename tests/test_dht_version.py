"""The DHT protocol version (hiveengine/dht/protocol.py): every request and reply carries it, and nodes of
different versions never mix. Strangers are real peers that hand-build their requests and replies; the node of
another release is a real process."""

import re

import pytest

from hiveengine.dht import DHT, DHTConfig, protocol
from hiveengine.dht.ids import solve
from hiveengine.dht.routing import key_id
from hiveengine.dht.serialization import pack
from hiveengine.dht.storage import Record, get_dht_time
from hiveengine.errors import BootstrapError, ProtocolError
from hiveengine.transport import Peer, Request
from tests.procs import PeerProcess

pytestmark = pytest.mark.timeout(120)

DIFFICULTY = 8
CONFIG = DHTConfig(id_difficulty=DIFFICULTY, rpc_timeout=5)
OURS = f"v{protocol.PROTOCOL_VERSION}"
# Versions a stranger may send (None: no version at all), and how the refusal names each.
FOREIGN = {None: "unversioned", 2: "v2", 0: "v0", "1": "v'1'", True: "vTrue"}


@pytest.fixture
def target():
    node = DHT(config=CONFIG)
    yield node
    node.shutdown()


@pytest.fixture
def stranger():
    peer = Peer()
    yield peer
    peer.shutdown()


def sender(peer: Peer, version) -> dict:
    """A request header's sender fields, with a valid proof of the peer's node id, of protocol `version`."""
    header = {"s": str(peer.address), "n": solve(peer.peer_id.raw, DIFFICULTY)}
    return header if version is None else {**header, protocol.VERSION_FIELD: version}


def refusal(theirs: str) -> str:
    return re.escape(f"this DHT node speaks DHT protocol {OURS}; the request is {theirs}")


def test_a_request_of_another_version_is_refused_and_its_sender_is_not_admitted(target, stranger):
    for version, theirs in FOREIGN.items():
        with pytest.raises(ProtocolError, match=refusal(theirs)):
            stranger.call_sync(target.address, protocol.PING, sender(stranger, version), timeout=10)
        find = protocol.find_request(sender(stranger, version), 0, want_values=True)
        with pytest.raises(ProtocolError, match=refusal(theirs)):
            stranger.call_sync(target.address, protocol.FIND, find, timeout=10)
        assert not target.node.table.has_peer(stranger.peer_id.raw), version
    # the same request of our version is answered, in our version, and its sender admitted
    reply, _ = stranger.call_sync(target.address, protocol.PING, sender(stranger, 1), timeout=10)
    assert reply == protocol.versioned({"n": target.node.nonce})
    assert target.node.table.has_peer(stranger.peer_id.raw)


def test_records_in_a_request_of_another_version_are_not_stored(target, stranger):
    record = Record(pack("versioned-key"), None, pack("value"), get_dht_time() + 60)
    fields, tensors = protocol.records_blob([record])
    kid = key_id(record.key)
    for version, theirs in FOREIGN.items():
        store = {**sender(stranger, version), **fields}
        with pytest.raises(ProtocolError, match=refusal(theirs)):
            stranger.call_sync(target.address, protocol.STORE, store, tensors, timeout=10)
        offer = protocol.find_request(sender(stranger, version), kid, want_values=False, offer=fields)
        with pytest.raises(ProtocolError, match=refusal(theirs)):  # a store riding on a find
            stranger.call_sync(target.address, protocol.FIND, offer, tensors, timeout=10)
        assert target.node.num_keys == 0, version
    # the same records in a store of our version are stored
    reply, _ = stranger.call_sync(target.address, protocol.STORE, {**sender(stranger, 1), **fields}, timeout=10)
    assert reply == protocol.versioned({"ok": [True]})
    assert target.node.storage.get(kid) is not None


def test_bootstrapping_from_a_node_of_another_version_fails_naming_both_versions():
    other = PeerProcess("dht_nodes.py", "--protocol-version", "2", "--id-difficulty", str(DIFFICULTY))
    try:
        address = other.expect("ADDRESS")
        other.expect("READY")
        with pytest.raises(BootstrapError, match=r"speaks DHT protocol v2; the request is v1") as caught:
            DHT(initial_peers=[address], config=CONFIG)
        assert "\n" not in str(caught.value)
    finally:
        other.close()


def serve_replies_of(peer: Peer, version) -> None:
    """Make `peer` answer every DHT request, whatever its version, with replies of `version` (None: none at all):
    a node of an older or newer release."""
    nonce = solve(peer.peer_id.raw, DIFFICULTY)
    stamp = {} if version is None else {protocol.VERSION_FIELD: version}

    async def ping(request: Request) -> dict:
        return {"n": nonce, **stamp}

    async def find(request: Request) -> tuple[dict, list]:
        header, tensors = protocol.encode_blob([[], None])  # no contacts, no values
        return {**header, **stamp}, tensors

    peer.register(protocol.PING, ping)
    peer.register(protocol.FIND, find)


@pytest.mark.parametrize("version", [None, 2])
def test_replies_of_another_version_fail_a_bootstrap_and_drop_their_node(target, stranger, version):
    serve_replies_of(stranger, version)
    theirs = FOREIGN[version]
    expected = re.escape(f"this DHT node speaks DHT protocol {OURS}; the reply from {stranger.address} is {theirs}")
    with pytest.raises(BootstrapError, match=expected) as caught:
        DHT(initial_peers=[stranger.address], config=CONFIG)
    assert "\n" not in str(caught.value)
    # a node that speaks to us in our version but replies in another is dropped at its first reply
    stranger.call_sync(target.address, protocol.PING, sender(stranger, 1), timeout=10)
    assert target.node.table.has_peer(stranger.peer_id.raw)
    assert target.node.num_peers == 1
    target.node.peer.runtime.run(target.node.find_nodes(0), 30)
    assert not target.node.table.has_peer(stranger.peer_id.raw)
