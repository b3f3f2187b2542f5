"""hiveengine's UCX defaults: what is set, what the user's settings keep, and the TCP-only rendezvous scheme."""

import pytest

from hiveengine.transport import UCX_DEFAULTS, configure_ucx_environment


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
