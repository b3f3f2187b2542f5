"""`hiveengine launch` as users run it: the README's forms, failures, signals, logs and usage mistakes, with real
launcher and worker processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from hiveengine.cli.launch import DEFAULT_GRACE, shared_host_defaults
from hiveengine.dht import DHT, get_dht_time
from hiveengine.transport.reactor import SPIN_ENV
from tests.test_cli_support import REPO, WORKER, CLIProcess, alive, noise, run_cli, started_pids

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def swarm():
    """Two DHT nodes of an existing swarm holding one key: (addresses, key, value)."""
    first = DHT()
    second = DHT(initial_peers=[first.address])
    key, value = f"launch-join-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    assert first.store(key, value, get_dht_time() + 600, timeout=30)
    yield [str(first.address), str(second.address)], key, value
    second.shutdown()
    first.shutdown()


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_joining_another_swarm_with_initial_peers_before_the_script(swarm):
    """README: `hiveengine launch --initial-peers ADDR train.py` on another machine (the option took the script
    as a second address and the launch failed with 'give a training script')."""
    addresses, key, value = swarm
    out = run_cli("launch", "--nproc", "1", "--initial-peers", ",".join(addresses), WORKER, "join", key, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"JOINED {value}" in out.stdout
    assert "swarm bootstrap" not in out.stdout  # it joined, it did not start a new swarm
    assert not noise(out.stdout + out.stderr)


def test_module_form_passes_every_later_argument_to_the_module(swarm):
    """`launch -m module --opt` (an option right after the module went to the launcher, which rejected it)."""
    addresses, key, value = swarm
    out = run_cli(
        "launch", "--initial-peers", addresses[0], "--initial-peers", addresses[1], "-m", "tests.peers.launch_worker",
        "--join", key, "--nproc", "7", timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "[worker 0] RANK 0 1" in out.stdout and out.stdout.count("RANK") == 1  # --nproc 7 was the module's
    assert "RANK 0 1 " in out.stdout and f"{key} --nproc 7" in out.stdout
    assert f"JOINED {value}" in out.stdout


def test_shared_host_defaults_split_the_cores_and_stop_spinning_only_when_oversubscribed():
    assert shared_host_defaults(1, {}, cores=8) == {}
    assert shared_host_defaults(3, {}, cores=8) == {"OMP_NUM_THREADS": "2"}
    assert shared_host_defaults(3, {}, cores=2) == {"OMP_NUM_THREADS": "1", SPIN_ENV: "0"}
    assert shared_host_defaults(3, {"OMP_NUM_THREADS": "2", SPIN_ENV: "50"}, cores=2) == {}  # the user's win


@pytest.mark.parametrize("user", [{}, {"OMP_NUM_THREADS": "2", SPIN_ENV: "50"}], ids=["defaults", "user-set"])
def test_workers_on_one_host_get_their_share_of_the_cores_unless_the_user_says(user):
    """Three workers: each sees an equal share of the cores (and no UCX spinning if they outnumber the cores),
    which the launcher says in one line; what the user exported wins."""
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", SPIN_ENV)} | user
    out = subprocess.run(
        [sys.executable, "-m", "hiveengine.cli", "launch", "--nproc", "3", WORKER, "env"],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, env=environ,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    expected = {**shared_host_defaults(3, {}), **user}
    seen = f"ENV {expected['OMP_NUM_THREADS']} {expected.get(SPIN_ENV, '-')}"
    assert out.stdout.count(seen) == 3, out.stdout[-2000:]
    assert ("workers share" in out.stdout) == (not user), out.stdout[-2000:]


def test_a_failing_worker_stops_the_others_and_its_code_is_the_launchers():
    """Worker 1 exits 3 while worker 0 would block forever: the launcher stops worker 0 within seconds (it
    used to wait for it) and exits 3."""
    launcher = CLIProcess("launch", "--nproc", "2", WORKER, "fail-fast")
    pids = []
    try:
        pids = started_pids(launcher, 2)
        launcher.expect("worker 1 exited with code 3")
        start = time.monotonic()
        assert launcher.wait(DEFAULT_GRACE) == 3
        assert time.monotonic() - start < DEFAULT_GRACE / 2  # SIGTERM ended it; no waiting out the grace period
        assert not [pid for pid in pids if alive(pid)]
        assert "stopping the other 1 worker(s)" in "\n".join(launcher.read_all(30))
    finally:
        launcher.kill()
        kill_all(pids)


def test_workers_that_ignore_sigterm_are_killed_after_the_grace_period():
    launcher = CLIProcess("launch", "--nproc", "2", "--grace", "1", WORKER, "stubborn")
    pids = []
    try:
        pids = started_pids(launcher, 2)
        launcher.expect("READY", 2)
        launcher.proc.send_signal(signal.SIGTERM)
        assert launcher.wait(30) == 128 + signal.SIGTERM
        assert "still running 1 s after being signalled; killing them" in "\n".join(launcher.read_all(30))
        assert not [pid for pid in pids if alive(pid)]
    finally:
        launcher.kill()
        kill_all(pids)


def test_log_level_reaches_the_workers_and_log_dir_keeps_their_output(tmp_path):
    out = run_cli("launch", "--log-level", "info", "--log-dir", str(tmp_path / "logs"), WORKER, "exit", "x")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    engine_line = "INFO hiveengine.engine.engine: worker 0/1 of run"
    assert any(line.startswith("[worker 0] ") and engine_line in line for line in out.stdout.splitlines())
    log = (tmp_path / "logs" / "worker-0.log").read_text()
    assert engine_line in log and "RANK 0 1 " in log and "[worker" not in log  # unprefixed


def test_ctrl_c_is_quiet_and_exits_130():
    """Workers catch the KeyboardInterrupt (the user's choice) and leave the rest to hiveengine: nothing may
    print a traceback or a destroyed task, and the launcher exits 130."""
    launcher = CLIProcess("launch", "--nproc", "2", WORKER, "quiet-wait")
    pids = []
    try:
        pids = started_pids(launcher, 2)
        launcher.expect("READY", 2)
        launcher.proc.send_signal(signal.SIGINT)
        assert launcher.wait(60) == 130
        lines = launcher.read_all(30)
        assert len([line for line in lines if line.endswith("INTERRUPTED")]) == 2
        assert not noise("\n".join(lines) + launcher.stderr_text())
        assert not [pid for pid in pids if alive(pid)]
    finally:
        launcher.kill()
        kill_all(pids)


def test_ctrl_c_exits_130_when_its_output_pipe_is_gone(tmp_path):
    """`hiveengine launch ... | tee log` and Ctrl-C: tee dies first, so the launcher's next write fails. It
    exited 1 with a BrokenPipeError traceback; it must still stop its workers quietly and exit 130."""
    launcher = CLIProcess("launch", "--nproc", "2", "--log-dir", str(tmp_path), WORKER, "quiet-wait")
    pids = []
    try:
        pids = started_pids(launcher, 2)
        launcher.expect("READY", 2)
        launcher.close_stdout()
        launcher.proc.send_signal(signal.SIGINT)
        assert launcher.wait(60) == 130
        assert not noise(launcher.stderr_text()), launcher.stderr_text()
        for rank in range(2):  # the workers' own output, kept by --log-dir: they exited quietly too
            log = (tmp_path / f"worker-{rank}.log").read_text()
            assert log.rstrip().endswith("INTERRUPTED") and not noise(log), log
        assert not [pid for pid in pids if alive(pid)]
    finally:
        launcher.kill()
        kill_all(pids)


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing-script.py"], "script 'missing-script.py' not found"),
        (["--initial-peers", "not-an-address", WORKER, "exit"], "'not-an-address' is not a peer address"),
        (["--initial-peers", "ucx://127.0.0.1:1/short", WORKER, "exit"], "'short' is not a peer id"),
        (["-m", "no_such_module_here"], "no module named 'no_such_module_here'"),
    ],
)
def test_usage_mistakes_are_one_line_and_exit_2_before_any_worker_starts(args, message):
    out = run_cli("launch", *args)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line, no traceback
    assert out.stderr.startswith("hiveengine launch: error: ") and message in out.stderr
    assert "started worker" not in out.stdout and "bootstrap" not in out.stdout
