"""The TCP wire (tcp_wire.py): the link a peer behind a NAT opens itself, carrying the same sealed messages.

Real peers on 127.0.0.1, dialling with HIVEENGINE_LINK=tcp; hostile ones speak the wire's records by hand inside
an authenticated session, or never finish their handshake. The honest peers keep being served, and what a hostile
one makes the victim hold stays under TransportLimits.tcp_unexpected_bytes / max_tcp_unexpected_bytes.
"""

import asyncio
import json
import socket

import numpy as np
import pytest
import torch

from hiveengine.errors import ConfigurationError
from hiveengine.transport import Peer, PeerAddress, TransportLimits
from hiveengine.transport.resources import Usage
from hiveengine.transport.session import BLOCK_BYTES, TAG_BYTES
from hiveengine.transport.tcp_wire import RECORD, _Budget
from tests.procs import PeerProcess, start_server
from tests.waits import until

pytestmark = pytest.mark.timeout(120)


async def _echo(request):
    return request.header, request.tensors


def test_a_process_dialling_over_tcp_calls_and_streams_with_the_same_results():
    server, address = start_server()
    try:
        client = PeerProcess("transport_peer.py", "client", address, env={"HIVEENGINE_LINK": "tcp"})
        line = client.lines.get(timeout=90)
        while line is not None and not line.startswith("{"):
            line = client.lines.get(timeout=90)
        result = json.loads(line)
        rtts = result.pop("rtt"), result.pop("their_rtt")
        assert result == {"link": "tcp", "echo_equal": True, "header": {"k": "v"}, "sum_ok": True}
        assert all(0 < rtt < 1.0 for rtt in rtts), rtts
        client.close()
    finally:
        server.close()


def test_the_listener_calls_back_over_the_link_the_dialler_opened():
    listener = Peer(limits=TransportLimits(local_copy=False))
    dialler = Peer(limits=TransportLimits(local_copy=False, link="tcp"))
    dialler.register("echo", _echo)
    try:
        listener.register("echo", _echo)
        dialler.call_sync(listener.address, "echo", {}, timeout=10)
        unreachable = PeerAddress("192.0.2.1", 9, dialler.peer_id, 9)  # TEST-NET-1: never answers
        x = torch.randn(300_000)
        header, (y,) = listener.call_sync(unreachable, "echo", {"back": 1}, [x], timeout=10)
        assert header == {"back": 1} and torch.equal(x, y)
        assert listener.pool.connections[dialler.peer_id].kind == "tcp"
    finally:
        dialler.shutdown()
        listener.shutdown()


def test_the_link_and_rail_settings_are_checked(monkeypatch):
    with pytest.raises(ConfigurationError, match="HIVEENGINE_LINK"):
        TransportLimits(link="carrier-pigeon")
    with pytest.raises(ConfigurationError, match="tcp_rails=65: expected 0 to 64"):
        TransportLimits(tcp_rails=65)
    monkeypatch.setenv("HIVEENGINE_TCP_RAILS", "many")
    with pytest.raises(ConfigurationError, match="HIVEENGINE_TCP_RAILS='many': expected a whole number"):
        TransportLimits()
    monkeypatch.setenv("HIVEENGINE_TCP_RAILS", "8")
    assert TransportLimits().tcp_rails == 8


def _victim(**limits) -> Peer:
    victim = Peer(limits=TransportLimits(local_copy=False, **limits))
    victim.register("echo", _echo)
    return victim


def _attack(victim: Peer, records) -> Peer:
    """An authenticated attacker over a TCP wire that sends `records(conn)`: raw (tag, payload) records."""
    attacker = Peer(limits=TransportLimits(local_copy=False, link="tcp"))
    conn = attacker.runtime.run(attacker.connect(victim.address), 10)

    async def send():
        for tag, payload in records(conn):
            future = conn.wire.send_now(payload, tag)
            if future is not None:
                try:
                    await future
                except ConnectionResetError:  # the victim closed the link mid-attack: what the tests check for
                    return

    attacker.runtime.run(send(), 30)
    return attacker


def _legit_call_works(victim: Peer) -> None:
    legit = Peer(limits=TransportLimits(local_copy=False, link="tcp"))
    try:
        x = torch.randn(100_000)
        _, (y,) = legit.call_sync(victim.address, "echo", {}, [x], timeout=10)
        assert torch.equal(x, y)
    finally:
        legit.shutdown()


