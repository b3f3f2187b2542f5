"""A hostile writer for tests/test_record_shapes.py: stores swarm records with absurd fields, each signed by its
own identity (so only their shape is wrong), straight into one DHT node.

Usage: absurd_records.py NODE_ADDRESS PREFIX. For each case of `cases` (an empty address there stands for the
writer's own) stores one record in NODE_ADDRESS's node and prints "STORED <case> <accepted: 0 or 1>", then "DONE";
exits when stdin closes.
"""

import sys

from hiveengine.averaging.matchmaking import matchmaking_key
from hiveengine.averaging.records import signed_record
from hiveengine.averaging.state import state_key
from hiveengine.dht import DHT, get_dht_time
from hiveengine.optim.progress import progress_key
from hiveengine.transport import Identity

INF, NAN = float("inf"), float("nan")


def cases(address: str, now: float) -> dict:
    """Case name -> (key kind, value); "good-*" cases are well formed."""
    registration = [address, 1.0, 0, now, now + 1, 3, None]
    progress = [4, 100, 12.5, now, 0.5, False, 64, False, False]
    state = [address, 4, b"\1" * 32]

    def changed(value: list, index: int, field) -> list:
        return [*value[:index], field, *value[index + 1 :]]

    return {
        "good-registration": ("registration", registration),
        "good-progress": ("progress", progress),
        "good-state": ("state", state),
        "registration-nan-bandwidth": ("registration", changed(registration, 1, NAN)),
        "registration-inf-deadline": ("registration", changed(registration, 4, INF)),
        "registration-negative-round": ("registration", changed(registration, 5, -1)),
        "registration-mode-7": ("registration", changed(registration, 2, 7)),
        "registration-other-address": ("registration", changed(registration, 0, "ucx://127.0.0.1:9/someoneelse")),
        "registration-junk": ("registration", "junk"),
        "registration-since-1970": ("registration", changed(registration, 3, 0.0)),
        "progress-epoch-2**64": ("progress", changed(progress, 0, 2**64 - 1)),
        "progress-negative-samples": ("progress", changed(progress, 1, -5)),
        "progress-inf-speed": ("progress", changed(progress, 2, INF)),
        "progress-nan-loss": ("progress", changed(progress, 4, NAN)),
        "progress-short": ("progress", progress[:4]),
        "state-float-epoch": ("state", changed(state, 1, 4.0)),
        "state-short-digest": ("state", changed(state, 2, b"\1")),
    }


def main() -> None:
    node, prefix = sys.argv[1:3]
    dht = DHT(initial_peers=[node], client_mode=True)  # stores nothing itself: what is accepted, NODE took
    keys = {
        "registration": matchmaking_key(prefix, "rounds"),
        "progress": progress_key(prefix),
        "state": state_key(prefix),
    }
    for name, (kind, value) in cases("", get_dht_time()).items():
        writer = Identity.generate()  # its own key: the signature is good, only the shape is absurd
        if isinstance(value, list) and value[0] == "":  # the writer's own address
            value = [f"ucx://127.0.0.1:9/{writer.peer_id}", *value[1:]]
        record = signed_record(dht, writer, keys[kind], value, get_dht_time() + 60)
        (accepted,) = dht.peer.runtime.run(dht.node.store([record]), 30)
        print("STORED", name, int(accepted), flush=True)
    print("DONE", flush=True)
    sys.stdin.read()
    dht.shutdown()


if __name__ == "__main__":
    main()
