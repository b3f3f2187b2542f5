"""Developer tools: the metrics plot."""

import json

import pytest

from tools.plot_metrics import main, read_rows, smooth


def test_metrics_rows_skip_summaries_and_smoothing_follows_the_data(tmp_path):
    path = tmp_path / "run.jsonl"
    rows = [{"t": i * 0.1, "samples": 16 * (i + 1), "loss": 5.0 - i * 0.1} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in [*rows, {"eval_loss": 3.0}]) + "\n")
    assert read_rows(path) == rows
    smoothed = smooth([r["loss"] for r in rows])
    assert smoothed[0] == rows[0]["loss"] and rows[-1]["loss"] < smoothed[-1] < rows[0]["loss"]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "run.jsonl"
    path.write_text("\n".join(json.dumps({"t": i, "samples": i * 8, "loss": 4.0 / (i + 1)}) for i in range(10)))
    out = tmp_path / "chart.png"
    assert main([str(out), str(path)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
