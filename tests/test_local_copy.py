"""Same-host direct copies: large host frames are read straight from the sender's memory, only after the
reader proved through the OS (a Unix socket's peer credentials, bound to the session's keys) that the sender is
the other end of this very session and another process; only the frames announced for that message are read.
Real processes over UCX on 127.0.0.1, including a hostile one that speaks the protocol by hand."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import json
import logging
import os
import subprocess
import sys
import threading
import time
import weakref

import msgpack
import numpy as np
import pytest
import torch

from hiveengine.errors import ConnectionLostError, ProtocolError
from hiveengine.transport import Peer, PeerID, TransportLimits, local_copy
from hiveengine.transport.wire import PREFIX, Kind
from tests.procs import PeerProcess

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(not local_copy.available(), reason="needs process_vm_readv (Linux)"),
]
MiB = 1 << 20


def _connection(peer: Peer, address: str):
    return peer.runtime.run(peer.connect(address), 30)


def _settled(peer: Peer, conn, remote_ready: bool = False):
    """Wait (bounded) until `conn`'s own proof has ended and, with `remote_ready`, until the remote may read us."""

    async def wait():
        async with asyncio.timeout(20):
            await conn.link.settled.wait()
            if remote_ready:
                await conn.link.remote_ready.wait()

    peer.runtime.run(wait(), 30)
    return conn


