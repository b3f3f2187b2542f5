"""A hostile swarm member for bench/swarm_attacks.py and tests/test_swarm_attacks.py: attacks the DHT records of
an Optimizer run while it trains.

Usage: swarm_attacker.py MODE INITIAL_PEER RUN_ID. Joins the DHT, prints "READY <the hex id its own records are
signed with>", then attacks in passes until stdin closes (printing "ATTACKING" once the first pass is done),
always at the swarm's current epoch (read from the honest peers' progress):
- registrations: tests/peers/forger_records.py's forgeries against this epoch's and the next one's gradient
  matchmaking (raw-id overwrites, forged signatures, expired, zero-bandwidth and junk registrations from 6
  identities) and against the run's state advertisements;
- samples: a progress record of its own at the swarm's epoch claiming 10^9 samples (the early-tiny-steps attack);
- overwrite: plain values under the run's progress, state and matchmaking keys, expiring at +inf, 1e300 and
  the year 3000 (each DHT node refuses or clamps them);
- absurd: tests/peers/absurd_records.py's records with absurd fields (not its well-formed ones), each signed by
  a fresh identity, under the run's live keys.
Prints "PASSES <n> FAILED <passes that raised>" on exit.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from hiveengine.averaging.matchmaking import matchmaking_key
from hiveengine.averaging.records import signed_record
from hiveengine.averaging.state import state_key
from hiveengine.dht import DHT, Record, get_dht_time
from hiveengine.dht.serialization import pack
from hiveengine.optim.progress import PeerProgress, parse_progress, progress_key
from hiveengine.transport import Identity
from tests.peers.absurd_records import cases
from tests.peers.forger_records import forge_pass

MODES = ("registrations", "samples", "overwrite", "absurd")
PACE_SECONDS = 0.05  # between passes (pacing the attack, not synchronizing with anyone)
FAKE_SAMPLES = 10**9
YEAR_3000 = 32503680000.0


def swarm_epoch(dht: DHT, run_id: str) -> int:
    """The epoch the honest peers' (corroborated) progress shows."""
    return parse_progress(dht.get(progress_key(run_id), latest=True)).epoch


def live_keys(run_id: str, epoch: int) -> dict[str, str]:
    """Record kind -> the key the run uses for it now."""
    return {
        "registration": matchmaking_key(f"{run_id}.grads", str(epoch)),
        "progress": progress_key(run_id),
        "state": state_key(f"{run_id}.state"),
    }


def attack_pass(mode: str, dht: DHT, run_id: str, forger: Identity, fakes: list[Identity]) -> None:
    """One pass of `mode` against the swarm's current epoch."""
    epoch, now = swarm_epoch(dht, run_id), get_dht_time()
    keys = live_keys(run_id, epoch)
    store = dht.node.store
    if mode == "registrations":
        for key in (keys["registration"], matchmaking_key(f"{run_id}.grads", str(epoch + 1))):
            forge_pass(dht, forger, fakes, key, keys["state"], "ucx://127.0.0.1:9/x")
    elif mode == "samples":
        claim = PeerProgress("", epoch, FAKE_SAMPLES, 10.0, now, None, False, 128).record()
        dht.peer.runtime.run(store([signed_record(dht, forger, keys["progress"], claim, now + 30)]), 30)
    elif mode == "overwrite":
        for key in keys.values():
            records = [Record(pack(key), None, pack("junk"), t) for t in (float("inf"), 1e300, YEAR_3000)]
            dht.peer.runtime.run(store(records), 30)
    else:
        for name, (kind, value) in cases("", now).items():
            if name.startswith("good-"):
                continue  # well-formed records from fresh identities are a Sybil flood, not absurd fields
            writer = Identity.generate()  # its own key: the signature is good, only the shape is absurd
            if isinstance(value, list) and value[0] == "":
                value = [f"ucx://127.0.0.1:9/{writer.peer_id}", *value[1:]]
            dht.peer.runtime.run(store([signed_record(dht, writer, keys[kind], value, now + 30)]), 30)


def main() -> None:
    mode, initial, run_id = sys.argv[1:4]
    if mode not in MODES:
        raise SystemExit(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
    dht = DHT(initial_peers=[initial], client_mode=True)  # it stores nothing itself: what is accepted, others took
    forger, fakes = Identity.generate(), [Identity.generate() for _ in range(6)]
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("READY", forger.peer_id.raw.hex(), flush=True)
    passes = failed = 0
    while not stop.wait(PACE_SECONDS):
        try:
            attack_pass(mode, dht, run_id, forger, fakes)
            passes += 1
            if passes == 1:
                print("ATTACKING", flush=True)
        except Exception as error:  # a refused or timed-out pass: the attacker just tries again
            failed += 1
            print("FAILED", repr(error), file=sys.stderr, flush=True)
    print("PASSES", passes, "FAILED", failed, flush=True)
    dht.shutdown()


if __name__ == "__main__":
    main()
