"""Every example in examples/ runs as its README says, at a tiny scale, with real processes under
`hiveengine launch` (and `hiveengine serve`), and its held-out loss falls."""

from __future__ import annotations

import queue
import re
import signal
import time
from pathlib import Path

import pytest

from hiveengine.cli.launch import BOOTSTRAP_PREFIX
from hiveengine.cli.serve import DHT_PREFIX
from tests.procs import PeerProcess

pytestmark = pytest.mark.timeout(240)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DONE = re.compile(r"^\[worker (\d+)\] done.*held-out loss ([\d.]+) -> ([\d.]+)")
RUN_SECONDS = 150


def cli(*args: str) -> PeerProcess:
    return PeerProcess("hiveengine.cli", *args)


def launch(example: str, *args: str, nproc: int = 2, launch_args: tuple[str, ...] = ()) -> PeerProcess:
    script = str(EXAMPLES / example / "train.py")
    return cli("launch", "--nproc", str(nproc), *launch_args, script, *args)


def results(launcher: PeerProcess, workers: int, timeout: float = RUN_SECONDS) -> dict[int, tuple]:
    """{worker: (held-out loss at start, at end)} from each worker's `done` line; the launcher must exit 0."""
    found, deadline = {}, time.monotonic() + timeout
    while len(found) < workers:
        try:
            line = launcher.lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail("no result in time:\n" + launcher.tail())
        if line is None:
            pytest.fail(f"the launcher exited ({launcher.proc.wait()}) early:\n" + launcher.tail())
        if match := DONE.match(line):
            found[int(match[1])] = (float(match[2]), float(match[3]))
    assert launcher.proc.wait(60) == 0, launcher.tail()
    return found


def assert_learned(found: dict[int, tuple], identical: bool) -> None:
    for start, end in found.values():
        assert end < 0.9 * start, found
    if identical:  # sync training: every peer ends with the same model, so the same held-out loss
        assert len({end for _, end in found.values()}) == 1, found


def test_collaborative_lm():
    tiny = ["--dim", "32", "--layers", "1", "--heads", "2", "--seq", "32", "--batch", "8"]
    tiny += ["--target-batch-size", "32", "--epochs", "15", "--corpus-mib", "0.5"]
    launcher = launch("collaborative_lm", *tiny)
    try:
        assert_learned(results(launcher, 2), identical=True)
    finally:
        launcher.kill()


def test_vision_on_a_bundled_data_set():
    pytest.importorskip("sklearn", reason="the vision example needs scikit-learn (the dev extra installs it)")
    tiny = ["--width", "8", "--batch", "16", "--target-batch-size", "64", "--epochs", "20"]
    launcher = launch("vision", *tiny)
    try:
        assert_learned(results(launcher, 2), identical=True)
    finally:
        launcher.kill()


def test_remote_mixture_of_experts_served_by_hiveengine_serve():
    pattern = ["--expert-cls", "ffn", "--expert-pattern", "ffn.[0:2].[0:2]", "--hidden-dim", "32"]
    server = cli("serve", *pattern, "--device", "cpu", "--stats-interval", "0")
    try:
        address = server.expect(DHT_PREFIX)
        tiny = ["--grid", "2", "2", "--hidden-dim", "32", "--k-best", "2", "--steps", "60", "--batch", "32"]
        launcher = launch("moe", *tiny, nproc=1, launch_args=("--initial-peers", address))
        try:
            assert_learned(results(launcher, 1), identical=False)
        finally:
            launcher.kill()
        server.proc.send_signal(signal.SIGINT)  # Ctrl-C: the server withdraws its experts and exits 0
        assert server.proc.wait(30) == 0, server.tail()
    finally:
        server.kill()


def test_diloco_across_two_sites():
    tiny = ["--wait-for-peers", "2", "--inner-steps", "10", "--outer-steps", "4", "--hidden", "64"]
    tiny += ["--corpus-mib", "0.5"]
    site_a = launch("diloco_two_sites", *tiny, nproc=1)
    try:
        address = site_a.expect(BOOTSTRAP_PREFIX)
        site_b = launch("diloco_two_sites", *tiny, nproc=1, launch_args=("--initial-peers", address))
        try:
            found_b = results(site_b, 1)
        finally:
            site_b.kill()
        found_a = results(site_a, 1)
    finally:
        site_a.kill()
    assert_learned({0: found_a[0], 1: found_b[0]}, identical=False)
    assert found_a[0][1] == found_b[0][1]  # after the last outer step both sites hold the same model
