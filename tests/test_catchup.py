"""Corroborated catch-up (issue 16 item 4): a newcomer loads only a state whose hash a quorum attests, verified.

Honest averagers (each its own DHT node and transport peer, real UCX on 127.0.0.1) average, so they hold and
advertise the same state. tests/peers/forger_state.py is a real hostile donor whose tensors are all FOREIGN: it
advertises them under a huge epoch (the issue's state hijack), or advertises the honest epoch and digest while
serving its own bytes. No newcomer ever loads a FOREIGN value.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch

from hiveengine.averaging import DecentralizedAverager
from hiveengine.dht import DHT
from tests.peers.forger_state import FOREIGN
from tests.procs import PeerProcess

pytestmark = pytest.mark.timeout(240)
PREFIX = "catchup-test"
STEP_TIMEOUT = 20.0


@contextlib.contextmanager
def swarm(count: int):
    """`count` honest averagers and a newcomer (the last one, all zeros), each with its own DHT node."""
    dhts = [DHT()]
    dhts += [DHT(initial_peers=[dhts[0].address]) for _ in range(count)]
    gen = torch.Generator().manual_seed(5)
    averagers = []
    try:
        for dht in dhts[:-1]:
            tensors = [torch.randn(5000, generator=gen), torch.randn(7, 3, generator=gen)]
            averagers.append(DecentralizedAverager(tensors, dht, PREFIX, matchmaking_time=1.0, aggregation="mean"))
        averagers.append(DecentralizedAverager([torch.zeros(5000), torch.zeros(7, 3)], dhts[-1], PREFIX))
        yield averagers[:-1], averagers[-1]
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in reversed(dhts):
            dht.shutdown()


def average(averagers, rounds: int) -> None:
    async def all_steps():
        return await asyncio.gather(*(a.astep(timeout=STEP_TIMEOUT, expected_peers=len(averagers)) for a in averagers))

    for _ in range(rounds):
        results = averagers[0].peer.runtime.run(all_steps(), STEP_TIMEOUT + 10)
        assert all(r is not None and not r.failed_parts for r in results)


def flat_of(averager) -> torch.Tensor:
    with averager.get_tensors():
        return averager.flat.clone()


@contextlib.contextmanager
def forger(averager, mode: str):
    proc = PeerProcess("forger_state.py", str(averager.dht.address), PREFIX, mode)
    try:
        proc.expect("ADVERTISED")
        yield proc
    finally:
        proc.close()


def served(proc: PeerProcess) -> int:
    proc.proc.stdin.write("count\n")
    proc.proc.stdin.flush()
    return int(proc.expect("SERVED"))


def test_a_state_advertised_under_a_huge_epoch_is_never_loaded():
    with swarm(3) as (honest, newcomer), forger(honest[0], "epoch"):
        average(honest, 2)
        expected = flat_of(honest[0])
        for _ in range(3):
            assert newcomer.load_state_from_peers(timeout=30) is not None
            assert newcomer.local_epoch == 2
            got = flat_of(newcomer)
            assert torch.equal(got, expected) and not (got == FOREIGN).any()
        assert honest[1].load_state_from_peers(timeout=30) is not None  # a peer that thinks it is behind
        assert honest[1].local_epoch == 2 and torch.equal(flat_of(honest[1]), expected)


def test_a_donor_serving_other_bytes_than_attested_is_refused_and_another_tried():
    with swarm(2) as (honest, newcomer):
        average(honest, 1)
        expected = flat_of(honest[0])
        with forger(honest[0], "copy") as liar:
            for averager in honest:  # only the liar advertises now: it alone attests (epoch 1, honest digest)
                averager.allow_state_sharing = False
            assert newcomer.load_state_from_peers(timeout=30) is None
            assert served(liar) >= 1, "the newcomer never asked the only donor"
            assert torch.equal(flat_of(newcomer), torch.zeros(5000 + 21)) and newcomer.local_epoch == 0

            for averager in honest:
                averager.allow_state_sharing = True
            for _ in range(3):  # whichever donor comes first, the verified state is the honest one
                assert newcomer.load_state_from_peers(timeout=30) is not None
                got = flat_of(newcomer)
                assert torch.equal(got, expected) and not (got == FOREIGN).any()
                assert newcomer.local_epoch == 1
