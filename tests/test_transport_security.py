"""The transport against strangers (issue 15): wrong ids, floods of unfinished handshakes and of calls whose frames
never come, per-peer limits. Real processes over UCX on 127.0.0.1; every wait has a deadline."""

from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import pytest
import torch

from hiveengine.errors import HandshakeError, PeerIdMismatch
from hiveengine.transport import SINK_METHOD, Identity, Peer, PeerAddress, TransportLimits, serve_sink
from hiveengine.transport.limits import INITIAL_WINDOW_BYTES, slow_start_round_trips
from hiveengine.transport.resources import Usage
from tests.procs import PeerProcess
from tests.waits import until

pytestmark = pytest.mark.timeout(120)


def test_a_live_address_with_another_peer_id_is_a_mismatch_naming_both_ids(server):
    _, address = server
    real = PeerAddress.parse(address)
    wanted = Identity.generate().peer_id
    peer = Peer()
    try:
        with pytest.raises(PeerIdMismatch) as caught:
            peer.call_sync(PeerAddress(real.host, real.port, wanted), "echo", {}, timeout=10)
        assert isinstance(caught.value, HandshakeError)
        assert caught.value.expected == wanted and caught.value.actual == real.peer_id
        assert str(wanted) in str(caught.value) and str(real.peer_id) in str(caught.value)
        assert peer.call_sync(address, "echo", {"ok": 1}, timeout=10)[0] == {"ok": 1}  # the right id still works
    finally:
        peer.shutdown()


# ---- floods: a hostile process (tests/peers/hostile_transport_peer.py) against a victim in this process


def _victim(**limits) -> tuple[Peer, asyncio.Event]:
    """A peer serving `echo`, a `gate` that answers once the returned event is set, and the built-in sink."""
    victim = Peer(limits=TransportLimits(local_copy=False, **limits))
    gate = victim.runtime.run(_event(), 10)

    async def echo(request):
        return request.header, request.tensors

    async def wait_gate(request):
        await gate.wait()
        return {}

    victim.register("echo", echo)
    victim.register("gate", wait_gate)
    serve_sink(victim)
    return victim, gate


async def _event() -> asyncio.Event:
    return asyncio.Event()


def _flood(mode: str, victim: Peer, count: int) -> tuple[PeerProcess, dict]:
    hostile = PeerProcess("hostile_transport_peer.py", "flood", mode, str(victim.address), str(count))
    return hostile, json.loads(hostile.expect("DONE", timeout=120))


def _legit_call(victim: Peer, legit: Peer) -> None:
    x = torch.randn(1 << 18)  # 1 MiB: framed, so it needs an inbound reservation and posted receives
    header, (got,) = legit.call_sync(victim.address, "echo", {"legit": True}, [x], timeout=20)
    assert header == {"legit": True} and torch.equal(got, x)


def _baseline(victim: Peer) -> Usage:
    return victim.resources.held()


def test_frames_that_never_come_hold_memory_only_until_their_deadline():
    """The 4 x 1 GiB attack: each request reserves its announced frame; a peer is capped, and when the frames
    do not come the connection is closed and everything it held is released."""
    cap = 512 << 20
    victim, _ = _victim(max_inbound_bytes_per_peer=cap, frame_timeout=3.0, min_frame_bytes_per_second=1e12)
    legit = Peer()
    try:
        hostile, summary = _flood("phantom", victim, 8)
        assert summary["kinds"].get("ResourceLimitError", 0) >= 6, summary  # only 2 x 256 MiB fit
        assert victim.resources.peak_per_peer.inbound_bytes <= cap
        _legit_call(victim, legit)
        until(victim, lambda: _baseline(victim) == Usage(), 15, "the phantom frames' release")
        assert not [c for c in victim.pool.connections.values() if c.remote != legit.peer_id]  # the flooder is gone
        _legit_call(victim, legit)
        hostile.close()
    finally:
        legit.shutdown()
        victim.shutdown()


