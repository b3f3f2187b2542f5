"""A hostile DHT client for the quota tests and bench/swarm_attacks.py: from IDENTITIES fresh identities (0: new
ones until stdin closes), sends dht.store requests of BATCH records (values of VALUE_BYTES, keys of its own)
straight to one node until it refuses a whole batch or RECORDS were sent per identity, at most MBIT megabits of
values per second if given (an attacker's uplink). Prints `READY` once the node answered its first batch (the flood
is under way), then `ACCEPTED <identity index> <records accepted> <bytes charged>` per identity, then `DONE`."""

import argparse
import itertools
import sys
import threading
import time

from hiveengine.dht import protocol
from hiveengine.dht.serialization import pack
from hiveengine.dht.storage import Record, get_dht_time
from hiveengine.transport import Peer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("--identities", type=int, default=1)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--value-bytes", type=int, default=1024)
    parser.add_argument("--mbit", type=float, default=None, help="pace the flood to this rate (default: flat out)")
    args = parser.parse_args()
    started, sent = time.monotonic(), 0
    expiration = get_dht_time() + 600
    stop = threading.Event()
    if args.identities == 0:
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    ready = False
    for index in range(args.identities) if args.identities else itertools.count():
        if stop.is_set():
            break
        peer = Peer()
        accepted = charged = 0
        for start in range(0, args.records, args.batch):
            count = min(args.batch, args.records - start)
            records = [
                Record(pack(f"flood-{index}-{start + i}"), None, pack(b"x" * args.value_bytes), expiration)
                for i in range(count)
            ]
            header, tensors = protocol.records_blob(records)
            request = protocol.versioned({"s": None, **header})
            reply, _ = peer.call_sync(args.target, protocol.STORE, request, tensors, timeout=30)
            sent += count * args.value_bytes
            if args.mbit:  # pacing to the uplink's rate, not synchronizing with anyone
                time.sleep(max(0.0, started + sent * 8 / (args.mbit * 1e6) - time.monotonic()))
            if not ready:
                print("READY", flush=True)
                ready = True
            ok = protocol.parse_store_reply(reply, count)
            accepted += sum(ok)
            charged += sum(r.nbytes for r, o in zip(records, ok, strict=True) if o)
            if not any(ok):
                break
        print("ACCEPTED", index, accepted, charged, flush=True)
        peer.shutdown()
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
