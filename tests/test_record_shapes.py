"""Swarm records with absurd fields are refused on store (issue 16 item 2): hiveengine.dht.schemas.

A hostile process (tests/peers/absurd_records.py) signs registrations, progress reports and state advertisements
with its own keys, so every signature is good, but fills them with NaN, infinities, negative or oversized counts,
wrong types or another peer's address. The honest node, a real DHT node over UCX on 127.0.0.1, refuses every one
and keeps the well-formed ones; a reader sees only those.
"""

from __future__ import annotations

import math

import pytest

from hiveengine.averaging.matchmaking import MatchmakingConfig, Mode, matchmaking_key
from hiveengine.averaging.state import state_key
from hiveengine.dht import DHT, get_dht_time
from hiveengine.dht.schemas import (
    MAX_ACCUSATIONS,
    MAX_GATHERING_SECONDS,
    MAX_VOTED_BANS,
    MODES,
    SchemaValidator,
    progress_problem,
    registration_problem,
    shape_problem,
)
from hiveengine.dht.serialization import pack
from hiveengine.dht.storage import Record
from hiveengine.dht.validation import owner_marker
from hiveengine.errors import ConfigurationError
from hiveengine.moe.declarations import expert_key
from hiveengine.optim.progress import PeerProgress, parse_progress, progress_key
from hiveengine.transport import Identity
from tests.procs import PeerProcess

PREFIX = "shapes-test"


def test_the_schema_knows_every_matchmaking_mode():
    assert tuple(int(m) for m in Mode) == MODES


@pytest.mark.parametrize(
    "change, problem",
    [
        ({1: math.nan}, "bandwidth"),
        ({4: math.inf}, "times"),
        ({2: True}, "mode"),
        ({5: 2**64 - 1}, "round"),
        ({7: b"short"}, "DHT node id"),
        ({0: "ucx://127.0.0.1:9/someoneelse"}, "another peer"),
        ({8: [b"short"]}, "bans are not peer ids"),
        ({8: [bytes(32)] * (MAX_VOTED_BANS + 1)}, "at most"),
        ({8: "everyone"}, "at most"),
        ({3: 2.0 - MAX_GATHERING_SECONDS - 1}, "before its deadline"),  # sorts first in an overfull gathering
        ({9: [[bytes(32), bytes(16)]] * (MAX_ACCUSATIONS + 1)}, "accusations are not a list of at most"),
        ({9: [[bytes(32), bytes(15)]]}, "not [peer id, evidence digest] pairs"),
        ({9: [[bytes(32)]]}, "not [peer id, evidence digest] pairs"),
        ({9: [["x" * 32, bytes(16)]]}, "not [peer id, evidence digest] pairs"),
    ],
)
def test_a_malformed_registration_is_named(change, problem):
    peer_id = Identity.generate().peer_id
    good = [f"ucx://127.0.0.1:9/{peer_id}", 1.0, 0, 1.0, 2.0, 0, {"any": "metadata"}, peer_id.raw, [bytes(32)]]
    good.append([[bytes(32), bytes(16)]])  # an accusation: [accused, evidence digest]
    assert registration_problem(peer_id, good) is None
    assert registration_problem(peer_id, good[:9]) is None  # one that names no accusations
    assert registration_problem(peer_id, [*good[:7], None]) is None  # a client-mode registrant stores nothing
    assert registration_problem(peer_id, good[:8]) is None  # one that names no bans
    bad = [change.get(i, field) for i, field in enumerate(good)]
    assert problem in registration_problem(peer_id, bad)
    assert "list of" in registration_problem(peer_id, {"a": 1})


