"""DHT storage quotas: every record is charged in real bytes to the peer that sent it, one identity holds at most
its quota, and a full node gives way to lighter senders, so floods (one identity or many) never keep an honest
record out; stores are paced per sender and in all, so a flood costs the node a bounded share of its CPU. Flooders
are real processes sending raw dht.store requests."""

from __future__ import annotations

import random
import time

import pytest

from hiveengine.dht import DHT, DHTConfig, get_dht_time
from hiveengine.dht.pacing import MAX_PACED_SENDERS, MIN_RECORD_CHARGE, REFUSAL_REPORT_SECONDS, StorePacer
from hiveengine.dht.storage import RECORD_OVERHEAD_BYTES, Record, Storage
from hiveengine.errors import PeerBusyError
from tests.procs import PeerProcess

KiB = 1 << 10
NODE_BYTES, PEER_BYTES = 1024 * KiB, 128 * KiB  # small limits, so a flood fills them in a second on 2 cores


def record(i: int, size: int = 100, expires: float = 600) -> Record:
    return Record(b"k%d" % i, None, b"v" * size, get_dht_time() + expires)


def test_each_sender_is_charged_its_records_real_bytes_and_capped():
    storage = Storage(10 * KiB, max_bytes_per_sender=4 * KiB)
    kept = [storage.store(i, record(i), sender=b"a") for i in range(20)]
    per_record = record(0).nbytes
    assert per_record >= 100 + RECORD_OVERHEAD_BYTES
    assert sum(kept) == 4 * KiB // per_record and storage.usage[b"a"] <= 4 * KiB
    assert storage.store(100, record(100), sender=b"b")  # another sender still has room
    assert storage.nbytes == sum(storage.usage.values())


def test_a_full_store_evicts_the_heaviest_senders_oldest_records_never_a_lighter_ones():
    storage = Storage(8 * KiB, max_bytes_per_sender=8 * KiB)
    while storage.store(len(storage), record(len(storage)), sender=b"flood"):
        pass
    flood_before = storage.usage[b"flood"]
    assert storage.store(1000, record(1000), sender=b"honest")  # the flooder's oldest record made room
    assert storage.get(1000) is not None and storage.get(0) is None
    assert storage.usage[b"flood"] < flood_before
    assert not storage.store(2000, record(2000), sender=b"flood")  # the heaviest cannot push the light one out
    assert storage.get(1000) is not None


def test_replaced_and_expired_records_release_their_charge():
    storage = Storage(8 * KiB)
    now = get_dht_time()
    storage.store(1, Record(b"k", b"s", b"v", now + 10), sender=b"a")
    storage.store(1, Record(b"k", b"s", b"w", now + 20), sender=b"b")  # a newer version from another sender
    assert b"a" not in storage.usage and storage.usage[b"b"] == storage.nbytes
    storage.drop_expired(now + 30)
    assert storage.nbytes == 0 and storage.usage == {} and len(storage) == 0


def test_random_stores_evict_and_expire_as_a_full_scan_would():
    """The heaps that index senders by usage and keys by expiration (stale items and all) against a full scan:
    thousands of random stores, replacements, evictions and expiries from many senders, with fresh random data."""
    rng = random.Random()
    storage = Storage(64 * KiB, max_bytes_per_sender=16 * KiB)
    now = get_dht_time()
    senders = [b"s%d" % i for i in range(40)]
    for step in range(4000):
        sender = rng.choice(senders[: rng.choice([3, 40])])  # a few heavy senders among many light ones
        key = rng.randrange(300)
        subkey = rng.choice([None, b"a", b"b"])
        stored = Record(b"k%d" % key, subkey, b"v" * rng.randrange(4 * KiB), now + rng.uniform(1, 100))
        if storage.usage and storage.nbytes > 48 * KiB:
            assert storage.usage[storage._heaviest_sender()] == max(storage.usage.values())
        storage.store(key, stored, now, sender=sender)
        if step % 50 == 0:
            now += rng.uniform(0, 5)
            storage.drop_expired(now)
            held = [r for _, entry in storage._entries.items() for r in entry.records()]
            assert all(r.expiration_time > now for r in held)
            assert storage.nbytes == sum(r.nbytes for r in held) == sum(storage.usage.values())
        assert storage.nbytes <= storage.max_bytes
        assert all(usage <= storage.max_bytes_per_sender for usage in storage.usage.values())
    storage.drop_expired(now + 100)
    assert storage.nbytes == 0 and storage.usage == {} and len(storage) == 0


def test_republishing_reads_only_the_keys_stored_before_the_cut():
    storage = Storage(64 * KiB)
    for i in range(5):
        storage.store(i, record(i))
    cut = time.monotonic()
    storage.store(5, record(5))
    storage.refreshed(1)  # republished after the cut
    assert [e.key for e in storage.due(cut)] == [b"k0", b"k2", b"k3", b"k4"]
    assert storage.due(time.monotonic() + 1)[-2:] == [storage.get(5), storage.get(1)]


