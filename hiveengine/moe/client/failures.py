"""The expert servers this process saw fail recently: routing leaves them out until their mark expires.

A server that is dead (or too slow) stays declared in the DHT until its declarations expire, up to two update
periods later. Without this record every batch would choose it again and wait for it. A peer is marked when a call
to it fails at the transport level (it could not be reached, the connection broke, or the deadline passed), and
when it answers NaN or Inf (RemoteMixtureOfExperts: it is broken or hostile); an error reply from a live server
(an unknown uid, a malformed request, a busy server) does not mark it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from hiveengine.errors import ConnectionLostError, HandshakeError, PeerUnreachableError, RPCTimeoutError

FAILED_PEER_EXPIRY = 30.0  # seconds a peer whose call failed is left out of routing; then it gets another chance
PEER_FAILURES = (PeerUnreachableError, ConnectionLostError, HandshakeError, RPCTimeoutError, TimeoutError)


def is_peer_failure(error: BaseException) -> bool:
    """Whether `error` says the peer itself is unreachable, gone or too slow (not that it refused the request)."""
    return isinstance(error, PEER_FAILURES)


class FailedPeers:
    """Addresses of peers whose calls failed, each left out for `expiry` seconds after its last failure.
    Thread-safe: calls fail on the transport loop, routing reads it from the caller's thread."""

    def __init__(self, expiry: float = FAILED_PEER_EXPIRY, clock: Callable[[], float] = time.monotonic):
        self.expiry, self._clock = expiry, clock
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, address: str) -> None:
        """Leave `address` out of routing from now until `expiry` seconds from now."""
        with self._lock:
            self._until[str(address)] = self._clock() + self.expiry

    def discard(self, address: str) -> None:
        """Forget a failure of `address` (e.g. it answered again)."""
        with self._lock:
            self._until.pop(str(address), None)

    def addresses(self) -> frozenset[str]:
        """The addresses left out now (expired marks are dropped)."""
        now = self._clock()
        with self._lock:
            self._until = {a: until for a, until in self._until.items() if until > now}
            return frozenset(self._until)

    def __contains__(self, address: object) -> bool:
        return address in self.addresses()

    def __len__(self) -> int:
        return len(self.addresses())


FAILED_PEERS = FailedPeers()  # shared by the RemoteMixtureOfExperts layers of this process unless given another