def test_stray_frames_are_held_up_to_the_limit_then_the_link_is_closed():
    victim = _victim(tcp_unexpected_bytes=4 << 20, frame_timeout=1.0)
    stray = np.zeros(1 << 20, dtype=np.uint8)
    attacker = None
    try:
        # 12 frames of 1 MiB for tags nobody announced: 4 are held, then the wire waits and closes
        attacker = _attack(victim, lambda conn: [((conn.send_base << 32) | (1000 + i), stray) for i in range(12)])
        until(victim, lambda: _Budget.held <= 4 << 20 and attacker.peer_id not in victim.pool.connections, 10, "close")
        assert _Budget.held == 0
        _legit_call_works(victim)
    finally:
        for peer in (attacker, victim):
            if peer is not None:
                peer.shutdown()


@pytest.mark.parametrize("how", ["oversized-control", "garbage"])
def test_a_malformed_record_closes_only_its_own_link(how):
    victim = _victim()
    attacker = None
    try:

        def records(conn):
            if how == "oversized-control":  # sent below, as a bare record header announcing 1 TiB
                return []
            return [((conn.send_base + 1) << 32, np.frombuffer(b"not a sealed message", dtype=np.uint8))]

        attacker = _attack(victim, records)
        if how == "oversized-control":
            conn = attacker.pool.connections[victim.peer_id]
            conn.wire._main.sock.send(RECORD.pack(conn.send_base << 32, 1 << 40))
        until(victim, lambda: attacker.peer_id not in victim.pool.connections, 10, "the hostile link's close")
        _legit_call_works(victim)
    finally:
        for peer in (attacker, victim):
            if peer is not None:
                peer.shutdown()


def test_connections_that_never_handshake_cost_nothing_after_the_handshake_timeout():
    victim = _victim(handshake_timeout=1.0, max_unauthenticated=16)
    legit = Peer(limits=TransportLimits(local_copy=False, link="tcp"))
    idle = []
    try:
        legit.call_sync(victim.address, "echo", {}, timeout=10)
        for _ in range(40):  # more than max_unauthenticated: the excess is closed at once
            idle.append(socket.create_connection(("127.0.0.1", victim.runtime.tcp_port), timeout=5))
        assert legit.call_sync(victim.address, "echo", {"during": 1}, timeout=10)[0] == {"during": 1}
        until(victim, lambda: victim.runtime.unauthenticated == 0, 10, "the handshake timeouts")
        assert victim.runtime.refused_unauthenticated > 0
        _legit_call_works(victim)  # a new link is accepted again
    finally:
        for s in idle:
            s.close()
        legit.shutdown()
        victim.shutdown()


# ---- encrypted frames sealed in blocks (session.py): each block is bound to its message and position


