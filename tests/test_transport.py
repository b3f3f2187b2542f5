"""The UCX transport between real processes on 127.0.0.1: round trips, limits, errors, faults."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time

import msgpack
import numpy as np
import psutil
import pytest
import torch

from hiveengine.errors import (
    ConnectionLostError,
    HandshakeError,
    PeerUnreachableError,
    ProtocolError,
    RemoteHandlerError,
    RPCTimeoutError,
    TransportError,
    UnknownMethodError,
)
from hiveengine.transport import Identity, Peer, PeerAddress, TransportLimits
from hiveengine.transport.limits import LOCAL_COPY_ENV
from hiveengine.transport.pool import DIAL_ROUND_TRIPS, LANE_ROUND_TRIPS, REPLY_ROUND_TRIPS
from hiveengine.transport.wire import DTYPES, PREFIX, Kind
from tests.procs import PeerProcess, start_server

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


@pytest.fixture(scope="module")
def client():
    peer = Peer()
    yield peer
    peer.shutdown()


def run(peer: Peer, coro, timeout: float = 30):
    return peer.runtime.run(coro, timeout)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=torch.complex128 if dtype.is_complex else None).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=gen, dtype=torch.int64).to(dtype)


def test_round_trip_of_every_dtype_and_shape(client, server):
    _, address = server
    gen = torch.Generator().manual_seed(1)
    shapes = [(), (0,), (1,), (7,), (3, 5), (2, 0, 3), (4, 1, 3, 2)]
    tensors = [random_tensor(dtype, shape, gen) for dtype in DTYPES.values() for shape in shapes]
    header = {"nested": {"list": [1, 2.5, "x"], "bytes": b"\x00\xff"}}
    reply_header, reply = client.call_sync(address, "echo", header, tensors, timeout=30)
    assert reply_header == header
    assert len(reply) == len(tensors)
    for sent, got in zip(tensors, reply, strict=True):
        assert got.dtype == sent.dtype and got.shape == sent.shape
        assert torch.equal(got, sent)
        assert got.numel() == 0 or got.data_ptr() % got.element_size() == 0  # inline tensors are aligned views


IDLE_WINDOW = 1.5  # seconds both peers sit idle while their CPU time is read
IDLE_CPU_FRACTION = 0.2  # a peer still polling after activity would use about all of one core


def test_peers_stop_polling_once_idle(client, server):
    proc, address = server
    for _ in range(20):  # activity starts the adaptive polling window on both sides
        client.call_sync(address, "echo", {}, [torch.zeros(4)], timeout=30)
    remote = psutil.Process(proc.proc.pid)
    start, remote_start = time.process_time(), sum(remote.cpu_times()[:2])
    time.sleep(IDLE_WINDOW)  # the measurement window itself, not a wait for anything
    assert time.process_time() - start < IDLE_CPU_FRACTION * IDLE_WINDOW
    assert sum(remote.cpu_times()[:2]) - remote_start < IDLE_CPU_FRACTION * IDLE_WINDOW


def test_non_contiguous_tensors_arrive_intact(client, server):
    _, address = server
    base = torch.randn(64, 48, generator=torch.Generator().manual_seed(2))
    views = [base.t(), base[::3, 5:], base.to(torch.bfloat16)[:, ::2]]
    assert not any(v.is_contiguous() for v in views)
    _, reply = client.call_sync(address, "echo", {}, views, timeout=30)
    for sent, got in zip(views, reply, strict=True):
        assert torch.equal(got, sent)


def test_large_header_is_compressed_and_round_trips(client, server):
    _, address = server
    header = {"items": [f"key-{i}" for i in range(3000)]}
    reply_header, _ = client.call_sync(address, "echo", header, timeout=30)
    assert reply_header == header


def test_hundred_concurrent_calls(client, server):
    _, address = server

    async def many():
        return await asyncio.gather(
            *[client.call(address, "echo", {"i": i}, [torch.full((i + 1,), float(i))]) for i in range(100)]
        )

    results = run(client, many())
    for i, (header, (t,)) in enumerate(results):
        assert header == {"i": i}
        assert t.shape == (i + 1,) and bool((t == i).all())


def test_streamed_256mb_transfer_lands_in_place(client, server):
    _, address = server
    x = torch.randn(64 * MiB, generator=torch.Generator().manual_seed(3))  # 256 MiB of float32
    reply = run(client, client.send_tensor(address, "sink", x, {"numel": x.numel(), "dtype": "float32"}), 120)
    assert reply == {"sum": float(x.double().sum()), "numel": x.numel()}


def test_small_streamed_chunks_travel_inline_and_land_in_place(server):
    """Chunks under the inline limit ride inside their control message, the last one carrying the end."""
    _, address = server
    peer = Peer(limits=TransportLimits(stream_chunk_bytes=1024))
    try:
        for numel in [100, 1000]:  # one inline chunk; several, the last one shorter
            x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
            reply = run(peer, peer.send_tensor(address, "sink", x, {"numel": numel, "dtype": "float32"}))
            assert reply == {"sum": float(x.double().sum()), "numel": numel}
    finally:
        peer.shutdown()


@pytest.mark.parametrize("numel", [100, 1 << 20])  # inline and framed replies
def test_reply_lands_in_caller_buffers(client, server, numel):
    _, address = server
    x = torch.randn(numel, generator=torch.Generator().manual_seed(4))
    out = torch.empty(numel)
    _, (got,) = client.call_sync(address, "echo", {}, [x], timeout=30, out=[out])
    assert got.data_ptr() == out.data_ptr() and torch.equal(out, x)
    with pytest.raises(ProtocolError, match="do not fit the receive buffer"):
        client.call_sync(address, "echo", {}, [x], timeout=30, out=[torch.empty(numel + 1)])
    assert torch.equal(client.call_sync(address, "echo", {}, [x], timeout=30)[1][0], x)  # connection still fine


def test_handler_allocator_provides_receive_buffers():
    server, caller = Peer(), Peer()
    landing = torch.empty(1 << 20)
    seen, senders = [], []

    async def record(request):
        seen.append(request.tensors[0].data_ptr())
        return {"sum": float(request.tensors[0].sum())}

    def allocate(header, specs, sender):
        senders.append(sender)  # called before the frames arrive, with who sends them
        return [landing] if header.get("mine") else None

    server.register("record", record, allocate=allocate)
    try:
        x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(5))
        assert caller.call_sync(server.address, "record", {"mine": True}, [x], timeout=30)[0] == {"sum": float(x.sum())}
        assert seen[-1] == landing.data_ptr() and torch.equal(landing, x)
        assert senders == [caller.peer_id]
        caller.call_sync(server.address, "record", {}, [x], timeout=30)
        assert seen[-1] != landing.data_ptr()
        with pytest.raises(ProtocolError, match="do not fit"):
            caller.call_sync(server.address, "record", {"mine": True}, [x[:10].clone()], timeout=30)
    finally:
        caller.shutdown()
        server.shutdown()


def test_round_trips_and_link_times_are_measured_per_link_and_estimated_for_peers_without_one(server):
    _, address = server
    server_id = PeerAddress.parse(address).peer_id
    caller = Peer()
    try:
        assert caller.round_trip(server_id) is None  # no link has measured anything yet
        connect = caller.limits.connect_timeout
        assert caller.link_time(server_id) == connect  # so a call's link allowance is a whole dial's deadline
        caller.call_sync(address, "echo", {}, timeout=30)
        measured = caller.round_trip(server_id)
        assert measured == caller.connection_to(server_id).rtt and 0 < measured < 1.0
        assert caller.link_time(server_id) == min(connect, REPLY_ROUND_TRIPS * measured)  # over the open link
        stranger = Identity.generate().peer_id
        assert caller.round_trip(stranger) == measured  # no link to it: what our links measure
        assert caller.link_time(stranger) == min(connect, (DIAL_ROUND_TRIPS + REPLY_ROUND_TRIPS) * measured)
        # A transfer adds each direction's bytes; a wait that began before the link opened also counts its dial and
        # the round trips UCX takes to wire up its data lanes after it.
        opened = caller.connection_to(server_id).opened
        sent, received = random.randrange(1, 1 << 30), random.randrange(1 << 30)
        moving = caller.limits.transfer_time(sent, measured) + caller.limits.transfer_time(received, measured)
        settled = caller.transfer_time(server_id, sent, received, since=opened)
        assert settled == caller.link_time(server_id) + moving
        fresh = caller.transfer_time(server_id, sent, received, since=opened - 1)
        lanes = LANE_ROUND_TRIPS * measured
        assert fresh == pytest.approx(caller.link_time(server_id, since=opened - 1) + moving + lanes)
        assert caller.link_time(server_id, since=opened - 1) == min(
            connect, (DIAL_ROUND_TRIPS + REPLY_ROUND_TRIPS) * measured
        )
        caller.disconnect(server_id)
        assert caller.connection_to(server_id) is None
        assert caller.round_trip(server_id) == measured  # no link open at all: what the last one measured
    finally:
        caller.shutdown()


def test_unknown_method_is_a_typed_error(client, server):
    _, address = server
    with pytest.raises(UnknownMethodError, match="nope"):
        client.call_sync(address, "nope", {}, [torch.ones(3)], timeout=10)
    with pytest.raises(UnknownMethodError):
        run(client, client.send_tensor(address, "no-such-stream", torch.ones(10)))
    assert client.call_sync(address, "echo", {"still": "serving"}, timeout=10)[0] == {"still": "serving"}


def test_handler_exception_is_reported(client, server):
    _, address = server
    with pytest.raises(RemoteHandlerError, match="ValueError: boom"):
        client.call_sync(address, "fail", timeout=10)


def test_wrong_dtype_or_shape_is_a_typed_error(client, server):
    _, address = server
    good = [torch.eye(4), torch.arange(16.0).reshape(4, 4)]
    assert torch.equal(client.call_sync(address, "matmul", {}, good, timeout=10)[1][0], good[0] @ good[1])
    with pytest.raises(ProtocolError, match=r"must be torch.float32"):
        client.call_sync(address, "matmul", {}, [good[0].double(), good[1]], timeout=10)
    with pytest.raises(ProtocolError, match=r"must have shape \(4, 4\)"):
        client.call_sync(address, "matmul", {}, [good[0], torch.ones(3, 4)], timeout=10)


def test_call_deadline(client, server):
    _, address = server
    with pytest.raises(RPCTimeoutError):
        client.call_sync(address, "sleep", {"seconds": 30}, timeout=0.5)
    assert client.call_sync(address, "sleep", {"seconds": 0}, timeout=10)[0] == {"slept": 0}


def test_oversized_frame_is_refused_without_allocating():
    proc, address = start_server(env={"TEST_MAX_FRAME_BYTES": str(MiB)})
    peer = Peer()
    try:
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            peer.call_sync(address, "echo", {}, [torch.ones(MiB // 4 + 1)], timeout=20)
        # The refused frame was drained, and the same connection keeps working.
        _, (t,) = peer.call_sync(address, "echo", {}, [torch.ones(1000)], timeout=20)
        assert t.numel() == 1000
    finally:
        peer.shutdown()
        proc.close()


def test_malformed_messages_get_errors_and_the_server_keeps_serving(client, server):
    _, address = server
    address = PeerAddress.parse(address)

    async def send_raw(make_payload):
        conn = await client.connect(address)
        request_id = conn.new_request_id()
        reply = conn.expect_reply(request_id)
        payload = make_payload(request_id)
        buf = np.frombuffer(PREFIX.pack(len(payload), 0) + payload, dtype=np.uint8)
        await conn.send_message(buf.tobytes())
        return await asyncio.wait_for(reply, 10)

    def bad_dtype(request_id: int) -> bytes:
        frames = [["complex999", [4], "cpu"]]
        return msgpack.packb({"k": Kind.REQUEST, "i": request_id, "m": "echo", "h": {}, "f": frames, "s": 7})

    with pytest.raises(ProtocolError, match="unsupported dtype"):
        run(client, send_raw(bad_dtype))
    assert client.call_sync(address, "echo", {"after": "bad dtype"}, timeout=10)[0] == {"after": "bad dtype"}
    with pytest.raises(ProtocolError, match="undecodable"):
        run(client, send_raw(lambda _: b"\xc1 this is not msgpack"))
    # The garbled connection was dropped; a fresh one is made and served.
    assert client.call_sync(address, "echo", {"after": "garbage"}, timeout=10)[0] == {"after": "garbage"}


def test_peer_killed_mid_transfer_fails_the_call_promptly(client):
    proc, address = start_server()
    try:
        x = torch.randn(16 * MiB)
        header = {"numel": x.numel(), "dtype": "float32", "chunk_delay": 0.2}
        future = client.runtime.submit(client.send_tensor(address, "sink", x, header, timeout=50))
        proc.expect("FIRST_CHUNK")
        proc.kill()
        with pytest.raises(ConnectionLostError):
            future.result(30)
        with pytest.raises(PeerUnreachableError):
            client.call_sync(address, "echo", timeout=10)
    finally:
        proc.kill()


@pytest.mark.timeout(120)
def test_a_peer_killed_mid_transfer_never_freezes_our_transport_loop(client):
    """Killed while a 64 MiB echo is in flight, a peer could leave UCX unable to arm its worker for a minute or more;
    the reactor then progressed in a loop of its own, and every call, deadline and timer of this process froze with it
    (an Optimizer's DHT reads timed out after 30 s). Kills land at points spread over the transfer, both ways."""
    x = torch.ones(64 * MiB // 4)
    for delay in (0.02, 0.05, 0.08, 0.11, 0.15, 0.2):
        proc, address = start_server()
        try:
            client.call_sync(address, "echo", timeout=10)
            future = client.runtime.submit(client.call(address, "echo", {}, [x], timeout=20))
            time.sleep(delay)  # not synchronization: where the kill lands, and any point will do
            proc.kill()
            for _ in range(10):  # over ~1 s: the loop must turn within a few seconds each time
                assert run(client, asyncio.sleep(0.1), timeout=5) is None, delay
            future.exception(30)  # answered, or failed (ConnectionLostError): either way, done in time
        finally:
            proc.kill()


def test_no_endpoint_outlives_its_connection(client):
    """The reactor holds each UCX endpoint until its connection closes it on the loop thread (Reactor.hold), so
    none is left to the garbage collector unclosed: once a server has exited, or was killed, and a call found it
    gone, the endpoints of that connection and of the failed dial are closed and let go."""
    reactor = client.runtime.reactor
    for end in ("exit", "kill"):
        before = reactor.held
        proc, address = start_server()
        try:
            client.call_sync(address, "echo", timeout=10)
            assert reactor.held == before + 1
            proc.close() if end == "exit" else proc.kill()
            with pytest.raises(TransportError):
                client.call_sync(address, "echo", timeout=10)
            assert reactor.held == before, end
        finally:
            proc.kill()


def test_connecting_to_a_closed_port_fails_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    peer = Peer(limits=TransportLimits(connect_timeout=1.0))
    try:
        address = PeerAddress("127.0.0.1", port, Identity.generate().peer_id)
        with pytest.raises(PeerUnreachableError, match="cannot connect"):
            peer.call_sync(address, "echo", timeout=20)
    finally:
        peer.shutdown()


def test_wrong_peer_id_at_an_address_is_rejected(client, server):
    _, address = server
    impostor = PeerAddress.parse(address)
    wanted = PeerAddress(impostor.host, impostor.port, Identity.generate().peer_id)
    with pytest.raises((HandshakeError, PeerUnreachableError)):
        client.call_sync(wanted, "echo", timeout=10)


class _ForgedIdentity:
    """Claims someone else's public key but cannot sign for it."""

    def __init__(self, victim: Identity):
        self.public_key, self.peer_id = victim.public_key, victim.peer_id

    def sign(self, message: bytes) -> bytes:
        return bytes(64)


def test_forged_handshake_is_rejected():
    victim = Peer()
    target = Peer()
    calls = []

    async def record(request):
        calls.append(request.sender)
        return {}

    target.register("record", record)
    forger = Peer()
    try:
        forger.identity = _ForgedIdentity(victim.identity)
        with pytest.raises(HandshakeError, match="refused our handshake"):
            forger.call_sync(target.address, "record", timeout=5)
        assert calls == []
        victim.call_sync(target.address, "record", timeout=10)
        assert calls == [victim.peer_id]
    finally:
        for p in (forger, victim, target):
            p.shutdown()


def test_two_processes_over_tcp_only():
    env = {"UCX_TLS": "tcp", LOCAL_COPY_ENV: "0"}
    proc, address = start_server(env=env)
    try:
        client_proc = PeerProcess("transport_peer.py", "client", address, env=env)
        result = json.loads("{" + client_proc.expect("{"))
        client_proc.close()
        rtts = result.pop("rtt"), result.pop("their_rtt")
        assert result == {"link": "ucx", "echo_equal": True, "header": {"k": "v"}, "sum_ok": True}
        assert all(0 < rtt < 1.0 for rtt in rtts), rtts  # each side measured its link's round trip
    finally:
        proc.close()


def test_peers_whose_ucx_tcp_segments_do_not_fit_refuse_each_other_with_an_error_that_names_the_settings():
    """A segment larger than the receiver takes fails a UCX TCP link mid-message; the handshake says so up front."""
    tcp = {"UCX_TLS": "tcp", LOCAL_COPY_ENV: "0"}
    small = {**tcp, "UCX_TCP_TX_SEG_SIZE": "8k", "UCX_TCP_RX_SEG_SIZE": "8k"}
    proc, address = start_server(env=small)
    try:
        dialer = PeerProcess("transport_peer.py", "dial", address, env=tcp)  # hiveengine's default: 256 KiB segments
        result = json.loads("{" + dialer.expect("{"))
        dialer.close()
        error = result["error"]
        assert error["type"] == "HandshakeError", result
        assert "takes at most 8192" in error["message"] and "UCX_TCP_TX_SEG_SIZE" in error["message"]
        assert result["seconds"] < 10  # refused in the handshake, not a deadline run out
        client_proc = PeerProcess("transport_peer.py", "client", address, env=small)  # a peer that fits still gets in
        result = json.loads("{" + client_proc.expect("{"))
        client_proc.close()
        assert (result["link"], result["echo_equal"], result["sum_ok"]) == ("ucx", True, True)
    finally:
        proc.close()


def test_a_peer_that_takes_larger_ucx_tcp_segments_than_it_sends_talks_to_the_default():
    """What must match is what each side sends against what the other takes: 8 KiB sent, 256 KiB taken, is fine."""
    proc, address = start_server(env={"UCX_TLS": "tcp", LOCAL_COPY_ENV: "0", "UCX_TCP_TX_SEG_SIZE": "8k"})
    try:
        client_proc = PeerProcess("transport_peer.py", "client", address, env={"UCX_TLS": "tcp", LOCAL_COPY_ENV: "0"})
        result = json.loads("{" + client_proc.expect("{"))
        client_proc.close()
        assert (result["link"], result["echo_equal"], result["sum_ok"]) == ("ucx", True, True)  # 4 MiB each way
    finally:
        proc.close()


def test_idle_connections_beyond_the_limit_are_closed_and_redialed():
    servers = [Peer() for _ in range(3)]
    caller = Peer(limits=TransportLimits(max_connections=2, connection_grace_seconds=0))

    async def hello(request):
        return {"from": str(request.sender)}

    try:
        for server in servers:
            server.register("hello", hello)
        for server in servers:
            assert caller.call_sync(server.address, "hello", timeout=10) == ({"from": str(caller.peer_id)}, [])
        assert len(caller.pool.connections) == 2
        assert servers[0].peer_id not in caller.pool.connections  # the least recently used one went
        assert caller.call_sync(servers[0].address, "hello", timeout=10)[0] == {"from": str(caller.peer_id)}
        caller.disconnect(servers[0].peer_id)
        assert servers[0].peer_id not in caller.pool.connections
        assert caller.call_sync(servers[0].address, "hello", timeout=10)[0] == {"from": str(caller.peer_id)}
    finally:
        for peer in (caller, *servers):
            peer.shutdown()
