"""Draw the all-reduce charts of the docs' Benchmarks page from the committed results in bench/results/.

    python docs/plot_benchmarks.py      # writes docs/benchmarks/allreduce-*.png (needs matplotlib)

Run it after `hiveengine bench allreduce --save-results` changed the JSON files. (The training chart,
bench/results/train.png, is drawn by tools/plot_metrics.py when `bench/train.py --plot` runs, and published as is.)
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS, OUT = ROOT / "bench" / "results", ROOT / "docs" / "benchmarks"
CHARTS = {
    "allreduce-vs-hivemind": "All-reduce on one host (loopback): hiveengine vs gloo and hivemind 1.1.12",
    "allreduce-1gbit": "All-reduce over shaped 1 Gbit/s links: hiveengine's codecs vs gloo",
}


def draw(name: str, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    records = [r for r in json.loads((RESULTS / f"{name}.json").read_text())["records"] if "seconds" in r]
    cases = sorted({(r["peers"], r["mbytes"]) for r in records})
    systems = list(dict.fromkeys(r["system"] for r in records))
    seconds = {(r["peers"], r["mbytes"], r["system"]): r["seconds"] for r in records}
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        xs = [c + (i - (len(systems) - 1) / 2) * width for c in range(len(cases))]
        ys = [seconds.get((*case, system), float("nan")) for case in cases]
        ax.bar(xs, ys, width, label=system)
    ax.set_xticks(range(len(cases)), [f"{p} peers, {mb} MB" for p, mb in cases])
    ax.set(ylabel="seconds per all-reduce (lower is better)", title=title)
    ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(systems))
    fig.tight_layout()
    path = OUT / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, title in CHARTS.items():
        print(draw(name, title))


if __name__ == "__main__":
    main()
