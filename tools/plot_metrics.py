"""Draw training metrics (JSON lines from bench/train.py) as a PNG: loss and throughput against samples.

Usage: python tools/plot_metrics.py OUT.png METRICS.jsonl [METRICS.jsonl ...]. Needs matplotlib
(`pip install -e ".[plot]"`). Each file is one curve, labelled by its name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SMOOTHING = 0.05  # weight of the newest loss in the plotted moving average


def read_rows(path: Path) -> list[dict]:
    """The per-step rows of a metrics file (summary rows without a loss are skipped)."""
    rows = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row and "samples" in row and "t" in row:
            rows.append(row)
    return rows


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    out, current = [], None
    for v in values:
        current = v if current is None else current + weight * (v - current)
        out.append(current)
    return out


def plot(out: Path, files: list[Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (loss_ax, speed_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for path in files:
        rows = read_rows(path)
        if not rows:
            continue
        label = path.stem
        samples = [r["samples"] for r in rows]
        loss_ax.plot(samples, smooth([r["loss"] for r in rows]), label=label)
        speed_ax.plot([r["t"] for r in rows], samples, label=label)
    loss_ax.set(xlabel="samples (whole swarm)", ylabel="training loss (smoothed)", title="loss")
    speed_ax.set(xlabel="seconds", ylabel="samples (whole swarm)", title="throughput")
    for ax in (loss_ax, speed_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("metrics", type=Path, nargs="+", help="JSON-lines metrics files")
    args = parser.parse_args(argv)
    plot(args.out, args.metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
