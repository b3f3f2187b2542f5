"""UCX settings chosen for hiveengine; applied to the environment before ucxx is first imported."""

from __future__ import annotations

import os

# Each of these may be overridden by setting it in the environment before hiveengine starts a peer.
UCX_DEFAULTS = {
    # Shared memory between processes on one host is used only with error handling enabled.
    "UCX_MM_ERROR_HANDLING": "y",
    # Two rendezvous rails roughly double TCP throughput on loopback (ucxx would force 1).
    "UCX_MAX_RNDV_RAILS": "2",
    "UCX_RNDV_THRESH": "8192",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
    # CUDA memory-type cache must be off with CUDA frames (ucxx would set this too).
    "UCX_MEMTYPE_CACHE": "n",
    # ucxx logs every failed endpoint at ERROR on stderr; hiveengine reports those failures as typed errors.
    "UCXX_LOG_LEVEL": "FATAL",
}


def configure_ucx_environment() -> dict[str, str]:
    """Set hiveengine's UCX defaults where the user has not; return the UCX_* settings in force."""
    for name, value in UCX_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return {k: v for k, v in os.environ.items() if k.startswith("UCX")}


def import_ucxx():
    """Import ucxx after applying our settings (ucxx reads the environment once, at import)."""
    configure_ucx_environment()
    import ucxx
    import ucxx._lib.libucxx as libucxx

    return ucxx, libucxx