def _inbound(peer: Peer, peer_id: PeerID, timeout: float = 20.0):
    """The connection `peer_id` opened to `peer`, once `peer` has adopted it (checked on each loop turn)."""

    async def find():
        deadline = time.monotonic() + timeout
        while (conn := peer.pool.connections.get(peer_id)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{peer_id} never connected")
            await asyncio.sleep(0.005)
        return conn

    return peer.runtime.run(find(), timeout + 5)


def test_large_frames_are_read_directly_both_ways_and_arrive_intact(server):
    proc, address = server
    peer = Peer()
    try:
        gen = torch.Generator().manual_seed(11)
        tensors = [torch.randn(3 * MiB, generator=gen), torch.randint(-100, 100, (600_000,), generator=gen)]
        conn = _settled(peer, _connection(peer, address), remote_ready=True)
        assert conn.local_pid == proc.proc.pid  # we read the server's replies from its memory
        assert conn.remote_reads_us  # the server reads our requests from ours
        out = [torch.empty_like(t) for t in tensors]
        before = conn.link.frames_read, conn.link.bytes_read
        _, reply = peer.call_sync(address, "echo", {}, tensors, timeout=30, out=out)
        for sent, got, buf in zip(tensors, reply, out, strict=True):
            assert torch.equal(got, sent) and got.data_ptr() == buf.data_ptr()
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        assert (conn.link.frames_read, conn.link.bytes_read) == (before[0] + 2, before[1] + nbytes)  # the reply
        assert not conn._local_sends  # every announced frame was acknowledged
    finally:
        peer.shutdown()


def test_a_streamed_tensor_larger_than_one_read_slice_arrives_intact(server):
    _, address = server
    peer = Peer()
    try:
        x = torch.randn(12 * MiB, generator=torch.Generator().manual_seed(12))  # 48 MiB: 3 chunks, threaded reads
        _settled(peer, _connection(peer, address), remote_ready=True)
        reply = peer.runtime.run(peer.send_tensor(address, "sink", x, {"numel": x.numel(), "dtype": "float32"}), 60)
        assert reply == {"sum": float(x.double().sum()), "numel": x.numel()}
    finally:
        peer.shutdown()


def test_turned_off_everything_goes_through_ucx(server):
    _, address = server
    peer = Peer(limits=TransportLimits(local_copy=False))
    try:
        x = torch.randn(MiB, generator=torch.Generator().manual_seed(13))
        _, (got,) = peer.call_sync(address, "echo", {}, [x], timeout=30)
        assert torch.equal(got, x)
        conn = _settled(peer, _connection(peer, address))
        assert conn.local_pid is None and not conn.remote_reads_us and conn.link.frames_read == 0
    finally:
        peer.shutdown()


def test_two_peers_in_one_process_never_read_their_own_memory():
    server, client = Peer(), Peer()

    async def echo(request):
        return {}, request.tensors

    server.register("echo", echo)
    try:
        conn = _settled(client, _connection(client, server.address))
        assert conn.local_pid is None and "never read" in conn.link.refusal
        x = torch.randn(MiB, generator=torch.Generator().manual_seed(16))
        _, (got,) = client.call_sync(server.address, "echo", {}, [x], timeout=30)
        assert torch.equal(got, x) and conn.link.frames_read == 0
    finally:
        client.shutdown()
        server.shutdown()


def test_a_hostile_peer_cannot_make_us_read_our_own_or_a_bystanders_memory(server):
    """The attack of issue 15: a remote peer reflects our own locality offer (or names a bystander's) and then
    announces a frame at an address in our memory, hoping an echo handler sends our bytes back. Both proofs
    fail, nothing is read by address, the request is refused, and we serve on."""
    bystander, _ = server
    bystander_socket = bystander.expect("LOCAL_SOCKET")
    victim = Peer()
    secret = torch.frombuffer(bytearray(b"SECRET-KEY-MATERIAL!" * 205)[:4096], dtype=torch.uint8)

    async def echo(request):
        return {}, request.tensors

    victim.register("echo", echo)
    args = [str(victim.address), victim.runtime.local_copy.name.hex(), bystander_socket, str(secret.data_ptr())]
    hostile = PeerProcess("hostile_transport_peer.py", "local-copy", *args)
    try:
        ids = [PeerID.from_string(x) for x in hostile.expect("IDS").split()]
        reflected, named = (_settled(victim, _inbound(victim, peer_id)) for peer_id in ids)
        assert reflected.local_pid is None and "never read" in reflected.link.refusal  # our own pid
        assert named.local_pid is None and "no such session" in named.link.refusal  # the bystander said no
        hostile.proc.stdin.write("go\n")
        hostile.proc.stdin.flush()
        results = json.loads("[" + hostile.expect("["))
        for result in results:
            assert result.get("error") == "ProtocolError" and "never proved it local" in result["message"], result
        for conn in (reflected, named):
            assert not conn.remote_reads_us and conn.link.frames_read == 0
        other = Peer()  # the victim still serves
        try:
            x = torch.randn(MiB)
            assert torch.equal(other.call_sync(victim.address, "echo", {}, [x], timeout=30)[1][0], x)
        finally:
            other.shutdown()
    finally:
        hostile.close()
        victim.shutdown()


def test_reads_are_refused_from_ourselves_dead_processes_and_unmapped_memory():
    target = torch.empty(8, dtype=torch.uint8)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(30)
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        with pytest.raises(ConnectionLostError, match="gone"):
            asyncio.run(local_copy.read_into(child.pid, [target], [4096]))
        with pytest.raises(ProtocolError, match="cannot read"):
            asyncio.run(local_copy.read_into(live.pid, [target], [8]))  # the first page is never mapped
        with pytest.raises(ProtocolError, match="own memory"):
            asyncio.run(local_copy.read_into(os.getpid(), [target], [target.data_ptr()]))
    finally:
        live.kill()
        live.wait(10)


def test_a_cancelled_large_read_keeps_its_target_alive_until_the_reader_threads_end():
    """Reader threads write through a raw pointer: a read cancelled (a deadline, a shutdown) while its slices are
    queued or running must not let the target be freed under them."""
    nbytes = 2 * local_copy.INLINE_READ_BYTES
    script = f"import ctypes, sys; b = ctypes.create_string_buffer({nbytes}); print(ctypes.addressof(b), flush=True)"
    source = subprocess.Popen(
        [sys.executable, "-c", script + "; sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    hold = threading.Event()
    blockers = [local_copy._reader_pool().submit(hold.wait, 30) for _ in range(local_copy.READ_THREADS)]

    async def cancelled_read() -> weakref.ref:
        target = torch.empty(nbytes, dtype=torch.uint8)
        read = asyncio.ensure_future(local_copy.read_into(source.pid, [target], [int(source.stdout.readline())]))
        await asyncio.sleep(0)  # the read submits its slices, which wait behind the blockers
        read.cancel()
        with pytest.raises(asyncio.CancelledError):
            await read
        return weakref.ref(target)

    try:
        kept = asyncio.run(cancelled_read())
        gc.collect()
        assert kept() is not None  # its slices are still queued
        hold.set()
        concurrent.futures.wait(blockers)
        drained = threading.Barrier(local_copy.READ_THREADS + 1)  # every reader thread free: the slices have ended
        for _ in range(local_copy.READ_THREADS):
            local_copy._reader_pool().submit(drained.wait, 30)
        drained.wait(30)
        gc.collect()
        assert kept() is None
    finally:
        hold.set()
        source.kill()
        source.wait(10)


def test_only_the_announced_frames_are_read():
    body = {"f": [["float32", [4], "cpu"], ["uint8", [3], "cpu"]], "a": [1 << 20, 1 << 21]}
    a, b = torch.empty(4), torch.empty(3, dtype=torch.uint8)
    assert local_copy.announced_regions(body, 0, [a.view(torch.uint8), b]) == [1 << 20, 1 << 21]
    assert local_copy.announced_regions(body, 1, [b]) == [1 << 21]
    with pytest.raises(ProtocolError, match="not the length"):
        local_copy.announced_regions(body, 0, [torch.empty(32, dtype=torch.uint8)])  # longer than announced
    with pytest.raises(ProtocolError, match="more frames"):
        local_copy.announced_regions(body, 1, [b, b])
    with pytest.raises(ProtocolError, match="one address"):
        local_copy.announced_regions({**body, "a": [1 << 20]}, 0, [b])
    with pytest.raises(ProtocolError, match="impossible"):
        local_copy.announced_regions({**body, "a": [1, (1 << 64) - 2]}, 1, [b])
    with pytest.raises(ProtocolError, match="impossible"):
        local_copy.announced_regions({**body, "a": [0, 0]}, 0, [a.view(torch.uint8)])


def test_frames_announced_by_address_without_a_proof_are_refused():
    """A peer that never proved anything cannot make us read memory by address."""
    server, client = Peer(limits=TransportLimits(local_copy=False)), Peer()
    seen = []

    async def record(request):
        seen.append(request.tensors)
        return {}

    server.register("record", record)
    try:
        conn = _connection(client, server.address)
        conn.link.remote_reads_us = True  # claim, without any proof, that the server may read us
        with pytest.raises(ProtocolError, match="never proved it local"):
            client.call_sync(server.address, "record", {}, [torch.randn(MiB)], timeout=30)
        assert seen == []
    finally:
        client.shutdown()
        server.shutdown()


def test_malformed_direct_copy_messages_are_ignored_and_the_connection_serves_on(caplog):
    """Junk probes, proofs and acknowledgements are dropped quietly: nothing fails on the receiving loop."""
    server, peer = Peer(), Peer()

    async def echo(request):
        return {}, request.tensors

    server.register("echo", echo)
    junk = [
        {"k": Kind.FRAMES_READ, "i": 0, "s": [1, 2]},
        {"k": Kind.FRAMES_READ, "i": 0, "s": 12345},
        {"k": Kind.LOCAL_OFFER, "i": 0, "u": b"short"},
        {"k": Kind.LOCAL_OFFER, "i": 0, "u": "\x00hiveengine-local-text"},
        {"k": Kind.LOCAL_OFFER, "i": 0, "u": local_copy.NAME_PREFIX + b"nobody-listens-here"},
        {"k": Kind.LOCAL_READY, "i": 0},
    ]

    async def send_junk():
        conn = await peer.connect(server.address)
        for body in junk:
            payload = msgpack.packb(body)
            buf = np.frombuffer(PREFIX.pack(len(payload), 0) + payload, dtype=np.uint8)
            await conn.send_message(buf.tobytes())
        return conn

    try:
        with caplog.at_level(logging.ERROR):
            conn = peer.runtime.run(send_junk(), 30)
            x = torch.randn(MiB, generator=torch.Generator().manual_seed(15))
            _, (got,) = peer.call_sync(server.address, "echo", {}, [x], timeout=30)
        assert torch.equal(got, x)
        assert _connection(peer, server.address) is conn and not conn.closed
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    finally:
        peer.shutdown()
        server.shutdown()


def test_a_proof_connection_open_at_shutdown_ends_quietly():
    """A locality proof still waiting for its binding when the process shuts down (its task is cancelled) must not
    make asyncio report "Exception in callback ... CancelledError" on the way out."""
    if not local_copy.available():
        pytest.skip("no same-host direct copy on this machine")
    reported = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: reported.append(context))
        service = local_copy.Service()
        await service.start()
        # Another process connects and never sends its binding (we never prove ourselves to our own process).
        client = subprocess.Popen([sys.executable, "-c", HALF_OPEN_PROOF, service.name.hex()], stdin=subprocess.PIPE)
        try:
            async with asyncio.timeout(30):
                while service._pending == 0:
                    await asyncio.sleep(0.001)
                for task in asyncio.all_tasks() - {asyncio.current_task()}:
                    task.cancel()  # what the runtime's shutdown does to the tasks still running
                while service._pending:
                    await asyncio.sleep(0.001)
        finally:
            client.stdin.close()
            client.wait(timeout=30)
            service.close()

    asyncio.run(scenario())
    assert reported == []


HALF_OPEN_PROOF = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(bytes.fromhex(sys.argv[1]))
sys.stdin.read()
"""
