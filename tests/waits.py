"""Waiting, with a deadline, for a condition that a peer's transport loop makes true."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from hiveengine.transport import Peer


def until(peer: Peer, condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until `condition()` holds, checked on `peer`'s transport loop every few ms; AssertionError naming `what`
    after `timeout` seconds."""

    async def wait():
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not happen within {timeout} s")
            await asyncio.sleep(0.01)

    peer.runtime.run(wait(), timeout + 10)
