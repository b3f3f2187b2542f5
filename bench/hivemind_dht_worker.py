"""hivemind's DHT under bench/dht.py's workload (runs in hivemind's own venv, never in hiveengine's).

Usage: python hivemind_dht_worker.py NODES KEYS CONCURRENCY EXPIRATION_SECONDS
Starts NODES hivemind DHT peers (each a process with its own p2pd daemon) and one client-mode peer, then:
KEYS stores and KEYS gets one at a time (latency), and as many again with CONCURRENCY in flight (throughput).
Prints "RESULT <json>" with the raw measurements, which bench/dht.py summarizes as it does its own; memory is the
peers' proportional set size (their p2pd daemons included, the client's left out) over this process's before they
started.
"""

import json
import os
import sys
import time
from pathlib import Path

import hivemind
from hivemind.utils.timed_storage import get_dht_time

KiB = 1 << 10
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_pids(root: int, exclude: int | None = None) -> set[int]:
    """Process `root` and its descendants, leaving out `exclude`'s subtree (read from /proc; no psutil here)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid and child != exclude]
        tree.update(children)
        frontier.extend(children)
    return tree


def tree_pss(root: int, exclude: int | None = None) -> int:
    """Proportional set size (shared pages split among their sharers, so forked peers are not counted many times
    over) of `root`'s process tree without `exclude`'s subtree."""
    total = 0
    for pid in tree_pids(root, exclude):
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) * KiB for line in rollup.splitlines() if line.startswith("Pss:"))
    return total


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds used so far by the live processes of `root`'s tree."""
    ticks = 0
    for pid in tree_pids(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / CLOCK_TICKS


def windowed(submit, count: int, concurrency: int) -> list:
    """Results of submit(i) for i < count, with at most `concurrency` futures outstanding."""
    futures, results = [], []
    for i in range(count):
        futures.append(submit(i))
        if len(futures) >= concurrency:
            results.append(futures.pop(0).result())
    return results + [f.result() for f in futures]


def main() -> None:
    nodes, keys, concurrency = (int(a) for a in sys.argv[1:4])
    expiration_s = float(sys.argv[4])
    baseline = tree_pss(os.getpid())
    dhts, start = [], []
    for _ in range(nodes):
        t = time.perf_counter()
        dhts.append(hivemind.DHT(initial_peers=dhts[0].get_visible_maddrs() if dhts else [], start=True))
        start.append(time.perf_counter() - t)
    client = hivemind.DHT(initial_peers=dhts[0].get_visible_maddrs(), client_mode=True, start=True)
    expiration = get_dht_time() + expiration_s
    cpu_before = tree_cpu_seconds(os.getpid())
    store_lat, get_lat, store_ok, get_ok = [], [], 0, 0
    for i in range(keys):
        t = time.perf_counter()
        store_ok += bool(client.store(f"key-{i}", {"i": i}, expiration))
        store_lat.append(time.perf_counter() - t)
    for i in range(keys):
        t = time.perf_counter()
        found = client.get(f"key-{i}")
        get_lat.append(time.perf_counter() - t)
        get_ok += found is not None and found.value == {"i": i}
    t = time.perf_counter()
    windowed(lambda i: client.store(f"burst-{i}", i, expiration, return_future=True), keys, concurrency)
    found = windowed(lambda i: client.get(f"burst-{i}", return_future=True), keys, concurrency)
    seconds = time.perf_counter() - t
    cpu_seconds = tree_cpu_seconds(os.getpid()) - cpu_before
    result = {
        "cpu_seconds": cpu_seconds,
        "start_seconds": start,
        "mb_per_node": (tree_pss(os.getpid(), exclude=client.pid) - baseline) / nodes / 2**20,
        "store_latencies": store_lat,
        "get_latencies": get_lat,
        "store_ok": store_ok,
        "get_ok": get_ok,
        "burst_seconds": seconds,
        "burst_ok": sum(f is not None and f.value == i for i, f in enumerate(found)),
    }
    print("RESULT", json.dumps(result), flush=True)
    for dht in [client, *dhts]:
        dht.shutdown()


if __name__ == "__main__":
    main()