def test_store_pacing_admits_no_more_than_the_burst_plus_the_rate_and_refuses_long_waits(caplog):
    """Random stores from a few senders on a simulated clock, against the token buckets' bound: whatever a sender
    (or all of them) got admitted by time t is at most burst + rate * (t + max_wait), each admitted store waits what
    its debt says, and a store that would wait longer than max_wait is refused and charged nothing."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    now = [0.0]
    rate, burst, total_rate, total_burst, max_wait = 100.0, 400.0, 250.0, 600.0, 2.0
    pacer = StorePacer(rate, burst, total_rate, total_burst, max_wait, clock=lambda: now[0])
    paid_until = {}  # sender -> when its last admitted store could go (a paced sender sends its next one then)
    for _ in range(3000):
        sender = rng.choice([b"a", b"b", b"c"])
        now[0] = max(now[0], paid_until.get(sender, 0.0)) + rng.expovariate(5.0)
        nbytes = rng.randrange(1, 300)
        before = dict(pacer.admitted)
        try:
            wait = pacer.admit(sender, nbytes)
        except PeerBusyError:
            assert pacer.admitted == before  # refused stores take nothing
            continue
        assert 0 <= wait <= max_wait, seed
        paid_until[sender] = now[0] + wait
        assert pacer.admitted[sender] <= burst + rate * (now[0] + max_wait), seed
        assert sum(pacer.admitted.values()) <= total_burst + total_rate * (now[0] + max_wait), seed
    assert pacer.refused > 0  # three senders at full speed overran the total rate now and then
    # The refusals were logged, the first at once and then once a minute at most: a flood logs little.
    reports = [r for r in caplog.records if "DHT stores since the last report" in r.getMessage()]
    assert 1 <= len(reports) <= 1 + now[0] // REFUSAL_REPORT_SECONDS < pacer.refused
    assert reports[0].levelname == "WARNING" and "refused 1 DHT stores" in reports[0].getMessage()
    quiet = StorePacer(rate, burst, total_rate, total_burst, max_wait, clock=lambda: now[0])
    assert quiet.admit(b"honest", 300) == 0  # within the burst: no wait at all
    large = StorePacer(rate, burst, total_rate, total_burst, max_wait, clock=lambda: now[0])
    assert large.admit(b"large", 3 * burst) == 0  # larger than both bursts: it goes at once from full buckets...
    with pytest.raises(PeerBusyError):  # ...and the sender's next store waits for its debt (here, too long)
        large.admit(b"large", 1)
    now[0] += 6.5  # the sender's bucket refilled 650 of its 800 bytes of debt
    assert large.admit(b"large", 1) == pytest.approx((150 + 1) / rate)
    for i in range(MAX_PACED_SENDERS + 10):
        quiet.admit(b"s%d" % i, 0)
    assert len(quiet.senders) == MAX_PACED_SENDERS and b"honest" not in quiet.admitted  # bounded memory


@pytest.mark.timeout(120)
def test_a_flooding_sender_is_paced_to_its_store_rate_while_an_honest_store_goes_through():
    rate, burst, records, value_bytes = 256 * KiB, 512 * KiB, 1000, MIN_RECORD_CHARGE
    config = DHTConfig(store_bytes_per_second=rate, store_burst_bytes=burst)
    batch = 50
    with DHT(config=config) as node:
        sizes = ["--records", str(records), "--batch", str(batch), "--value-bytes", str(value_bytes)]
        args = ["--identities", "1", *sizes]
        proc = PeerProcess("swarm_dht_flooder.py", str(node.address), *args)
        try:
            proc.expect("READY")  # the node answered the first batch
            started = time.monotonic()
            honest_round_trip(str(node.address), "during-a-paced-flood")
            assert proc.proc.poll() is None  # the honest store went through while the flood was still going
            accepted = int(proc.expect("ACCEPTED", timeout=60).split()[1])
            elapsed = time.monotonic() - started
            proc.expect("DONE")
        finally:
            proc.close()
    assert accepted == records  # paced, not refused
    # What the node took from the flooder (at least its values' bytes) is bounded by its bucket (the first batch
    # went before the clock started). Unpaced, the 4 MB go in about two seconds, far over the bound; paced, over 13 s.
    assert accepted * value_bytes <= burst + rate * (elapsed + config.max_store_wait) + batch * value_bytes


@pytest.fixture
def node():
    args = ["--max-stored-bytes", str(NODE_BYTES), "--max-stored-bytes-per-peer", str(PEER_BYTES)]
    proc = PeerProcess("dht_nodes.py", *args)
    try:
        address = proc.expect("ADDRESS")
        proc.expect("READY")
        yield address
    finally:
        proc.close()


def flood(address: str, identities: int, records: int) -> list[tuple[int, int]]:
    """(records accepted, bytes charged) per flooding identity."""
    proc = PeerProcess("swarm_dht_flooder.py", address, "--identities", str(identities), "--records", str(records))
    try:
        results = [tuple(map(int, proc.expect("ACCEPTED", timeout=60).split())) for _ in range(identities)]
        proc.expect("DONE")
        assert proc.proc.wait(30) == 0, proc.tail()
    finally:
        proc.close()
    return [r[1:] for r in results]


def honest_round_trip(address: str, key: str) -> None:
    config = DHTConfig(rpc_timeout=10)
    with DHT(initial_peers=[address], client_mode=True, config=config) as writer:
        assert writer.store(key, {"honest": 150}, get_dht_time() + 60, timeout=30)
    with DHT(initial_peers=[address], client_mode=True, config=config) as reader:
        found = reader.get(key, latest=True, timeout=30)
        assert found is not None and found.value == {"honest": 150}


@pytest.mark.timeout(180)
def test_one_identity_flooding_a_node_fills_only_its_quota(node):
    [(accepted, charged)] = flood(node, 1, 2000)
    assert 0 < charged <= PEER_BYTES and accepted < 2000  # refused once its quota was full
    honest_round_trip(node, "after-one-flooder")


@pytest.mark.timeout(180)
def test_many_identities_filling_a_node_never_starve_an_honest_record(node):
    results = flood(node, 12, 400)  # 12 quotas of 128 KiB: more than the node's 1 MiB
    assert all(charged <= PEER_BYTES for _, charged in results)
    assert sum(charged for _, charged in results) > NODE_BYTES  # the node was full, and some of it was evicted
    honest_round_trip(node, "after-a-sybil-flood")
