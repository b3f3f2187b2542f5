"""`hiveengine doctor`: can this machine take part in a swarm, and what to fix if not.

It checks, each with what to do about a problem: the address this process announces, whether other peers can
dial it (initial peers are asked to dial it back: transport/reachability.py), the UCX transports UCX found, the
wire links are dialled with, encryption, and the GPU (and whether UCX can move its memory).
"""

from __future__ import annotations

import ipaddress
import os
import re

from hiveengine.cli.common import add_initial_peers, initial_peers
from hiveengine.engine.env import INITIAL_PEERS_ENV
from hiveengine.transport import Peer, PeerAddress, TransportLimits
from hiveengine.transport.peer import ANNOUNCE_HOST_ENV
from hiveengine.transport.reachability import check_reachability_sync
from hiveengine.transport.runtime import PORT_ENV, TCP_PORT_ENV

PROBLEMS_EXIT_CODE = 1
RESOURCE = re.compile(r"resource \d+\s*:.*--\s*(\S+)")
RDMA_TRANSPORTS = ("rc", "ud", "dc", "ib", "rdmacm")


def add_commands(sub) -> None:
    doctor = sub.add_parser("doctor", help="check this machine's reachability, transports, encryption and GPU")
    add_initial_peers(
        doctor, "peers of the swarm to dial us back (without: reachability is not checked)", env=INITIAL_PEERS_ENV
    )
    doctor.add_argument("--timeout", type=float, default=15.0, help="seconds the dial-back check may take")
    doctor.set_defaults(handler=cmd_doctor)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _private(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_private
    except ValueError:
        return False


def ucx_transports(peer: Peer) -> list[str]:
    """The transport/device pairs UCX found on this machine (e.g. tcp/eth0, posix/memory)."""
    return RESOURCE.findall(peer.runtime.reactor.context.info)


def diagnose(peer: Peer, helpers: list[str], timeout: float) -> list[tuple[str, str, str | None]]:
    """(check, finding, what to do or None) for each check."""
    rows = []
    address = peer.address
    fix = None
    if _loopback(address.host) and any(not _loopback(PeerAddress.parse(h).host) for h in helpers):
        fix = f"others cannot reach {address.host}: set {ANNOUNCE_HOST_ENV} to this host's public address"
    rows.append(("announced address", str(address), fix))
    if helpers:
        found = check_reachability_sync(peer, helpers, timeout)
        observed = f" (our links come from {found.observed_host})" if found.observed_host else ""
        if found.reachable:
            rows.append(("reachability", f"reachable: {found.reason}{observed}", None))
        elif found.reachable is False:
            fix = (
                f"this peer opens its own links (over TCP) and others reach it only through a relay (an initial "
                f"peer that relays; without one it trains as a client): to be dialled directly, forward ports "
                f"{peer.port} and {peer.runtime.tcp_port} to this host (fix them with {PORT_ENV} and {TCP_PORT_ENV}) "
                f"and announce the public address with {ANNOUNCE_HOST_ENV}"
            )
            if found.observed_host and found.observed_host != address.host:
                fix += f" (the swarm sees us at {found.observed_host})"
            rows.append(("reachability", f"unreachable: {found.reason}{observed}", fix))
        else:
            rows.append(("reachability", f"unknown: {found.reason}", "check --initial-peers and that they run"))
    else:
        hint = "pass --initial-peers (any peer of the swarm) to have it dial us back"
        if _private(address.host) and not _loopback(address.host):
            hint = f"{address.host} is a private address: peers outside this network cannot dial it; " + hint
        rows.append(("reachability", "not checked", hint))
    transports = ucx_transports(peer)
    tls = os.environ.get("UCX_TLS", "all")
    rdma = [t for t in transports if t.split("/")[0].startswith(RDMA_TRANSPORTS)]
    between_hosts = "RDMA between hosts" if rdma else "TCP between hosts (for RDMA, a system UCX built with verbs)"
    rows.append(("UCX transports", f"{', '.join(transports) or 'none'} (UCX_TLS={tls}); {between_hosts}", None))
    limits = TransportLimits()
    rails = f"; TCP wires carry large frames over {limits.tcp_rails} more connections (HIVEENGINE_TCP_RAILS)"
    rows.append(("links", f"dialled with {limits.link!r} (HIVEENGINE_LINK: auto, ucx or tcp){rails}", None))
    if limits.encrypt:
        rows.append(("encryption", "on: AES-256-GCM between hosts, every message authenticated", None))
    else:
        rows.append(
            ("encryption", "off (HIVEENGINE_ENCRYPT=0): authenticated but readable", "use it only in trusted networks")
        )
    rows.append(_gpu_row(peer))
    return rows


def _gpu_row(peer: Peer) -> tuple[str, str, str | None]:
    import torch

    if not torch.cuda.is_available():
        return "GPU", "none: CPU kernels (native C)", None
    name = torch.cuda.get_device_name()
    if not peer.runtime.reactor.context.cuda_support:
        return "GPU", f"{name}; UCX without CUDA support", "install ucxx-cu12 so tensors move GPU to GPU"
    return "GPU", f"{name}; UCX moves CUDA memory", None


def cmd_doctor(args) -> int:
    helpers = initial_peers(args, os.environ.get(INITIAL_PEERS_ENV))
    peer = Peer()
    try:
        rows = diagnose(peer, helpers, args.timeout)
    finally:
        peer.shutdown()
    width = max(len(check) for check, _, _ in rows)
    problems = 0
    for check, finding, fix in rows:
        print(f"{check:<{width}}  {finding}")
        if fix:
            problems += 1
            print(f"{'':<{width}}  -> {fix}")
    print(f"{problems} problem(s)" if problems else "no problems found")
    return PROBLEMS_EXIT_CODE if problems else 0
