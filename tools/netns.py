"""Network namespaces joined through a bridge by rate-limited veth links, to benchmark real bandwidth limits.

Each peer i gets namespace `<prefix>-ns<i>` with interface `he0` at 10.77.0.(i+1)/24; both directions of its
link are shaped with a tc token bucket. Needs root, `ip` and `tc`; `available()` says whether this machine
can. Latency is not emulated: these kernels lack the netem qdisc. Only addresses inside the namespaces
this tool creates are used.
"""

from __future__ import annotations

import os
import shutil
import subprocess

SUBNET = "10.77.0"
INNER_IFACE = "he0"
TBF_BURST = "512kb"
TBF_LATENCY = "100ms"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _tc(*args: str) -> None:
    subprocess.run(["tc", *args], check=True, capture_output=True, text=True)


def available() -> bool:
    """True when namespaces, veth links, bridges and tc can be used here (root on Linux with iproute2)."""
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None


class ShapedNetwork:
    """`with ShapedNetwork(4, "1gbit") as net:` then run peer i with `net.command(i, argv)` at `net.host(i)`."""

    def __init__(self, peers: int, rate: str, prefix: str = "he"):
        self.peers, self.rate, self.prefix = peers, rate, prefix
        self.bridge = f"{prefix}-br"

    def namespace(self, i: int) -> str:
        return f"{self.prefix}-ns{i}"

    def host(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def command(self, i: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(i), *argv]

    def __enter__(self) -> ShapedNetwork:
        self.close()  # leftovers of an interrupted run
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        for i in range(self.peers):
            ns, outer = self.namespace(i), f"{self.prefix}-v{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", INNER_IFACE, "netns", ns)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.host(i)}/24", "dev", INNER_IFACE)
            _ip("-n", ns, "link", "set", INNER_IFACE, "up")
            shape = ["root", "tbf", "rate", self.rate, "burst", TBF_BURST, "latency", TBF_LATENCY]
            _tc("qdisc", "add", "dev", outer, *shape)  # towards the peer
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", INNER_IFACE, *shape], check=True)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the namespaces, links and bridge (idempotent)."""
        for i in range(self.peers):
            subprocess.run(["ip", "netns", "del", self.namespace(i)], capture_output=True)
            subprocess.run(["ip", "link", "del", f"{self.prefix}-v{i}"], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
