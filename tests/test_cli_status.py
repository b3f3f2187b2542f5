"""`hiveengine status` with a run id nobody reports under, and `hiveengine dht` counting only live peers."""

from __future__ import annotations

import re
import signal
import time

import pytest

from hiveengine.cli.dht import READY_PREFIX, STATUS_PREFIX
from hiveengine.dht import DHT
from hiveengine.optim import ProgressTracker
from tests.test_cli_support import CLIProcess, run_cli

pytestmark = pytest.mark.timeout(150)


def test_status_of_a_run_id_nobody_reports_under_says_so_and_exits_1():
    dht = DHT()
    try:
        tracker = ProgressTracker(dht, "real-run")
        dht.peer.runtime.run(tracker.report(epoch=1, samples=8, loss=2.0, target=64), 30)
        wrong = run_cli("status", "--once", "--initial-peers", str(dht.address), "--run-id", "wrong-run")
        right = run_cli("status", "--once", "--initial-peers", str(dht.address), "--run-id", "real-run")
    finally:
        dht.shutdown()
    assert wrong.returncode == 1 and wrong.stdout == ""  # no empty table
    assert "no peer reports progress under run id 'wrong-run'" in wrong.stderr and "--run-id" in wrong.stderr
    assert right.returncode == 0, right.stderr
    rows = [line for line in right.stdout.splitlines() if line.startswith(str(dht.peer_id)[:12])]
    assert len(rows) == 1  # the peer id in base32, as addresses write it (it was hex)


def status_counts(proc: CLIProcess, timeout: float = 60):
    """(peers known, line) of each status line the dht command prints from now on, for at most `timeout` s."""
    deadline = time.monotonic() + timeout
    n = sum(STATUS_PREFIX in line for line in proc.lines)  # the lines already read are not "from now on"
    while time.monotonic() < deadline:
        n += 1
        line = proc.expect(STATUS_PREFIX, n, timeout=deadline - time.monotonic())[-1]
        yield int(re.match(rf"{STATUS_PREFIX} (\d+) peers known", line).group(1)), line
    raise AssertionError(f"no expected status line within {timeout} s")


def test_dht_status_stops_counting_a_peer_that_died():
    bootstrap = CLIProcess("dht", "--status-interval", "0.5")
    other = None
    try:
        address = bootstrap.expect(READY_PREFIX)[0][len(READY_PREFIX) :].strip()
        other = CLIProcess("dht", "--initial-peers", address, "--status-interval", "0")
        other.expect(READY_PREFIX)
        next(c for c, _ in status_counts(bootstrap) if c == 1)
        other.proc.send_signal(signal.SIGKILL)
        other.wait(30)
        # It used to count the dead node forever; now a status line pings the quiet nodes and drops the dead one.
        line = next(line for c, line in status_counts(bootstrap) if c == 0)
        assert "(1 stopped answering and were dropped)" in line
        bootstrap.proc.send_signal(signal.SIGINT)
        assert bootstrap.wait(30) == 0
    finally:
        if other is not None:
            other.kill()
        bootstrap.kill()