def test_a_peer_cannot_gather_for_longer_than_nodes_accept():
    peer_id = Identity.generate().peer_id
    registration = [f"ucx://127.0.0.1:9/{peer_id}", 1.0, 0, 10.0, 10.0 + MAX_GATHERING_SECONDS, 0, None]
    assert registration_problem(peer_id, registration) is None
    registration[3] -= 1
    assert "before its deadline" in registration_problem(peer_id, registration)
    for bad in (MAX_GATHERING_SECONDS + 1, math.inf, math.nan, 0.0):
        with pytest.raises(ConfigurationError, match="matchmaking_time"):
            MatchmakingConfig(matchmaking_time=bad)
    assert MatchmakingConfig(matchmaking_time=MAX_GATHERING_SECONDS).matchmaking_time == MAX_GATHERING_SECONDS


def test_progress_a_peer_publishes_has_the_shape_nodes_accept():
    nan_loss = PeerProgress("ab", 3, 10, 2.5, get_dht_time(), math.nan, 1, 64, 0, 0)  # flags as ints, NaN loss
    assert progress_problem(nan_loss.record()) is None
    assert "loss" in progress_problem([3, 10, 2.5, 1.0, math.nan, False, 64, False, False])
    assert "flags" in progress_problem([3, 10, 2.5, 1.0, None, 1, 64, False, False])


def test_records_under_other_keys_are_not_judged_by_shape():
    owner = Identity.generate()
    record = Record(pack("my.own.key", "key"), pack(owner_marker(owner.public_key), "subkey"), pack([math.inf]), 1.0)
    assert shape_problem(record) is None
    reserved = Record(pack(progress_key("run"), "key"), pack("not-a-marker", "subkey"), pack(None), 1.0)
    assert "owner's marker" in shape_problem(reserved)
    assert not SchemaValidator().validate(reserved)


@pytest.mark.timeout(120)
def test_a_node_refuses_absurd_swarm_records_signed_by_their_writers():
    node = DHT()
    writer = PeerProcess("absurd_records.py", str(node.address), PREFIX)
    try:
        verdicts = {}
        while (line := writer.expect("")) != "DONE":
            if line.startswith("STORED"):
                _, name, accepted = line.split()
                verdicts[name] = accepted == "1"
        good = {name for name in verdicts if name.startswith("good-")}
        assert good == {"good-registration", "good-progress", "good-state"}
        assert all(verdicts[name] for name in good), verdicts
        refused = [name for name, accepted in verdicts.items() if not accepted]
        assert sorted(refused) == sorted(set(verdicts) - good), verdicts

        for key in (matchmaking_key(PREFIX, "rounds"), state_key(PREFIX)):
            found = node.get(key, latest=True)
            assert found is not None and len(found.value) == 1  # the well-formed record only
        progress = parse_progress(node.get(progress_key(PREFIX), latest=True))
        assert [(p.epoch, p.samples) for p in progress.peers] == [(4, 100)]
    finally:
        writer.close()
        node.shutdown()


def test_expert_declarations_must_be_signed_addresses_of_their_owner():
    owner = Identity.generate()
    marker, mine = owner_marker(owner.public_key), f"ucx://127.0.0.1:9/{owner.peer_id}"

    def problem(key: str, subkey, value) -> str | None:
        packed = None if subkey is None else pack(subkey, "subkey")
        return shape_problem(Record(pack(key, "key"), packed, pack(value), 1.0))

    assert problem(expert_key("ffn.3.17"), marker, mine) is None
    assert problem(expert_key("ffn.3."), (17, marker), mine) is None  # a grid successor
    assert problem(expert_key("ffn.3.17"), marker, None) is None  # a withdrawal
    assert "not an address" in problem(expert_key("ffn.3.17"), marker, "ucx://127.0.0.1:9/someoneelse")
    assert "not an address" in problem(expert_key("ffn.3."), (17, marker), 1e300)
    assert "owner's marker" in problem(expert_key("ffn.3.17"), None, mine)  # a plain value has no owner
    assert "owner's marker" in problem(expert_key("ffn.3.17"), (17, marker), mine)
    assert "[coordinate" in problem(expert_key("ffn.3."), (-1, marker), mine)
    assert "[coordinate" in problem(expert_key("ffn.3."), marker, mine)
    assert problem("ffn.3.17", None, 1e300) is None  # a user's own key: not judged
