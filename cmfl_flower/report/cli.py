"""``cmfl-report RUN_DIR [RUN_DIR ...] [--out DIR]``: compare finished (or running) runs."""

from __future__ import annotations

import argparse
import html
from collections.abc import Iterable, Sequence
from pathlib import Path

from cmfl_flower.aliases import Row
from cmfl_flower.report.charts import accuracy_figure, data_uri, png_bytes
from cmfl_flower.report.page import STYLE, cell, html_table
from cmfl_flower.report.run import RECOGNISED, RunView, load_run

# ----- cmfl-report ------------------------------------------------------------------------
COMPARE_COLUMNS = (
    "run",
    "method",
    "status",
    "rounds",
    "global-acc-mean",
    "global-acc-min",
    "global-acc-max",
    "local-acc-mean",
    f"{RECOGNISED}-mean",
    "bytes-sent",
    "bytes-received",
    "round-seconds",
)


def comparison_rows(runs: Iterable[RunView]) -> list[Row]:
    """One row of headline figures per run."""
    return [{"run": run.name, "method": run.method} | run.final() for run in runs]


def comparison_table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table (the columns of :data:`COMPARE_COLUMNS`)."""
    lines = ["| " + " | ".join(COMPARE_COLUMNS) + " |", "|" + " --- |" * len(COMPARE_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(c, ""), c) for c in COMPARE_COLUMNS) + " |")
    return "\n".join(lines)


def write_comparison(runs: Sequence[RunView], out: Path) -> tuple[Path, Path]:
    """``compare.png`` (overlaid accuracy curves) and ``compare.html`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    png = png_bytes(accuracy_figure(runs))
    (out / "compare.png").write_bytes(png)
    rows = comparison_rows(runs)
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>cmfl-report</title>'
        f"<style>{STYLE}</style></head><body><h1>Runs compared</h1>"
        f"{html_table(rows, COMPARE_COLUMNS)}"
        f'<img alt="accuracy per round" src="{data_uri(png)}">'
        "<ul>"
        + "".join(
            f"<li>{html.escape(r.name)}: <code>{html.escape(str(r.run_dir))}</code></li>"
            for r in runs
        )
        + "</ul></body></html>"
    )
    (out / "compare.html").write_text(page)
    return out / "compare.html", out / "compare.png"


def main(argv: list[str] | None = None) -> None:
    """``cmfl-report``: print a comparison table; with ``--out``, also the overlaid curves."""
    parser = argparse.ArgumentParser(
        prog="cmfl-report", description="Compare cmfl-flower runs side by side."
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, default=None, help="write compare.html/.png here")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(path) for path in args.runs]
    except ValueError as err:
        parser.error(str(err))
    print(comparison_table(comparison_rows(runs)))
    if args.out is not None:
        page, png = write_comparison(runs, args.out)
        print(f"wrote {page.resolve()} and {png.resolve()}")


if __name__ == "__main__":
    main()
