"""`hiveengine launch` and `hiveengine status` end to end, with real worker processes."""

from __future__ import annotations

import signal

import psutil
import pytest

from hiveengine.cli.launch import BOOTSTRAP_PREFIX
from hiveengine.dht import DHT
from hiveengine.engine import LaunchEnv
from hiveengine.engine.env import RUN_ID_ENV
from hiveengine.optim import ProgressTracker
from tests.procs import PEERS, PeerProcess

pytestmark = pytest.mark.timeout(180)
WORKER = str(PEERS / "launch_worker.py")


def launch(*args: str) -> PeerProcess:
    return PeerProcess("hiveengine.cli", "launch", *args)


def worker_lines(launcher: PeerProcess, word: str, n: int) -> dict[int, list[str]]:
    """{rank: the rest of its line} for the first line starting with `word` from each of n workers."""
    found = {}
    while len(found) < n:
        rank, _, rest = launcher.expect("[worker ").partition("] ")
        if rest.startswith(word):
            found[int(rank)] = rest.split()[1:]
    return found


def test_three_workers_from_different_models_train_together_and_end_identical():
    launcher = launch("--nproc", "3", "--run-id", "launch-test", WORKER, "train")
    try:
        assert launcher.expect(BOOTSTRAP_PREFIX).startswith("ucx://")
        done = worker_lines(launcher, "DONE", 3)
        assert launcher.proc.wait(60) == 0, launcher.tail()
    finally:
        launcher.kill()
    assert {d[0] for d in done.values()} == {"3"}
    assert len({d[1] for d in done.values()}) == 1, done  # identical parameters, whatever each started from


def test_ctrl_c_stops_every_worker_and_leaves_no_orphans():
    launcher = launch("--nproc", "2", "--grace", "5", WORKER, "wait")
    try:
        pids = [int(rest[0]) for rest in worker_lines(launcher, "READY", 2).values()]
        launcher.proc.send_signal(signal.SIGINT)
        assert launcher.proc.wait(30) == 128 + signal.SIGINT
    finally:
        launcher.kill()
    assert not [pid for pid in pids if psutil.pid_exists(pid)]


def test_the_first_failing_workers_code_is_the_launchers():
    launcher = launch("--nproc", "2", WORKER, "fail")
    try:
        assert launcher.expect("hiveengine launch: worker 1 exited with code").startswith("3")
        assert launcher.proc.wait(60) == 3
    finally:
        launcher.kill()


def test_launch_env_round_trips_through_the_environment():
    env = LaunchEnv(["ucx://127.0.0.1:1/abc"], "run-x", 2, 4, "/tmp/key", True)
    assert LaunchEnv.from_environ(env.to_environ()) == env
    assert LaunchEnv.from_environ({}).run_id == LaunchEnv().run_id
    assert env.to_environ()[RUN_ID_ENV] == "run-x"


def test_status_shows_the_swarms_progress():
    dht = DHT()
    try:
        tracker = ProgressTracker(dht, "status-run")
        dht.peer.runtime.run(tracker.report(epoch=4, samples=96, loss=1.25, target=256), 30)
        status = PeerProcess(
            "hiveengine.cli", "status", "--once", "--initial-peers", str(dht.address), "--run-id", "status-run"
        )
        try:
            summary = status.expect("")
            assert "epoch 4, 1 peer(s)" in summary and "96/256 samples" in summary
            row = status.expect(str(dht.peer_id)[:12]).split()  # base32, as in addresses
            assert row[:2] == ["4", "96"] and row[3] == "1.2500"
            assert status.proc.wait(30) == 0, status.tail()
        finally:
            status.kill()
    finally:
        dht.shutdown()
