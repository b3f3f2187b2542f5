"""MkDocs hook: publish the benchmark charts that bench/ and tools/ write to bench/results/ (one copy, no
duplicate PNGs under docs/), as benchmarks/results/NAME.png."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def on_files(files, config):
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"benchmarks/results/{png.name}", abs_src_path=str(png)))
    return files


README = RESULTS.parent.parent / "README.md"
TABLE_MARK = "<!-- readme-table: "


def readme_table(header: str) -> str:
    """The table of README.md whose header row is `header` (README stays the one copy of it)."""
    lines = README.read_text().splitlines()
    start = lines.index(header)  # a ValueError fails the build when README's table is renamed
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[start:end])


def on_page_markdown(markdown, page, config, files):
    out = []
    for line in markdown.splitlines():
        if line.startswith(TABLE_MARK) and line.endswith(" -->"):
            out.append(readme_table(line[len(TABLE_MARK) : -len(" -->")]))
        else:
            out.append(line)
    return "\n".join(out)
