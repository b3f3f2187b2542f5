"""Transport settings from the environment: UCX defaults, the TCP-only rendezvous scheme, the polling window."""

import pytest

from hiveengine.errors import ConfigurationError
from hiveengine.transport import UCX_DEFAULTS, configure_ucx_environment
from hiveengine.transport.reactor import DEFAULT_SPIN_US, SPIN_ENV, spin_seconds


def test_defaults_fill_only_what_the_user_left_unset():
    environ = {"UCX_MAX_RNDV_RAILS": "1", "PATH": "/bin"}
    settings = configure_ucx_environment(environ)
    assert environ["UCX_MAX_RNDV_RAILS"] == "1"
    assert environ["UCX_MM_ERROR_HANDLING"] == UCX_DEFAULTS["UCX_MM_ERROR_HANDLING"]
    assert "PATH" not in settings and settings["UCX_MAX_RNDV_RAILS"] == "1"


@pytest.mark.parametrize("tls", ["tcp", "tcp,self", "rc,tcp,self", "tcp:aux,self"])
def test_tcp_only_peers_read_rendezvous_data_from_the_sender(tls):
    environ = {"UCX_TLS": tls}
    configure_ucx_environment(environ)
    assert environ["UCX_RNDV_SCHEME"] == "get_zcopy"


@pytest.mark.parametrize("tls", [None, "sm,tcp,self", "tcp,posix", "^sm", "all", "tcp,cuda_ipc"])
def test_shared_memory_keeps_the_default_scheme(tls):
    environ = {} if tls is None else {"UCX_TLS": tls}
    configure_ucx_environment(environ)
    assert "UCX_RNDV_SCHEME" not in environ


def test_a_scheme_the_user_chose_is_kept():
    environ = {"UCX_TLS": "tcp", "UCX_RNDV_SCHEME": "put_zcopy"}
    configure_ucx_environment(environ)
    assert environ["UCX_RNDV_SCHEME"] == "put_zcopy"


def test_adaptive_polling_window_comes_from_the_environment():
    assert spin_seconds({}) == DEFAULT_SPIN_US / 1e6
    assert spin_seconds({SPIN_ENV: "0"}) == 0
    assert spin_seconds({SPIN_ENV: "50"}) == pytest.approx(50e-6)
    for bad in ("-1", "fast", "1e9"):
        with pytest.raises(ConfigurationError, match=SPIN_ENV):
            spin_seconds({SPIN_ENV: bad})