def _windows_until_delivered(nbytes: int) -> int:
    """Reference: round trips of a TCP window that starts at INITIAL_WINDOW_BYTES and doubles until `nbytes` are
    through, plus the round trip of the request that announced them."""
    delivered, window, rounds = 0, INITIAL_WINDOW_BYTES, 1
    while delivered < nbytes:
        delivered, window, rounds = delivered + window, window * 2, rounds + 1
    return rounds


def test_a_frame_deadline_adds_the_slow_start_round_trips_of_the_link_up_to_max_deadline_rtt():
    rng = np.random.default_rng()
    for nbytes in [1, INITIAL_WINDOW_BYTES, INITIAL_WINDOW_BYTES + 1, *rng.integers(1, 1 << 34, 50).tolist()]:
        assert slow_start_round_trips(nbytes) == _windows_until_delivered(nbytes), nbytes
    limits = TransportLimits()
    flat = limits.frame_timeout + (4 << 20) / limits.min_frame_bytes_per_second
    assert limits.frame_deadline(4 << 20) == flat  # no round trip measured: as before
    assert limits.frame_deadline(4 << 20, 0.001) < flat + 0.02  # a LAN adds next to nothing
    assert limits.frame_deadline(4 << 20, 1.5) >= flat + 13.0  # ~9 doublings of the window at 1.5 s
    # A peer that dragged its handshake out to a long "round trip" gains at most max_deadline_rtt's worth.
    assert limits.frame_deadline(4 << 20, 60.0) == limits.frame_deadline(4 << 20, limits.max_deadline_rtt)


def test_frames_for_an_unknown_method_cannot_pile_up_posted_receives():
    """Dropping unwanted frames posts receives; a peer that announces frames and never sends them hits the
    per-peer cap and loses its connection, and every receive goes with it."""
    cap = 2048
    victim, _ = _victim(max_posted_receives_per_peer=cap, frame_timeout=3.0)
    legit = Peer()
    try:
        hostile, summary = _flood("discards", victim, 40)  # 40 x 256 frames
        assert summary["kinds"].get("UnknownMethodError", 0) <= cap // 256, summary
        assert victim.resources.peak_per_peer.receives <= cap
        _legit_call(victim, legit)
        until(victim, lambda: _baseline(victim) == Usage(), 15, "the dropped frames' receives' release")
        hostile.close()
    finally:
        legit.shutdown()
        victim.shutdown()


def test_slow_calls_are_capped_per_peer_and_cancelled_when_the_caller_dies():
    cap = 32
    victim, gate = _victim(max_calls_in_flight_per_peer=cap)
    legit = Peer()
    tasks_before = len(victim._tasks)
    try:
        hostile, summary = _flood("calls", victim, 500)
        assert summary["unanswered"] == cap and summary["kinds"] == {"ResourceLimitError": 500 - cap}, summary
        assert victim.resources.peak_per_peer.calls == cap and len(victim._tasks) <= tasks_before + cap
        _legit_call(victim, legit)
        hostile.kill()  # it dies with 32 calls in flight
        until(victim, lambda: _baseline(victim) == Usage(), 15, "the dead caller's calls' release")
        until(victim, lambda: len(victim._tasks) <= tasks_before, 5, "the dead caller's handlers' end")
    finally:
        victim.runtime.call_soon(gate.set)
        legit.shutdown()
        victim.shutdown()


def test_streams_and_the_sink_are_bounded_per_peer():
    cap = 4
    victim, _ = _victim(max_streams_per_peer=cap, max_inbound_bytes_per_peer=256 << 20)
    legit = Peer()
    try:
        hostile, summary = _flood("streams", victim, 10)
        assert summary["huge"] == {"ResourceLimitError": 1}, summary  # a 4 GiB sink tensor is never allocated
        assert summary["unanswered"] == cap and summary["kinds"] == {"ResourceLimitError": 10 - cap}, summary
        assert victim.resources.peak_per_peer.streams <= cap
        assert victim.resources.peak_per_peer.inbound_bytes <= 256 << 20
        _legit_call(victim, legit)
        x = torch.randn(1000)
        reply = legit.runtime.run(legit.send_tensor(victim.address, SINK_METHOD, x, timeout=20), 30)
        assert reply["numel"] == 1000
        hostile.kill()
        until(victim, lambda: _baseline(victim) == Usage(), 15, "the dead streamer's streams' release")
    finally:
        legit.shutdown()
        victim.shutdown()


