"""Same-host direct copies: large host frames are read straight from the sender's memory, only after the
reader proved it can read the sender (real processes over UCX on 127.0.0.1)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import msgpack
import numpy as np
import pytest
import torch

from hiveengine.errors import ConnectionLostError, ProtocolError
from hiveengine.transport import Peer, TransportLimits, local_copy
from hiveengine.transport import connection as connection_module
from hiveengine.transport.connection import CONTROL_SEQ, _tag
from hiveengine.transport.wire import PREFIX, Kind

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not local_copy.available(), reason="needs process_vm_readv (Linux)"),
]
MiB = 1 << 20


def _connection(peer: Peer, address: str):
    return peer.runtime.run(peer.connect(address), 30)


def test_large_frames_are_read_directly_both_ways_and_arrive_intact(server):
    proc, address = server
    peer = Peer()
    try:
        gen = torch.Generator().manual_seed(11)
        tensors = [torch.randn(3 * MiB, generator=gen), torch.randint(-100, 100, (600_000,), generator=gen)]
        for _ in range(2):  # the proofs are exchanged by the time the second reply is in
            peer.call_sync(address, "echo", {}, [torch.ones(1)], timeout=30)
        conn = _connection(peer, address)
        assert conn.local_pid == proc.proc.pid  # we read the server's replies from its memory
        assert conn.remote_reads_us  # the server reads our requests from ours
        out = [torch.empty_like(t) for t in tensors]
        _, reply = peer.call_sync(address, "echo", {}, tensors, timeout=30, out=out)
        for sent, got, buf in zip(tensors, reply, out, strict=True):
            assert torch.equal(got, sent) and got.data_ptr() == buf.data_ptr()
        assert not conn._local_sends  # every announced frame was acknowledged
    finally:
        peer.shutdown()


def test_a_streamed_tensor_larger_than_one_read_slice_arrives_intact(server):
    _, address = server
    peer = Peer()
    try:
        x = torch.randn(12 * MiB, generator=torch.Generator().manual_seed(12))  # 48 MiB: 3 chunks, threaded reads
        for _ in range(2):  # the first may go through UCX while the proofs are exchanged
            reply = peer.runtime.run(peer.send_tensor(address, "sink", x, {"numel": x.numel(), "dtype": "float32"}), 60)
            assert reply == {"sum": float(x.double().sum()), "numel": x.numel()}
        assert _connection(peer, address).remote_reads_us
    finally:
        peer.shutdown()


def test_turned_off_everything_goes_through_ucx(server):
    _, address = server
    peer = Peer(limits=TransportLimits(local_copy=False))
    try:
        x = torch.randn(MiB, generator=torch.Generator().manual_seed(13))
        _, (got,) = peer.call_sync(address, "echo", {}, [x], timeout=30)
        assert torch.equal(got, x)
        conn = _connection(peer, address)
        assert conn.local_pid is None and not conn.remote_reads_us
    finally:
        peer.shutdown()


def test_a_proof_naming_another_process_is_refused(server, monkeypatch):
    """A peer that answers the probe with some other process's pid never gets its frames read by address."""
    _, address = server
    bystander = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    monkeypatch.setattr(connection_module.os, "getpid", lambda: bystander.pid)
    peer = Peer()
    try:
        x = torch.randn(MiB, generator=torch.Generator().manual_seed(14))
        for _ in range(2):  # the second call goes after the server has checked (and refused) our proof
            _, (got,) = peer.call_sync(address, "echo", {}, [x], timeout=30)
            assert torch.equal(got, x)
        assert not _connection(peer, address).remote_reads_us
    finally:
        peer.shutdown()
        bystander.kill()
        bystander.wait(10)


def test_reading_a_dead_process_is_a_lost_connection_and_a_bad_address_a_protocol_error():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(30)
    with pytest.raises(ConnectionLostError, match="gone"):
        local_copy.read_bytes(child.pid, 4096, 8)
    with pytest.raises(ProtocolError, match="cannot read"):
        local_copy.read_bytes(os.getpid(), 8, 8)  # the first page is never mapped


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
        conn.remote_reads_us = True  # claim, without any proof, that the server may read us
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
        {"k": Kind.LOCAL_PROBE, "i": 0, "n": b"short"},
        {"k": Kind.LOCAL_PROOF, "i": 0, "p": "me", "o": -1},
        {"k": Kind.LOCAL_PROOF, "i": 0, "p": 1 << 40, "o": (1 << 64) - 1},
        {"k": Kind.LOCAL_PROOF, "i": 0, "p": 1, "o": 0},
        {"k": Kind.LOCAL_READY, "i": 0},
    ]

    async def send_junk():
        conn = await peer.connect(server.address)
        for body in junk:
            payload = msgpack.packb(body)
            buf = np.frombuffer(PREFIX.pack(len(payload), 0) + payload, dtype=np.uint8)
            await conn.reactor.tag_send(conn.endpoint, buf, _tag(conn.send_base, CONTROL_SEQ))
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
