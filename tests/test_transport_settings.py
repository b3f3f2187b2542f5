"""Transport settings from the environment: UCX defaults, the TCP-only rendezvous scheme, the polling window."""

import pytest

from hiveengine.errors import ConfigurationError
from hiveengine.transport import UCX_DEFAULTS, configure_ucx_environment
from hiveengine.transport.reactor import DEFAULT_SPIN_US, SPIN_ENV, spin_seconds
from hiveengine.transport.ucx_env import tcp_segments


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


def test_ucx_tcp_segments_default_to_256_kib_and_read_ucx_size_units():
    assert tcp_segments({}) == (256 << 10, 256 << 10)
    assert tcp_segments({"UCX_TCP_TX_SEG_SIZE": "8K", "UCX_TCP_RX_SEG_SIZE": "1mb"}) == (8 << 10, 1 << 20)
    assert tcp_segments({"UCX_TCP_TX_SEG_SIZE": "65536"}) == (65536, 256 << 10)


@pytest.mark.parametrize(
    "environ",
    [{"UCX_TCP_RX_SEG_SIZE": "lots"}, {"UCX_TCP_TX_SEG_SIZE": "1m"}, {"UCX_TCP_TX_SEG_SIZE": "0"}],
)
def test_ucx_tcp_segments_that_ucx_would_refuse_get_a_clear_error(environ):
    with pytest.raises(ConfigurationError, match="UCX_TCP_"):
        tcp_segments(environ)


def test_adaptive_polling_window_comes_from_the_environment():
    assert spin_seconds({}) == DEFAULT_SPIN_US / 1e6
    assert spin_seconds({SPIN_ENV: "0"}) == 0
    assert spin_seconds({SPIN_ENV: "50"}) == pytest.approx(50e-6)
    for bad in ("-1", "fast", "1e9"):
        with pytest.raises(ConfigurationError, match=SPIN_ENV):
            spin_seconds({SPIN_ENV: bad})


def test_the_loop_polls_longer_only_while_a_thread_blocks_on_it():
    """A blocking call (Runtime.run) widens the polling window WAITED_SPIN_FACTOR times while it waits, and ends
    the wait once its result is ready."""
    from hiveengine.transport import Peer
    from hiveengine.transport.reactor import WAITED_SPIN_FACTOR

    peer = Peer()
    try:
        reactor = peer.runtime.reactor

        async def seen() -> tuple[int, float]:
            return reactor._waiting, reactor._spin_window()

        waiting, window = peer.runtime.run(seen(), 10)
        assert waiting >= 1 and window == pytest.approx(WAITED_SPIN_FACTOR * spin_seconds())
        assert reactor._waiting == 0 and reactor._spin_window() == pytest.approx(spin_seconds())
    finally:
        peer.shutdown()