def test_connection_limit_eviction_never_closes_a_connection_with_a_call_in_flight():
    victim, gate = _victim(max_connections=4)
    legit = Peer()
    try:
        pending = legit.runtime.submit(legit.call(victim.address, "gate", {}, timeout=60))
        until(victim, lambda: victim.resources.held().calls == 1, 10, "the legitimate call's arrival")
        hostile, summary = _flood("identities", victim, 12)  # 12 fresh identities, one call each
        assert summary["kinds"] == {"ok": 12}, summary  # new connections are not evicted in their grace period
        grace = victim.limits.connection_grace_seconds
        until(victim, lambda: len(victim.pool.connections) <= 4, grace + 10, "the idle connections' eviction")
        assert legit.peer_id in victim.pool.connections
        victim.runtime.call_soon(gate.set)
        assert pending.result(20) == ({}, [])
        hostile.close()
    finally:
        legit.shutdown()
        victim.shutdown()


def _descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_unauthenticated_connections_are_capped_and_time_out():
    """500 connections that never handshake took 1,000 descriptors: now at most max_unauthenticated are held,
    each for at most handshake_timeout, and an established peer is served throughout."""
    cap = 8
    victim, _ = _victim(max_unauthenticated=cap, handshake_timeout=2.0)
    legit = Peer()
    try:
        _legit_call(victim, legit)  # connected before the flood
        baseline, refused = _descriptors(), victim.runtime.refused_unauthenticated
        hostile, summary = _flood("unauthenticated", victim, 40)  # 40 silent, 40 that stop after HELLO
        assert summary == {"opened": 80}
        # UCX accepts each socket before it asks us: once we have seen all 80, only `cap` are held
        until(victim, lambda: victim.runtime.refused_unauthenticated - refused == 80 - cap, 10, "the refusals")
        # Exactly `cap` were admitted (the rest refused); a held one may already have hit its handshake_timeout
        # when the flood took long to arrive (a loaded machine), so no more than `cap` are held now.
        assert victim.runtime.unauthenticated <= cap
        # the refused ones' sockets go as soon as UCX has closed them; the `cap` held ones stay until their timeout
        until(victim, lambda: _descriptors() <= baseline + 4 * cap, 5, "the refused connections' close")
        assert victim.runtime.unauthenticated <= cap
        _legit_call(victim, legit)
        until(victim, lambda: victim.runtime.unauthenticated == 0, 15, "the unfinished handshakes' timeout")
        until(victim, lambda: _descriptors() <= baseline + 4, 15, "the descriptors' release")
        newcomer = Peer()
        try:
            _legit_call(victim, newcomer)  # a new connection is accepted again
        finally:
            newcomer.shutdown()
        hostile.close()
    finally:
        legit.shutdown()
        victim.shutdown()


# ---- sessions: every message is bound to the session (session.py)


def _tampered(conn, how: str, request_id: int) -> list[bytes]:
    """Sealed control messages (raw wire bytes) for a `record` request on `conn`, tampered with as `how` says."""
    from hiveengine.transport.session import Session
    from hiveengine.transport.wire import Kind, encode_control

    def seal(session, request_id: int) -> bytes:
        body = {"k": Kind.REQUEST, "i": request_id, "m": "record", "h": {"n": request_id}, "d": 10}
        return session.seal_control(encode_control(body, conn.limits), True)[1]

    if how == "replay":
        first = seal(conn.session, request_id)
        return [first, first]  # the first is served; its replay is not
    if how == "reorder":
        first, second = seal(conn.session, request_id), seal(conn.session, request_id + 1)
        return [second, first]
    if how == "flip":
        sealed = bytearray(seal(conn.session, request_id))
        sealed[10] ^= 1
        return [bytes(sealed)]
    if how == "foreign":  # sealed in another session (a third party injecting on the path)
        return [seal(Session(os.urandom(32), os.urandom(32)), request_id)]
    raise ValueError(how)


