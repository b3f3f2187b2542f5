"""An engine process for the NAT rig: `bootstrap` runs a DHT node and prints its address; `join ADDR` starts
hiveengine.init with ADDR as initial peer and reports whether it switched to client mode and whether the DHT works."""

import json
import sys
import threading

import hiveengine
from hiveengine.dht import DHT, get_dht_time

if __name__ == "__main__":
    threading.current_thread().name = "engine-main"
    if sys.argv[1] == "bootstrap":
        dht = DHT()
        print("ADDRESS", dht.address, flush=True)
        sys.stdin.read()
        dht.shutdown()
    else:
        engine = hiveengine.init(initial_peers=[sys.argv[2]])
        engine.dht.store("nat-key", "from-home", get_dht_time() + 60)
        found = engine.dht.get("nat-key")
        relayed = engine.dht.peer.relayed
        result = {"client_mode": engine.client_mode, "value": found.value if found else None, "relayed": bool(relayed)}
        print("RESULT", json.dumps(result), flush=True)
        engine.shutdown()
