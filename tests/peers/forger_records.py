"""A hostile peer for tests/test_signed_records.py: forges the DHT records averagers rely on.

Usage: forger_records.py INITIAL_PEER MATCHMAKING_KEY STATE_KEY STATE_ADDRESS. Joins the DHT, prints "READY",
then until stdin closes, over and over:
- for every averager registered under MATCHMAKING_KEY: writes an unsigned registration under its raw peer id
  (bandwidth 0, a deadline just ahead), and one under its owner marker signed by the forger's own key (every
  node must refuse it);
- from 6 identities of its own, signed registrations that are expired (deadlines in the past), of bandwidth 0,
  junk, or whose address names an honest peer;
- for every peer advertising state under STATE_KEY: an advertisement under its owner marker signed by the forger
  (refused) and an unsigned one under its raw id, both pointing at STATE_ADDRESS with a huge epoch.
After each pass prints "FORGED <victims> REFUSED <refused> ACCEPTED <accepted forged-signature records>".
"""

import sys
import threading

from hiveengine.averaging.records import signed_record
from hiveengine.dht import DHT, Record, get_dht_time, owner_marker
from hiveengine.dht.validation import named_owners_of, signed_message, signer_of
from hiveengine.transport import Identity

PACE_SECONDS = 0.05  # between passes (pacing the attack, not synchronizing with anyone)
HUGE_EPOCH = 10**9


def forged_for(dht: DHT, forger: Identity, key: str, value, victim_public_key: bytes) -> Record:
    """A record under the victim's owner marker, signed by the forger."""
    record = dht.make_record(key, value, get_dht_time() + 30, owner_marker(victim_public_key))
    return Record(record.key, record.subkey, record.value, record.expiration_time, forger.sign(signed_message(record)))


def forge_pass(dht: DHT, forger: Identity, fakes: list[Identity], key: str, state_key: str, state_address: str):
    """One pass of every forgery above; returns (victims' peer ids, records refused, forged-signature records
    accepted)."""
    victims, refused, accepted = set(), 0, 0
    now = get_dht_time()
    found = dht.get(key, latest=True)
    honest = {}
    for subkey, entry in (found.value if found is not None and isinstance(found.value, dict) else {}).items():
        peer_id = signer_of(subkey)
        if peer_id is not None and isinstance(entry.value, list) and peer_id not in {f.peer_id for f in fakes}:
            honest[peer_id] = (subkey, entry.value)
    for peer_id, (subkey, value) in honest.items():
        zero = [value[0], 0.0, 0, now, now + 0.5, 0, None]
        dht.store(key, zero, now + 30, subkey=peer_id.raw)  # unsigned: readers must ignore it
        public_key = next(iter(named_owners_of(subkey)))
        (ok,) = dht.peer.runtime.run(dht.node.store([forged_for(dht, forger, key, zero, public_key)]), 30)
        accepted, refused = accepted + ok, refused + (not ok)
        victims.add(peer_id)
    some_honest = next(iter(honest.values()), (None, ["ucx://127.0.0.1:1/x"]))[1][0]
    for i, fake in enumerate(fakes):
        address = f"ucx://127.0.0.1:9/{fake.peer_id}"
        value = [
            [address, 1.0, 0, now - 10, now - 5, 0, None],  # expired
            [address, 0.0, 0, now - 10, now - 1, 0, None],  # expired, bandwidth 0
            ["junk", float("nan")],
            [some_honest, 1.0, 0, now, now + 0.5, 0, None],  # names an honest peer's address
            [address, -1.0, 0, now, now + 0.5, 0, None],
            "junk",
        ][i % 6]
        record = signed_record(dht, fake, key, value, now + 30)
        dht.peer.runtime.run(dht.node.store([record]), 30)
    ads = dht.get(state_key, latest=True)
    for subkey, _ in (ads.value if ads is not None and isinstance(ads.value, dict) else {}).items():
        peer_id = signer_of(subkey)
        if peer_id is None:
            continue
        forged = [f"{state_address.rsplit('/', 1)[0]}/{peer_id}", HUGE_EPOCH, b"\0" * 32]
        dht.store(state_key, forged, now + 30, subkey=peer_id.raw)
        public_key = next(iter(named_owners_of(subkey)))
        (ok,) = dht.peer.runtime.run(dht.node.store([forged_for(dht, forger, state_key, forged, public_key)]), 30)
        accepted, refused = accepted + ok, refused + (not ok)
    return victims, refused, accepted


def main() -> None:
    initial, key, state_key, state_address = sys.argv[1:5]
    dht = DHT(initial_peers=[initial])
    forger = Identity.generate()
    fakes = [Identity.generate() for _ in range(6)]
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("READY", flush=True)
    victims, refused, accepted = set(), 0, 0
    while not stop.wait(PACE_SECONDS):
        hit, no, yes = forge_pass(dht, forger, fakes, key, state_key, state_address)
        victims, refused, accepted = victims | hit, refused + no, accepted + yes
        print("FORGED", len(victims), "REFUSED", refused, "ACCEPTED", accepted, flush=True)
    dht.shutdown()


if __name__ == "__main__":
    main()