@pytest.mark.parametrize("how", ["replay", "reorder", "flip", "foreign"])
def test_a_forged_replayed_reordered_or_altered_message_closes_the_connection(how):
    victim, _ = _victim()
    attacker, legit = Peer(), Peer()
    served = []

    async def record(request):
        served.append((request.sender, request.header["n"]))
        return {}

    victim.register("record", record)
    try:
        conn = attacker.runtime.run(attacker.connect(victim.address), 10)
        request_id = conn.new_request_id()
        messages = _tampered(conn, how, request_id)

        async def send():
            for message in messages:
                await conn.reactor.tag_send(conn.endpoint, np.frombuffer(message, dtype=np.uint8), conn.send_base << 32)

        attacker.runtime.run(send(), 10)
        until(victim, lambda: attacker.peer_id not in victim.pool.connections, 10, "the tampered connection's close")
        assert served == ([(attacker.peer_id, request_id)] if how == "replay" else [])
        assert legit.call_sync(victim.address, "record", {"n": -1}, timeout=10) == ({}, [])
        assert attacker.call_sync(victim.address, "record", {"n": -2}, timeout=10) == ({}, [])  # a new session
        assert served[-2:] == [(legit.peer_id, -1), (attacker.peer_id, -2)]
    finally:
        for peer in (attacker, legit, victim):
            peer.shutdown()


def _forged_frame_closes_the_connection(forge) -> None:
    """Send a `record` request with one 64 KiB frame, protected as `forge(conn, body, frame)` says (it completes the
    header and returns the bytes that travel for the frame): the victim must close the connection before its
    handler runs, holding nothing."""
    from hiveengine.transport.wire import Kind, encode_control

    victim, _ = _victim()
    attacker = Peer()
    served = []

    async def record(request):
        served.append(request.tensors)
        return {}

    victim.register("record", record)
    try:
        conn = attacker.runtime.run(attacker.connect(victim.address), 10)
        frame = np.arange(1 << 16, dtype=np.uint8)  # 64 KiB: framed, not inline
        body = {"k": Kind.REQUEST, "i": conn.new_request_id(), "m": "record", "h": {}, "d": 10}
        body.update(f=[["uint8", [frame.nbytes], "cpu"]], s=conn._reserve_seqs(1))
        wire_frame = forge(conn, body, frame)
        _, message = conn.session.seal_control(encode_control(body, conn.limits), True)

        async def send():
            await conn.reactor.tag_send(conn.endpoint, np.frombuffer(message, dtype=np.uint8), conn.send_base << 32)
            await conn.reactor.tag_send(conn.endpoint, wire_frame, conn.send_base << 32 | (body["s"] + 1))

        attacker.runtime.run(send(), 10)
        until(victim, lambda: attacker.peer_id not in victim.pool.connections, 10, "the forged connection's close")
        assert served == [] and victim.resources.held() == Usage()
    finally:
        attacker.shutdown()
        victim.shutdown()


def test_an_altered_frame_closes_the_connection_before_its_handler_runs():
    def altered(conn, body, frame):
        body["z"] = 1
        sealed = conn.session.seal_frame(conn.session.sent, 0, frame, np.empty(frame.nbytes + 16, dtype=np.uint8))
        sealed[100] ^= 1
        return sealed

    _forged_frame_closes_the_connection(altered)


