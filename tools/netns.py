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
import sys
from collections.abc import Iterable
from pathlib import Path

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


PUBLIC_SUBNET = "198.51.100"  # the emulated Internet (TEST-NET-2: never routed for real)
HOME_SUBNET = "192.168.1"  # every home network is numbered alike, as real ones are
WAN_IFACE, LAN_IFACE = "wan", "lan"


def _in(ns: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, capture_output=True, text=True)


def _firewall(ns: str, iface: str) -> None:
    """Drop every packet that comes in on `iface` in `ns` except replies to connections opened from inside."""
    established = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]
    _in(ns, "iptables", "-A", "INPUT", "-i", iface, *established)
    _in(ns, "iptables", "-A", "INPUT", "-i", iface, "-j", "DROP")


def nat_available() -> bool:
    """True when the NAT rig can run here: `available()` and iptables (apt-get install iptables)."""
    return available() and shutil.which("iptables") is not None


class NatRig:
    """An emulated Internet: `public` hosts and `home` hosts each behind its own NAT router.

    `with NatRig(2, 2, prefix="hx") as rig:` then run a process with `rig.command(name, argv)`, where name is
    `pub0`, `pub1`, ... or `home0`, `home1`, .... Public host i is `rig.host("pub<i>")` (198.51.100.(10+i)) and
    can reach every public address; home host j sits at 192.168.1.(home_host) in its own LAN behind router j,
    whose WAN address `rig.router(j)` (198.51.100.(100+j)) is what others see (iptables MASQUERADE). A router
    forwards replies to connections its home opened and silently drops everything else that comes from the
    Internet, as a home router does: a public host that dials a home host's address gets no answer at all.
    With `rate` every link is shaped with a tc token bucket. The Internet is a bridge inside namespace
    `<prefix>-net`, so nothing is added to the caller's own network namespace.
    """

    def __init__(self, public: int = 2, home: int = 2, prefix: str = "hx", rate: str | None = None, home_host: int = 2):
        self.public, self.home, self.prefix, self.rate, self.home_host = public, home, prefix, rate, home_host
        self.net = f"{prefix}-net"

    def namespace(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def names(self) -> list[str]:
        return [f"pub{i}" for i in range(self.public)] + [f"home{j}" for j in range(self.home)]

    def host(self, name: str) -> str:
        """The address the host `name` has inside its own network (a home host's is private)."""
        if name.startswith("pub"):
            return f"{PUBLIC_SUBNET}.{10 + int(name[3:])}"
        return f"{HOME_SUBNET}.{self.home_host}"

    def router(self, j: int) -> str:
        """The public address of home j's router: where home j's connections appear to come from."""
        return f"{PUBLIC_SUBNET}.{100 + j}"

    def command(self, name: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(name), *argv]

    def _link(self, ns: str, inner: str, outer: str, outer_ns: str, address: str) -> None:
        """A veth pair: `inner` with `address` in `ns`, `outer` in `outer_ns` (both up, both shaped with `rate`)."""
        _ip("link", "add", outer, "netns", outer_ns, "type", "veth", "peer", "name", inner, "netns", ns)
        _ip("-n", ns, "addr", "add", address, "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", outer_ns, "link", "set", outer, "up")
        if self.rate:
            shape = ["root", "tbf", "rate", self.rate, "burst", TBF_BURST, "latency", TBF_LATENCY]
            _in(ns, "tc", "qdisc", "add", "dev", inner, *shape)
            _in(outer_ns, "tc", "qdisc", "add", "dev", outer, *shape)

    def __enter__(self) -> NatRig:
        self.close()  # leftovers of an interrupted run
        _ip("netns", "add", self.net)
        _ip("-n", self.net, "link", "add", "inet", "type", "bridge")
        _ip("-n", self.net, "link", "set", "inet", "up")
        for i in range(self.public):
            ns = self.namespace(f"pub{i}")
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            self._link(ns, INNER_IFACE, f"p{i}", self.net, f"{self.host(f'pub{i}')}/24")
            _ip("-n", self.net, "link", "set", f"p{i}", "master", "inet")
        for j in range(self.home):
            self._add_home(j)
        return self

    def _add_home(self, j: int) -> None:
        router, home = self.namespace(f"rt{j}"), self.namespace(f"home{j}")
        for ns in (router, home):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        self._link(router, WAN_IFACE, f"r{j}", self.net, f"{self.router(j)}/24")
        _ip("-n", self.net, "link", "set", f"r{j}", "master", "inet")
        self._link(home, INNER_IFACE, LAN_IFACE, router, f"{self.host(f'home{j}')}/24")
        _ip("-n", router, "addr", "add", f"{HOME_SUBNET}.1/24", "dev", LAN_IFACE)
        _ip("-n", home, "route", "add", "default", "via", f"{HOME_SUBNET}.1")
        _in(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _in(router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", WAN_IFACE, "-j", "MASQUERADE")
        for chain in ("INPUT", "FORWARD"):  # only replies come in from the Internet; the rest is dropped silently
            established = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]
            _in(router, "iptables", "-A", chain, "-i", WAN_IFACE, *established)
            _in(router, "iptables", "-A", chain, "-i", WAN_IFACE, "-j", "DROP")

    def cut(self, j: int, down: bool = True) -> None:
        """Cut (or restore) home j's uplink: its router's WAN link goes down (or up)."""
        _ip("-n", self.namespace(f"rt{j}"), "link", "set", WAN_IFACE, "down" if down else "up")

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove every namespace of the rig (idempotent); their links go with them."""
        names = [
            self.net,
            *(self.namespace(n) for n in self.names()),
            *(self.namespace(f"rt{j}") for j in range(self.home)),
        ]
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


WAN_SUBNET = "10.78.0"


class WanNetwork:
    """Peers in namespaces joined by WAN links with delay and loss (tools/wanlink.py, one process per link).

    `with WanNetwork(4, "100mbit-50ms") as net:` then run peer i with `net.command(i, argv)` at `net.host(i)`.
    Between any two peers the round trip is the profile's and each direction gets its rate. Peers in `firewalled`
    accept no incoming connection (iptables drops all but replies, as a home router does): others cannot dial them,
    they can dial out. That needs iptables (`nat_available()`).
    """

    def __init__(self, peers: int, profile: str, prefix: str = "hw", firewalled: Iterable[int] = ()):
        from tools.wanlink import Profile

        Profile.parse(profile)  # a bad profile fails before anything is created
        self.peers, self.profile, self.prefix = peers, profile, prefix
        self.firewalled = sorted(set(firewalled))
        self.net = f"{prefix}-net"
        self._links: list[subprocess.Popen] = []

    def namespace(self, i: int) -> str:
        return f"{self.prefix}-ns{i}"

    def host(self, i: int) -> str:
        return f"{WAN_SUBNET}.{i + 1}"

    def command(self, i: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(i), *argv]

    def __enter__(self) -> WanNetwork:
        from tools.wanlink import WAN_MTU

        self.close()
        _ip("netns", "add", self.net)
        _ip("-n", self.net, "link", "add", "inet", "type", "bridge")
        _ip("-n", self.net, "link", "set", "inet", "up")
        root = str(Path(__file__).resolve().parent.parent)
        for i in range(self.peers):
            ns = self.namespace(i)
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            argv = [sys.executable, "-m", "tools.wanlink", f"{ns}:{INNER_IFACE}", f"{self.net}:t{i}", self.profile]
            link = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=root)
            self._links.append(link)
            if link.stdout.readline().strip() != "READY":
                raise RuntimeError(f"the WAN link of peer {i} did not start ({link.wait()})")
            _ip("-n", ns, "addr", "add", f"{self.host(i)}/24", "dev", INNER_IFACE)
            _ip("-n", ns, "link", "set", INNER_IFACE, "mtu", str(WAN_MTU), "up")
            _ip("-n", self.net, "link", "set", f"t{i}", "mtu", str(WAN_MTU), "master", "inet", "up")
        for i in self.firewalled:
            _firewall(self.namespace(i), INNER_IFACE)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the links and remove the namespaces (idempotent)."""
        for link in self._links:
            link.kill()
            link.wait(10)
        self._links.clear()
        for ns in [self.net, *(self.namespace(i) for i in range(self.peers))]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
