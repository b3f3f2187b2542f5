"""Accusations (accusations.py, verification.Evidence): a reducer's signed reply that contradicts its signed claim
gets it banned by peers that check the evidence themselves; evidence that shows nothing, or is not what it claims
to be, bans nobody. Real peers over UCX on 127.0.0.1, and the evidence's construction checked on its own."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from hiveengine.averaging.accusations import EVIDENCE_METHOD
from hiveengine.averaging.allreduce import AllReduceService
from hiveengine.averaging.verification import MAX_EVIDENCE_NUMEL, Claim, Evidence, Probes, claim_message, reply_digest
from hiveengine.codec import get_codec
from hiveengine.transport import Peer, TransportLimits
from hiveengine.transport.identity import Identity
from tests.waits import until

pytestmark = pytest.mark.timeout(120)
NUMEL = 5000
GROUP = b"g" * 16


def _signed(identity: Identity, codec_name: str, seed: int, garbage: bool) -> Evidence:
    """A reducer's reply for chunk 0 of part 1 and its signed claim, computed as allreduce.py does; with `garbage`,
    the reply is moved after the claim was computed from the honest copies (what a cheat signs)."""
    codec = get_codec(codec_name)
    generator = torch.Generator().manual_seed(seed)
    copies = [codec.encode(torch.randn(NUMEL, generator=generator)) for _ in range(3)]
    coefficients: list[float] = []
    reply = codec.reduce(copies, [1.0, 2.0, 1.0], torch.empty(NUMEL), requantize=True, coefficients=coefficients)
    reply = [t.clone() for t in reply]
    if garbage:  # shifted by 10 everywhere: far outside any codec's rounding, which the shift does not widen
        reply = codec.encode(codec.decode(reply, torch.empty(NUMEL)) + 10)
    decoded = [codec.decode(c, torch.empty(NUMEL)) for c in copies]
    probes = Probes(GROUP, 1, 0, reply_digest(reply), NUMEL, np.array(coefficients))
    projections, norms = probes.project(torch.stack(decoded))
    claim = Claim(coefficients, projections.tolist(), norms.tolist())
    signature = identity.sign(claim_message(GROUP, 1, 0, NUMEL, codec_name, reply_digest(reply), claim))
    claim = Claim(claim.coefficients, claim.projections, claim.norms, signature)
    return Evidence(identity.public_key, GROUP, 1, 0, NUMEL, codec_name, reply, claim)


@pytest.mark.parametrize("codec_name", ["none", "fp16", "bf16", "int8", "int4"])
def test_an_honest_reducers_signed_replies_never_show_a_cheat(codec_name):
    reducer = Identity.generate()
    for seed in range(20):
        assert _signed(reducer, codec_name, seed, garbage=False).cheat() is None  # nobody can frame it


# int4 too: its rounding of the shifted reply is about a tenth of the shift, which one probe let through half the
# time; all PROBES probes at once about 1e-3.
@pytest.mark.parametrize("codec_name", ["none", "fp16", "bf16", "int8", "int4"])
def test_evidence_shows_a_cheat_only_when_the_signed_reply_contradicts_the_signed_claim(codec_name):
    reducer, forger = Identity.generate(), Identity.generate()
    for seed in range(5):
        cheat = _signed(reducer, codec_name, seed, garbage=True)
        assert "not the combination of the copies it reports" in cheat.cheat()
        assert cheat.accused == reducer.peer_id
        # Signed by someone else in the reducer's name, or altered after signing: no proof of anything.
        forged = _signed(forger, codec_name, seed, garbage=True)
        assert replace(forged, public_key=reducer.public_key).cheat() is None
        lie = replace(cheat.claim, projections=[[t + 1 for t in row] for row in cheat.claim.projections])
        altered = replace(cheat, claim=lie)
        assert altered.cheat() is None
        # The evidence survives its trip through a message.
        assert Evidence.parse(cheat.header(), cheat.reply).digest == cheat.digest


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"n": 1 << 30}, "cannot be checked"),
        ({"codec": "rot13"}, "cannot be checked"),
        ({"key": b"short"}, "32-byte key"),
        ({"s": b""}, "not signed"),
        ({"k": []}, "needs a claim"),
        ({"p": -1}, "counts"),
    ],
)
def test_malformed_evidence_is_refused_before_any_work(change, problem):
    evidence = _signed(Identity.generate(), "int8", 0, garbage=True)
    with pytest.raises(ValueError, match=problem):
        Evidence.parse({**evidence.header(), **change}, evidence.reply)
    with pytest.raises(ValueError, match="payload"):
        Evidence.parse(evidence.header(), [evidence.reply[0][:10], *evidence.reply[1:]])


@pytest.fixture
def services():
    peers = [Peer(limits=TransportLimits(local_copy=False)) for _ in range(4)]
    yield [AllReduceService.of(p) for p in peers]
    for p in peers:
        p.shutdown()


def test_a_third_peer_bans_the_accused_only_after_checking_the_evidence_itself(services):
    accuser, liar, bystander, reducer = services
    cheat = _signed(reducer.peer.identity, "int8", 1, garbage=True)
    honest = _signed(reducer.peer.identity, "int8", 2, garbage=False)
    accuser.accusations.keep(cheat)
    liar.accusations._held[honest.digest] = honest  # evidence that shows nothing
    liar.accusations._held[cheat.digest] = cheat
    accused = reducer.peer.peer_id.raw
    assert accuser.accusations.published() == [(accused, cheat.digest)]

    async def hear(by: AllReduceService, *digests: bytes) -> None:
        for digest in digests:
            bystander.accusations.hear(by.peer.peer_id, str(by.peer.address), accused, digest)

    run = bystander.peer.runtime.run
    run(hear(liar, honest.digest), 10)
    run(hear(accuser, bytes(16)), 10)  # a digest the accuser does not hold: nothing to check
    until(bystander.peer, lambda: bystander.accusations._checking == 0, 30, "the checks")
    assert bystander.accusations.refuted == 1 and bystander.accusations.confirmed == 0
    assert reducer.peer.peer_id not in bystander.banned
    run(hear(liar, cheat.digest), 10)  # a liar's accusations are ignored from then on, true or not
    assert bystander.accusations._checking == 0 and reducer.peer.peer_id not in bystander.banned
    run(hear(accuser, cheat.digest, cheat.digest), 10)  # the same accusation twice is checked once
    until(bystander.peer, lambda: reducer.peer.peer_id in bystander.banned, 30, "the ban")
    assert bystander.accusations.confirmed == 1
    assert "checked out here" in bystander.banned[reducer.peer.peer_id]
    assert bystander.accusations.published() == [(accused, cheat.digest)]  # it passes it on


def _check_hostile(services, serve) -> tuple:
    """The bystander checks an accusation against the reducer, naming a real cheat's digest, that the accuser answers
    with `serve(request, cheat)`: nobody may be banned for it. Returns (accuser, bystander, cheat)."""
    accuser, _, bystander, reducer = services
    cheat = _signed(reducer.peer.identity, "int8", 1, garbage=True)

    async def handler(request):
        return serve(request, cheat)

    accuser.peer.register(EVIDENCE_METHOD, handler)  # replaces the honest handler

    async def hear() -> None:
        accused = reducer.peer.peer_id.raw
        bystander.accusations.hear(accuser.peer.peer_id, str(accuser.peer.address), accused, cheat.digest)

    bystander.peer.runtime.run(hear(), 10)
    until(bystander.peer, lambda: bystander.accusations._checking == 0, 30, "the check")
    assert reducer.peer.peer_id not in bystander.banned and bystander.accusations.confirmed == 0
    return accuser, bystander, cheat


def test_a_hostile_accuser_serving_garbage_gets_nobody_banned(services):
    _, bystander, _ = _check_hostile(
        services, lambda request, cheat: ({**cheat.header(), "n": "lots"}, [torch.zeros(1 << 20)])
    )
    assert bystander.accusations.refuted == 0


@pytest.mark.parametrize("lie", ["frames larger than named", "too many elements", "frames with the header"])
def test_an_accuser_cannot_make_a_checker_take_in_more_than_the_evidence_it_names(services, lie):
    calls = []

    def serve(request, cheat):
        calls.append(request.header.get("h") is True)
        if lie == "too many elements":
            return {**cheat.header(), "n": MAX_EVIDENCE_NUMEL + 1}, []
        if lie == "frames with the header":  # 64 MiB where only the header was asked for
            return cheat.header(), [torch.zeros(16 << 20)]
        # The header names the real chunk; the frames that follow are 64 MiB.
        return cheat.header(), [] if request.header.get("h") is True else [torch.zeros(16 << 20)]

    accuser, bystander, cheat = _check_hostile(services, serve)
    # Too many elements, or frames sent with the header: refused on the header call, the frames are never asked for
    # (frames with it are refused unread). Larger frames: refused unread (they do not fit the buffers the header
    # named). The link still works.
    assert calls == ([True, False] if lie == "frames larger than named" else [True])
    header, tensors = bystander.peer.call_sync(accuser.peer.address, EVIDENCE_METHOD, {"d": cheat.digest, "h": True})
    assert header["key"] == cheat.public_key
    assert tensors == [] or lie == "frames with the header"


def test_a_flood_of_accusations_cannot_push_out_the_cheats_we_caught_ourselves(services):
    # An attacker's registrations name evidence against throwaway identities of its own: every peer confirms it, and
    # the newest were kept, so enough of them pushed out the evidence we hold of a cheat we caught and, past
    # MAX_BANNED, our own bans (of that cheat, and of senders our audits convicted).
    from hiveengine.averaging.accusations import MAX_HELD
    from hiveengine.averaging.allreduce import MAX_BANNED

    me = services[0]
    ours = _signed(services[1].peer.identity, "int8", 1, garbage=True)
    me.accusations.keep(ours)
    me.ban(services[1].peer.peer_id, "caught in a round")
    me.ban(services[2].peer.peer_id, "failed an audit")
    for seed in range(MAX_HELD + 2):
        me.accusations.keep(_signed(Identity.generate(), "int8", seed, garbage=True), learned=True)
    throwaways = [Identity.generate().peer_id for _ in range(MAX_BANNED + 2)]
    for peer_id in throwaways:
        me.ban(peer_id, "accused", learned=True)
    assert ours.digest in dict((d, a) for a, d in me.accusations.published())
    assert len(me.accusations.published()) == MAX_HELD
    assert {services[1].peer.peer_id, services[2].peer.peer_id} <= me.banned.keys()
    assert len(me.banned) == MAX_BANNED and throwaways[0] not in me.banned and throwaways[-1] in me.banned