def test_an_untagged_frame_from_a_peer_not_proven_local_closes_the_connection():
    """Only device frames between processes proven to share a host travel without a tag (session.py); these two
    peers share a process, which the same-host proof never accepts, so a frame whose tag is missing is forged."""

    def untagged(conn, body, frame):
        assert not conn.same_host
        body["t"] = [None]
        return frame

    _forged_frame_closes_the_connection(untagged)


class _Spy:
    """Records every buffer a reactor hands to UCX (and hands it on): what an eavesdropper on the path sees."""

    def __init__(self, reactor):
        self.reactor, self.seen = reactor, []
        self._send_now, self._tag_send = reactor.send_now, reactor.tag_send

    def __enter__(self):
        def send_now(endpoint, buf, tag):
            self.seen.append(bytes(buf))
            return self._send_now(endpoint, buf, tag)

        def tag_send(endpoint, buf, tag):
            self.seen.append(np.asarray(buf).tobytes())
            return self._tag_send(endpoint, buf, tag)

        self.reactor.send_now, self.reactor.tag_send = send_now, tag_send
        return self

    def __exit__(self, *exc):
        del self.reactor.send_now, self.reactor.tag_send


@pytest.mark.parametrize("encrypt", [True, False])
def test_messages_between_hosts_are_encrypted_unless_turned_off(encrypt):
    victim, _ = _victim()
    caller = Peer(limits=TransportLimits(local_copy=False, encrypt=encrypt))
    marker = b"hiveengine-plaintext-marker!"
    small = torch.frombuffer(bytearray(marker * 10), dtype=torch.uint8)  # inline in the control message
    large = torch.frombuffer(bytearray(marker * 4000), dtype=torch.uint8)  # its own frame
    try:
        conn = caller.runtime.run(caller.connect(victim.address), 10)
        assert not conn.same_host  # one process: never proven local, so treated as another host
        with _Spy(caller.runtime.reactor) as spy:
            header, (a, b) = caller.call_sync(victim.address, "echo", {"secret": marker.decode()}, [small, large], 10)
        assert header == {"secret": marker.decode()} and torch.equal(a, small) and torch.equal(b, large)
        readable = any(marker in buf for buf in spy.seen)
        assert readable is not encrypt
    finally:
        caller.shutdown()
        victim.shutdown()


def test_the_encryption_setting_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("HIVEENGINE_ENCRYPT", "0")
    assert TransportLimits().encrypt is False
    monkeypatch.setenv("HIVEENGINE_ENCRYPT", "1")
    assert TransportLimits().encrypt is True
    monkeypatch.delenv("HIVEENGINE_ENCRYPT")
    assert TransportLimits().encrypt is True


def test_a_proven_same_host_peer_is_authenticated_but_not_encrypted(server):
    _, address = server
    peer = Peer()
    try:
        conn = peer.runtime.run(peer.connect(address), 10)

        async def proven():
            async with asyncio.timeout(20):
                await conn.link.settled.wait()

        peer.runtime.run(proven(), 30)
        assert conn.same_host
        x = torch.randn(1 << 15)  # 128 KiB: below the direct copy's minimum, so through UCX, tagged
        with _Spy(peer.runtime.reactor) as spy:
            _, (got,) = peer.call_sync(address, "echo", {}, [x], timeout=10)
        assert torch.equal(got, x)
        assert any(x.numpy().tobytes() == buf for buf in spy.seen)  # sent as it is, with its tag in the header
    finally:
        peer.shutdown()


def test_a_listener_that_drags_its_hello_out_stretches_a_dial_to_at_most_twice_connect_timeout():
    from hiveengine.transport.handshake import stretch_deadline

    timeout, started = 5.0, 100.0
    assert stretch_deadline(started + timeout, started, started + 0.01) == started + timeout  # a short link: as set
    assert stretch_deadline(started + timeout, started, started + 4.0) == started + 8.0  # a long link: 4 s more
    # the worst a listener can do, answer just before the deadline, gains one connect_timeout
    assert stretch_deadline(started + timeout, started, started + timeout) == started + 2 * timeout
