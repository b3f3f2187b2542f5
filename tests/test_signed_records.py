"""Records that speak for an averager are signed by it (issue 16 item 2): a forging process next to honest peers.

Three honest averagers (each its own DHT node and transport peer, real UCX on 127.0.0.1) average round after
round while tests/peers/forger_records.py rewrites their registrations (unsigned under their raw ids, or signed
by the wrong key), registers expired, zero-bandwidth and junk records from identities of its own, and forges
state advertisements with a huge epoch. Honest peers still average every round, and a newcomer loads the honest
state.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch

from hiveengine.averaging import DecentralizedAverager
from hiveengine.averaging.matchmaking import matchmaking_key
from hiveengine.averaging.state import state_key
from hiveengine.dht import DHT
from hiveengine.dht.validation import signer_of
from tests.procs import PeerProcess

pytestmark = pytest.mark.timeout(240)
PREFIX = "signed-test"
ROUNDS = 4
STEP_TIMEOUT = 20.0


@contextlib.contextmanager
def honest_swarm(count: int):
    dhts = [DHT()]
    dhts += [DHT(initial_peers=[dhts[0].address]) for _ in range(count - 1)]
    gen = torch.Generator().manual_seed(3)
    averagers = []
    try:
        for dht in dhts:
            tensors = [torch.randn(5000, generator=gen), torch.randn(7, 3, generator=gen)]
            averagers.append(DecentralizedAverager(tensors, dht, PREFIX, matchmaking_time=1.0, aggregation="mean"))
        yield averagers
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in reversed(dhts):
            dht.shutdown()


def together(averagers):
    async def all_steps():
        return await asyncio.gather(*(a.astep(timeout=STEP_TIMEOUT, expected_peers=len(averagers)) for a in averagers))

    return averagers[0].peer.runtime.run(all_steps(), STEP_TIMEOUT + 10)


def flat_of(averager) -> torch.Tensor:
    with averager.get_tensors():
        return averager.flat.clone()


def test_forged_registrations_and_state_ads_change_nothing():
    with honest_swarm(3) as averagers:
        key = matchmaking_key(PREFIX, "rounds")
        forger = PeerProcess(
            "forger_records.py", str(averagers[0].dht.address), key, state_key(PREFIX), "ucx://127.0.0.1:9/x"
        )
        try:
            forger.expect("READY")
            honest_ids = {a.me.peer_id for a in averagers}
            first = together(averagers)  # the forger now sees everyone's registration and state ad
            assert all(r is not None and {m.peer_id for m in r.group.members} == honest_ids for r in first)
            while True:  # wait until it has forged records for all three (its own report, bounded by expect)
                report = forger.expect("FORGED").split()
                if int(report[0]) == 3 and int(report[2]) > 0:
                    break
            for _ in range(ROUNDS):
                results = together(averagers)
                for result in results:
                    assert result is not None, "an honest peer did not average"
                    assert {m.peer_id for m in result.group.members} == honest_ids
                    assert all(m.bandwidth == 1.0 for m in result.group.members)
                    assert not result.failed_parts
                states = [flat_of(a) for a in averagers]
                assert all(torch.equal(states[0], s) for s in states[1:])
            report = forger.expect("FORGED").split()
            assert int(report[4]) == 0, "a DHT node accepted a record signed by the wrong key"

            found = averagers[0].dht.get(key, latest=True).value
            honest = {signer_of(s): e.value for s, e in found.items() if signer_of(s) in honest_ids}
            assert set(honest) == honest_ids and all(v[1] == 1.0 for v in honest.values())

            newcomer_dht = DHT(initial_peers=[averagers[0].dht.address])
            newcomer = DecentralizedAverager([torch.zeros(5000), torch.zeros(7, 3)], newcomer_dht, PREFIX)
            try:
                assert newcomer.load_state_from_peers(timeout=30) is not None
                assert newcomer.local_epoch == averagers[0].local_epoch == ROUNDS + 1
                assert torch.equal(flat_of(newcomer), flat_of(averagers[0]))
            finally:
                newcomer.shutdown()
                newcomer_dht.shutdown()
        finally:
            forger.close()
