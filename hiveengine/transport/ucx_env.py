"""UCX settings chosen for hiveengine; applied to the environment before ucxx is first imported."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping, MutableMapping

from hiveengine.errors import ConfigurationError

# Each of these may be overridden by setting it in the environment before hiveengine starts a peer.
UCX_DEFAULTS = {
    # Shared memory between processes on one host is used only with error handling enabled.
    "UCX_MM_ERROR_HANDLING": "y",
    # Two rendezvous rails roughly double TCP throughput on loopback (ucxx would force 1).
    "UCX_MAX_RNDV_RAILS": "2",
    "UCX_RNDV_THRESH": "8192",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
    # UCX's TCP transport dials its data connections with a blocking connect() on the progress thread by default
    # (UCX_TCP_CONN_NB=n): one peer that cannot be dialled (behind a NAT, or an attacker announcing a blackholed
    # address) froze the whole transport of whoever dialled it, for the kernel's SYN timeout (measured in the NAT
    # rig, tests/test_nat.py: every other peer's calls timed out). Non-blocking, a failed dial costs only its caller.
    "UCX_TCP_CONN_NB": "y",
    # UCX's TCP transport moves data in segments of 8 KiB by default; 256 KiB ones roughly double its throughput
    # (bench/transport.py ucx-tcp-plain on a 2-core VM: 0.6 -> 1.0 GB/s at 1 MiB, 0.9 -> 1.8 GB/s at 256 MiB). A
    # peer cannot take segments larger than its receive size (the link fails mid-message), so the handshake checks
    # that what each side sends fits what the other takes.
    "UCX_TCP_TX_SEG_SIZE": "256k",
    "UCX_TCP_RX_SEG_SIZE": "256k",
    # CUDA memory-type cache must be off with CUDA frames (ucxx would set this too).
    "UCX_MEMTYPE_CACHE": "n",
    # ucxx logs every failed endpoint at ERROR on stderr; hiveengine reports those failures as typed errors.
    "UCXX_LOG_LEVEL": "FATAL",
}
# Where peers reach each other only over TCP (UCX_TLS without a shared-memory transport), the receiver
# reads rendezvous data from the sender (one request round trip) instead of the default fenced write,
# whose extra round trips queue behind data on a link with deep buffers: a 2-peer 64 MB all-reduce on a
# shaped 1 Gbit/s link went from 1.11 to 0.57 s. Not with shared memory: there a sender whose reader was
# killed mid-transfer is never told (its send hangs), so the default scheme stays.
TCP_ONLY_DEFAULTS = {"UCX_RNDV_SCHEME": "get_zcopy"}
SHARED_MEMORY_TRANSPORTS = ("sm", "shm", "mm", "posix", "sysv", "xpmem", "knem", "cma", "cuda_ipc", "all")


def _tcp_only(tls: str | None) -> bool:
    """Whether a UCX_TLS value lets UCX use TCP but no shared-memory transport ("^..." excludes: not TCP-only)."""
    if not tls or tls.startswith("^"):
        return False
    names = [t.strip().split(":")[0] for t in tls.split(",")]
    return "tcp" in names and not any(n in SHARED_MEMORY_TRANSPORTS for n in names)


def configure_ucx_environment(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set hiveengine's UCX defaults in `environ` where the user has not; return the UCX_* settings in force."""
    defaults = {**UCX_DEFAULTS, **(TCP_ONLY_DEFAULTS if _tcp_only(environ.get("UCX_TLS")) else {})}
    for name, value in defaults.items():
        environ.setdefault(name, value)
    return {k: v for k, v in environ.items() if k.startswith("UCX")}


_MEMUNITS = re.compile(r"(\d+)([kmg]?)b?", re.IGNORECASE)
_UNIT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _memunits(name: str, environ: Mapping[str, str]) -> int:
    """A UCX size setting in bytes ("262144", "256k", "256KB", ...)."""
    raw = environ.get(name, UCX_DEFAULTS[name])
    match = _MEMUNITS.fullmatch(raw.strip())
    if match is None:
        raise ConfigurationError(f"{name}={raw!r}: expected a size such as 262144 or 256k")
    return int(match[1]) * _UNIT[match[2].lower()]


def tcp_segments(environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(send, receive) sizes in bytes of the segments UCX's TCP transport uses in this process: what a peer sends
    must fit what the other receives (handshake.py checks both directions when a UCX link opens)."""
    send, receive = _memunits("UCX_TCP_TX_SEG_SIZE", environ), _memunits("UCX_TCP_RX_SEG_SIZE", environ)
    if not 0 < send <= receive < 1 << 32:
        raise ConfigurationError(
            f"UCX_TCP_TX_SEG_SIZE ({send} bytes) must be positive and at most UCX_TCP_RX_SEG_SIZE ({receive} bytes, "
            "under 4 GiB)"
        )
    return send, receive


@functools.cache
def segments_in_force() -> tuple[int, int]:
    """tcp_segments() as UCX read them: once, when ucxx was first imported (later changes to the environment do
    not reach UCX, so the handshake must not announce them either)."""
    return tcp_segments()


def import_ucxx():
    """Import ucxx after applying our settings (ucxx reads the environment once, at import)."""
    configure_ucx_environment()
    segments_in_force()  # a clear error for sizes UCX would refuse with "Invalid parameter"
    import ucxx
    import ucxx._lib.libucxx as libucxx

    return ucxx, libucxx