def test_frames_sealed_in_blocks_arrive_intact_whether_their_receive_is_posted_or_not():
    victim = _victim()
    caller = Peer(limits=TransportLimits(local_copy=False, link="tcp"))
    landed = []

    async def slow_sink(request):  # each chunk's frame arrives (and is held) before its receive is posted
        async for chunk in request.chunks:
            await asyncio.sleep(0.2)
            landed.append(await chunk.read())
        return {}

    victim.register_stream("slow_sink", slow_sink)
    try:
        frames = [torch.randn((BLOCK_BYTES * 5 // 2 + 12) // 4), torch.arange(7, dtype=torch.uint8), torch.randn(3)]
        frames.append(torch.randint(0, 255, (BLOCK_BYTES,), dtype=torch.uint8))  # exactly one block
        _, echoed = caller.call_sync(victim.address, "echo", {}, frames, timeout=20)
        assert all(torch.equal(a, b) for a, b in zip(frames, echoed, strict=True))
        assert caller.pool.connections[victim.peer_id].kind == "tcp"
        big = torch.randn(BLOCK_BYTES * 3 // 4)  # 3 MiB in 1 MiB chunks
        caller.runtime.run(caller.send_tensor(victim.address, "slow_sink", big, timeout=20), 30)
        assert torch.equal(torch.cat([t.view(torch.uint8) for t in landed]), big.view(-1).view(torch.uint8))
    finally:
        caller.shutdown()
        victim.shutdown()


def _sealed_blocks(conn, frame: np.ndarray, counter: int) -> list[np.ndarray]:
    """`frame` sealed in blocks as frame 0 of message `counter` of `conn`'s session (what an honest sender sends)."""
    (blocks,) = conn.session.frame_blocks(counter, [frame.nbytes])
    out = []
    for j, start in enumerate(range(0, frame.nbytes, BLOCK_BYTES)):
        block = frame[start : start + BLOCK_BYTES]
        sealed = np.empty(block.nbytes + TAG_BYTES, dtype=np.uint8)
        blocks.seal(j, block, sealed)
        out.append(sealed)
    return out


@pytest.mark.parametrize("how", ["intact", "flip", "reorder", "repeat", "truncate", "extend", "other-message"])
def test_a_block_altered_moved_repeated_or_cut_closes_the_connection_before_its_handler_runs(how):
    from hiveengine.transport.wire import Kind, encode_control

    victim = _victim()
    served = []

    async def record(request):
        served.append(request.tensors[0].clone())
        return {}

    victim.register("record", record)
    frame = np.random.default_rng(0).integers(0, 255, BLOCK_BYTES * 2 + 1000, dtype=np.uint8)  # 3 blocks

    def records(conn):
        body = {"k": Kind.REQUEST, "i": conn.new_request_id(), "m": "record", "h": {}, "d": 10}
        body.update(f=[["uint8", [frame.nbytes], "cpu"]], s=conn._reserve_seqs(1), z=2)
        counter = conn.session.sent
        blocks = _sealed_blocks(conn, frame, counter + 1 if how == "other-message" else counter)
        if how == "flip":
            blocks[1][1000] ^= 1
        elif how == "reorder":
            blocks[0], blocks[1] = blocks[1], blocks[0]
        elif how == "repeat":
            blocks[1] = blocks[0]
        elif how == "truncate":
            blocks = blocks[:-1]  # a shorter record: the last block is missing
        elif how == "extend":
            blocks.append(blocks[-1])
        _, message = conn.session.seal_control(encode_control(body, conn.limits), True)
        tag = conn.send_base << 32
        return [(tag, np.frombuffer(message, dtype=np.uint8)), (tag | (body["s"] + 1), np.concatenate(blocks))]

    attacker = None
    try:
        attacker = _attack(victim, records)
        if how == "intact":
            until(victim, lambda: served, 10, "the intact call")
            assert np.array_equal(served[0].numpy(), frame) and attacker.peer_id in victim.pool.connections
            return
        until(victim, lambda: attacker.peer_id not in victim.pool.connections, 10, "the tampered link's close")
        assert served == [] and victim.resources.held() == Usage()
        _legit_call_works(victim)
    finally:
        for peer in (attacker, victim):
            if peer is not None:
                peer.shutdown()


# ---- rails (rails.py): extra sockets the dialler opens for large frames


@pytest.fixture
def peers():
    """Make peers (`peers(victim=True, **limits)` serves "echo"; others dial over TCP wires); all shut down after."""
    made = []

    def make(victim: bool = False, **limits) -> Peer:
        made.append(
            _victim(**limits) if victim else Peer(limits=TransportLimits(local_copy=False, link="tcp", **limits))
        )
        return made[-1]

    yield make
    for peer in reversed(made):
        peer.shutdown()


def _echo_large(caller: Peer, victim: Peer, times: int = 4) -> None:
    for _ in range(times):
        frames = [torch.randn(1 << 20) for _ in range(3)]  # 4 MiB each: past tcp_rail_min_bytes
        _, echoed = caller.call_sync(victim.address, "echo", {}, frames, timeout=30)
        assert all(torch.equal(a, b) for a, b in zip(frames, echoed, strict=True))


def test_large_frames_go_side_by_side_on_rails_and_small_calls_open_none(peers):
    caller = peers()  # the process's first peer: a wire accepted for the victim still lives under the victim's limits
    victim = peers(victim=True, tcp_rails=2)  # the listener takes 2 of the 4 rails the dialler asks for
    quiet = peers()
    for i in range(20):
        assert quiet.call_sync(victim.address, "echo", {"i": i}, [torch.randn(1000)], timeout=10)[0] == {"i": i}
    _echo_large(caller, victim)
    ours = caller.pool.connections[victim.peer_id].wire
    theirs = victim.pool.connections[caller.peer_id].wire
    until(caller, lambda: len(ours.rails) == 2, 10, "both rails joining")  # the dialler's are joined last
    assert len(theirs.rails) == 2
    _echo_large(caller, victim)
    assert all(sent >= 4 << 20 for sent in ours.rails), ours.rails
    assert all(sent >= 4 << 20 for sent in theirs.rails), theirs.rails  # the replies use them too
    assert quiet.pool.connections[victim.peer_id].wire.rails == []
    assert victim.pool.connections[quiet.peer_id].wire.rails == []


def test_no_rails_when_turned_off(peers):
    victim, caller = peers(victim=True), peers(tcp_rails=0)
    _echo_large(caller, victim, times=2)
    assert caller.pool.connections[victim.peer_id].wire.rails == []


def _join(victim: Peer, join: bytes, held: list) -> bytes:
    """What the victim answers a rail join on a fresh socket (kept in `held`): JOINED, or b"" once it closed it."""
    from hiveengine.transport.rails import JOINED

    held.append(socket.create_connection(("127.0.0.1", victim.runtime.tcp_port), timeout=10))
    held[-1].sendall(join)
    return held[-1].recv(len(JOINED))


@pytest.fixture
def sockets():
    held = []
    yield held
    for s in held:
        s.close()


@pytest.mark.parametrize("how", ["forged", "unknown-link", "past-limit", "twice", "cut-short"])
def test_a_rail_join_that_does_not_prove_its_session_is_refused_and_the_link_keeps_working(how, peers, sockets):
    from hiveengine.transport.rails import JOINED, join_request

    attacker = peers()  # the process's first peer; it sends nothing large, so it opens no rails itself
    victim = peers(victim=True, tcp_rails=2, handshake_timeout=1.0)
    conn = attacker.runtime.run(attacker.connect(victim.address), 10)
    _, _, key, link_id = conn.wire._rail_plan  # this session's own rail key: what an honest dialler proves
    offered = victim.pool.connections[attacker.peer_id].wire
    join = {
        "forged": join_request(bytes(32), link_id, 1),
        "unknown-link": join_request(key, bytes(16), 1),
        "past-limit": join_request(key, link_id, 3),
        "twice": join_request(key, link_id, 1),
        "cut-short": join_request(key, link_id, 1)[:-5],
    }[how]
    if how == "twice":
        assert _join(victim, join, sockets) == JOINED
    assert _join(victim, join, sockets) == b""  # closed: refused, or its handshake_timeout passed
    assert len(offered.rails) == (1 if how == "twice" else 0)
    _, (y,) = attacker.call_sync(victim.address, "echo", {}, [torch.ones(10)], timeout=10)
    assert torch.equal(y, torch.ones(10))
    assert attacker.pool.connections[victim.peer_id] is conn  # the same link: nothing was closed
    until(victim, lambda: victim.runtime.unauthenticated == 0, 10, "the join's slot to be given back")


def test_a_control_message_on_a_rail_or_a_rail_that_dies_closes_the_link_and_the_next_call_redials(peers, sockets):
    from hiveengine.transport.rails import JOINED, join_request

    victim, caller = peers(victim=True), peers()
    for how in ("control-on-rail", "rail-dies"):
        conn = caller.runtime.run(caller.connect(victim.address), 10)
        _, _, key, link_id = conn.wire._rail_plan
        assert _join(victim, join_request(key, link_id, 4), sockets) == JOINED  # joined by hand, as a dialler would
        if how == "control-on-rail":
            sockets[-1].sendall(RECORD.pack(conn.send_base << 32, 10) + bytes(10))
        sockets[-1].close()
        until(victim, lambda: caller.peer_id not in victim.pool.connections, 10, "the link's close")
        assert caller.call_sync(victim.address, "echo", {"after": how}, timeout=10)[0] == {"after": how}
        assert caller.pool.connections[victim.peer_id] is not conn  # a fresh link
    _echo_large(caller, victim, times=2)  # which opens its own rails
    fresh = caller.pool.connections[victim.peer_id].wire
    until(caller, lambda: len(fresh.rails) == 4, 10, "the fresh link's rails")
