"""A userspace WAN link: delay, loss and a rate between two TAP devices (these kernels lack tc's netem).

One process per link. It opens TAP device `inner` inside one network namespace and TAP device `outer` inside
another (through setns), prints READY, and from then on copies every Ethernet frame from one to the other: each
frame waits its turn behind the frames before it at `rate` (a serialising link), then `delay` seconds more, and is
dropped with probability `loss`. The caller gives the TAP devices their addresses and bridges after READY.

Frames are as large as the devices' MTU (WAN_MTU: 64000 bytes, so that a Python loop keeps up with 1 Gbit/s in
~2,000 frames per second); a lost frame is then a lost 64 KB TCP segment, coarser than real loss but just as
disruptive to TCP's congestion control. Profiles read like `100mbit-50ms` or `1gbit-20ms-1pct-loss`, where the
time is the round trip between two peers: each of their two links adds a quarter of it each way.

The link runs at nice LINK_NICE: it stands for the network, which does not slow down when the host's cores are busy,
and at the default priority a full test suite on 2 cores starved it enough that 1 MiB over a 1.5 s round trip took
past the 22 s its receiver allows (test_wan_round_trip.py failed now and then). Mostly asleep in select(), it takes
little from the peers it serves.

Run: `python -m tools.wanlink NS:TAP NS:TAP PROFILE` (root).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import os
import random
import re
import selectors
import struct
import sys
import time
from dataclasses import dataclass

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
CLONE_NEWNET = 0x40000000
WAN_MTU = 64000
LINK_NICE = -15  # the forwarding loop's scheduling priority (root may raise it; CFS weighs -15 about 30x nice 0)
READ_BATCH = 64  # frames read from one device per wake-up
RATE_UNITS = {"kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8}
PROFILE = re.compile(r"^(\d+(?:\.\d+)?)(kbit|mbit|gbit)(?:-(\d+(?:\.\d+)?)ms)?(?:-(\d+(?:\.\d+)?)pct-loss)?$")


@dataclass(frozen=True)
class Profile:
    """One peer's link: bytes per second, one-way delay in seconds, frame loss probability."""

    rate: float
    delay: float
    loss: float

    @classmethod
    def parse(cls, text: str) -> Profile:
        """`100mbit-50ms` / `1gbit-20ms-1pct-loss`: the round trip and loss are between two peers, each behind
        such a link, so each link gets a quarter of the round trip one way and about half the loss."""
        match = PROFILE.match(text)
        if not match:
            raise ValueError(f"{text!r} is not a link profile; expected e.g. 100mbit-50ms or 1gbit-20ms-1pct-loss")
        rate, unit, rtt_ms, loss_pct = match.groups()
        path_loss = float(loss_pct or 0) / 100
        per_link_loss = 1 - (1 - path_loss) ** 0.5
        return cls(float(rate) * RATE_UNITS[unit], float(rtt_ms or 0) / 4000, per_link_loss)


def _enter(namespace: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {namespace}")
    finally:
        os.close(fd)


def open_tap(namespace: str, name: str) -> int:
    """A non-blocking fd of a new TAP device `name` in `namespace` (it goes away with the fd)."""
    _enter(namespace)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


class Direction:
    """Frames from one device on their way to the other."""

    def __init__(self, source: int, sink: int, profile: Profile):
        self.source, self.sink, self.profile = source, sink, profile
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.free_at = 0.0  # when the link finishes serialising what it holds

    def read(self, now: float) -> None:
        for _ in range(READ_BATCH):
            try:
                frame = os.read(self.source, WAN_MTU + 64)
            except BlockingIOError:
                return
            if random.random() < self.profile.loss:
                continue
            self.free_at = max(now, self.free_at) + len(frame) / self.profile.rate
            self.queue.append((self.free_at + self.profile.delay, frame))

    def write_due(self, now: float) -> None:
        while self.queue and self.queue[0][0] <= now:
            _, frame = self.queue.popleft()
            try:
                os.write(self.sink, frame)
            except BlockingIOError:
                return  # the kernel's queue is full: the frame is lost, as on a congested link
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                # The far device is down (the caller sets the two up one after the other, and a frame from the
                # first can come due before the second is: under a loaded host's scheduling, it killed the link).
                # The frame is lost, as on a link whose far end is down.

    def next_due(self) -> float | None:
        return self.queue[0][0] if self.queue else None


def run(inner: str, outer: str, profile: Profile) -> None:
    """Open both devices, say READY, and forward frames until killed."""
    os.setpriority(os.PRIO_PROCESS, 0, LINK_NICE)
    a = open_tap(*inner.split(":"))
    b = open_tap(*outer.split(":"))
    print("READY", flush=True)
    directions = [Direction(a, b, profile), Direction(b, a, profile)]
    selector = selectors.DefaultSelector()
    for d in directions:
        selector.register(d.source, selectors.EVENT_READ, d)
    while True:
        now = time.monotonic()
        dues = [t for t in (d.next_due() for d in directions) if t is not None]
        timeout = max(0.0, min(dues) - now) if dues else None
        for key, _ in selector.select(timeout):
            key.data.read(time.monotonic())
        now = time.monotonic()
        for d in directions:
            d.write_due(now)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], Profile.parse(sys.argv[3]))
