"""A plain value stored by anyone cannot squat a key that peers sign their entries under."""

from __future__ import annotations

import pytest

from hiveengine.dht import DHT, get_dht_time
from hiveengine.dht.storage import MAX_RECORD_TTL, Entry, Record


def test_an_owner_signed_subkey_replaces_an_unsigned_plain_value_whatever_its_expiration():
    now = get_dht_time()
    squat = Record(b"k", None, b"\x01", now + MAX_RECORD_TTL)
    entry = Entry(b"k")
    assert entry.merge(squat)
    assert not entry.merge(Record(b"k", b"s", b"\x02", now + 60))  # unsigned, older: newer-wins holds
    assert entry.merge(Record(b"k", b"s", b"\x02", now + 60, signature=b"\x00" * 64))
    assert entry.plain is None and set(entry.subkeys) == {b"s"}
    assert not entry.merge(squat)  # and the plain value cannot come back over the live dictionary


@pytest.fixture(scope="module")
def pair():
    first = DHT()
    second = DHT(initial_peers=[first.address])
    yield first, second
    second.shutdown()
    first.shutdown()


def test_signed_entries_land_under_a_key_squatted_with_a_plain_value(pair):
    squatter, honest = pair
    key = "run.progress"
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
