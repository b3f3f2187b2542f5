"""Training progress in the DHT: each peer publishes its epoch and samples; everyone reads the swarm's sum.

A peer's record lives under `{run_id}.progress` with the peer's owner marker as the subkey (the DHT's signed-
record convention: the subkey names the peer's public key), so every node refuses it unless that peer signed it,
and nobody can overwrite another peer's progress. It expires by itself when the peer dies. Peers step together
when the samples accumulated by everyone in the newest epoch reach the target batch size; a peer whose epoch is
behind the newest one loads state instead of averaging.

Claims are checked, not believed (a signature proves who wrote a record, not that it is true):
- an epoch counts only when corroborated: the swarm's epoch is at most EPOCH_LEAD above the epoch that a strict
  majority of the reporting peers has reached, and a peer that claims more is left out altogether (its samples
  too), so one record claiming epoch 10^9 neither stalls the swarm nor makes it download anyone's state;
- samples are bounded by a plausible rate: ProgressTracker counts another peer's samples only as fast as
  PLAUSIBLE_SPEEDUP times the swarm's lower-median speed (or our own, if faster) lets them grow between its reads,
  or up to PLAUSIBLE_SPEEDUP times the lower median of the samples claimed at that epoch (or ours), so a record
  claiming 10^9 samples weighs like a fast peer, not like the whole target. Sybils that outnumber the honest peers
  defeat both checks: private swarms (membership) and costly DHT ids are the answer to those.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from dataclasses import dataclass

from hiveengine.dht import get_dht_time
from hiveengine.dht.schemas import progress_problem
from hiveengine.dht.validation import signer_of

logger = logging.getLogger(__name__)

PROGRESS_TTL = 30.0  # seconds a progress record outlives its last refresh (a dead peer's then disappears)
SPEED_SMOOTHING = 0.1  # weight of the newest measurement in the samples/s moving average
EPOCH_LEAD = 1  # epochs a peer may be ahead of the epoch a majority reached (it stepped first) and still count
PLAUSIBLE_SPEEDUP = 2.0  # another peer's samples grow at most this many times the swarm's median speed


def progress_key(run_id: str) -> str:
    """The DHT key under which the peers of run `run_id` publish their progress."""
    return f"{run_id}.progress"


@dataclass(frozen=True)
class PeerProgress:
    """One peer's published progress."""

    peer: str
    epoch: int
    samples: int  # accumulated toward the next step of `epoch`
    samples_per_second: float
    time: float  # DHT time of the report
    loss: float | None = None
    client_mode: bool = False
    target: int = 0  # the samples at which this peer expects the swarm's next step
    waiting: bool = False  # it has its share of the target and waits for the swarm's step
    auxiliary: bool = False  # it averages but contributes no samples

    def record(self) -> list:
        """The progress as the list stored in the DHT (parse_progress reads it back)."""
        return [
            self.epoch,
            self.samples,
            self.samples_per_second,
            self.time,
            self.loss if self.loss is not None and math.isfinite(self.loss) else None,  # a NaN loss is no news
            bool(self.client_mode),
            self.target,
            bool(self.waiting),
            bool(self.auxiliary),
        ]


@dataclass(frozen=True)
class SwarmProgress:
    """What the swarm looks like from the DHT at one moment."""

    epoch: int  # the newest epoch any live peer reports
    samples: int  # accumulated by peers in that epoch
    peers: list[PeerProgress]

    @property
    def samples_per_second(self) -> float:
        """The swarm's throughput: the sum of its peers' samples per second."""
        return sum(p.samples_per_second for p in self.peers)

    @property
    def size(self) -> int:
        """How many peers report progress."""
        return len(self.peers)

    @property
    def target(self) -> int:
        """The target batch size the peers of the newest epoch announce (0: unknown)."""
        return max((p.target for p in self.peers if p.epoch == self.epoch), default=0)

    def eta(self, target_batch_size: int) -> float:
        """Seconds until the swarm reaches `target_batch_size` samples at its current speed."""
        speed = sum(p.samples_per_second for p in self.peers if p.epoch == self.epoch)
        return max(0.0, target_batch_size - self.samples) / speed if speed > 0 else math.inf


def parse_progress(found, mine: PeerProgress | None = None) -> SwarmProgress:
    """A SwarmProgress from the DHT's dictionary value; malformed records (buggy or hostile) are skipped. `mine`:
    the reading peer's own latest progress, which stands in for whatever record of it the DHT returned (a store
    that failed or is still under way must not hide the reader from itself)."""
    peers = []
    subkeys = found.value if found is not None and isinstance(found.value, dict) else {}
    for subkey, entry in subkeys.items():
        signer = signer_of(subkey)
        if signer is None or progress_problem(entry.value) is not None:
            continue  # unsigned (anyone could have written it) or malformed
        epoch, samples, speed, reported, loss, client, target, waiting, auxiliary = entry.value
        peer = signer.raw.hex()
        loss = None if loss is None else float(loss)
        peers.append(
            PeerProgress(peer, epoch, samples, float(speed), float(reported), loss, client, target, waiting, auxiliary)
        )
    if mine is not None:
        peers = [p for p in peers if p.peer != mine.peer] + [mine]
    peers = corroborated(peers)
    epoch = max((p.epoch for p in peers), default=0)
    samples = sum(p.samples for p in peers if p.epoch == epoch)
    return SwarmProgress(epoch, samples, sorted(peers, key=lambda p: p.peer))


