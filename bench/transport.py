"""Transport benchmark: hiveengine's UCX peers vs plain asyncio TCP sockets between two processes.

Measures the 4 KiB round trip, throughput from 1 MiB to 256 MiB, and the CPU an idle connected peer
burns. Each configuration runs a server and a client in separate processes (UCX reads its settings
once per process). Prints a table and writes bench/results/local/transport.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import format_table, read_prefixed, write_results

MiB = 1 << 20
SIZES = [1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB]
LATENCY_BYTES = 4096
LATENCY_ROUNDS = 2000
WARMUP_PINGS = 200
BYTES_PER_SIZE = 1024 * MiB  # repeat each size until about this much was sent (at least 3 times)
IDLE_SECONDS = 3.0
LINE_TIMEOUT = 120.0
CONFIGS = {
    # ucx-local: hiveengine's default on one host (the peers prove to each other, through the OS, that they share
    # the host: large host frames are read directly by the receiver, the rest is authenticated, not encrypted);
    # ucx-shm and ucx-tcp: everything through UCX, over its shared memory or TCP transports, as between hosts:
    # encrypted (the default), or "-plain": HIVEENGINE_ENCRYPT=0, authenticated but readable.
    "ucx-local": {"role": "ucx", "env": {"UCX_TLS": "sm,tcp,self"}},
    "ucx-shm": {"role": "ucx", "env": {"UCX_TLS": "sm,tcp,self", "HIVEENGINE_LOCAL_COPY": "0"}},
    "ucx-shm-plain": {
        "role": "ucx",
        "env": {"UCX_TLS": "sm,tcp,self", "HIVEENGINE_LOCAL_COPY": "0", "HIVEENGINE_ENCRYPT": "0"},
    },
    "ucx-tcp": {"role": "ucx", "env": {"UCX_TLS": "tcp,self", "HIVEENGINE_LOCAL_COPY": "0"}},
    "ucx-tcp-plain": {
        "role": "ucx",
        "env": {"UCX_TLS": "tcp,self", "HIVEENGINE_LOCAL_COPY": "0", "HIVEENGINE_ENCRYPT": "0"},
    },
    "tcp-wire": {"role": "ucx", "env": {"HIVEENGINE_LINK": "tcp", "HIVEENGINE_LOCAL_COPY": "0"}},
    "tcp-wire-plain": {
        "role": "ucx",
        "env": {"HIVEENGINE_LINK": "tcp", "HIVEENGINE_LOCAL_COPY": "0", "HIVEENGINE_ENCRYPT": "0"},
    },
    "asyncio-streams": {"role": "streams", "env": {}},
    "asyncio-sockets": {"role": "tcp", "env": {}},
}
BASELINE = "asyncio-streams"  # the baseline the transport issue names; raw sockets are a stricter one
LEN = struct.Struct("<Q")


def repeats(size: int) -> int:
    return max(3, BYTES_PER_SIZE // size)


def idle_cpu(pid: int) -> tuple[float, float]:
    """Percent of one core used by `pid` and by this process while both sit idle for IDLE_SECONDS."""
    other, me = psutil.Process(pid), psutil.Process()
    t0_other, t0_me = sum(other.cpu_times()[:2]), sum(me.cpu_times()[:2])
    time.sleep(IDLE_SECONDS)
    return (
        100 * (sum(other.cpu_times()[:2]) - t0_other) / IDLE_SECONDS,
        100 * (sum(me.cpu_times()[:2]) - t0_me) / IDLE_SECONDS,
    )


def _with_idle_cpu(result: dict, server_pid: int) -> dict:
    """Add the CPU both sides burn while connected and idle (measured after the transfers)."""
    result["idle_cpu_server"], result["idle_cpu_client"] = idle_cpu(server_pid)
    return result


async def measure_transport(ping_once, transfer_once) -> dict:
    """Median 4 KiB round trip and per-size throughput, each after a warm-up, for one transport:
    `ping_once()` does one round trip, `transfer_once(payload)` sends one message and waits for its ack."""

    async def timed(fn, rounds: int, *args) -> list[float]:
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            await fn(*args)
            times.append(time.perf_counter() - start)
        return times

    await timed(ping_once, WARMUP_PINGS)
    result = {"rtt_us": 1e6 * statistics.median(await timed(ping_once, LATENCY_ROUNDS)), "throughput": {}}
    for size in SIZES:
        payload = torch.randint(0, 255, (size,), dtype=torch.uint8)
        await transfer_once(payload)
        result["throughput"][size] = size / statistics.median(await timed(transfer_once, repeats(size), payload)) / 1e9
    return result


# ---------------------------------------------------------------- hiveengine UCX


def ucx_server() -> None:
    from hiveengine.transport import Peer

    peer = Peer()
    landing = torch.empty(max(SIZES), dtype=torch.uint8)
    landing.fill_(0)  # touch the pages once, as a real receiver's reused buffer would be

    async def echo(request):
        return {}, request.tensors

    async def sink(request):
        async for chunk in request.chunks:
            offset = int(chunk.header["offset"])
            await chunk.read(out=landing[offset : offset + chunk.spec.numel])
        return {}

    peer.register("echo", echo)
    peer.register_stream("sink", sink)
    print("ADDRESS", peer.address, flush=True)
    sys.stdin.read()
    peer.shutdown()


def ucx_client(address: str, server_pid: int) -> dict:
    from hiveengine.transport import Peer

    peer = Peer()
    small = torch.randint(0, 255, (LATENCY_BYTES,), dtype=torch.uint8)

    async def ping_once() -> None:
        await peer.call(address, "echo", {}, [small])

    async def transfer_once(payload: torch.Tensor) -> None:
        await peer.send_tensor(address, "sink", payload, {"n": payload.numel()}, timeout=120)

    result = _with_idle_cpu(peer.runtime.run(measure_transport(ping_once, transfer_once), 3600), server_pid)
    peer.shutdown()
    return result


# ---------------------------------------------------------------- asyncio TCP baseline


async def _recv_exact(loop, sock, view: memoryview) -> None:
    while view:
        n = await loop.sock_recv_into(sock, view)
        if n == 0:
            raise ConnectionError("peer closed")
        view = view[n:]


def tcp_server() -> None:
    landing = bytearray(max(SIZES))
    view = memoryview(landing)

    async def serve(sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        head = bytearray(LEN.size)
        try:
            while True:
                await _recv_exact(loop, sock, memoryview(head))
                (size,) = LEN.unpack(head)
                echo = size & 1
                size >>= 1
                await _recv_exact(loop, sock, view[:size])
                await loop.sock_sendall(sock, view[:size] if echo else b"\x01")
        except ConnectionError:
            sock.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        print("ADDRESS", listener.getsockname()[1], flush=True)
        connections = set()
        while True:
            sock, _ = await loop.sock_accept(listener)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(serve(sock))
            connections.add(task)
            task.add_done_callback(connections.discard)

    asyncio.run(main())


def tcp_client(port: str, server_pid: int) -> dict:
    async def main() -> dict:
        loop = asyncio.get_running_loop()
        sock = socket.create_connection(("127.0.0.1", int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        small = os.urandom(LATENCY_BYTES)
        back = bytearray(LATENCY_BYTES)
        ack = bytearray(1)

        async def ping_once() -> None:
            await loop.sock_sendall(sock, LEN.pack(LATENCY_BYTES << 1 | 1) + small)
            await _recv_exact(loop, sock, memoryview(back))

        async def transfer_once(payload: torch.Tensor) -> None:
            await loop.sock_sendall(sock, LEN.pack(payload.numel() << 1))
            await loop.sock_sendall(sock, memoryview(payload.numpy()))
            await _recv_exact(loop, sock, memoryview(ack))

        result = await measure_transport(ping_once, transfer_once)
        sock.close()
        return result

    return _with_idle_cpu(asyncio.run(main()), server_pid)


def streams_server() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (size,) = LEN.unpack(await reader.readexactly(LEN.size))
                echo = size & 1
                data = await reader.readexactly(size >> 1)
                writer.write(data if echo else b"\x01")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        print("ADDRESS", server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(main())


def streams_client(port: str, server_pid: int) -> dict:
    async def main() -> dict:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(port))
        small = os.urandom(LATENCY_BYTES)

        async def ping_once() -> None:
            writer.write(LEN.pack(LATENCY_BYTES << 1 | 1) + small)
            await writer.drain()
            await reader.readexactly(LATENCY_BYTES)

        async def transfer_once(payload: torch.Tensor) -> None:
            writer.write(LEN.pack(payload.numel() << 1))
            writer.write(memoryview(payload.numpy()))
            await writer.drain()
            await reader.readexactly(1)

        result = await measure_transport(ping_once, transfer_once)
        writer.close()
        return result

    return _with_idle_cpu(asyncio.run(main()), server_pid)


ROLES = {
    "ucx-server": ucx_server,
    "ucx-client": ucx_client,
    "tcp-server": tcp_server,
    "tcp-client": tcp_client,
    "streams-server": streams_server,
    "streams-client": streams_client,
}


# ---------------------------------------------------------------- orchestration


def _spawn(role: str, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", role, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def measure(config: str) -> dict:
    """Run one configuration's server and client; the result includes the 1-minute load average before
    and after (the machine may be shared: a ratio is only meaningful between rows taken at similar load)."""
    spec = CONFIGS[config]
    load_before = os.getloadavg()[0]
    server = _spawn(f"{spec['role']}-server", spec["env"])
    try:
        address = read_prefixed(server, "ADDRESS", LINE_TIMEOUT)
        client = _spawn(f"{spec['role']}-client", spec["env"], "--address", address, "--server-pid", str(server.pid))
        try:
            result = json.loads(read_prefixed(client, "RESULT", LINE_TIMEOUT))
        finally:
            client.kill()
    finally:
        server.kill()
    result["load_before"], result["load_after"] = load_before, os.getloadavg()[0]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--role", choices=list(ROLES))
    parser.add_argument("--address")
    parser.add_argument("--server-pid", type=int)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args(argv)
    if args.role and args.role.endswith("-server"):
        ROLES[args.role]()
        return 0
    if args.role:
        print("RESULT", json.dumps(ROLES[args.role](args.address, args.server_pid)), flush=True)
        return 0

    results = {}
    for config in args.configs:
        print(f"measuring {config} ...", file=sys.stderr, flush=True)
        results[config] = measure(config)
    baseline = results.get(BASELINE)
    rows = []
    for config, r in results.items():
        row = {
            "transport": config,
            "rtt 4KiB (us)": r["rtt_us"],
            "idle cpu server %": r["idle_cpu_server"],
            "idle cpu client %": r["idle_cpu_client"],
            "load": f"{r['load_before']:.1f}-{r['load_after']:.1f}",
        }
        for size, gbs in r["throughput"].items():
            label = f"{int(size) // MiB}MiB GB/s"
            row[label] = gbs
            if baseline and config.startswith("ucx"):
                r.setdefault("ratio_vs_asyncio", {})[size] = gbs / baseline["throughput"][size]
        if baseline and config.startswith("ucx"):
            r["rtt_ratio_vs_asyncio"] = r["rtt_us"] / baseline["rtt_us"]
            row["rtt / asyncio"] = r["rtt_ratio_vs_asyncio"]
            row["min GB/s ratio"] = min(r["ratio_vs_asyncio"].values())
        rows.append(row)
    columns = ["transport", "rtt 4KiB (us)", "rtt / asyncio"]
    columns += [f"{s // MiB}MiB GB/s" for s in SIZES] + ["min GB/s ratio", "idle cpu server %", "idle cpu client %"]
    columns.append("load")
    print(format_table(rows, columns))
    print(f"ratios are against {BASELINE}")
    path = write_results("transport", {"sizes": SIZES, "baseline": BASELINE, "results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
