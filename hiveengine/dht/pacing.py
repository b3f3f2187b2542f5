"""Store pacing: how fast one DHT node takes records in, from each sender and from all of them, so that a flood of
stores costs the node a bounded share of its CPU (decoding, checking and storing records costs about 15 ms of CPU
per MB on a small VM, and a loopback sender pushes about 100 MB/s).

Each sender (the authenticated peer a store came from) has a token bucket that refills at `rate` bytes per second up
to `burst` bytes; all senders together share one that refills at `total_rate` up to `total_burst`. A store of n bytes
takes n from both. A bucket may go below zero: the store's handler then waits, before it decodes anything, until the
refill has paid the debt. So a sender that stores faster than its rate is slowed to it (each of its calls takes
longer), and all senders together to the total rate. A store larger than a burst waits until that bucket is full,
then goes and leaves it in debt (so one large honest write is never refused for its size alone). A store that would
wait longer than `max_wait` takes nothing and is refused at once. Each record is charged at least MIN_RECORD_CHARGE
bytes (the node charges the rest once it decoded the store, before it checks a record): checking one record's shape
and signature costs about as much as decoding that much. Honest writes (registrations, progress, republishing) stay
far below the rates and rarely wait. A fresh identity starts with a full burst, so the total rate is what bounds a
flood from many identities; while such a flood keeps the total bucket in debt, every sender's stores to this node
wait (up to `max_wait`) or are refused, and go to the key's other replicas.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Hashable

from hiveengine.errors import PeerBusyError

logger = logging.getLogger(__name__)

MAX_PACED_SENDERS = 4096  # senders whose buckets are remembered; the least recently seen is forgotten first
MIN_RECORD_CHARGE = 4096  # bytes each stored record is charged at least (checking it costs ~0.15 ms of CPU)
REFUSAL_REPORT_SECONDS = 60.0  # refused stores are logged at most once per this many seconds (a flood logs little)


class TokenBucket:
    """`rate` tokens per second, at most `burst` held; the level may go negative (a debt that refills first)."""

    __slots__ = ("burst", "level", "rate", "stamp")

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst, self.level, self.stamp = rate, burst, burst, now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` tokens would be paid for, if taken now (0: at once); more than a burst waits only
        for a full bucket."""
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        return max(0.0, (min(amount, self.burst) - self.level) / self.rate)

    def take(self, amount: float) -> None:
        self.level -= amount


class StorePacer:
    """Token buckets per sender and in all (see the module docstring); `admit` says how long a store must wait."""

    def __init__(
        self,
        rate: float,
        burst: float,
        total_rate: float,
        total_burst: float,
        max_wait: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.rate, self.burst, self.max_wait, self.clock = rate, burst, max_wait, clock
        self.total = TokenBucket(total_rate, total_burst, clock())
        self.senders: collections.OrderedDict[Hashable, TokenBucket] = collections.OrderedDict()
        self.admitted: collections.Counter[Hashable] = collections.Counter()  # bytes admitted, by sender (bounded too)
        self.refused = 0  # stores refused for waiting too long
        self._reported: tuple[float, int] | None = None  # when refusals were last logged, and how many there were

    def admit(self, sender: Hashable, nbytes: int) -> float:
        """Charge a store of `nbytes` from `sender`; the seconds it must wait before it is decoded. PeerBusyError (and
        nothing charged) if that would be longer than `max_wait`."""
        now = self.clock()
        bucket = self.senders.pop(sender, None) or TokenBucket(self.rate, self.burst, now)
        self.senders[sender] = bucket  # the most recently seen last
        while len(self.senders) > MAX_PACED_SENDERS:
            forgotten, _ = self.senders.popitem(last=False)
            self.admitted.pop(forgotten, None)
        own, everyone = bucket.wait_for(nbytes, now), self.total.wait_for(nbytes, now)
        wait = max(own, everyone)
        if wait > self.max_wait:
            self.refused += 1
            self._report(sender, wait, "its own" if own >= everyone else "the total", now)
            raise PeerBusyError(
                f"this DHT node takes stores at DHTConfig.store_bytes_per_second = {self.rate:g} per sender and "
                f"total_store_bytes_per_second = {self.total.rate:g} in all: {nbytes} bytes more would wait "
                f"{wait:.1f} s, over max_store_wait = {self.max_wait:g} s; retry later"
            )
        bucket.take(nbytes)
        self.total.take(nbytes)
        self.admitted[sender] += nbytes
        return wait

    def _report(self, sender: Hashable, wait: float, bucket: str, now: float) -> None:
        """Log that stores are being refused: the first refusal, then at most once per REFUSAL_REPORT_SECONDS."""
        if self._reported is not None and now - self._reported[0] < REFUSAL_REPORT_SECONDS:
            return
        since = self.refused - (self._reported[1] if self._reported else 0)
        logger.warning(
            "refused %d DHT stores since the last report: the latest, from sender %s, would have waited %.1f s for "
            "%s store rate (DHTConfig.store_bytes_per_second, total_store_bytes_per_second, max_store_wait)",
            since,
            sender,
            wait,
            bucket,
        )
        self._reported = (now, self.refused)