def corroborated(peers: list[PeerProgress]) -> list[PeerProgress]:
    """The peers whose epoch is at most EPOCH_LEAD above the epoch a strict majority of them reached."""
    if not peers:
        return peers
    epochs = sorted((p.epoch for p in peers), reverse=True)
    majority = epochs[len(epochs) // 2]  # reached by len // 2 + 1 peers
    kept = [p for p in peers if p.epoch <= majority + EPOCH_LEAD]
    if len(kept) < len(peers):
        ignored = ", ".join(f"{p.peer[:12]} at {p.epoch}" for p in peers if p.epoch > majority + EPOCH_LEAD)
        logger.debug("ignoring uncorroborated epochs (the majority is at %d): %s", majority, ignored)
    return kept


def lower_median(values: list[float]) -> float:
    """The lower median (a single outlier in a pair cannot move it); 0 for none."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else 0.0


class ProgressTracker:
    """Publishes this peer's progress and reads the swarm's (awaitable; runs on the transport loop)."""

    def __init__(self, dht, run_id: str, client_mode: bool = False, auxiliary: bool = False, ttl: float = PROGRESS_TTL):
        self.dht, self.key, self.client_mode, self.ttl = dht, progress_key(run_id), client_mode, ttl
        self.auxiliary = auxiliary
        self.samples_per_second = 0.0
        self._last_sample_time: float | None = None
        self._record: PeerProgress | None = None  # our last report (None after retract)
        self._reporting = asyncio.Lock()  # one store at a time: a slower, older report would be refused anyway
        self._allowed: dict[str, tuple[int, float]] = {}  # peer -> (epoch, samples we count for it)
        self._last_fetch = time.monotonic()
        self.rate = 0.0  # samples/s another peer plausibly processes (from the last fetch)

    def count(self, samples: int) -> None:
        """Record that `samples` were just processed locally (updates the samples/s moving average)."""
        now = time.monotonic()
        if self._last_sample_time is not None and now > self._last_sample_time:
            speed = samples / (now - self._last_sample_time)
            if self.samples_per_second == 0:
                self.samples_per_second = speed
            else:
                self.samples_per_second += SPEED_SMOOTHING * (speed - self.samples_per_second)
        self._last_sample_time = now

    def _subkey(self) -> str:
        return self.dht.owner_marker

    async def report(
        self, epoch: int, samples: int, loss: float | None = None, target: int = 0, waiting: bool = False
    ) -> None:
        """Publish this peer's progress (epoch, samples this epoch, loss, share of the target, waiting)
        under the run's progress key, signed by this peer. Reports go out one at a time, each stamped when its
        turn comes, so an older one never lands after a newer one (and is refused)."""
        async with self._reporting:
            now = get_dht_time()
            self._record = mine = PeerProgress(
                self.dht.peer_id.raw.hex(),
                epoch,
                samples,
                self.samples_per_second,
                now,
                loss,
                self.client_mode,
                target,
                waiting,
                self.auxiliary,
            )
            if not await self.dht.astore(self.key, mine.record(), now + self.ttl, subkey=self._subkey()):
                logger.warning("could not publish progress (epoch %d, %d samples)", epoch, samples)

    async def retract(self) -> None:
        """Replace our record with a tombstone (a newer, empty entry), so peers stop counting us at once."""
        async with self._reporting:
            self._record = None
            now = get_dht_time()
            await self.dht.astore(self.key, None, now + self.ttl, subkey=self._subkey())

    async def fetch(self) -> SwarmProgress:
        """Read every peer's progress record of the run and summarize the swarm (claims checked); our own
        progress is our last report, whether or not the DHT holds it yet."""
        return self.plausible(parse_progress(await self.dht.aget(self.key, latest=True), self._record))

    def samples_by_now(self, progress: PeerProgress, now: float | None = None) -> float:
        """The most samples the peer of `progress` (as counted) can have processed by DHT time `now`: what it
        reported, plus the plausible rate since its report."""
        now = get_dht_time() if now is None else now
        return progress.samples + self.rate * max(0.0, now - progress.time)

    def plausible(self, swarm: SwarmProgress, now: float | None = None) -> SwarmProgress:
        """`swarm` with each other peer's samples cut to what a plausible rate allows since our last read."""
        now = time.monotonic() if now is None else now
        elapsed, self._last_fetch = max(0.0, now - self._last_fetch), now
        me = self.dht.peer_id.raw.hex()
        speeds = [p.samples_per_second for p in swarm.peers if not p.auxiliary and p.peer != me]
        rate = self.rate = PLAUSIBLE_SPEEDUP * max(lower_median(speeds), self.samples_per_second)
        by_epoch: dict[int, list[float]] = {}
        for p in swarm.peers:
            if not p.auxiliary:
                by_epoch.setdefault(p.epoch, []).append(p.samples)
        last = self._record
        my_epoch, my_samples = (last.epoch, last.samples) if last is not None else (0, 0)
        peers, allowed = [], {}
        for p in swarm.peers:
            if p.peer != me:
                epoch, before = self._allowed.get(p.peer, (p.epoch, 0.0))
                typical = lower_median(by_epoch.get(p.epoch, []))
                floor = PLAUSIBLE_SPEEDUP * max(typical, my_samples if p.epoch == my_epoch else 0)
                limit = max((before if epoch == p.epoch else 0.0) + rate * elapsed, floor)
                counted = min(p.samples, int(limit))
                allowed[p.peer] = (p.epoch, counted)
                p = dataclasses.replace(p, samples=counted) if counted < p.samples else p
            peers.append(p)
        self._allowed = allowed
        samples = sum(p.samples for p in peers if p.epoch == swarm.epoch)
        return SwarmProgress(swarm.epoch, samples, peers)
