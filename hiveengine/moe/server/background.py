"""`background_server`: an expert Server (and its DHT node) in a child process, for scripts, notebooks and tests.

The child is started with the `spawn` method: it shares no threads, locks or UCX state with the caller (forking a
process whose transport threads are running is unsafe). So every argument must be picklable (use
`functools.partial(torch.optim.SGD, lr=0.1)`, not a lambda), and a custom expert class must be registered at the
top level of an importable module: the child imports the module that defines its factory before building experts.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from hiveengine.moe.errors import ExpertError
from hiveengine.moe.server.experts import get_expert_class

START_TIMEOUT = 120.0  # seconds the child may take to import torch, build its experts and start serving
SHUTDOWN_TIMEOUT = 30.0  # seconds a stopping child may take to shut down cleanly before it is killed
_STOP = "stop"


@dataclass(frozen=True)
class BackgroundServerInfo:
    """What a background server reports once it serves: where to call its experts (`address`), the DHT node it
    declares them in (`dht_address`, None without a DHT; pass it as a client DHT's initial peer), its uids and its
    process id."""

    address: str
    dht_address: str | None
    uids: tuple[str, ...]
    pid: int


@contextlib.contextmanager
def background_server(
    expert_cls: str,
    uids: Sequence[str],
    hidden_dim: int,
    *,
    use_dht: bool = True,
    initial_peers: Sequence[str] = (),
    start_timeout: float = START_TIMEOUT,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    **server_kwargs,
) -> Iterator[BackgroundServerInfo]:
    """Run `Server.create(expert_cls, uids, hidden_dim, **server_kwargs)` in a child process until the block exits;
    yield its BackgroundServerInfo once it serves. With `use_dht`, the child runs a DHT node (joining
    `initial_peers`, or starting a swarm) and declares its experts there. A child that fails to start raises its
    error here; one that does not report within `start_timeout` is killed. On exit the child shuts down cleanly (it
    is killed after `shutdown_timeout`); it also stops by itself if this process dies."""
    factory_module = get_expert_class(expert_cls).make.__module__  # an unknown class fails here, before spawning
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    options = dict(use_dht=use_dht, initial_peers=list(initial_peers), factory_module=factory_module)
    process = context.Process(
        target=_serve,
        args=(theirs, expert_cls, list(uids), hidden_dim, options, server_kwargs),
        name="hiveengine-background-server",
        daemon=True,
    )
    process.start()
    theirs.close()
    try:
        info = _await_start(ours, process, start_timeout)
        yield info
    finally:
        _stop(ours, process, shutdown_timeout)


def _await_start(conn, process, timeout: float) -> BackgroundServerInfo:
    if not conn.poll(timeout):
        raise ExpertError(f"the background server did not start within {timeout} s; raise start_timeout")
    try:
        kind, payload = conn.recv()
    except EOFError:
        process.join(SHUTDOWN_TIMEOUT)
        raise ExpertError(f"the background server exited (code {process.exitcode}) before it started") from None
    if kind == "error":
        error, text = payload
        if isinstance(error, BaseException):
            raise error from ExpertError(f"in the background server:\n{text}")
        raise ExpertError(f"the background server failed to start:\n{text}")
    return payload


def _stop(conn, process, timeout: float) -> None:
    with contextlib.suppress(OSError):
        conn.send(_STOP)
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join(timeout)
    conn.close()


def _serve(conn, expert_cls: str, uids: list[str], hidden_dim: int, options: dict, server_kwargs: dict) -> None:
    """The child: build the DHT node and the server, report, serve until told to stop or the parent is gone."""
    from hiveengine.dht import DHT
    from hiveengine.moe.server.server import Server

    dht = server = None
    try:
        if options["factory_module"] not in ("__main__", "__mp_main__"):
            importlib.import_module(options["factory_module"])  # registers a custom expert class
        if options["use_dht"]:
            dht = DHT(initial_peers=options["initial_peers"])
        server = Server.create(expert_cls, uids, hidden_dim, dht=dht, **server_kwargs)
        info = BackgroundServerInfo(
            server.address, None if dht is None else str(dht.address), tuple(server.experts), os.getpid()
        )
        conn.send(("ready", info))
    except BaseException as e:
        _report_failure(conn, e)
        _close(server, dht)
        return
    try:
        while True:
            try:
                if conn.recv() == _STOP:
                    break
            except (EOFError, OSError):  # the parent is gone
                break
    finally:
        _close(server, dht)


def _report_failure(conn, error: BaseException) -> None:
    text = "".join(traceback.format_exception(error))
    try:
        pickle.loads(pickle.dumps(error))  # the parent must be able to rebuild it
    except Exception:
        error = None
    with contextlib.suppress(OSError):
        conn.send(("error", (error, text)))


def _close(server, dht) -> None:
    if server is not None:
        server.shutdown()
    if dht is not None:
        dht.shutdown()
