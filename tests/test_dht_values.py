"""DHT values as users see them: tuples stay tuples (in this process and across processes), unsupported types are
refused, and hostile value bytes stored by anyone never break a reader."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import msgpack
import pytest

from hiveengine.dht import DHT, Record, get_dht_time, protocol
from hiveengine.dht.routing import key_id
from hiveengine.dht.serialization import MAX_DECODE_BYTES, MAX_VALUE_DEPTH, TUPLE_EXT, pack, record_problem, unpack
from hiveengine.dht.storage import MAX_RECORD_TTL, Entry
from hiveengine.errors import ProtocolError
from tests.procs import HERE, PeerProcess

pytestmark = pytest.mark.timeout(120)

VALUES = [
    (1, 2),
    (),
    ((),),
    ("peer", 3, (b"\x00", 1.5, None)),
    [1, (2, [3, (4,)]), [5]],
    {"endpoint": ("127.0.0.1", 1234), "ranks": [(0, 1), (2, 3)], "nested": {"t": (True, False)}},
    {(1, "a"): "tuple keys", ("x",): [()]},
    [[], (), {}],
    ([], {}),
    "plain",
    b"bytes",
    12,
    None,
]


def assert_same(got, want) -> None:
    """Equal, and of exactly the same container types all the way down (a tuple is not a list)."""
    assert type(got) is type(want), (got, want)
    if isinstance(want, list | tuple):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for k in want:
            assert_same(got[k], want[k])
    else:
        assert got == want


# ---- encoding, without a network


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_values_round_trip_exactly(value):
    assert_same(unpack(pack(value)), value)


def test_keys_and_subkeys_encode_as_before():
    # Key ids do not change: a key (or subkey) is plain msgpack, a tuple as an array.
    assert pack(("group", 3), "key") == msgpack.packb(["group", 3], use_bin_type=True)
    assert unpack(pack(["peer", [1, 2]], "subkey"), hashable=True) == ("peer", (1, 2))
    # Values are plain msgpack too unless they hold tuples.
    assert pack({"a": [1, "x", b"y"]}) == msgpack.packb({"a": [1, "x", b"y"]}, use_bin_type=True)
    assert pack((1, 2)) == msgpack.packb(msgpack.ExtType(TUPLE_EXT, msgpack.packb([1, 2])))


@pytest.mark.parametrize(
    "value, message",
    [
        ({1, 2}, "type set"),
        ([frozenset()], "type frozenset"),
        ({"a": object()}, "type object"),
        (2**64, "outside msgpack's range"),
        (msgpack.ExtType(TUPLE_EXT, b"\x90"), "ExtType"),
        ([msgpack.ExtType(5, b"")], "ExtType"),
    ],
)
def test_unsupported_values_are_refused_with_a_clear_error(value, message):
    with pytest.raises(TypeError, match=f"msgpack-serializable.*{message}"):
        pack(value)


def test_nesting_is_bounded_and_cycles_are_refused():
    value = inner = []
    for _ in range(MAX_VALUE_DEPTH - 1):
        inner.append(())
        inner.append([])
        inner = inner[-1]
    assert_same(unpack(pack(value)), value)  # MAX_VALUE_DEPTH levels fit
    inner.append(())
    with pytest.raises(TypeError, match="MAX_VALUE_DEPTH"):
        pack(value)
    cycle = []
    cycle.extend([cycle] * 100)
    with pytest.raises(TypeError, match="MAX_VALUE_DEPTH"):
        pack(cycle)


def _ext(code: int, data: bytes) -> bytes:
    return msgpack.packb(msgpack.ExtType(code, data))


def _nested_tuples(levels: int) -> bytes:
    data = msgpack.packb(0)
    for _ in range(levels):
        data = _ext(TUPLE_EXT, b"\x91" + data)
    return data


HOSTILE_VALUES = {  # what a hostile writer may store: name -> (value bytes, the error they must raise)
    "empty": (b"", "undecodable"),
    "reserved byte": (b"\xc1", "undecodable"),
    "truncated": (b"\x92\x01", "undecodable"),
    "trailing bytes": (b"\x01\x02", "undecodable"),
    "invalid utf-8": (b"\xa2\xff\xfe", "undecodable"),
    "map keyed by a list": (b"\x81\x90\x01", "undecodable"),
    "unknown ext": (_ext(5, b"\x90"), "unknown msgpack extension type 5"),
    "empty tuple ext": (_ext(TUPLE_EXT, b""), "undecodable"),
    "garbage tuple ext": (_ext(TUPLE_EXT, b"\xc1"), "undecodable"),
    "tuple ext with trailing bytes": (_ext(TUPLE_EXT, b"\x90\x90"), "undecodable"),
    "tuple ext of a map": (_ext(TUPLE_EXT, msgpack.packb({"a": 1})), "malformed tuple extension"),
    "tuple ext of an int": (_ext(TUPLE_EXT, msgpack.packb(7)), "malformed tuple extension"),
    "deep lists": (b"\x91" * (MAX_VALUE_DEPTH + 1) + b"\x00", "MAX_VALUE_DEPTH"),
    "deeper than msgpack's stack": (b"\x91" * 5000 + b"\x00", "undecodable"),
    "deep tuples": (_nested_tuples(MAX_VALUE_DEPTH + 1), "MAX_VALUE_DEPTH"),
    "20000 nested tuples": (_nested_tuples(20_000), "MAX_VALUE_DEPTH"),  # a recursive decoder would crash
    "lists around tuples": (b"\x91" * 40 + _nested_tuples(40), "MAX_VALUE_DEPTH"),
    "oversized": (b"\xc4" * (MAX_DECODE_BYTES + 1), "MAX_DECODE_BYTES"),
}


@pytest.mark.parametrize("name", HOSTILE_VALUES)
def test_hostile_value_bytes_are_protocol_errors(name):
    data, message = HOSTILE_VALUES[name]
    assert len(data) <= MAX_DECODE_BYTES or name == "oversized"
    with pytest.raises(ProtocolError, match=message):
        unpack(data)
    assert record_problem(Record(b"\xa1k", None, data, 1e12)) is not None


@pytest.mark.parametrize(
    "data, message",
    [
        (msgpack.packb({"a": 1}), "hashable"),
        (msgpack.packb([1, {"a": 1}]), "hashable"),
        (_ext(TUPLE_EXT, b"\x90"), "extension type"),
        (b"\xc1", "undecodable"),
    ],
)
def test_hostile_subkeys_are_protocol_errors(data, message):
    with pytest.raises(ProtocolError, match=message):
        unpack(data, hashable=True)
    assert record_problem(Record(b"\xa1k", data, msgpack.packb(1), 1e12)) is not None


# ---- real nodes


@pytest.fixture(scope="module")
def pair():
    first = DHT()
    second = DHT(initial_peers=[first.address])
    yield first, second
    second.shutdown()
    first.shutdown()


def raw_store(peer_dht: DHT, target: DHT, records: list[Record]) -> list[bool]:
    """Store records on `target` directly, as any peer on the network could (no client-side encoding)."""
    fields, tensors = protocol.records_blob(records)
    request = protocol.versioned({"s": None, **fields})
    header, _ = peer_dht.peer.call_sync(target.address, protocol.STORE, request, tensors, timeout=10)
    return header["ok"]


def test_two_nodes_store_and_get_tuples(pair):
    first, second = pair
    expiration = get_dht_time() + 60
    for i, value in enumerate(VALUES):
        assert first.store(f"tuple-{i}", value, expiration, timeout=30)
    for i, value in enumerate(VALUES):
        found = second.get(f"tuple-{i}", latest=True, timeout=30)
        assert found is not None and found.expiration_time == expiration
        assert_same(found.value, value)
        assert_same(second.get(f"tuple-{i}", timeout=30).value, value)  # from its cache or storage this time
    # The DHT tutorial's pattern: subkeys holding tuples.
    assert first.store("tutorial", ("alice", 0.5), expiration, subkey="a", timeout=30)
    assert second.store("tutorial", ("bob", 1.5), expiration, subkey=("b", 2), timeout=30)
    found = first.get("tutorial", latest=True, timeout=30).value
    assert {s: v.value for s, v in found.items()} == {"a": ("alice", 0.5), ("b", 2): ("bob", 1.5)}
    assert all(type(v.value) is tuple for v in found.values())


def test_owner_signed_tuple_values_verify_over_their_exact_bytes(pair):
    first, second = pair
    key = f"state {first.owner_marker}"
    now = get_dht_time()
    assert first.store(key, ("epoch", 7, (1, 2)), now + 60, timeout=30)
    assert_same(second.get(key, latest=True, timeout=30).value, ("epoch", 7, (1, 2)))
    # The signature covers the serialized value: the same items re-encoded as a list (or as anything else) are refused.
    signed = first.make_record(key, ("epoch", 8, (1, 2)), now + 90)
    as_list = msgpack.packb(["epoch", 8, [1, 2]], use_bin_type=True)
    forged = Record(signed.key, None, as_list, signed.expiration_time, signed.signature)
    holders = [n for n in pair if n.node.storage.get(key_id(signed.key)) is not None]
    assert holders
    assert raw_store(second, holders[0], [forged]) == [False]
    assert raw_store(second, holders[0], [signed]) == [True]
    assert_same(second.get(key, latest=True, timeout=30).value, ("epoch", 8, (1, 2)))


def test_hostile_values_stored_by_anyone_never_break_a_reader(pair):
    first, second = pair
    expiration = get_dht_time() + 60
    for i, (name, (data, _)) in enumerate(HOSTILE_VALUES.items()):
        if name == "oversized":
            continue  # over MAX_VALUE_BYTES: no node takes it anyway
        key = f"junk-{i}"
        # Storing nodes keep values as opaque bytes (decoding is the reader's cost): the junk is accepted ...
        assert raw_store(second, first, [Record(pack(key, "key"), None, data, expiration)]) == [True]
        # ... but no reader ever sees it, on the holder itself or elsewhere.
        assert first.get(key, timeout=30) is None
        assert second.get(key, latest=True, timeout=30) is None
    # A junk subkey or subkey value costs its own entry only, never the whole dictionary.
    key = pack("shared", "key")
    assert first.store("shared", ("valid", 1), expiration, subkey="good", timeout=30)
    junk = [
        Record(key, pack("bad-value", "subkey"), _nested_tuples(MAX_VALUE_DEPTH + 1), expiration),
        Record(key, msgpack.packb({"a": 1}), pack(("ok",)), expiration),
        Record(key, b"\xc1", pack(("ok",)), expiration),
    ]
    for target in pair:
        assert raw_store(second, target, junk) == [True, True, True]
    for reader in pair:
        for latest in (False, True):
            found = reader.get("shared", latest=latest, timeout=30)
            assert {s: v.value for s, v in found.value.items()} == {"good": ("valid", 1)}


@pytest.mark.parametrize("signature", [None, b"\x00" * 64])
def test_a_subkey_replaces_a_plain_value_whatever_its_expiration(signature):
    now = get_dht_time()
    squat = Record(b"k", None, b"\x01", now + MAX_RECORD_TTL)
    entry = Entry(b"k")
    assert entry.merge(squat)
    assert entry.merge(Record(b"k", b"s", b"\x02", now + 60, signature=signature))
    assert entry.plain is None and set(entry.subkeys) == {b"s"}
    assert not entry.merge(squat)  # and the plain value cannot come back over the live dictionary


def test_what_a_key_holds_does_not_depend_on_the_order_its_records_arrived_in():
    # Replicas get the same records in different orders; readers and republishing spread what each holds. Ties of
    # expiration (an owner that re-stores another value at the same time) went to whichever came first, and a plain
    # value older than a subkey record survived it only when it came first.
    now = get_dht_time()
    records = [
        Record(b"k", None, b"plain-a", now + 90),
        Record(b"k", None, b"plain-b", now + 90),
        Record(b"k", b"s", b"v1", now + 60),
        Record(b"k", b"s", b"v2", now + 60),
        Record(b"k", b"s", b"v0", now + 30),
        Record(b"k", b"t", b"w", now + 45, signature=b"\x00" * 64),
    ]
    held = set()
    for order in itertools.permutations(records):
        entry = Entry(b"k")
        for record in order:
            entry.merge(record)
        held.add((entry.plain, tuple(sorted(entry.subkeys.items()))))
    assert held == {(None, ((b"s", records[3]), (b"t", records[5])))}
    plains = Entry(b"k")
    for record in records[1::-1]:
        plains.merge(record)
    assert plains.plain == records[1]  # the larger value of two with one expiration, though it came first


def test_signed_entries_land_under_a_key_squatted_with_a_plain_value(pair):
    squatter, honest = pair
    key = "run.squatted"  # not a reserved key (hiveengine.dht.schemas): any value may be stored under it
    assert squatter.store(key, "mine for a day", get_dht_time() + MAX_RECORD_TTL - 60, timeout=30)
    assert honest.get(key, latest=True, timeout=30).value == "mine for a day"
    subkey = honest.owner_marker
    assert honest.store(key, {"epoch": 3}, get_dht_time() + 30, subkey=subkey, timeout=30)
    for reader in pair:
        found = reader.get(key, latest=True, timeout=30)
        assert isinstance(found.value, dict) and found.value[subkey].value == {"epoch": 3}
    # An unowned record may not carry a signature: it would vouch for nothing yet outrank plain values.
    forged = squatter.make_record(key, "junk", get_dht_time() + 60, subkey="anyone")
    with_signature = Record(forged.key, forged.subkey, forged.value, forged.expiration_time, b"\x00" * 64)
    assert not squatter.node.validator.validate(with_signature)


READER = """
import json, sys
from hiveengine.dht import DHT
with DHT(initial_peers=[sys.argv[1]], client_mode=True) as dht:
    found = [dht.get(key, latest=True, timeout=30) for key in json.loads(sys.argv[2])]
    print(json.dumps([[repr(f.value), type(f.value).__name__] if f else None for f in found]))
"""


def test_tuples_survive_a_trip_through_other_processes():
    """A node in another process holds the records; a reader in a third process gets tuples back."""
    import ast

    holder = PeerProcess("dht_nodes.py", "--nodes", "2")
    try:
        address = holder.expect("ADDRESS")
        holder.expect("READY")
        with DHT(initial_peers=[address], client_mode=True) as writer:
            keys = [f"procs-{i}" for i in range(len(VALUES))]
            expiration = get_dht_time() + 60
            for key, value in zip(keys, VALUES, strict=True):
                assert writer.store(key, value, expiration, timeout=30)
        result = subprocess.run(
            [sys.executable, "-c", READER, address, json.dumps(keys)],
            capture_output=True,
            text=True,
            timeout=90,
            cwd=HERE.parent,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        found = json.loads(result.stdout.strip().splitlines()[-1])
        for (text, type_name), value in zip(found, VALUES, strict=True):
            assert type_name == type(value).__name__
            assert_same(ast.literal_eval(text), value)
    finally:
        holder.close()
